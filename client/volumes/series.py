"""DICOM series -> one volume, assembled by geometry.

Slices are ordered by ImagePositionPatient projected on the slice normal (the cross product of the two
ImageOrientationPatient direction cosines), never by file name or InstanceNumber: exports shuffle names, and
InstanceNumber is optional and often restarts. The spacing between slices comes from those positions, not from
SliceThickness (which is the slab thickness, and may overlap or leave gaps). One file per slice and an enhanced (or
legacy-converted enhanced) multi-frame file, whose frames carry their position in the per-frame functional groups,
give the same :class:`SliceGeometry` list and so the same volume.

A series that cannot be assembled exactly is quarantined as a whole with a :class:`~client.volumes.reasons.VolumeReason`:
a volume stitched from inconsistent slices would train on anatomy that does not exist.

Affines: :func:`affine_lps` maps voxel index ``(slice, row, column)`` to patient coordinates (DICOM LPS, mm);
:func:`lps_to_ras` gives the RAS affine MONAI and NIfTI use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from client.volumes.reasons import VolumeReason

#: fewer slices than this is not a volume (a scout, a single-slice localiser)
MIN_SLICES = 4
_COS_TOL = 1e-3      # direction cosines: same orientation within this (about 0.06 degrees)
_MM_TOL = 1e-3       # pixel spacing equal within this, in mm
_GAP_TOL = 0.1       # a step between slices deviating from the median step by > 10 % is a gap (or an extra slice)


@dataclass(frozen=True)
class SliceGeometry:
    """Where one 2D frame lies: its file (relative path), frame index (0 for single-frame files) and geometry."""

    file: str
    frame: int
    position: tuple[float, float, float]
    orientation: tuple[float, ...]     # 6 direction cosines: row direction, then column direction
    pixel_spacing: tuple[float, float]  # between rows, between columns (mm)
    rows: int
    columns: int


@dataclass
class SeriesFacts:
    """Header facts of one series (per-file facts merged); ``problem`` set when the headers already disqualify it."""

    series: str
    study: str | None
    patient: str | None
    modality: str | None
    files: list[str] = field(default_factory=list)
    slices: list[SliceGeometry] = field(default_factory=list)
    multiframe: bool = False
    problem: tuple[VolumeReason, str] | None = None


@dataclass(frozen=True)
class Assembled:
    """The series' frames in geometric order, with the grid they span."""

    order: list[SliceGeometry]
    spacing: tuple[float, float, float]  # between slices, rows, columns (mm)
    affine_lps: np.ndarray               # 4x4, voxel (slice, row, column) -> LPS mm

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.order), self.order[0].rows, self.order[0].columns)


