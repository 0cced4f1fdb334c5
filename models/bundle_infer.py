"""The `run` step of an exported Atoll bundle (server/export.py): find the inputs, preprocess, predict, save.

Why a few lines of our own instead of MONAI's ``SupervisedEvaluator``: that evaluator needs pytorch-ignite, which
Atoll does not install; the loop here is the same one (MONAI ``Dataset`` + ``DataLoader``, the bundle's
``preprocessing`` as its transform, MONAI ``SaveImage`` for label maps).

Outputs in ``output_dir``:
  classification: ``predictions.json``, one entry per input: ``input`` (path relative to the input folder),
                  ``probabilities`` per class (softmax), ``prediction`` (the most probable class)
  segmentation:   ``<input>_seg.nii.gz`` per volume (voxel value i + 1 = label i, 0 = background, on the task's
                  grid, with its affine), and ``predictions.json`` listing them with each label's voxel count
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

_NIFTI = (".nii", ".nii.gz")


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def find_inputs(input_dir: str | Path, kind: str) -> list[str]:
    """The inputs under ``input_dir``: ``dicom-image``: every DICOM file (Part 10, any name);
    ``volume``: every NIfTI file, and every folder whose files are DICOM (one series per folder).

    Raises ``FileNotFoundError`` naming the folder when it is missing or holds no input.
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input_dir {root} does not exist (pass --input_dir FOLDER)")
    if kind == "dicom-image":
        found = sorted(str(p) for p in root.rglob("*") if p.is_file() and _is_dicom(p))
    elif kind == "volume":
        nifti = [str(p) for p in root.rglob("*") if p.is_file() and p.name.endswith(_NIFTI)]
        series = [str(d) for d in [root, *root.rglob("*")] if d.is_dir()
                  and any(p.is_file() and _is_dicom(p) for p in d.iterdir())]
        found = sorted(nifti + series)
    else:
        raise ValueError(f"input_kind must be 'dicom-image' or 'volume', got {kind!r}")
    if not found:
        what = "DICOM files" if kind == "dicom-image" else "NIfTI volumes or DICOM series folders"
        raise FileNotFoundError(f"input_dir {root} holds no {what}")
    return found


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return Path(path).name


@torch.no_grad()
def predict(network: torch.nn.Module, preprocessing: Any, datalist: Sequence[str], output_dir: str | Path, *,
            kind: str, names: Sequence[str], input_key: str, device: torch.device | str = "cpu",
            batch_size: int = 32) -> list[dict]:
    """Run ``network`` on every input of ``datalist`` after ``preprocessing``; write and return the predictions."""
    from monai.data import DataLoader, Dataset

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # paths in the predictions are relative to the inputs' common folder (no machine paths in a shared file)
    root = Path(os.path.commonpath(list(datalist))) if datalist else out
    if len(datalist) == 1:
        root = root.parent
    network.eval().to(device)
    ds = Dataset([{input_key: p, "path": p} for p in datalist], transform=preprocessing)
    loader = DataLoader(ds, batch_size=batch_size if kind == "classification" else 1, num_workers=0)
    results: list[dict] = []
    saver = None
    if kind != "classification":
        from monai.transforms import SaveImage

        saver = SaveImage(output_dir=str(out), output_postfix="seg", output_ext=".nii.gz", separate_folder=False,
                          print_log=False, resample=False)
    for batch in loader:
        x = torch.as_tensor(batch["image"]).float().to(device)
        logits = network(x)
        if kind == "classification":
            probs = torch.softmax(logits, dim=1).cpu()
            for path, p in zip(batch["path"], probs):
                results.append({"input": _relative(path, root),
                                "probabilities": {n: float(v) for n, v in zip(names, p)},
                                "prediction": names[int(p.argmax())]})
        else:
            seg = logits.argmax(1, keepdim=True).cpu()
            for i, path in enumerate(batch["path"]):
                label = seg[i].to(torch.uint8)
                img = batch["image"][i]
                if hasattr(img, "meta"):
                    from monai.data import MetaTensor

                    label = MetaTensor(label, meta=dict(img.meta))  # meta carries the affine
                saver(label)
                results.append({"input": _relative(path, root),
                                "voxels": {n: int((label == j + 1).sum()) for j, n in enumerate(names)}})
    (out / "predictions.json").write_text(json.dumps(results, indent=2))
    return results
