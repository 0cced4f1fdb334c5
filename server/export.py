"""`atoll run export`: a run's global model as a MONAI bundle a hospital can deploy, with its model card.

Layout of the bundle folder (MONAI's bundle specification, so that ``monai.bundle`` loads and runs it)::

  configs/metadata.json   version, libraries, task, network_data_format (inputs/outputs), the run it came from
  configs/inference.json  network_def (Atoll's model factory), the task's preprocessing (the sites' own MONAI
                          transforms, applied to a DICOM image or series / NIfTI volume), load + predict
  models/model.pt         the global weights of the chosen round (a plain state dict)
  models/model.ts         the same network as TorchScript, written by MONAI's ``ckpt_export``
  docs/README.md          the model card (Markdown), docs/model_card.json the same as data (server.model_card)

Run it with MONAI's own tools, e.g.
``python -m monai.bundle run --config_file BUNDLE/configs/inference.json --meta_file BUNDLE/configs/metadata.json
--bundle_root BUNDLE --input_dir DICOM_FOLDER``: predictions land in ``BUNDLE/predictions`` (``predictions.json``
for classification, one NIfTI label map per volume for segmentation).

The preprocessing is referenced, not copied: the bundle's config names the same transform builders the sites ran
(``client.ingest.transforms.build_preprocess`` for 2D images, ``client.volumes.transforms.build_volume_transform``
for volumes), so a deployed model sees exactly the pixels it was trained on; that needs Atoll installed next to
MONAI (declared in the metadata). ``models/model.ts`` needs only PyTorch for the network itself.

Nothing here imports the client side: the config holds those names as strings. The weights are post-processing of
the sites' DP outputs, so exporting them costs no privacy.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUNDLE_VERSION = "0.1.0"


class ExportError(ValueError):
    """The run folder cannot be exported as asked; the message names the file or option and what to do."""


@dataclass
class RunRecord:
    """What a run folder says, read and checked once (no torch needed)."""

    root: Path
    settings: dict[str, Any]
    history: list[dict]
    status: dict[str, Any]
    round: int
    weights: Path
    ledger: list[dict] = field(default_factory=list)
    ema: bool = False  # the server's EMA of the global model (weights/round-NNN-ema.pt), not the global model

    def decision_threshold(self) -> dict | None:
        """The round's threshold chosen from the sites' released validation counts, when the run's
        ``decision-threshold`` is "validation" (else None: the model decides by argmax)."""
        if (self.settings.get("server_options") or {}).get("decision_threshold") != "validation":
            return None
        entry = next((e for e in self.history if e.get("round") == self.round), {})
        return entry.get("decision_threshold")

    @property
    def task(self):
        from contract.task import TaskSpec

        return TaskSpec.from_manifest(_task_manifest(self.settings["task"]), where=f"{self.root / 'settings.json'} task")


def _task_manifest(task: dict) -> dict:
    """settings.json's task (``dataclasses.asdict`` of a TaskSpec) in TaskSpec.from_manifest's form."""
    kind = task.get("kind", "classification")
    out = {k: task[k] for k in ("kind", "spatial_dims", "in_channels", "size", "modalities", "loss") if k in task}
    out["classes" if kind == "classification" else "labels"] = list(task.get("classes" if kind == "classification"
                                                                             else "labels", ()))
    if int(task.get("spatial_dims", 2)) == 3:
        out["spacing_mm"] = list(task.get("spacing_mm", ()))
        out["orientation"] = task.get("orientation", "")
    return out


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path} is missing: {what}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ExportError(f"{path} is not readable JSON ({exc.__class__.__name__}: {exc}); {what}") from None


def read_run(run_dir: str | Path, round_: int | None = None, *, ema: bool = False) -> RunRecord:
    """The run folder's settings, history, status and the weights of ``round_`` (default: the last recorded);
    with ``ema``, the server's EMA of the global model of that round (run config ``server-ema`` > 0).

    Raises :class:`ExportError` naming the missing or broken file: a folder that is not a run, a run without
    recorded rounds, a round that was never completed, a weights file that is absent.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise ExportError(f"{root} does not exist (give the run's folder, RUN_DIR/<run-name>)")
    settings = _read_json(root / "settings.json", "not a run folder (the ServerApp writes settings.json first)")
    history = _read_json(root / "history.json", "the run recorded no round yet; export a run once a round is done") \
        if (root / "history.json").exists() or (root / "weights").is_dir() else None
    if history is None:
        raise ExportError(f"{root / 'history.json'} is missing: the run recorded no round yet")
    if not isinstance(history, list) or not all(isinstance(e, dict) and isinstance(e.get("round"), int)
                                                and isinstance(e.get("sites"), dict) for e in history):
        raise ExportError(f"{root / 'history.json'}: expected a list of rounds (each with 'round' and 'sites')")
    if not isinstance(settings, dict) or not isinstance(settings.get("task"), dict) or "model" not in settings:
        raise ExportError(f"{root / 'settings.json'}: no 'task' or 'model' (not written by Atoll's ServerApp)")
    done = {e["round"] for e in history if (root / "weights" / f"round-{e['round']:03d}.pt").is_file()}
    if round_ is None:
        if not done:
            raise ExportError(f"{root}: no completed round with saved global weights (weights/round-NNN.pt); "
                              "nothing to export yet")
        round_ = max(done)
    elif round_ not in {e["round"] for e in history}:
        rounds = sorted(e["round"] for e in history)
        raise ExportError(f"--round {round_}: run {root.name} has no such round (recorded: "
                          f"{', '.join(map(str, rounds)) or 'none'}); pass one of them or omit --round for the last")
    weights = root / "weights" / f"round-{round_:03d}.pt"
    if ema:
        from server.server_ema import ema_path

        weights = ema_path(weights)
        if not weights.is_file():
            raise ExportError(f"{weights} is missing: the run kept no EMA of its global model (run config "
                              "server-ema = 0); export without --ema")
    if not weights.is_file():
        raise ExportError(f"{weights} is missing: round {round_} did not end with aggregated weights (it stopped "
                          f"before aggregation); export another round (done: {sorted(done) or 'none'})")
    status_path = root / "status.json"
    status = _read_json(status_path, "") if status_path.exists() else {"status": "running", "reason": ""}
    ledger: list[dict] = []
    lpath = root / "ledger.jsonl"
    if lpath.is_file():
        for n, line in enumerate(lpath.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    ledger.append(json.loads(line))
                except ValueError:
                    raise ExportError(f"{lpath} line {n} is not JSON (a torn or edited ledger: run "
                                      f"`atoll audit verify {root}`)") from None
    r = RunRecord(root, settings, history, status, round_, weights, ledger, ema=ema)
    try:
        r.task
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    return r


# ------------------------------------------------------------------------------------------------ bundle configs


def network_def(run: RunRecord) -> dict[str, Any]:
    """``network_def`` as MONAI bundle config: Atoll's factory builds the same DP-compatible network the run trained."""
    task = run.task
    return {"_target_": "models.factory.build_model", "name": run.settings["model"],
            "spatial_dims": task.spatial_dims, "in_channels": task.in_channels, "num_classes": task.num_outputs}


def preprocessing(run: RunRecord) -> dict[str, Any]:
    """The task's preprocessing as bundle config: the transforms the sites applied, by name."""
    task = run.task
    if task.spatial_dims == 2:
        # one DICOM file -> pydicom Dataset -> the sites' pixel path (modality LUT, VOI, MONOCHROME1, luminance,
        # [0, 1], fit to S x S) -> float32 [1, S, S]
        return {"_target_": "Compose", "transforms": [
            {"_target_": "Lambdad", "keys": "ds", "func": "$pydicom.dcmread"},
            f"$build_preprocess({task.image_size})",
            {"_target_": "DeleteItemsd", "keys": ["ds", "frame"]}]}  # a Dataset does not batch
    # a NIfTI volume or a DICOM series folder -> MONAI LoadImaged (RAS affine) -> the sites' volume transforms
    # (orientation, spacing, z-score, pad/crop to the task's size)
    return {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        "$build_volume_transform(TaskSpec.from_manifest(@task))",
        {"_target_": "Lambdad", "keys": "image", "func": "$lambda x: torch.nan_to_num(x.float())"}]}