def _floats(v: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def frame_geometries(ds: Any, rel: str) -> list[SliceGeometry] | str:
    """The geometry of every frame of ``ds`` (one for a single-frame file), or a problem description."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 1 or cols < 1:
        return "Rows/Columns missing or zero"
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    if nframes <= 1 and "ImagePositionPatient" in ds:
        pos, ori = _floats(ds.get("ImagePositionPatient"), 3), _floats(ds.get("ImageOrientationPatient"), 6)
        sp = _floats(ds.get("PixelSpacing"), 2)
        if pos is None or ori is None or sp is None:
            return "ImagePositionPatient, ImageOrientationPatient or PixelSpacing missing or malformed"
        return [SliceGeometry(rel, 0, pos, ori, sp, rows, cols)]
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    per = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per) != nframes:
        return f"{nframes} frames but {len(per)} per-frame functional group items"

    def group(i: int, seq: str, attr: str) -> Any:
        for item in (per[i], shared):
            if item is not None and seq in item and len(item[seq].value):
                val = item[seq].value[0].get(attr)
                if val is not None:
                    return val
        return None

    out = []
    for i in range(nframes):
        pos = _floats(group(i, "PlanePositionSequence", "ImagePositionPatient"), 3)
        ori = _floats(group(i, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        sp = _floats(group(i, "PixelMeasuresSequence", "PixelSpacing"), 2)
        if pos is None or ori is None or sp is None:
            return f"frame {i + 1}: plane position, orientation or pixel spacing missing in the functional groups"
        out.append(SliceGeometry(rel, i, pos, ori, sp, rows, cols))
    return out


def normal_of(orientation: tuple[float, ...]) -> np.ndarray:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    n = np.cross(row, col)
    return n / (np.linalg.norm(n) or 1.0)


def assemble(facts: SeriesFacts) -> Assembled | tuple[VolumeReason, str]:
    """Order the series' frames along the slice normal and check they form one regular grid."""
    if facts.problem is not None:
        return facts.problem
    sl = facts.slices
    if len(sl) < MIN_SLICES:
        return (VolumeReason.TOO_FEW_SLICES, f"{len(sl)} slice(s); a volume needs at least {MIN_SLICES}")
    first = sl[0]
    for s in sl[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            return (VolumeReason.INCONSISTENT_SHAPE,
                    f"{s.file} is {s.rows}x{s.columns}, {first.file} is {first.rows}x{first.columns}")
        if max(abs(a - b) for a, b in zip(s.orientation, first.orientation)) > _COS_TOL:
            return (VolumeReason.INCONSISTENT_ORIENTATION, f"{s.file} and {first.file} differ in ImageOrientationPatient")
        if max(abs(a - b) for a, b in zip(s.pixel_spacing, first.pixel_spacing)) > _MM_TOL:
            return (VolumeReason.INCONSISTENT_SPACING, f"{s.file} and {first.file} differ in PixelSpacing")
    normal = normal_of(first.orientation)
    dist = np.array([float(np.dot(normal, s.position)) for s in sl])
    order_idx = np.argsort(dist, kind="stable")
    d = dist[order_idx]
    steps = np.diff(d)
    median = float(np.median(steps))
    dup = np.flatnonzero(steps < max(_MM_TOL, 0.01 * abs(median)))
    if dup.size:
        a, b = sl[order_idx[dup[0]]], sl[order_idx[dup[0] + 1]]
        return (VolumeReason.DUPLICATE_POSITION, f"{a.file} (frame {a.frame + 1}) and {b.file} (frame {b.frame + 1}) "
                                                 f"lie at the same position along the slice normal")
    bad = np.flatnonzero(np.abs(steps - median) > _GAP_TOL * median)
    if bad.size:
        i = int(bad[0])
        return (VolumeReason.SLICE_GAP, f"step of {steps[i]:.2f} mm between slices {i + 1} and {i + 2} (in position "
                                        f"order) where the series' step is {median:.2f} mm: a missing or extra slice")
    ordered = [sl[i] for i in order_idx]
    # In-plane offsets must not drift either (a tilted stack read as straight would shear the anatomy).
    p0 = np.asarray(ordered[0].position)
    for k, s in enumerate(ordered[1:], start=1):
        expected = p0 + k * median * normal
        if np.linalg.norm(np.asarray(s.position) - expected) > max(0.05 * median, 0.01):
            return (VolumeReason.INCONSISTENT_ORIENTATION,
                    f"slice positions do not lie on the slice normal (gantry tilt or a mixed stack) at {s.file}")
    spacing = (median, first.pixel_spacing[0], first.pixel_spacing[1])
    return Assembled(order=ordered, spacing=spacing, affine_lps=affine_lps(ordered[0], normal, spacing))


def affine_lps(first: SliceGeometry, normal: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxel ``(slice, row, column)`` -> LPS mm. Columns advance along the row direction cosines, rows along the
    column direction cosines (DICOM PS3.3 C.7.6.2.1.1)."""
    row_dir, col_dir = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:])
    a = np.eye(4)
    a[:3, 0] = normal * spacing[0]
    a[:3, 1] = col_dir * spacing[1]
    a[:3, 2] = row_dir * spacing[2]
    a[:3, 3] = first.position
    return a


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
