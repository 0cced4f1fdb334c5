"""`atoll run export`: the MONAI bundle and the model card.

The slow test exports a run folder written the way the ServerApp writes it (signed ledger records, digests, real
AtollNet weights), runs the bundle with MONAI's own ``monai.bundle.run`` on the held-out DICOM files, and checks
that its predictions reproduce the held-out test metrics the demo computes for that round (``atoll.demo``'s
``evaluate_heldout``, which writes them into summary.json). The other tests are bad inputs and the card's content.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from atoll.cli import main as atoll_main
from server.export import ExportError, read_run
from tests.console_helpers import RunWriter


class ModelRunWriter(RunWriter):
    """RunWriter with real AtollNet weights per round (the default task's network), so that they can be exported."""

    @staticmethod
    def _weights(tag: int):
        import torch
        from flwr.app import ArrayRecord

        from contract.task import TaskSpec
        from models import build_task_model

        torch.manual_seed(100 + tag)
        return ArrayRecord(build_task_model("atollnet", TaskSpec()).state_dict())


def _settings(writer: RunWriter):
    """What evaluate_heldout reads of the run's settings: its task and model (RunWriter runs the defaults)."""
    from server.settings import RunSettings

    s = RunSettings()
    saved = json.loads((writer.run_dir / "settings.json").read_text())
    assert (saved["model"], saved["task"]["size"]) == (s.model, list(s.task.size))
    return s


def _minimal_run(root: Path, rounds: int = 2, weights: tuple[int, ...] = (0, 1, 2)) -> Path:
    """A run folder by hand (no torch): settings, history, weights files as names only."""
    run = root / "runs" / "r1"
    (run / "weights").mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps({"model": "atollnet", "num_server_rounds": rounds, "task": {
        "kind": "classification", "spatial_dims": 2, "in_channels": 1, "classes": ["normal", "pneumonia"],
        "labels": [], "size": [28, 28], "spacing_mm": [], "orientation": "", "modalities": [], "loss": ""}}))
    (run / "history.json").write_text(json.dumps([{"round": k, "sites": {"hospital-a": {"status": "contributed"}}}
                                                  for k in range(1, rounds + 1)]))
    for k in weights:
        (run / "weights" / f"round-{k:03d}.pt").write_bytes(b"")
    return run


def test_read_run_bad_inputs(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        read_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match=r"settings\.json is missing.*not a run folder"):
        read_run(tmp_path / "empty")
    run = _minimal_run(tmp_path, weights=(0, 1))
    assert read_run(run).round == 1  # round 2 has no weights: the last exportable round is 1
    with pytest.raises(ExportError, match=r"--round 5: run r1 has no such round \(recorded: 1, 2\)"):
        read_run(run, 5)
    with pytest.raises(ExportError, match=r"round-002\.pt is missing: round 2 did not end with aggregated weights"):
        read_run(run, 2)
    (run / "history.json").unlink()
    with pytest.raises(ExportError, match=r"history\.json is missing"):
        read_run(run)
    (run / "history.json").write_text("[{\"round\": 1")
    with pytest.raises(ExportError, match=r"history\.json is not readable JSON"):
        read_run(run)


