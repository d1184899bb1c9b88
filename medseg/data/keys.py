"""Dictionary keys of a case as it flows through the MONAI transforms."""

IMAGE, LABEL = "image", "label"