def inference_config(run: RunRecord) -> dict[str, Any]:
    task = run.task
    image_input = task.spatial_dims == 2
    return {
        # MONAI binds `import a.b` under the dotted name: `from a import b` gives expressions a usable name
        "imports": ["$import os", "$import torch", "$import pydicom", "$from contract.task import TaskSpec",
                    "$from client.ingest.transforms import build_preprocess" if image_input else
                    "$from client.volumes.transforms import build_volume_transform",
                    "$from models.bundle_infer import find_inputs", "$from models.bundle_infer import predict"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "task": task.to_manifest(),
        "input_dir": "$@bundle_root + '/input'",
        # 2D: every DICOM file under input_dir; 3D: every NIfTI file and every folder holding a DICOM series
        "input_kind": "dicom-image" if image_input else "volume",
        "input_key": "ds" if image_input else "image",
        "output_dir": "$@bundle_root + '/predictions'",
        "network_def": network_def(run),
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "preprocessing": preprocessing(run),
        "datalist": "$find_inputs(@input_dir, @input_kind)",
        # weights are loaded in `run`, not `initialize`: monai.bundle.load initializes the workflow before it
        # knows the bundle root, and loads models/model.pt into network_def itself
        "initialize": [],
        "run": ["$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))",
                "$predict(@network, @preprocessing, @datalist, @output_dir, kind=@task['kind'], "
                "names=@task.get('classes') or @task.get('labels'), input_key=@input_key, device=@device)"],
        "finalize": [],
    }


def metadata(run: RunRecord, weights_sha256: str) -> dict[str, Any]:
    import monai
    import numpy
    import pydicom
    import torch

    task = run.task
    names = list(task.names())
    size = list(task.size)
    if task.is_classification:
        out = {"type": "probabilities", "format": "classes", "num_channels": task.num_outputs, "spatial_shape": [1],
               "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
               "channel_def": {str(i): n for i, n in enumerate(names)}}
    else:
        out = {"type": "image", "format": "segmentation", "num_channels": task.num_outputs, "spatial_shape": size,
               "dtype": "float32", "value_range": [], "is_patch_data": False,
               "channel_def": {"0": "background", **{str(i + 1): n for i, n in enumerate(names)}}}
    try:
        from importlib.metadata import version

        atoll_version = version("atoll")
    except Exception:  # noqa: BLE001 - a checkout that is not installed
        atoll_version = "0.1.0"
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20240725.json",
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported from Atoll run {run.root.name}, round {run.round}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"pydicom": pydicom.__version__, "atoll": atoll_version,
                                      **({"nibabel": _version("nibabel")} if task.spatial_dims == 3 else {})},
        "name": f"atoll-{run.root.name}",
        "task": task.describe(),
        "description": f"{task.describe()}, trained federatedly with Atoll (run {run.root.name}, round {run.round} "
                       f"of {run.settings.get('num_server_rounds')}); see docs/README.md (model card)",
        "authors": "the consortium of the run (docs/README.md lists its sites)",
        "copyright": "the consortium of the run",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": ",".join(task.modalities) or "any",
                                 "num_channels": task.in_channels, "spatial_shape": size, "dtype": "float32",
                                 "value_range": [0, 1] if task.spatial_dims == 2 else [],
                                 "is_patch_data": False, "channel_def": {"0": "image"}}},
            "outputs": {"pred": out},
        },
        "atoll": {"run": run.root.name, "round": run.round, "model": run.settings["model"],
                  "weights_sha256": weights_sha256, "task": task.to_manifest(),
                  "weights": "server EMA of the global model" if run.ema else "global model",
                  **({"decision_threshold": run.decision_threshold()} if run.decision_threshold() else {})},
    }


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return ""


