"""Pixel path as MONAI dictionary transforms: decoded DICOM -> float32 tensor ``[1, S, S]`` in [0, 1].

Order (each step a :class:`monai.transforms.MapTransform`, composed with :class:`monai.transforms.Compose`):

1. :class:`DecodeFramed`      - pydicom pixel-data plugins decode ONE frame. Multi-frame policy for the 2D task:
                                the middle frame (``n // 2``); YBR is converted to RGB by pydicom; PALETTE COLOR is
                                expanded through its colour LUT.
2. :class:`ModalityLUTd`      - greyscale only: Modality LUT or RescaleSlope/Intercept (``apply_modality_lut``),
                                also from enhanced multi-frame functional groups of the chosen frame.
3. :class:`VOILUTd`           - greyscale only: VOI LUT or the first window centre/width (``apply_voi_lut``);
                                untouched when the file has neither.
4. :class:`InvertMonochrome1d` - MONOCHROME1 (white = low values, e.g. many CR films) is inverted so that bright
                                always means dense, as in MONOCHROME2.
5. :class:`ToLuminanced`      - colour (ultrasound, secondary capture) becomes one luminance channel
                                (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B); output is channel-first ``[1, H, W]``,
                                non-finite values set to 0.
6. ``ScaleIntensityd`` (min-max to [0, 1] per image; a constant image becomes all zeros), then
   :class:`FitToSquared`: MONAI ``Resize`` (longest side = S, area interpolation: keeps the aspect ratio and
   averages when downsampling) and ``SpatialPad`` (centred zero padding to S x S), then ``EnsureTyped`` (plain
   float32 torch tensor, no MetaTensor).

:func:`preprocess_key` hashes everything that determines the output (parameters, this file's source, library
versions) so that any change invalidates the on-disk cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Hashable, Iterator, Mapping

import monai
import numpy as np
import pydicom
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import Compose, EnsureTyped, MapTransform, Resize, ScaleIntensityd, SpatialPad
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

#: Bump by hand for a semantic change outside this file (the source hash covers edits inside it).
PREPROCESS_VERSION = 1
IMAGE = "image"
DS = "ds"
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def _frames(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def _frame_group(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """Item of an enhanced multi-frame functional-group ``sequence`` for ``frame`` (per-frame, else shared)."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > i:
            inner = seq[i].get(sequence)
            if inner is not None and len(inner) > 0:
                return inner[0]
    return None


class DecodeFramed(MapTransform):
    """Decode the pixel data of ``d["ds"]`` into ``d["image"]`` (one frame; see the module docstring)."""

    def __init__(self, keys: Any = IMAGE, ds_key: str = DS) -> None:
        super().__init__(keys)
        self.ds_key = ds_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ds: Dataset = d[self.ds_key]
        n = _frames(ds)
        frame = n // 2 if n > 1 else 0
        arr = pixel_array(ds, index=frame if n > 1 else None)
        if n > 1 and arr.ndim == (4 if int(ds.get("SamplesPerPixel", 1)) > 1 else 3):
            arr = arr[frame]  # a plugin that ignored ``index``
        if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
        rows, cols = int(ds.Rows), int(ds.Columns)
        if arr.shape[:2] != (rows, cols):
            raise ValueError(f"decoded frame shape {arr.shape} does not match Rows x Columns {rows}x{cols}")
        d["frame"] = frame
        for key in self.keys:  # created here, so not ``key_iterator`` (which requires them to exist)
            d[key] = arr
        return d


def _is_grey(d: Mapping[Hashable, Any], key: Hashable) -> bool:
    return d[key].ndim == 2


class ModalityLUTd(MapTransform):
    """Modality LUT / rescale to physical units (e.g. Hounsfield units for CT); greyscale images only."""

    def __init__(self, keys: Any = IMAGE, ds_key: str = DS) -> None:
        super().__init__(keys)
        self.ds_key = ds_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ds: Dataset = d[self.ds_key]
        for key in self.key_iterator(d):
            if not _is_grey(d, key):
                continue
            if "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds:
                d[key] = apply_modality_lut(d[key], ds)
            else:
                item = _frame_group(ds, d.get("frame", 0), "PixelValueTransformationSequence")
                if item is not None and ("RescaleSlope" in item or "RescaleIntercept" in item):
                    slope = float(item.get("RescaleSlope", 1.0) or 1.0)
                    intercept = float(item.get("RescaleIntercept", 0.0) or 0.0)
                    d[key] = d[key].astype(np.float64) * slope + intercept
        return d


