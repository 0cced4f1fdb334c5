"""Does the lead's task fit this site's data? Checked before any privacy is charged.

The lead declares the task (:class:`~contract.task.TaskSpec`); the hospital's data says what it holds: the site
config's ``[data].task`` and ``[data].classes``, the modality and dimensionality of the images it kept. A run whose
task does not fit is refused with ``TASK_MISMATCH`` and a message that names what differs (class names, modality
codes and dimensions are the consortium's vocabulary, never identifiers), so the lead can fix the run or the site
its config — instead of a failed weight load reported as ``SITE_ERROR``.

Class indices: a site whose labels CSV holds class *names* maps them through ``[data].classes`` and then, by
name, onto the task's classes, so two sites may list their classes in different orders. A site with integer
labels and no ``[data].classes`` takes label ``i`` as the task's ``classes[i]``; naming them is safer, since only
then can Atoll check that the site's ``1`` is the task's ``pneumonia``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from client.ingest import SiteDataset, SplitTensors
from client.site_config import SiteConfig
from contract.task import TaskSpec
from contract.wire import TASK_MISMATCH


class TaskMismatch(Exception):
    """The run's task does not fit the site's data. ``message`` is safe to send to the server."""

    code = TASK_MISMATCH

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class FittedData:
    """The site's splits with labels as the task's class indices."""

    train: SplitTensors
    val: SplitTensors


def check_task_shape(task: TaskSpec, cfg: SiteConfig) -> None:
    """What can be checked from the site config alone, before any image is decoded."""
    if task.kind != cfg.task:
        raise TaskMismatch(f"the run's task is {task.kind} but this site's data is labelled for {cfg.task} "
                           "([data].task of the site config)")
    if cfg.kind == "volumes":
        if task.spatial_dims != 3:
            raise TaskMismatch(f"the run's task is {task.spatial_dims}D but this site holds 3D volumes")
        return
    if task.spatial_dims != 2:
        raise TaskMismatch(f"the run's task is {task.spatial_dims}D but this site holds 2D images")
    if task.size[0] != task.size[1]:
        raise TaskMismatch(f"the run asks for {task.size[0]}x{task.size[1]} images; this site preprocesses square "
                           "images (image-size one number)")


def class_map(task: TaskSpec, site_classes: tuple[str, ...] | None, labels_seen: set[int]) -> torch.Tensor:
    """Lookup table site label index -> task class index; raises :class:`TaskMismatch` naming what differs."""
    if site_classes:
        missing = [c for c in site_classes if c not in task.classes]
        used_missing = [site_classes[i] for i in sorted(labels_seen)
                        if i < len(site_classes) and site_classes[i] not in task.classes]
        if used_missing:
            raise TaskMismatch(
                f"this site's labels include class(es) {', '.join(used_missing)} that the run's task does not have "
                f"(task classes: {', '.join(task.classes)})")
        lut = [task.classes.index(c) if c not in missing else -1 for c in site_classes]
        return torch.tensor(lut, dtype=torch.int64)
    n = len(task.classes)
    beyond = sorted(i for i in labels_seen if i >= n)
    if beyond:
        raise TaskMismatch(
            f"this site's labels include class index {beyond[0]} but the run's task has {n} classes "
            f"({', '.join(task.classes)}); name the site's classes in [data].classes or ask the lead for a task "
            f"with {beyond[-1] + 1} classes")
    return torch.arange(n, dtype=torch.int64)


def label_map(task: TaskSpec, site_labels: tuple[str, ...] | None, values_seen: set[int]) -> torch.Tensor:
    """Lookup table site mask value -> task voxel value (0 background stays 0); :class:`TaskMismatch` naming what
    differs. Named site labels map by name (two sites may number their structures differently)."""
    if site_labels:
        foreign = [site_labels[v - 1] for v in sorted(values_seen) if 0 < v <= len(site_labels)
                   and site_labels[v - 1] not in task.labels]
        if foreign:
            raise TaskMismatch(f"this site's masks include label(s) {', '.join(foreign)} that the run's task does not "
                               f"have (task labels: {', '.join(task.labels)})")
        lut = [0] + [task.labels.index(n) + 1 if n in task.labels else 0 for n in site_labels]
        return torch.tensor(lut, dtype=torch.int64)
    n = len(task.labels)
    beyond = sorted(v for v in values_seen if v > n)
    if beyond:
        raise TaskMismatch(f"this site's masks hold value {beyond[0]} but the run's task has {n} label(s) "
                           f"({', '.join(task.labels)}); name the site's labels in [data].labels")
    return torch.arange(n + 1, dtype=torch.int64)


def fit_task(task: TaskSpec, cfg: SiteConfig, data: SiteDataset) -> FittedData:
    """The site's splits relabelled to the task's classes (or labels), or :class:`TaskMismatch`."""
    check_task_shape(task, cfg)
    if cfg.kind == "volumes":
        return _fit_volumes(task, cfg, data)
    channels = int(data.train.images.shape[1]) if data.train.images.ndim == 4 else 1
    if channels != task.in_channels:
        raise TaskMismatch(f"the run's task expects {task.in_channels} input channel(s); this site's images have "
                           f"{channels}")
    _check_modalities(task, data)
    seen = {int(v) for split in (data.train, data.val) for v in split.labels.unique().tolist() if int(v) >= 0}
    lut = class_map(task, cfg.classes, seen)
    return FittedData(train=_relabel(data.train, lut), val=_relabel(data.val, lut))


def _check_modalities(task: TaskSpec, data: SiteDataset) -> None:
    if task.modalities:
        held = sorted({str(u.get("modality") or "") for u in data.report.get("used", [])} - {""})
        foreign = [m for m in held if m not in task.modalities]
        if foreign:
            raise TaskMismatch(
                f"this site's images include modality {', '.join(foreign)} but the run's task is for "
                f"{', '.join(task.modalities)}; restrict [data].modalities of the site config")


def _fit_volumes(task: TaskSpec, cfg: SiteConfig, data: SiteDataset) -> FittedData:
    """3D segmentation on a volume site: one input channel, the task's grid, mask values the task's labels."""
    if task.in_channels != 1:
        raise TaskMismatch(f"the run's task expects {task.in_channels} input channels; this site's series have 1")
    grid = tuple(int(s) for s in data.train.images.shape[2:]) if len(data.train) else tuple(task.size)
    if grid != tuple(task.size):
        raise TaskMismatch(f"this site preprocessed its volumes to {'x'.join(map(str, grid))}, not the task's "
                           f"{'x'.join(map(str, task.size))}")
    _check_modalities(task, data)
    seen = {int(v) for u in data.report.get("used", []) for v in u.get("labels_present", [])}
    lut = label_map(task, cfg.labels, seen)
    return FittedData(train=_relabel(data.train, lut), val=_relabel(data.val, lut))


def _relabel(split: SplitTensors, lut: torch.Tensor) -> SplitTensors:
    if len(split.labels) == 0 or int(split.labels.min()) < 0:
        return split  # unlabelled split: the caller refuses it as it always did
    return dataclasses.replace(split, labels=lut[split.labels])
