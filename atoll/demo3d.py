"""`atoll demo --task hippocampus`: three hospitals segment the hippocampus on real MR DICOM series.

Like the chest X-ray demo (``atoll.demo``) it composes both sides: it writes the hospitals' exports
(``atoll.demo_hippocampus``), runs the real ServerApp and ClientApp in Flower's simulation engine with patient-level
DP-SGD (on by default), saves the global model of every round, and scores each on the held-out subjects that no
site sees (Dice per label, MONAI's DiceMetric). Volumes are small (32 x 48 x 32 voxels at 1 mm) so that the demo
runs in minutes on two CPU cores; sites train on CUDA where present.

The recipe is chosen for DP-SGD at sites of 14 to 25 training patients. A U-Net does not learn there: DP-SGD's noise
has the dimension of the trainable parameters while each step's clipped signal is at most C, and with batches of
~5-12 patients the 340k-parameter ``basicunet-small`` got a noise about 100 times its signal per step and predicted
background everywhere (held-out Dice 0.000 with DP at its former recipe). The demo trains ``scalespace``
(``models.scalespace``): fixed, data-independent multi-scale intensity, edge and position features and a
275-parameter per-voxel head. The loss is ``dice_ce_fg`` (Dice over the two labels, background left to the
cross-entropy): with 93 % background voxels the plain Dice + CE pulls towards "all background" first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from atoll import demo_hippocampus as hippo
from atoll.demo import (approve_run, prepare_site_keys, print_privacy, resume_if_interrupted, setup_console_logging,
                        simulate)

log = logging.getLogger("atoll.demo")

#: the task the demo's lead declares (its geometry is what every site preprocesses to)
TASK_KW = dict(kind="segmentation", spatial_dims=3, classes=(), labels=hippo.LABELS, size=(32, 48, 32),
               spacing_mm=(1.0, 1.0, 1.0), orientation="RAS", modalities=("MR",), loss="dice_ce_fg")
# DP recipe of the demo: per round and site 12 DP-SGD steps, patients Poisson-sampled at q = 0.5 (batches of ~7-12
# patients), clip 1, sigma 1.6, SGD lr 0.5 (momentum 0.9); 3 rounds spend epsilon ~ 7.4-7.9 per site at
# delta = 1/(10 x patients) (RDP; the site with the most patients spends the most, its delta being the smallest).
DEFAULTS = {"model": "scalespace", "lr": 0.5, "steps": 12, "noise_multiplier": 1.6, "clip_norm": 1.0,
            "sample_rate": 0.5}
REFERENCE = ("nnU-Net (pooled, full resolution, 260 subjects) on the Decathlon's hidden test set: Dice about "
             "0.90 anterior / 0.89 posterior (Isensee et al. 2021)")


def hippocampus_settings(rounds: int, *, dp: bool, run_dir: Path, keys_dir: Path, overrides: dict | None = None):
    from contract import Mechanism, TaskSpec
    from server.settings import RunSettings

    o = {**DEFAULTS, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    unknown = set(o) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown demo override(s): {', '.join(sorted(unknown))}")
    mechanism = Mechanism(dp=dp, steps=int(o["steps"]), noise_multiplier=float(o["noise_multiplier"]),
                          clip_norm=float(o["clip_norm"]), sample_rate=float(o["sample_rate"]))
    return RunSettings(num_server_rounds=rounds, run_dir=str(run_dir), keys_dir=str(keys_dir), min_sites=2,
                       num_sites=len(hippo.HOSPITALS), model=o["model"], lr=float(o["lr"]), batch_size=4,
                       task=TaskSpec(**TASK_KW).check(), mechanism=mechanism)


def run_hippocampus_demo(out: Path, rounds: int = 3, *, dp: bool = True, verbose: bool = False,
                         overrides: dict | None = None) -> dict:
    """Generate (if absent) and train the hippocampus consortium; returns and writes DIR/summary.json."""
    from client.site_config import load_site_config

    out = Path(out).resolve()
    t_start = time.perf_counter()
    setup_console_logging(verbose)
    for var, val in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                     ("RAY_DEDUP_LOGS", "0"), ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")):
        os.environ.setdefault(var, val)
    log.info("preparing the hippocampus consortium (MR DICOM exports) in %s", out)
    manifest = hippo.generate(out)
    hospitals = manifest["hospitals"]
    configs = [out / h / "site.toml" for h in hospitals]
    for c in configs:
        load_site_config(c)
    if not dp and any((out / h / "state" / "ledger.jsonl").exists() for h in hospitals):
        raise FileExistsError(f"the demo sites in {out} already have a privacy history; a non-DP round spends an "
                              "infinite epsilon. Use another --out for --no-dp")
    keys_dir = prepare_site_keys(out, hospitals)
    settings = hippocampus_settings(rounds, dp=dp, run_dir=out / "runs", keys_dir=keys_dir, overrides=overrides)
    settings.check()
    digest = approve_run(configs, settings)
    log.info("each site's admin approved run manifest %s", digest[:16])
    settings = resume_if_interrupted(settings)
    log.info("training %d rounds of %s with %s (%s) across %s", rounds, settings.task.describe(), settings.model,
             f"DP-SGD {settings.mechanism.describe()}" if dp else "no DP", ", ".join(hospitals))
    outputs = simulate(settings, configs, verbose=verbose)
    summary = summarise(out, manifest, settings, outputs, configs, time.perf_counter() - t_start)
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)  # the whole demo, held-out evaluation included
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary, out)
    return summary


def heldout_tensors(out: Path, task) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out NIfTI subjects through the sites' own pixel path (same transforms, same grid)."""
    import nibabel as nib

    from client.volumes.transforms import build_volume_transform, preprocess_volume

    transform = build_volume_transform(task)
    images, labels = [], []
    for p in sorted((out / hippo.HELDOUT / "images").glob("*.nii.gz")):
        img = nib.load(p)
        lab = nib.load(out / hippo.HELDOUT / "labels" / p.name)
        x, y = preprocess_volume(np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine),
                                 np.asarray(lab.dataobj).astype(np.int64), transform)
        images.append(x)
        labels.append(y)
    return torch.stack(images), torch.stack(labels)


