"""Planning: dataset fingerprints and suggested settings (nnU-Net style), one module per data kind."""
