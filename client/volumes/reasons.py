"""Series-level quarantine reason codes for the volume data kind.

A 2D site quarantines files (``client.ingest.quarantine.Reason``); a volume site quarantines whole *series*, because
one bad slice makes the whole volume wrong. File-level codes (NOT_DICOM, CORRUPT_HEADER, ...) are reused from the
2D path for files that cannot even be read; these are the codes of a series that was read but cannot be used.
Values are stable strings: they appear in the dataset card and the on-site report.
"""

from __future__ import annotations

from enum import Enum


class VolumeReason(str, Enum):
    INCONSISTENT_ORIENTATION = "INCONSISTENT_ORIENTATION"  # slices differ in ImageOrientationPatient, or drift off the normal
    INCONSISTENT_SHAPE = "INCONSISTENT_SHAPE"  # slices differ in Rows/Columns
    INCONSISTENT_SPACING = "INCONSISTENT_SPACING"  # slices differ in PixelSpacing
    SLICE_GAP = "SLICE_GAP"  # a step between slice positions differs from the series' step (missing slice)
    DUPLICATE_POSITION = "DUPLICATE_POSITION"  # two slices at the same position along the normal
    MIXED_SERIES = "MIXED_SERIES"  # one SeriesInstanceUID over several patients/studies/modalities or file kinds
    TOO_FEW_SLICES = "TOO_FEW_SLICES"  # fewer slices than a volume needs
    BAD_GEOMETRY = "BAD_GEOMETRY"  # position/orientation/spacing attributes missing or malformed
    MODALITY_NOT_ALLOWED = "MODALITY_NOT_ALLOWED"  # modality not in [data].modalities
    MISSING_PATIENT_ID = "MISSING_PATIENT_ID"  # no PatientID: patient-level privacy cannot be guaranteed
    NO_MASK = "NO_MASK"  # labels are configured but no mask (NIfTI row or DICOM SEG) references this series
    MASK_MISMATCH = "MASK_MISMATCH"  # the mask's grid (shape, spacing, orientation, origin) is not the image's
    BAD_MASK = "BAD_MASK"  # the mask cannot be read, or holds values that are not the site's labels
    DECODE_ERROR = "DECODE_ERROR"  # pixel data could not be decoded or preprocessed