def test_cli_export_refuses_bad_round_and_incomplete_folder(tmp_path, capsys):
    run = _minimal_run(tmp_path, weights=(0, 1))
    assert atoll_main(["run", "export", str(run), "--out", str(tmp_path / "b"), "--round", "9"]) == 3
    err = capsys.readouterr().err
    assert "--round 9: run r1 has no such round" in err and "Traceback" not in err
    (run / "weights" / "round-001.pt").write_bytes(b"not a torch file")
    assert atoll_main(["run", "export", str(run), "--out", str(tmp_path / "b")]) == 2
    assert "round-001.pt is not a readable weights file" in capsys.readouterr().err
    (run / "settings.json").unlink()
    assert atoll_main(["run", "export", str(run), "--out", str(tmp_path / "b")]) == 3
    assert "settings.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_model_card_content(tmp_path):
    """Task, sites with their signed epsilon and budget, the held-out metrics of the round, no machine paths."""
    from server.model_card import build_card, card_markdown, heldout_from_summary

    w = RunWriter(tmp_path, "card-run", rounds=2, sites=["hospital-a", "hospital-b"])
    w.round(1)
    w.round(2, refuse={"hospital-b": ("BUDGET_EXHAUSTED", "the projected epsilon exceeds the budget")})
    w.finish()
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"run": "card-run", "history": [
        {"round": 2, "test": {"round": 2, "test_images": 624, "test_accuracy": 0.81, "test_auc": 0.9}}]}))
    run = read_run(w.run_dir)
    heldout = heldout_from_summary(summary, "card-run", run.round)
    meta = {"name": "atoll-card-run", "version": "0.1.0", "atoll": {"weights_sha256": "ab" * 32},
            "network_data_format": {"outputs": {"pred": {"channel_def": {"0": "normal", "1": "pneumonia"}}}}}
    card = build_card(run, meta, heldout=heldout, audit={"verdict": "PASS", "date": "2026-12-01T12:00:00Z"},
                      manifest={"sha256": "cd" * 32, "app_hash": "ef" * 32, "source": "test"})
    a, b = card["sites"]["hospital-a"], card["sites"]["hospital-b"]
    assert a["rounds_contributed"] == 2 and b["rounds_contributed"] == 1
    assert b["refusals"] == {"BUDGET_EXHAUSTED": 1}
    records = [json.loads(x) for x in (w.run_dir / "ledger.jsonl").read_text().splitlines()]
    last_a = [r for r in records if r["site"] == "hospital-a"][-1]
    assert a["privacy"]["epsilon"] == last_a["epsilon_after"] and a["privacy"]["unit"] == "patient"
    assert a["privacy"]["max_epsilon"] == 8.0 and a["privacy"]["accountant"] == last_a["accountant"]
    assert card["metrics"]["heldout"]["metrics"] == {"test_accuracy": 0.81, "test_auc": 0.9}
    assert card["metrics"]["heldout"]["examples"] == 624
    text = card_markdown(card)
    assert "| hospital-b | 1 | BUDGET_EXHAUSTED x1 |" in text and "**PASS** on 2026-12-01T12:00:00Z" in text
    assert str(tmp_path) not in json.dumps(card) and str(tmp_path) not in text
    # a summary of another run is refused, not silently used
    summary.write_text(json.dumps({"run": "other", "history": []}))
    with pytest.raises(ValueError, match="summary of run 'other'"):
        heldout_from_summary(summary, "card-run", 2)


def _heldout_labels(consortium: Path) -> dict[str, int]:
    """File (relative to the held-out DICOM folder) -> label, from the labels CSV keyed by SOPInstanceUID."""
    import pydicom

    with open(consortium / "heldout-test" / "labels.csv", newline="") as fh:
        by_uid = {row["SOPInstanceUID"]: int(row["pneumonia"]) for row in csv.DictReader(fh)}
    root = consortium / "heldout-test" / "dicom"
    out = {}
    for p in root.rglob("*"):
        if p.is_file():
            uid = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            if uid in by_uid:
                out[str(p.relative_to(root))] = by_uid[uid]
    return out


