"""Data access: reading images (DICOM, PNG/JPEG/TIFF, NPY), manifests and their
validation, the phantom generators, DICOM folder and DICOMweb ingest, the
public-data-set converters and keyed patient-id hashing. Nothing here imports torch.
"""
