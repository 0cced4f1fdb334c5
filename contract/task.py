"""The task a consortium trains, declared once by the lead: what the model predicts, from what input.

Atoll used to assume one task in code (binary 2D classification of 28-pixel images). A :class:`TaskSpec` makes it
data: the lead sets it in the run config (:meth:`TaskSpec.from_config`), it travels in every round config, the run
manifest pins it (:meth:`TaskSpec.to_manifest`) so that a site approves the task as well as the code and the DP
parameters, and each site checks it against its own data before any privacy is charged (``client.task_fit``).
The model factory builds the network from it, the trainer takes its loss from it and the evaluation its metrics.

Kinds
-----
``classification``: one label per image (or volume) out of two or more named ``classes``; output index ``i``
    is ``classes[i]``. Loss ``cross_entropy``.
``segmentation``: one label per pixel/voxel; ``labels`` names the foreground labels, voxel value ``i + 1`` is
    ``labels[i]`` and 0 is background. Loss ``dice_ce`` (Dice + cross-entropy) or ``dice_ce_fg``
    (its Dice over the labels only, background left to the cross-entropy).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from contract._fields import coerce as _coerce


def coerce(value: Any, kind: type, key: str, where: str) -> Any:
    return _coerce(value, kind, key, where, TaskError)

KINDS: tuple[str, ...] = ("classification", "segmentation")
LOSSES: dict[str, tuple[str, ...]] = {"classification": ("cross_entropy",), "segmentation": ("dice_ce", "dice_ce_fg")}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_MODALITY = re.compile(r"^[A-Z0-9]{1,16}$")
_AXCODES = re.compile(r"^[LRAPSI]{3}$")

#: metrics a site can release for every task kind (and that its policy may list)
COMMON_METRICS: tuple[str, ...] = ("num-examples", "train_loss", "train_seconds", "val_loss")


class TaskError(ValueError):
    """A task field is missing, mistyped or inconsistent; the message names the config key."""


def _names(value: Any, key: str, where: str) -> tuple[str, ...]:
    """A list of names from a comma-separated string (run config) or a list (manifest)."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise TaskError(f"{where} '{key}' must be a comma-separated string of names, got {value!r}")
    return tuple(items)