@pytest.mark.slow
def test_bundle_reproduces_heldout_metrics(demo_consortium, tmp_path, capsys):
    """MONAI's bundle API loads the export and its predictions give the run's held-out accuracy and AUC."""
    import torch
    from monai.bundle import load, run as bundle_run
    from sklearn.metrics import roc_auc_score

    from atoll.demo import evaluate_heldout

    w = ModelRunWriter(tmp_path, "export-run", rounds=1, sites=["hospital-a", "hospital-b"])
    w.round(1)
    w.finish()
    settings = _settings(w)
    test = evaluate_heldout(demo_consortium, settings, w.out)  # what the demo writes into summary.json
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"run": "export-run", "history": [{"round": t["round"], "test": t} for t in test]}))
    bundle = tmp_path / "bundle"
    assert atoll_main(["run", "export", str(w.run_dir), "--out", str(bundle), "--heldout", str(summary),
                       "--site-ledger", str(w.site_ledgers()[0])]) == 0
    printed = capsys.readouterr().out
    assert "configs/inference.json" in printed and "models/model.ts" in printed
    for f in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.ts",
              "docs/README.md", "docs/model_card.json"):
        assert (bundle / f).is_file(), f
    card = json.loads((bundle / "docs" / "model_card.json").read_text())
    assert card["provenance"]["audit"]["verdict"] == "PASS", card["provenance"]["audit"]
    assert card["metrics"]["heldout"]["round"] == 1

    # MONAI's loader: network_def + models/model.pt, and the TorchScript module, give the same logits
    net = load(name="bundle", bundle_dir=str(tmp_path), workflow_type="inference", source="github", device="cpu")
    ts = torch.jit.load(str(bundle / "models" / "model.ts"))
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(net.eval()(x), ts(x), atol=1e-5)

    # MONAI's runner on the held-out DICOM files -> predictions.json -> the run's held-out metrics
    bundle_run(config_file=str(bundle / "configs" / "inference.json"),
               meta_file=str(bundle / "configs" / "metadata.json"), bundle_root=str(bundle),
               input_dir=str(demo_consortium / "heldout-test" / "dicom"), output_dir=str(tmp_path / "pred"))
    preds = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    labels = _heldout_labels(demo_consortium)
    scored = [(labels[p["input"]], p["probabilities"]["pneumonia"], p["prediction"]) for p in preds
              if p["input"] in labels]
    want = next(t for t in test if t["round"] == 1)
    assert len(scored) == want["test_images"] == 624
    acc = sum((pred == "pneumonia") == bool(y) for y, _, pred in scored) / len(scored)
    auc = roc_auc_score([y for y, _, _ in scored], [p for _, p, _ in scored])
    assert math.isclose(acc, want["test_accuracy"], abs_tol=1e-9)
    assert math.isclose(auc, want["test_auc"], abs_tol=1e-6)
    assert card["metrics"]["heldout"]["metrics"]["test_auc"] == pytest.approx(auc, abs=1e-6)


def test_segmentation_bundle_predicts_as_the_sites_pipeline(tmp_path):
    """3D segmentation: MONAI's runner on NIfTI volumes gives the label maps of the network on the sites' own
    volume preprocessing (client.volumes.transforms), on the task's grid."""
    import nibabel as nib
    import numpy as np
    import torch
    from monai.bundle import run as bundle_run

    from client.volumes.transforms import build_volume_transform, preprocess_volume
    from contract.task import TaskSpec
    from models import build_task_model
    from server.export import export_bundle

    task = TaskSpec(kind="segmentation", spatial_dims=3, classes=(), labels=("anterior", "posterior"),
                    size=(16, 16, 16), spacing_mm=(1.5, 1.5, 1.5), orientation="RAS", modalities=("MR",)).check()
    run = tmp_path / "runs" / "seg"
    (run / "weights").mkdir(parents=True)
    torch.manual_seed(3)
    net = build_task_model("basicunet-small", task)
    torch.save(net.state_dict(), run / "weights" / "round-001.pt")
    import dataclasses

    (run / "settings.json").write_text(json.dumps({"model": "basicunet-small", "num_server_rounds": 1,
                                                   "task": dataclasses.asdict(task)}))
    (run / "history.json").write_text(json.dumps([{"round": 1, "sites": {"hospital-a": {
        "status": "contributed", "val": {"val_dice": 0.1}}}}]))
    card = export_bundle(run, tmp_path / "bundle")
    assert card["task"]["outputs"] == {"0": "background", "1": "anterior", "2": "posterior"}
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    affine = np.diag([1.2, 0.9, 1.1, 1.0])
    for i in range(2):
        nib.save(nib.Nifti1Image(rng.normal(100, 20, (18, 14, 20)).astype(np.float32), affine), inputs / f"s{i}.nii.gz")
    b = tmp_path / "bundle"
    bundle_run(config_file=str(b / "configs" / "inference.json"), meta_file=str(b / "configs" / "metadata.json"),
               bundle_root=str(b), input_dir=str(inputs), output_dir=str(tmp_path / "pred"))
    preds = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert [p["input"] for p in preds] == ["s0.nii.gz", "s1.nii.gz"]
    transform = build_volume_transform(task)
    for i in range(2):
        img = nib.load(inputs / f"s{i}.nii.gz")
        x, _ = preprocess_volume(np.asarray(img.dataobj, dtype=np.float32), img.affine, None, transform)
        with torch.no_grad():
            want = net.eval()(x[None]).argmax(1)[0].numpy()
        got = np.asarray(nib.load(tmp_path / "pred" / f"s{i}_seg.nii.gz").dataobj)
        assert got.shape == (16, 16, 16) and (got == want).all()
