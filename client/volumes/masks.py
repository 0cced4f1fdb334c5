"""Segmentation masks of a volume site: DICOM SEG (read with highdicom) or NIfTI (read with nibabel).

Either way a mask becomes ``(label map, RAS affine)`` and is then put on its image's grid by
:func:`align_to_image`: an axis permutation/flip is allowed (a NIfTI written by a converter stores the axes in
another order than the DICOM slices), anything else — another shape, spacing, origin or a tilt — is
``MASK_MISMATCH``. Resampling a mismatched mask onto the image would silently train on labels that are not where
the anatomy is; quarantining it lets the site fix the export.

Label values: voxel value ``i`` (1-based) is the site's ``[data].labels[i-1]``. A SEG names its segments
(SegmentLabel); they are mapped by name onto the site's labels, so a SEG whose segments come in another order
still means the same thing. A value the site does not name is ``BAD_MASK``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.volumes.reasons import VolumeReason
from client.volumes.series import lps_to_ras

_AFFINE_TOL_MM = 0.01


@dataclass(frozen=True)
class Mask:
    """A label map and its grid (RAS affine, voxel -> mm)."""

    labels: np.ndarray  # int, 3D
    affine_ras: np.ndarray


class MaskError(Exception):
    def __init__(self, reason: VolumeReason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def read_nifti(path: Path) -> Mask:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 - any unreadable mask is one quarantine entry, not a crash
        raise MaskError(VolumeReason.BAD_MASK, f"cannot read NIfTI mask ({type(e).__name__}: {str(e)[:200]})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise MaskError(VolumeReason.BAD_MASK, f"NIfTI mask has {data.ndim} dimensions; a label volume needs 3")
    if not np.all(np.isfinite(data)) or not np.all(data == np.round(data)):
        raise MaskError(VolumeReason.BAD_MASK, "NIfTI mask holds non-integer values; it must be a label map")
    return Mask(labels=data.astype(np.int64), affine_ras=np.asarray(img.affine, dtype=np.float64))


def seg_reference(ds: Any) -> str | None:
    """The SeriesInstanceUID of the source series a SEG references (from its header)."""
    for item in ds.get("ReferencedSeriesSequence") or []:
        uid = item.get("SeriesInstanceUID")
        if uid:
            return str(uid)
    return None


def read_seg(path: Path, site_labels: tuple[str, ...] | None) -> Mask:
    """A DICOM SEG as one label map, segment numbers mapped by SegmentLabel onto ``site_labels``."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
        vol = seg.get_volume(combine_segments=True, skip_overlap_checks=False)
    except Exception as e:  # noqa: BLE001
        raise MaskError(VolumeReason.BAD_MASK, f"cannot read DICOM SEG ({type(e).__name__}: {str(e)[:200]})") from None
    arr = np.asarray(vol.array).astype(np.int64)
    if site_labels:
        lut = np.zeros(int(arr.max(initial=0)) + 1, dtype=np.int64)
        for item in seg.SegmentSequence:
            num, name = int(item.SegmentNumber), str(item.SegmentLabel).strip()
            if name not in site_labels:
                raise MaskError(VolumeReason.BAD_MASK, f"SEG segment {num} is labelled {name!r}, which is not one of "
                                                       f"this site's labels ({', '.join(site_labels)})")
            if num < len(lut):
                lut[num] = site_labels.index(name) + 1
        arr = lut[arr]
    return Mask(labels=arr, affine_ras=lps_to_ras(np.asarray(vol.affine, dtype=np.float64)))


def align_to_image(mask: Mask, image_affine_ras: np.ndarray, image_shape: tuple[int, int, int],
                   n_labels: int | None, *, subgrid: bool = False) -> np.ndarray:
    """The mask's label map on the image grid (same shape and voxel order), or :class:`MaskError`.

    ``subgrid``: the mask may cover a block of the image grid (same spacing and orientation, an origin on an image
    voxel) and is zero-filled around it — a DICOM SEG omits frames without any segment (highdicom's default).
    A NIfTI mask must cover the whole grid: converters write full volumes, and a crop there is an export error.
    """
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    src = io_orientation(mask.affine_ras)
    dst = io_orientation(image_affine_ras)
    xform = ornt_transform(src, dst)
    labels = apply_orientation(mask.labels, xform)
    affine = mask.affine_ras @ inv_ornt_aff(xform, mask.labels.shape)
    if subgrid and tuple(labels.shape) != tuple(image_shape):
        labels, affine = _embed(labels, affine, image_affine_ras, image_shape)
    if tuple(labels.shape) != tuple(image_shape):
        raise MaskError(VolumeReason.MASK_MISMATCH, f"mask grid is {'x'.join(map(str, labels.shape))} voxels, the "
                                                    f"image {'x'.join(map(str, image_shape))}")
    diff = float(np.abs(affine - image_affine_ras).max())
    if diff > _AFFINE_TOL_MM:
        raise MaskError(VolumeReason.MASK_MISMATCH, f"mask and image grids differ by up to {diff:.3f} mm in their "
                                                    "affine (origin, spacing or orientation)")
    values = np.unique(labels)
    if values.min() < 0 or (n_labels is not None and values.max() > n_labels):
        raise MaskError(VolumeReason.BAD_MASK, f"mask holds value(s) {[int(v) for v in values if v < 0 or v > (n_labels or 0)]} "
                                               f"outside 0..{n_labels} (0 background, 1..{n_labels} this site's labels)")
    return np.ascontiguousarray(labels)


def _embed(labels: np.ndarray, affine: np.ndarray, image_affine: np.ndarray, image_shape: tuple[int, int, int]
           ) -> tuple[np.ndarray, np.ndarray]:
    """Zero-fill a mask block into the image grid when it lies exactly on it; else return it unchanged."""
    if np.abs(affine[:3, :3] - image_affine[:3, :3]).max() > _AFFINE_TOL_MM:
        return labels, affine
    offset = np.linalg.solve(image_affine[:3, :3], affine[:3, 3] - image_affine[:3, 3])
    start = np.round(offset).astype(int)
    if np.abs(offset - start).max() > 0.01 or (start < 0).any() or \
            (start + np.array(labels.shape) > np.array(image_shape)).any():
        return labels, affine
    full = np.zeros(image_shape, dtype=labels.dtype)
    full[start[0]:start[0] + labels.shape[0], start[1]:start[1] + labels.shape[1],
         start[2]:start[2] + labels.shape[2]] = labels
    return full, image_affine.copy()
