"""Hospital-site data room: DICOM indexing, quarantine, MONAI preprocessing with an on-disk cache, patient split.

Entry point: :func:`build_site_dataset` (see ``docs/site-data.md``).
"""

from client.ingest.dataset import NoUsableImagesError, SiteDataset, SplitTensors, build_site_dataset
from client.ingest.quarantine import Reason

__all__ = ["NoUsableImagesError", "Reason", "SiteDataset", "SplitTensors", "build_site_dataset"]