def _numbers(value: Any, key: str, where: str, kind: type) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (kind(value),)
    if isinstance(value, str):
        parts = [v.strip() for v in value.replace("x", ",").split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise TaskError(f"{where} '{key}' must be a number or a comma-separated list, got {value!r}")
    try:
        return tuple(kind(p) for p in parts)
    except (TypeError, ValueError):
        raise TaskError(f"{where} '{key}' must hold {kind.__name__}s, got {value!r}") from None


@dataclass(frozen=True)
class TaskSpec:
    """What the consortium trains. Construct through :meth:`from_config` / :meth:`from_manifest`, or directly
    and then :meth:`check`.

    kind: ``classification`` or ``segmentation``.
    spatial_dims: 2 (images) or 3 (volumes).
    in_channels: input channels of the network.
    classes: classification: the class names, in output order (at least two).
    labels: segmentation: the foreground label names (voxel value i+1), at least one.
    size: input size per spatial dim: 2D ``(H, W)``, 3D ``(D, H, W)`` (the volume or patch fed to the network).
    spacing_mm: 3D only: target voxel spacing the sites resample to (between slices, rows, columns).
    orientation: 3D only: axis codes the sites reorient to (e.g. ``RAS``); empty = keep the series' own.
    modalities: DICOM modalities the task is for (e.g. ``CR``, ``DX``); empty = any.
    loss: the training loss; empty = the kind's default.
    """

    kind: str = "classification"
    spatial_dims: int = 2
    in_channels: int = 1
    classes: tuple[str, ...] = ("normal", "pneumonia")
    labels: tuple[str, ...] = ()
    size: tuple[int, ...] = (28, 28)
    spacing_mm: tuple[float, ...] = ()
    orientation: str = ""
    modalities: tuple[str, ...] = ()
    loss: str = ""

    # ------------------------------------------------------------------ derived
    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"

    @property
    def num_outputs(self) -> int:
        """Output channels of the network: one logit per class, or background + one per label."""
        return len(self.classes) if self.is_classification else len(self.labels) + 1

    @property
    def loss_name(self) -> str:
        return self.loss or LOSSES[self.kind][0]

    @property
    def image_size(self) -> int:
        """The side of a square 2D input (what a 2D site preprocesses to)."""
        return int(self.size[0])

    def names(self) -> tuple[str, ...]:
        """Class names (classification) or foreground label names (segmentation)."""
        return self.classes if self.is_classification else self.labels

    def metric_names(self) -> tuple[str, ...]:
        """Every metric this task's ClientApp can release (a site sends the subset its policy lists).

        Binary classification keeps Atoll's historic set; multi-class adds macro one-vs-rest AUC under the same
        name and one recall per class; segmentation releases Dice per label and their mean.
        """
        if self.is_classification:
            base = (*COMMON_METRICS, "val_accuracy", "val_auc")
            if len(self.classes) == 2:  # + the counts a decision threshold is chosen from (contract.threshold)
                return (*base, "val_threshold_counts")
            return (*base, *(f"val_recall_{c}" for c in self.classes))
        return (*COMMON_METRICS, "val_dice", *(f"val_dice_{lab}" for lab in self.labels))

    # ------------------------------------------------------------------ checks
    def problems(self) -> list[tuple[str, str]]:
        """``(config key, what is wrong)`` pairs; empty when the task is consistent."""
        out: list[tuple[str, str]] = []
        if self.kind not in KINDS:
            return [("task", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")]
        if self.spatial_dims not in (2, 3):
            out.append(("spatial-dims", f"must be 2 or 3, got {self.spatial_dims!r}"))
        if not isinstance(self.in_channels, int) or not 1 <= self.in_channels <= 16:
            out.append(("in-channels", f"must be an integer in [1, 16], got {self.in_channels!r}"))
        names_key = "classes" if self.is_classification else "labels"
        names, other = (self.classes, self.labels) if self.is_classification else (self.labels, self.classes)
        need = 2 if self.is_classification else 1
        if len(names) < need:
            out.append((names_key, f"a {self.kind} task needs at least {need} named "
                                   f"{'classes' if self.is_classification else 'labels'}, got {list(names)}"))
        if other:
            out.append(("labels" if self.is_classification else "classes",
                        f"is for {'segmentation' if self.is_classification else 'classification'} tasks; "
                        f"leave it empty for a {self.kind} task"))
        for n in names:
            if not _NAME.match(n):
                out.append((names_key, f"name {n!r} must be 1-32 lowercase letters, digits, '_' or '-' "
                                       "(it becomes part of metric names)"))
        if len(set(names)) != len(names):
            out.append((names_key, f"names must be distinct, got {list(names)}"))
        if self.spatial_dims in (2, 3):
            if len(self.size) != self.spatial_dims or any(not isinstance(s, int) or not 4 <= s <= 1024
                                                          for s in self.size):
                out.append(("image-size", f"needs {self.spatial_dims} sizes in [4, 1024], got {list(self.size)}"))
            if self.spatial_dims == 2 and (self.spacing_mm or self.orientation):
                out.append(("spacing-mm", "spacing and orientation apply to 3D tasks only"))
            if self.spatial_dims == 3 and self.spacing_mm and (
                    len(self.spacing_mm) != 3 or any(not 0 < s <= 50 for s in self.spacing_mm)):
                out.append(("spacing-mm", f"needs 3 spacings in (0, 50] mm, got {list(self.spacing_mm)}"))
        if self.orientation and not _AXCODES.match(self.orientation):
            out.append(("orientation", f"must be three axis codes such as RAS or LPS, got {self.orientation!r}"))
        for m in self.modalities:
            if not _MODALITY.match(m):
                out.append(("modalities", f"entry {m!r} is not a DICOM modality code such as CR or MR"))
        if self.loss and self.loss not in LOSSES[self.kind]:
            out.append(("loss", f"must be one of {', '.join(LOSSES[self.kind])} for a {self.kind} task"))
        return out

    def check(self, where: str = "task") -> "TaskSpec":
        bad = self.problems()
        if bad:
            key, what = bad[0]
            raise TaskError(f"{where} '{key}' {what}")
        return self

    # ------------------------------------------------------------------ run config / round config
    def to_config(self) -> dict[str, Any]:
        """Flat scalar keys (Flower's run config and ConfigRecord carry scalars)."""
        return {"task": self.kind, "spatial-dims": self.spatial_dims, "in-channels": self.in_channels,
                "classes": ",".join(self.classes), "labels": ",".join(self.labels),
                "image-size": self.size[0] if len(set(self.size)) == 1 else ",".join(str(s) for s in self.size),
                "spacing-mm": ",".join(f"{s:g}" for s in self.spacing_mm), "orientation": self.orientation,
                "modalities": ",".join(self.modalities), "loss": self.loss}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "round config") -> "TaskSpec":
        """Parse and check the task's keys of a flat config; absent keys keep the defaults (the X-ray task).

        ``image-size`` may be one number (a square image or a cube) or ``"H,W"`` / ``"D,H,W"``.
        """
        d = cls()
        kind = coerce(config.get("task", d.kind), str, "task", where).strip().lower()
        dims = coerce(config.get("spatial-dims", d.spatial_dims), int, "spatial-dims", where)
        seg = kind == "segmentation"
        classes = _names(config.get("classes", "" if seg else ",".join(d.classes)), "classes", where)
        labels = _names(config.get("labels", ""), "labels", where)
        size = _numbers(config.get("image-size", d.size[0]), "image-size", where, int)
        if len(size) == 1:
            size = size * dims
        spacing = _numbers(config.get("spacing-mm", ""), "spacing-mm", where, float) if config.get(
            "spacing-mm", "") not in ("", None) else ()
        modalities = tuple(m.upper() for m in _names(config.get("modalities", ""), "modalities", where))
        task = cls(kind=kind, spatial_dims=dims,
                   in_channels=coerce(config.get("in-channels", d.in_channels), int, "in-channels", where),
                   classes=() if seg and "classes" not in config else classes, labels=labels, size=size,
                   spacing_mm=spacing, orientation=coerce(config.get("orientation", ""), str, "orientation",
                                                          where).strip().upper(),
                   modalities=modalities, loss=coerce(config.get("loss", ""), str, "loss", where).strip())
        return task.check(where)

    # ------------------------------------------------------------------ manifest
    def to_manifest(self) -> dict[str, Any]:
        """As the run manifest pins it: ``kind``, ``spatial_dims`` and ``classes`` or ``labels`` by name, and
        the input geometry a site preprocesses to."""
        d: dict[str, Any] = {"kind": self.kind, "spatial_dims": self.spatial_dims, "in_channels": self.in_channels,
                             "size": list(self.size), "modalities": list(self.modalities), "loss": self.loss_name}
        d["classes" if self.is_classification else "labels"] = list(self.names())
        if self.spatial_dims == 3:
            d["spacing_mm"] = [float(s) for s in self.spacing_mm]
            d["orientation"] = self.orientation
        return d

    @classmethod
    def from_manifest(cls, data: Mapping[str, Any], where: str = "run manifest task") -> "TaskSpec":
        if not isinstance(data, Mapping):
            raise TaskError(f"{where}: expected an object")
        allowed = {f.name for f in fields(cls)} - {"size"} | {"size"}
        unknown = set(data) - allowed
        if unknown:
            raise TaskError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        if "kind" not in data:
            raise TaskError(f"{where}: missing field 'kind'")
        try:
            task = cls(kind=str(data["kind"]), spatial_dims=int(data.get("spatial_dims", 2)),
                       in_channels=int(data.get("in_channels", 1)),
                       classes=tuple(data.get("classes", ())), labels=tuple(data.get("labels", ())),
                       size=tuple(int(s) for s in data.get("size", ())),
                       spacing_mm=tuple(float(s) for s in data.get("spacing_mm", ())),
                       orientation=str(data.get("orientation", "")),
                       modalities=tuple(data.get("modalities", ())),
                       loss="" if data.get("loss") == LOSSES.get(str(data["kind"]), ("",))[0] else str(data.get("loss", "")))
        except (TypeError, ValueError) as exc:
            raise TaskError(f"{where}: {exc}") from None
        return task.check(where)

    def describe(self) -> str:
        dims = "x".join(str(s) for s in self.size)
        what = f"{len(self.classes)} classes ({', '.join(self.classes)})" if self.is_classification else \
            f"labels {', '.join(self.labels)}"
        return f"{self.spatial_dims}D {self.kind}, {what}, input {dims}"