# ------------------------------------------------------------------------------------------------ export


def export_bundle(run_dir: str | Path, out: str | Path, *, round_: int | None = None, card_facts: dict | None = None,
                  overwrite: bool = False, ema: bool = False) -> dict[str, Any]:
    """Write the bundle of ``run_dir``'s round ``round_`` (default the last) into ``out``; returns the model card.

    ``card_facts``: what the caller gathered for the model card beyond the run folder (see
    :func:`server.model_card.build_card`: held-out metrics, dataset cards, the audit verdict, the manifest).
    The bundle is written into a temporary sibling folder and renamed into place, so a failed export leaves no
    half bundle. ``out`` must not exist unless ``overwrite``.
    """
    import torch

    from models import state_dict_sha256
    from server.model_card import build_card, card_markdown

    run = read_run(run_dir, round_, ema=ema)
    out = Path(out)
    if out.exists() and not (overwrite and (out / "configs" / "metadata.json").is_file()):
        raise ExportError(f"--out {out} already exists; give a new folder" +
                          (" (or --overwrite to replace an earlier export)" if (out / "configs").is_dir() else ""))
    try:
        sd = torch.load(run.weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable weights file, named
        raise ExportError(f"{run.weights} is not a readable weights file ({exc.__class__.__name__})") from None
    from models import build_task_model

    try:
        net = build_task_model(run.settings["model"], run.task)
        net.load_state_dict(sd)
    except (RuntimeError, ValueError) as exc:
        raise ExportError(f"{run.weights} does not fit model {run.settings['model']!r} for the run's task: "
                          f"{str(exc).splitlines()[0]}") from None
    digest = state_dict_sha256(sd)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir()
        meta = metadata(run, digest)
        infer = inference_config(run)
        (tmp / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
        (tmp / "configs" / "inference.json").write_text(json.dumps(infer, indent=2))
        torch.save(net.state_dict(), tmp / "models" / "model.pt")
        from models.factory import NOT_SCRIPTABLE

        if run.settings["model"] not in NOT_SCRIPTABLE:  # scatternet: the bundle's Python network_def serves it
            _torchscript(tmp)
        card = build_card(run, meta, **(card_facts or {}))
        (tmp / "docs" / "model_card.json").write_text(json.dumps(card, indent=2))
        (tmp / "docs" / "README.md").write_text(card_markdown(card))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card


def _torchscript(bundle: Path) -> None:
    """models/model.ts through MONAI's own ``ckpt_export`` (scripting; configs embedded as extra files)."""
    from monai.bundle import ckpt_export

    cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    # ckpt_export only needs the network: a config without the preprocessing (whose imports need no data)
    net_only = {k: copy.deepcopy(cfg[k]) for k in ("imports", "network_def")}
    net_file = bundle / "configs" / ".network.json"
    net_file.write_text(json.dumps(net_only))
    try:
        ckpt_export(net_id="network_def", filepath=str(bundle / "models" / "model.ts"),
                    ckpt_file=str(bundle / "models" / "model.pt"), meta_file=str(bundle / "configs" / "metadata.json"),
                    config_file=str(net_file), bundle_root=str(bundle))
    finally:
        net_file.unlink(missing_ok=True)


def bundle_layout(bundle: str | Path) -> list[str]:
    """The bundle's files, relative, with sizes (what `atoll run export` prints)."""
    root = Path(bundle)
    return [f"{p.relative_to(root)}  ({p.stat().st_size:,} bytes)" for p in sorted(root.rglob("*")) if p.is_file()]


def exported_at() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
