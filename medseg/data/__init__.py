"""Data: phantom generation, input validation, MONAI transform pipelines and loaders."""