class VOILUTd(MapTransform):
    """VOI LUT or the first window centre/width; greyscale only; a no-op for files that define neither."""

    def __init__(self, keys: Any = IMAGE, ds_key: str = DS) -> None:
        super().__init__(keys)
        self.ds_key = ds_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ds: Dataset = d[self.ds_key]
        for key in self.key_iterator(d):
            if not _is_grey(d, key):
                continue
            if "VOILUTSequence" in ds or "WindowCenter" in ds:
                d[key] = apply_voi_lut(d[key], ds, index=0)
                continue
            item = _frame_group(ds, d.get("frame", 0), "FrameVOILUTSequence")
            if item is not None and "WindowCenter" in item and "WindowWidth" in item:
                view = Dataset()
                view.PhotometricInterpretation = ds.PhotometricInterpretation
                view.BitsStored = ds.get("BitsStored", ds.get("BitsAllocated", 16))
                view.PixelRepresentation = ds.get("PixelRepresentation", 0)
                view.WindowCenter, view.WindowWidth = item.WindowCenter, item.WindowWidth
                if "VOILUTFunction" in item:
                    view.VOILUTFunction = item.VOILUTFunction
                d[key] = apply_voi_lut(d[key], view, index=0)
        return d


class InvertMonochrome1d(MapTransform):
    """MONOCHROME1 -> MONOCHROME2 convention by reflecting values within their own range."""

    def __init__(self, keys: Any = IMAGE, ds_key: str = DS) -> None:
        super().__init__(keys)
        self.ds_key = ds_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if str(d[self.ds_key].get("PhotometricInterpretation", "")).upper() != "MONOCHROME1":
            return d
        for key in self.key_iterator(d):
            a = d[key].astype(np.float64, copy=False)
            d[key] = a.max() + a.min() - a
        return d


class ToLuminanced(MapTransform):
    """Channel-first single-channel float32: greyscale as is, colour as BT.601 luminance; NaN/inf -> 0."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            a = np.asarray(d[key])
            if a.ndim == 3:
                a = a.astype(np.float64, copy=False) @ LUMA
            a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
            d[key] = a[None]
        return d


class FitToSquared(MapTransform):
    """MONAI ``Resize`` (longest side = S, area interpolation) then ``SpatialPad`` to S x S.

    Padding (applied after intensity scaling, so it is black) keeps the aspect ratio of non-square images instead of
    stretching them. Skipped when the image already is S x S (most small-image sites), which saves two tensor copies.
    """

    def __init__(self, keys: Any, image_size: int) -> None:
        super().__init__(keys)
        self.size = image_size
        self.resize = Resize(spatial_size=image_size, size_mode="longest", mode="area")
        self.pad = SpatialPad(spatial_size=(image_size, image_size), mode="constant")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if tuple(d[key].shape[1:]) != (self.size, self.size):
                d[key] = self.pad(self.resize(d[key]))
        return d


def build_preprocess(image_size: int) -> Compose:
    """The full pixel pipeline for the 2D classification task (input: ``{"ds": header+pixel Dataset}``)."""
    return Compose(
        [
            DecodeFramed(IMAGE),
            ModalityLUTd(IMAGE),
            VOILUTd(IMAGE),
            InvertMonochrome1d(IMAGE),
            ToLuminanced(IMAGE),
            ScaleIntensityd(IMAGE, minv=0.0, maxv=1.0),
            FitToSquared(IMAGE, image_size),
            EnsureTyped(IMAGE, data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


@contextlib.contextmanager
def plain_tensors() -> Iterator[None]:
    """Turn MONAI's MetaTensor tracking off while preprocessing (halves the per-image cost; we keep no metadata)."""
    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)


def preprocess(ds: Dataset, pipeline: Compose, image_size: int) -> torch.Tensor:
    """Run ``pipeline`` on one dataset and check the result (shape ``[1, S, S]``, finite)."""
    out = pipeline({DS: ds})[IMAGE]
    t = torch.as_tensor(out, dtype=torch.float32).contiguous()
    if tuple(t.shape) != (1, image_size, image_size):
        raise ValueError(f"preprocessed shape {tuple(t.shape)} != (1, {image_size}, {image_size})")
    if not torch.isfinite(t).all():
        raise ValueError("preprocessed image has non-finite values")
    return t


def _plugin_versions() -> dict[str, str | None]:
    """Installed pixel-data plugins: a new or upgraded decoder can turn a cached DECODE_ERROR into an image."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "python-gdcm", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def preprocess_key(image_size: int, task: str) -> str:
    """Hex digest of everything that determines preprocessed tensors (cache key)."""
    spec = {
        "version": PREPROCESS_VERSION,
        "task": task,
        "image_size": image_size,
        "pipeline": repr(
            [
                "DecodeFramed(middle-frame)",
                "ModalityLUTd",
                "VOILUTd(index=0)",
                "InvertMonochrome1d",
                "ToLuminanced(bt601)",
                "ScaleIntensityd(0,1)",
                f"FitToSquared(Resize({image_size},longest,area),SpatialPad(constant 0))",
                "EnsureTyped(float32)",
            ]
        ),
        # the pixel path spans this file and the pixel-tail parsing in index.py
        "code": hashlib.sha256(b"".join(Path(__file__).with_name(n).read_bytes()
                                        for n in ("transforms.py", "index.py"))).hexdigest(),
        "plugins": _plugin_versions(),
        "libs": {"pydicom": pydicom.__version__, "monai": monai.__version__, "numpy": np.__version__,
                 "torch": torch.__version__},
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
