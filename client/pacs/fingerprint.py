"""Dataset fingerprint: which instances a site trains on, as a keyed hash that reveals nothing across sites.

HMAC-SHA256 under the site's pseudonym secret (domain-separated from the patient pseudonyms) over the sorted,
de-duplicated SOP Instance UIDs of the images the site trains on (train and validation split: the images its
dataset holds after quarantine). The same images give the same fingerprint at every run of the site, whether they
come from a folder or a PACS mirror; one image added, removed or replaced changes it. Without the secret it
cannot be recomputed, so two sites holding the same public images do not show it, and a UID list cannot be
tested against it. Folder and PACS sites alike (it lives here because PACS sites are where datasets change
between runs).

Where it is exposed: :attr:`client.ingest.dataset.SiteDataset.sop_uids` (the UIDs) and
:attr:`client.runtime.SiteRuntime.dataset_fingerprint` (the hash).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

DOMAIN = b"atoll/dataset-fingerprint/v1\x00"
PREFIX = "hmac-sha256:"


def dataset_fingerprint(secret: bytes, sop_uids: Iterable[str]) -> str:
    """``hmac-sha256:<64 hex>`` of the sorted unique UIDs (``\\n``-joined) under ``secret``."""
    if not secret:
        raise ValueError("the dataset fingerprint needs the site's pseudonym secret")
    uids = sorted({u.strip() for u in sop_uids if u and u.strip()})
    mac = hmac.new(secret, DOMAIN, hashlib.sha256)
    mac.update("\n".join(uids).encode("ascii", errors="strict"))
    return PREFIX + mac.hexdigest()


def site_dataset_fingerprint(secret_file: Path, sop_uids: Iterable[str]) -> str:
    """:func:`dataset_fingerprint` with the secret read as :class:`client.ingest.pseudonyms.Pseudonymizer`
    reads it (the same checks: present, private, long enough)."""
    from client.site_config import check_secret_file

    check_secret_file(secret_file, where="[site].secret_file")
    return dataset_fingerprint(secret_file.read_bytes().strip(), sop_uids)