def evaluate_heldout(out: Path, settings, outputs) -> list[dict]:
    from client.task_metrics import segmentation_metrics
    from models import build_task_model

    images, labels = heldout_tensors(out, settings.task)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scores = []
    for rnd in [0] + [e["round"] for e in outputs.history]:
        path = outputs.weights_path(rnd)
        if not path.exists():
            continue
        model = build_task_model(settings.model, settings.task)
        model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
        m = segmentation_metrics(settings.task, model, images, labels, device)
        scores.append({"round": rnd, "test_subjects": m["n"], "test_loss": m["val_loss"],
                       "test_dice": {"mean": m["val_dice"],
                                     **{lab: m[f"val_dice_{lab}"] for lab in settings.task.labels}}})
    return scores


def _quarantine_counts(configs: list[Path], task) -> dict[str, dict]:
    """Each site's quarantine by reason, from its cached ingest (the demo runs all sites on this machine; a real
    consortium sees only the suppressed counts of each site's dataset card)."""
    from client.site_config import load_site_config
    from client.volumes import build_volume_dataset

    out = {}
    for c in configs:
        ds = build_volume_dataset(load_site_config(c), task)
        reasons: dict[str, int] = {}
        for q in ds.report["quarantined"]:
            reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
        out[c.parent.name] = {"series_used": len(ds.report["used"]), "quarantined": reasons}
    return out


def summarise(out: Path, manifest: dict, settings, outputs, configs: list[Path], wall: float) -> dict:
    test = evaluate_heldout(out, settings, outputs)
    by_round = {t["round"]: t for t in test}
    final = test[-1] if test else {}
    epsilon: dict[str, float | None] = {}
    delta: dict[str, float | None] = {}
    for entry in outputs.history:
        for site, s in entry["sites"].items():
            if s.get("epsilon") is not None:
                epsilon[site], delta[site] = s["epsilon"], s.get("delta")
    status = json.loads((outputs.root / "status.json").read_text())
    return {
        "task": {**settings.task.to_manifest(), "name": "hippocampus"},
        "rounds": len(outputs.history),
        "sites": manifest["hospitals"],
        "subjects": manifest["subjects"],
        "run": outputs.name,
        "run_dir": str(outputs.root.relative_to(out)),
        "status": status["status"],
        "status_reason": status.get("reason", ""),
        "test_dice": final.get("test_dice"),
        "dp": settings.mechanism.dp,
        "epsilon": epsilon,
        "delta": delta,
        "sites_data": _quarantine_counts(configs, settings.task),
        "broken_series_planted": manifest["broken"],
        "settings": dataclasses.asdict(settings),
        "history": [{**e, "test": by_round.get(e["round"], {}),
                     "weights": str(outputs.weights_path(e["round"]).relative_to(out))} for e in outputs.history],
        "initial_weights": str(outputs.weights_path(0).relative_to(out)),
        "wall_seconds": round(wall, 1),
        "reference": REFERENCE,
    }


def print_summary(s: dict, out: Path) -> None:
    print()
    print(f"Atoll hippocampus demo: {s['rounds']} round(s) across {', '.join(s['sites'])} — {s['status']}"
          + (f" ({s['status_reason']})" if s["status_reason"] else ""))
    if s["test_dice"]:
        d = s["test_dice"]
        print(f"  held-out test ({s['subjects'][hippo.HELDOUT]} subjects no site saw): Dice mean {d['mean']:.3f}, "
              + ", ".join(f"{k} {v:.3f}" for k, v in d.items() if k != "mean"))
        print(f"  reference: {s['reference']}")
    for site, d in s["sites_data"].items():
        q = ", ".join(f"{k}: {v}" for k, v in d["quarantined"].items()) or "none"
        print(f"  {site}: {d['series_used']} series used; quarantined {q}")
    print_privacy(s)
    print(f"  wall time {s['wall_seconds']:.0f} s; summary: {out / 'summary.json'}")
