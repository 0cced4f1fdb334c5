"""On-site caches: header facts and preprocessed tensors, so round 2 decodes no DICOM at all.

Design (why not one ``.pt`` per image as in ``monai.data.PersistentDataset``): sites hold thousands of small
images; one file per image costs a ``torch.load``/``open`` per image on every pass and litters the disk. The
training side needs all images in memory anyway (``SplitTensors``), so each site keeps ONE consolidated tensor file
per preprocessing key: ``tensors-<key>.pt`` = ``{"keys": [file keys], "images": float32 [N, 1, S, S],
"failed": {file key: [reason, detail]}}``. Loading it is one read.

* Preprocessing key (:func:`client.ingest.transforms.preprocess_key`): parameters, image size, the transforms'
  source hash and library versions. A different key is a different file, so a change can never serve stale tensors.
* File key: SHA-256 of (relative path, size, mtime in ns). Re-exported or edited files change size or mtime and are
  decoded again; hashing every file's content would cost a full read of the export on each pass.
* Decode failures are cached too (same keys), so a broken file is not re-decoded every round.
* Writes are atomic (temporary file + ``os.replace``); a corrupt or foreign cache file is ignored and rebuilt.

The header index (``index-v<N>-<secret fingerprint>.json``) holds :class:`HeaderFacts` per file key. It contains
UIDs and pseudonyms, so the cache folder is created 0700 and, like the report, never leaves the site.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from client.ingest.index import INDEX_VERSION, HeaderFacts

log = logging.getLogger("atoll.ingest.cache")


def file_key(rel: str, st: os.stat_result) -> str:
    """Cache key of one file version: its relative path, size and modification time."""
    return hashlib.sha256(f"{rel}\x00{st.st_size}\x00{st.st_mtime_ns}".encode()).hexdigest()[:32]


def _ensure_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


def _atomic_write(path: Path, write: Any) -> None:
    _ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TensorCache:
    """Consolidated preprocessed-tensor cache of one site for one preprocessing key."""

    def __init__(self, cache_dir: Path, preprocess_key: str, image_size: int) -> None:
        self.path = cache_dir / f"tensors-{preprocess_key[:24]}.pt"
        self.key = preprocess_key
        self.image_size = image_size
        self.images: dict[str, torch.Tensor] = {}
        self.failed: dict[str, tuple[str, str]] = {}
        self.hits = 0
        self.misses = 0
        self._dirty = False
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
            if blob.get("key") != self.key:
                raise ValueError("preprocessing key mismatch")
            images = blob["images"]
            if images.dtype != torch.float32 or tuple(images.shape[1:]) != (1, self.image_size, self.image_size):
                raise ValueError("unexpected tensor shape")
            self.images = dict(zip(blob["keys"], images.unbind(0), strict=True))
            self.failed = {k: (v[0], v[1]) for k, v in blob["failed"].items()}
        except Exception as e:
            log.warning("ingest cache unreadable (%s); it will be rebuilt", type(e).__name__)
            self.images, self.failed = {}, {}

    def get(self, key: str) -> torch.Tensor | tuple[str, str] | None:
        """Cached tensor, cached failure ``(reason, detail)``, or None (miss)."""
        hit = self.images.get(key)
        if hit is None:
            hit = self.failed.get(key)  # type: ignore[assignment]
        if hit is None:
            self.misses += 1
        else:
            self.hits += 1
        return hit

    def put(self, key: str, value: torch.Tensor | tuple[str, str]) -> None:
        if isinstance(value, torch.Tensor):
            self.images[key] = value
        else:
            self.failed[key] = value
        self._dirty = True

    def save(self, keep: set[str]) -> None:
        """Write the cache (only entries in ``keep``: files that still exist) when anything changed."""
        stale = (set(self.images) | set(self.failed)) - keep
        if not self._dirty and not stale:
            return
        keys = sorted(k for k in self.images if k in keep)
        images = (torch.stack([self.images[k] for k in keys]) if keys
                  else torch.zeros((0, 1, self.image_size, self.image_size)))
        blob = {"key": self.key, "keys": keys, "images": images,
                "failed": {k: list(v) for k, v in self.failed.items() if k in keep}}
        _atomic_write(self.path, lambda f: torch.save(blob, f))
        self._dirty = False


class IndexCache:
    """Header facts per file key, valid for one index version and one pseudonym secret."""

    def __init__(self, cache_dir: Path, secret_fingerprint: str, task: str) -> None:
        self.path = cache_dir / f"index-v{INDEX_VERSION}-{task}-{secret_fingerprint}.json"
        self.entries: dict[str, dict[str, Any]] = {}
        self._dirty = False
        if self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text(encoding="utf-8"))["entries"]
            except Exception as e:
                log.warning("ingest index cache unreadable (%s); it will be rebuilt", type(e).__name__)

    def get(self, key: str) -> HeaderFacts | None:
        raw = self.entries.get(key)
        if raw is None:
            return None
        try:
            return HeaderFacts.from_json(raw)
        except Exception:
            return None

    def put(self, key: str, facts: HeaderFacts) -> None:
        self.entries[key] = facts.to_json()
        self._dirty = True

    def save(self, keep: set[str]) -> None:
        stale = set(self.entries) - keep
        if not self._dirty and not stale:
            return
        data = json.dumps({"entries": {k: v for k, v in self.entries.items() if k in keep}}).encode()
        _atomic_write(self.path, lambda f: f.write(data))
        self._dirty = False
