"""A three-class task end to end in a real Flower simulation: the lead declares the classes, sites that name
theirs in another order still train the same output, a site whose labels include a class the task lacks refuses
with TASK_MISMATCH (never SITE_ERROR), and the global model beats chance on held-out images no site saw."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from atoll import simulation
from atoll.demo import approve_run, prepare_site_keys
from client.app import app as client_app
from client.runtime import SIM_SITE_CONFIGS_ENV
from client.task_metrics import classification_metrics
from contract import Mechanism, TaskSpec
from models import build_task_model
from server.app import run_consortium
from server.settings import RunSettings
from tests.dicom_factory import uid, write_dicom

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Full backward hook is firing")]

TASK = TaskSpec(classes=("normal", "viral", "bacterial"), size=(16, 16))
CANARY = "CANARY^MULTICLASS"


def _image(label: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """Class 0 a bright top band, 1 a bright left band, 2 a bright centre square, 3 a bottom band, on noise."""
    img = rng.normal(800, 120, (size, size))
    if label == 0:
        img[: size // 3] += 1500
    elif label == 1:
        img[:, : size // 3] += 1500
    elif label == 2:
        img[size // 3: 2 * size // 3, size // 3: 2 * size // 3] += 2500
    else:
        img[-(size // 3):] += 1500
    return np.clip(img, 0, 4095).astype(np.uint16)


def _site(root, name: str, *, classes: list[str] | None, labels: list[str], seed: int,
          released: list[str]) -> "os.PathLike":
    """A hospital with one CR image per patient, a labels CSV (names or indices) and its own policy."""
    rng = np.random.default_rng(seed)
    site = root / name
    rows = []
    for p, label in enumerate(labels):
        name_of = label if classes else TASK.classes[int(label)]
        true_class = TASK.classes.index(name_of) if name_of in TASK.classes else 3  # 3: a pattern of its own
        sop = uid(f"{name}-sop-{p}")
        write_dicom(site / "dicom" / f"{p:04d}.dcm", patient_id=f"{name}-P{p:04d}", patient_name=CANARY,
                    sop_uid=sop, study_uid=uid(f"{name}-st-{p}"), series_uid=uid(f"{name}-se-{p}"),
                    rows=16, columns=16, pixels=_image(true_class, rng), seed=seed * 1000 + p)
        rows.append(f"{sop},{label}")
    (site / "labels.csv").write_text("SOPInstanceUID,label\n" + "\n".join(rows) + "\n")
    secret = site / "pseudonym.secret"
    secret.write_text(f"{seed:064x}\n")
    os.chmod(secret, 0o600)
    classes_line = f"classes = {json.dumps(classes)}\n" if classes else ""
    (site / "site.toml").write_text(f"""[site]
name = "{name}"
state_dir = "state"
secret_file = "pseudonym.secret"
signing_key = "keys/site_ed25519.pem"
device = "cpu"

[data]
dicom_dir = "dicom"
labels_csv = "labels.csv"
label_key = "SOPInstanceUID"
label_column = "label"
task = "classification"
{classes_line}modalities = ["CR"]
cache_dir = "state/cache"
image_size = 16
val_fraction = 0.25
seed = 0

[privacy]
max_epsilon = 50.0
accountant = "rdp"
noise_multiplier = [0.3, 10.0]
clip_norm = [0.1, 10.0]
local_steps = [1, 500]
released_metrics = {json.dumps(released)}
""")
    return site / "site.toml"


def _simulate(configs, settings):
    holder = {}
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        holder["outputs"] = run_consortium(grid, settings, context.run_id)

    os.environ[SIM_SITE_CONFIGS_ENV] = os.pathsep.join(str(c) for c in configs)
    simulation.run_sites(app, client_app, len(configs))  # the demo's resources: fair share of the cores, nice 0
    return holder["outputs"]


def test_three_classes_train_across_sites_and_a_foreign_class_is_a_task_mismatch(tmp_path):
    names = ["hospital-a", "hospital-b", "hospital-c", "hospital-d"]
    cyc = list(TASK.classes) * 40
    recall = [f"val_recall_{c}" for c in TASK.classes]
    configs = [
        # names in the task's order
        _site(tmp_path, "hospital-a", classes=list(TASK.classes), labels=cyc[:72], seed=1,
              released=["num-examples", "train_loss", "val_loss", "val_accuracy", "val_auc", *recall]),
        # names in another order: mapped by name, so "bacterial" is still output 2
        _site(tmp_path, "hospital-b", classes=["bacterial", "normal", "viral"], labels=cyc[1:73], seed=2,
              released=["num-examples", "val_accuracy", "val_auc"]),
        # integer labels: taken as the task's class indices
        _site(tmp_path, "hospital-c", classes=None, labels=[str(i % 3) for i in range(72)], seed=3,
              released=["num-examples", "val_accuracy"]),
        # a class the task does not have
        _site(tmp_path, "hospital-d", classes=["normal", "viral", "bacterial", "covid"],
              labels=(cyc[:30] + ["covid"] * 6), seed=4, released=["num-examples", "val_accuracy"]),
    ]
    keys = prepare_site_keys(tmp_path, names)
    settings = RunSettings(num_server_rounds=2, run_dir=str(tmp_path / "runs"), run_name="three", keys_dir=str(keys),
                           num_sites=4, min_sites=2, lr=0.1, task=TASK,
                           mechanism=Mechanism(noise_multiplier=1.0, clip_norm=2.0, sample_rate=0.3, steps=30))
    approve_run(configs, settings)
    outputs = _simulate(configs, settings)
    assert outputs.status == "completed", outputs.reason
    last = outputs.history[-1]["sites"]
    for entry in outputs.history:
        d = entry["sites"]["hospital-d"]
        assert d["status"] == "refused" and d["code"] == "TASK_MISMATCH", d
        assert "covid" in d["message"] and "normal, viral, bacterial" in d["message"]
        assert all(entry["sites"][n]["status"] == "contributed" for n in names[:3])
    # only what each site's policy lists leaves it: per-class recall from hospital-a only
    assert set(recall) <= set(last["hospital-a"]["val"])
    assert not any(k.startswith("val_recall_") for k in last["hospital-b"]["val"]) and "val_auc" in last["hospital-b"]["val"]
    assert set(last["hospital-c"]["val"]) <= {"num-examples", "val_accuracy"}
    ledger = (tmp_path / "hospital-d" / "state" / "ledger.jsonl")
    assert not ledger.exists() or "reservation" not in ledger.read_text(), "a mismatched task is refused before any charge"

    # the global model beats chance (1/3) on held-out images from every class pattern
    model = build_task_model(settings.model, TASK)
    model.load_state_dict(torch.load(outputs.weights_path(2), weights_only=True))
    rng = np.random.default_rng(99)
    labels = torch.tensor([i % 3 for i in range(150)])
    x = torch.stack([torch.from_numpy(_image(int(c), rng).astype(np.float32)) for c in labels]).unsqueeze(1)
    x = (x - x.amin((2, 3), keepdim=True)) / (x.amax((2, 3), keepdim=True) - x.amin((2, 3), keepdim=True))
    m = classification_metrics(TASK, model, x, labels, torch.device("cpu"))
    print("3-class held-out:", json.dumps({k: round(v, 3) for k, v in m.items()}))
    assert m["val_accuracy"] > 0.6, m
    assert min(m[r] for r in recall) > 0.2, m
    text = "\n".join(p.read_text(errors="replace") for p in outputs.root.rglob("*.json*"))
    assert CANARY not in text and "hospital-d-P" not in text
