"""medseg: medical 3D (and 2D) segmentation with MONAI, tracked in MLflow."""

__version__ = "0.1.0"
