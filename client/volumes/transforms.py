"""Pixel path of a volume: decoded series (modality LUT applied) -> MONAI dictionary transforms -> fixed-size tensors.

Order: ``Orientationd`` (to the task's axis codes, when it names them), ``Spacingd`` (to the task's spacing;
bilinear for the image, nearest for the label map so labels stay labels), ``NormalizeIntensityd`` (z-score per
volume: MR intensities have no absolute scale, so each hospital's scanner gain drops out), then
``ResizeWithPadOrCropd`` (centred crop or zero pad to the task's size). The image and its mask go through the same
spatial transforms in one ``Compose``, so they stay voxel-aligned.

:func:`volume_preprocess_key` hashes what determines the output, so a change never serves a stale cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import monai
import numpy as np
import pydicom
import torch

from contract.task import TaskSpec

IMAGE, LABEL = "image", "label"
VOLUME_PREPROCESS_VERSION = 1


def modality_lut(ds: Any, pixels: np.ndarray) -> np.ndarray:
    """Stored values -> modality values for every frame: the enhanced per-frame (or shared) Pixel Value
    Transformation when present, else the classic Modality LUT / RescaleSlope+Intercept (pydicom)."""
    from pydicom.pixels import apply_modality_lut

    per = ds.get("PerFrameFunctionalGroupsSequence")
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    if pixels.ndim == 3 and (per or shared is not None):
        out = np.empty(pixels.shape, dtype=np.float32)
        for i in range(pixels.shape[0]):
            slope, intercept = 1.0, 0.0
            for item in ((per[i] if per and i < len(per) else None), shared):
                if item is not None and "PixelValueTransformationSequence" in item:
                    t = item.PixelValueTransformationSequence[0]
                    slope, intercept = float(t.get("RescaleSlope", 1.0)), float(t.get("RescaleIntercept", 0.0))
                    break
            out[i] = pixels[i].astype(np.float32) * slope + intercept
        return out
    return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)


def build_volume_transform(task: TaskSpec) -> Any:
    from monai.transforms import (Compose, NormalizeIntensityd, Orientationd, ResizeWithPadOrCropd, Spacingd)

    steps: list[Any] = []
    if task.orientation:
        steps.append(Orientationd(keys=(IMAGE, LABEL), axcodes=task.orientation, allow_missing_keys=True,
                                  labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if task.spacing_mm:
        steps.append(Spacingd(keys=(IMAGE, LABEL), pixdim=task.spacing_mm, mode=("bilinear", "nearest"),
                              allow_missing_keys=True))
    steps.append(NormalizeIntensityd(keys=IMAGE))
    steps.append(ResizeWithPadOrCropd(keys=(IMAGE, LABEL), spatial_size=task.size, allow_missing_keys=True))
    return Compose(steps)


def preprocess_volume(volume: np.ndarray, affine_ras: np.ndarray, labels: np.ndarray | None, transform: Any
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(image float32 [1, D, H, W], label map int64 [D, H, W] or None) on the task's grid."""
    from monai.data import MetaTensor

    aff = torch.as_tensor(affine_ras, dtype=torch.float64)
    item: dict[str, Any] = {IMAGE: MetaTensor(torch.from_numpy(np.ascontiguousarray(volume[None], dtype=np.float32)),
                                              affine=aff)}
    if labels is not None:
        item[LABEL] = MetaTensor(torch.from_numpy(np.ascontiguousarray(labels[None], dtype=np.float32)), affine=aff)
    out = transform(item)
    image = torch.as_tensor(out[IMAGE]).as_subclass(torch.Tensor).float().contiguous()
    image = torch.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
    label = None
    if labels is not None:
        label = torch.as_tensor(out[LABEL]).as_subclass(torch.Tensor)[0].round().long().contiguous()
    return image, label


def volume_preprocess_key(task: TaskSpec) -> str:
    src = Path(__file__).read_bytes() + (Path(__file__).parent / "series.py").read_bytes() + \
        (Path(__file__).parent / "masks.py").read_bytes()
    blob = json.dumps({"v": VOLUME_PREPROCESS_VERSION, "size": list(task.size), "spacing": list(task.spacing_mm),
                       "orientation": task.orientation, "monai": monai.__version__, "pydicom": pydicom.__version__,
                       "src": hashlib.sha256(src).hexdigest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
