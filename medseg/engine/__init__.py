"""Training engine: device/AMP selection, checkpoints, distributed helpers and the trainer."""
