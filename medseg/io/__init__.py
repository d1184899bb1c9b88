"""Image I/O: NIfTI, DICOM series, DICOM-SEG, dataset manifests."""
