"""The volume data kind of a site (``[data] kind = "volumes"``): DICOM series assembled by geometry, DICOM SEG or
NIfTI masks, MONAI preprocessing to the task's grid, cached; see :func:`build_volume_dataset`."""

from client.volumes.dataset import build_volume_dataset

__all__ = ["build_volume_dataset"]
