"""Run manifests, app bundle hash (Flower's FAB rules), the append-only approval log and its CLI."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from client import approve_cli
from contract import Mechanism, TaskSpec
from client.approval import (
    ApprovalStore,
    ApprovalStoreError,
    ManifestError,
    RunManifest,
    RunNotApproved,
    TensorSpec,
    TrainingParams,
    app_bundle_hash,
    check_approved,
    load_manifest,
    manifest_hash,
    outputs_from_state_dict,
    save_manifest,
)

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "miniapp"
version = "1.0.0"
dependencies = ["flwr==1.41.0"]

[tool.flwr.app]
publisher = "atoll"

[tool.flwr.app.components]
serverapp = "miniapp.server_app:app"
clientapp = "miniapp.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 3

[tool.flwr.federations]
default = "local"

[tool.flwr.federations.local]
options.num-supernodes = 2
"""


def _project(root: Path) -> Path:
    (root / "miniapp").mkdir(parents=True)
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / "miniapp" / "__init__.py").write_text("")
    (root / "miniapp" / "client_app.py").write_text("app = None  # client\n")
    (root / "miniapp" / "server_app.py").write_text("app = None  # server\n")
    (root / "README.md").write_text("# docs\n")
    (root / "tests").mkdir()
    (root / "tests" / "test_mini.py").write_text("def test(): pass\n")
    return root


def _manifest(**over) -> RunManifest:
    sd = torch.nn.Linear(4, 2).state_dict()
    base = dict(
        app_hash="ab" * 32,
        model="atollnet",
        task=TaskSpec(),
        mechanism=Mechanism(dp=True, noise_multiplier=1.1, clip_norm=1.0, steps=5), training=TrainingParams(batch_size=32, lr=0.01),
        num_rounds=3,
        outputs=outputs_from_state_dict(sd),
        metrics=("num-examples", "val_loss"),
    )
    base.update(over)
    return RunManifest(**base)


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="atoll site")
    approve_cli.add_parser(parser.add_subparsers(dest="cmd", required=True))
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- manifest
def test_outputs_from_torch_state_dict_match_flower_array_dtypes() -> None:
    from flwr.app import ArrayRecord

    sd = torch.nn.Linear(4, 2).state_dict()
    specs = outputs_from_state_dict(sd)
    rec = ArrayRecord(sd)
    assert {(s.name, s.shape, s.dtype) for s in specs} == {(k, tuple(a.shape), a.dtype) for k, a in rec.items()}


def test_hash_is_canonical_over_order_and_int_float_spelling() -> None:
    a = _manifest()
    b = _manifest(
        outputs=tuple(reversed(a.outputs)),
        metrics=("val_loss", "num-examples", "val_loss"),
        mechanism=Mechanism(dp=True, noise_multiplier=1.1, clip_norm=1, steps=5), training=TrainingParams(batch_size=32, lr=0.01),
    )
    assert manifest_hash(a) == manifest_hash(b)
    assert len(manifest_hash(a)) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"app_hash": "cd" * 32},
        {"model": "resnet18"},
        {"num_rounds": 4},
        {"metrics": ("num-examples", "val_loss", "train_loss")},
        {"outputs": (TensorSpec("weight", (2, 4), "float64"), TensorSpec("bias", (2,), "float32"))},
        {"mechanism": Mechanism(dp=True, noise_multiplier=1.0, clip_norm=1.0, steps=5), "training": TrainingParams(batch_size=32, lr=0.01)},
        {"mechanism": Mechanism(dp=True, noise_multiplier=1.1, clip_norm=1.0, steps=6), "training": TrainingParams(batch_size=32, lr=0.01)},
        {"mechanism": Mechanism(dp=True, noise_multiplier=1.1, clip_norm=1.0, steps=5, sample_rate=0.2), "training": TrainingParams(batch_size=32, lr=0.01)},
        {"mechanism": Mechanism(dp=False, noise_multiplier=1.1, clip_norm=1.0, steps=5), "training": TrainingParams(batch_size=32, lr=0.01)},
        {"secure_aggregation": True},
        {"task": TaskSpec(classes=("normal", "viral", "bacterial"))},
        {"task": TaskSpec(classes=("pneumonia", "normal"))},
        {"task": TaskSpec(size=(64, 64))},
        {"task": TaskSpec(modalities=("CR",))},
        {"mechanism": Mechanism(noise_multiplier=1.1, clip_norm=1.0, steps=5, accountant="prv")},
    ],
)
def test_every_field_changes_the_hash(change: dict) -> None:
    assert manifest_hash(_manifest(**change)) != manifest_hash(_manifest())


def test_json_round_trip(tmp_path: Path) -> None:
    m = _manifest()
    path = save_manifest(m, tmp_path / "run-manifest.json")
    assert load_manifest(path) == m and manifest_hash(load_manifest(path)) == manifest_hash(m)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.pop("model"), "missing field"),
        (lambda d: d.update(extra=1), "unknown field"),
        (lambda d: d.update(app_hash="xyz"), "app_hash"),
        (lambda d: d["mechanism"].update(noise_multiplier=float("nan")), "noise-multiplier"),
        (lambda d: d["training"].update(lr=0), "training.lr"),
        (lambda d: d["mechanism"].update(steps=True), "steps"),
        (lambda d: d["mechanism"].update(sample_rate=1.5), "sample-rate"),
        (lambda d: d["mechanism"].pop("clip_norm"), "missing field"),
        (lambda d: d.pop("task"), "missing field"),
        (lambda d: d["task"].update(classes=["normal"]), "at least 2"),
        (lambda d: d["task"].update(kind="detection"), "task"),
        (lambda d: d.update(num_rounds=0), "num_rounds"),
        (lambda d: d["outputs"][0].update(shape=[-1]), "shape"),
        (lambda d: d.update(outputs=[]), "at least one tensor"),
        (lambda d: d.update(atoll_run_manifest=1), "atoll_run_manifest"),
    ],
)
def test_malformed_manifests_name_file_and_field(tmp_path: Path, mutate, match: str) -> None:
    d = _manifest().to_dict()
    mutate(d)
    p = tmp_path / "m.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=match) as err:
        load_manifest(p)
    assert str(p) in str(err.value)


def test_dp_on_needs_noise() -> None:
    with pytest.raises(ManifestError, match="not a valid DP mechanism"):
        _manifest(mechanism=Mechanism(dp=True, noise_multiplier=0.0))


# ----------------------------------------------------------------------------- app hash
def test_app_hash_same_for_checkout_and_flower_installed_bundle(tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.install import install_from_fab

    project = _project(tmp_path / "miniapp")
    installed = install_from_fab(build_fab_from_disk(project), install_dir=tmp_path / "home", skip_prompt=True)
    assert installed != project and (installed / "miniapp" / "client_app.py").is_file()
    h = app_bundle_hash(project)
    assert app_bundle_hash(installed) == h
    # a Python cache at the site and a test file or README edit at the lead do not change it
    (installed / "miniapp" / "__pycache__").mkdir()
    (installed / "miniapp" / "__pycache__" / "client_app.cpython-311.pyc").write_bytes(b"\0junk")
    (project / "tests" / "test_mini.py").write_text("def test(): assert 0\n")
    (project / "README.md").write_text("# edited\n")
    assert app_bundle_hash(installed) == h == app_bundle_hash(project)


def test_app_hash_changes_with_code_or_added_module(tmp_path: Path) -> None:
    project = _project(tmp_path / "miniapp")
    h = app_bundle_hash(project)
    (project / "miniapp" / "client_app.py").write_text("app = None  # client, patched\n")
    h2 = app_bundle_hash(project)
    (project / "miniapp" / "extra.py").write_text("import os\n")
    h3 = app_bundle_hash(project)
    assert len({h, h2, h3}) == 3


def test_app_hash_needs_a_flower_app(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no pyproject.toml"):
        app_bundle_hash(tmp_path)


# ----------------------------------------------------------------------------- store
def test_unapproved_run_is_refused_with_a_path_free_reason(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with pytest.raises(RunNotApproved) as err:
        check_approved(_manifest(), state)
    msg = err.value.message
    assert "not approved" in msg and "atoll site approve" in msg
    assert str(tmp_path) not in msg and "/" not in msg.replace("atoll site approve", "")


def test_approve_then_check_passes_and_record_has_who_when_what(tmp_path: Path) -> None:
    store = ApprovalStore(tmp_path / "state")
    m = _manifest()
    rec = store.approve(m, by="dr-operator")
    store.check_approved(m)
    saved = [json.loads(l) for l in store.path.read_text().splitlines()]
    assert saved == [rec]
    assert rec["by"] == "dr-operator" and rec["at"].endswith("+00:00")
    assert rec["manifest"] == m.to_dict() and rec["manifest_sha256"] == manifest_hash(m)


def test_refusal_names_the_fields_that_differ(tmp_path: Path) -> None:
    store = ApprovalStore(tmp_path)
    store.approve(_manifest(), by="op")
    changed = _manifest(
        num_rounds=10,
        mechanism=Mechanism(dp=True, noise_multiplier=0.5, clip_norm=1.0, steps=5), training=TrainingParams(batch_size=32, lr=0.01),
    )
    with pytest.raises(RunNotApproved, match=r"differs from an approved run in: mechanism\.noise_multiplier, num_rounds"):
        store.check_approved(changed)
    with pytest.raises(RunNotApproved, match="app code .* was never approved"):
        store.check_approved(_manifest(app_hash="ef" * 32))


def test_revocation_refuses_later_rounds(tmp_path: Path) -> None:
    store = ApprovalStore(tmp_path)
    m = _manifest()
    store.approve(m, by="op")
    store.revoke(manifest_hash(m), by="op", reason="protocol changed")
    with pytest.raises(RunNotApproved, match="revoked"):
        store.check_approved(m)
    with pytest.raises(ApprovalStoreError, match="not currently approved"):
        store.revoke(manifest_hash(m))
    store.approve(m, by="op")  # re-approval is a new record, history kept
    store.check_approved(m)
    assert [r["action"] for r in store.records()] == ["approve", "revoke", "approve"]


def test_edited_history_fails_closed(tmp_path: Path) -> None:
    store = ApprovalStore(tmp_path)
    a, b = _manifest(), _manifest(num_rounds=5)
    store.approve(a, by="op")
    store.approve(b, by="op")
    lines = store.path.read_text().splitlines()
    store.path.write_text(lines[1] + "\n")  # drop the first line
    with pytest.raises(RunNotApproved, match="approval log is damaged"):
        store.check_approved(b)
    with pytest.raises(ApprovalStoreError, match="hash chain broken"):
        store.approve(a)
    forged = json.loads(lines[0])
    forged["manifest"]["num_rounds"] = 99
    store.path.write_text(json.dumps(forged) + "\n" + lines[1] + "\n")  # edit a record in place
    with pytest.raises(ApprovalStoreError):
        store.records()


# ----------------------------------------------------------------------------- CLI
def test_cli_shows_what_runs_and_records_approval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = _manifest()
    mf = save_manifest(m, tmp_path / "run-manifest.json")
    state = tmp_path / "state"
    args = _cli(["approve", "--state-dir", str(state), "--manifest", str(mf)])
    assert args.func(args) == 1  # no tty, no --yes: shown but not approved
    out = capsys.readouterr().out
    assert m.app_hash in out and "noise multiplier 1.1" in out and "weight float32[2, 4]" in out
    assert "num-examples, val_loss" in out and "--yes" in out
    assert not ApprovalStore(state).is_approved(manifest_hash(m))

    args = _cli(["approve", "--state-dir", str(state), "--manifest", str(mf), "--yes", "--by", "dr-a"])
    assert args.func(args) == 0
    assert "Approved run" in capsys.readouterr().out
    ApprovalStore(state).check_approved(m)

    listing = _cli(["approve", "--state-dir", str(state), "--list"])
    assert listing.func(listing) == 0
    out = capsys.readouterr().out
    assert manifest_hash(m)[:12] in out and "approved" in out and "dr-a" in out


def test_cli_warns_loudly_when_dp_is_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = _manifest(mechanism=Mechanism(dp=False, noise_multiplier=0.0, clip_norm=1.0, steps=1), training=TrainingParams(batch_size=8, lr=0.1))
    mf = save_manifest(m, tmp_path / "m.json")
    args = _cli(["approve", "--state-dir", str(tmp_path / "s"), "--manifest", str(mf), "--yes"])
    assert args.func(args) == 0
    assert "WITHOUT differential privacy" in capsys.readouterr().out


def test_cli_reads_state_dir_from_site_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site"
    (site / "dicom").mkdir(parents=True)
    (site / "pseudonym.secret").write_bytes(b"s" * 32)
    (site / "pseudonym.secret").chmod(0o600)
    (site / "site.toml").write_text(
        '[site]\nname = "hospital-a"\nstate_dir = "state"\nsecret_file = "pseudonym.secret"\n'
        '[data]\ndicom_dir = "dicom"\n'
        "[privacy]\nmax_epsilon = 8.0\n"
    )
    mf = save_manifest(_manifest(), tmp_path / "m.json")
    args = _cli(["approve", "--config", str(site / "site.toml"), "--manifest", str(mf), "--yes"])
    code = args.func(args)
    out = capsys.readouterr().out
    assert code == 0 and "Traceback" not in out, out
    ApprovalStore(site / "state").check_approved(_manifest())


def test_cli_bad_manifest_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "m.json"
    bad.write_text("{not json")
    args = _cli(["approve", "--state-dir", str(tmp_path), "--manifest", str(bad), "--yes"])
    assert args.func(args) == 2
    out = capsys.readouterr().out
    assert "is not valid JSON" in out and "Traceback" not in out


def test_cli_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = _manifest()
    ApprovalStore(tmp_path).approve(m, by="op")
    args = _cli(["approve", "--state-dir", str(tmp_path), "--revoke", manifest_hash(m), "--reason", "done"])
    assert args.func(args) == 0
    with pytest.raises(RunNotApproved):
        ApprovalStore(tmp_path).check_approved(m)
    assert ApprovalStore(tmp_path).records()[-1]["reason"] == "done"
    again = _cli(["approve", "--state-dir", str(tmp_path), "--revoke", manifest_hash(m)])
    assert again.func(again) == 2
    assert "not currently approved" in capsys.readouterr().out


def test_replace_keeps_validation() -> None:
    with pytest.raises(ManifestError):
        replace(_manifest(), num_rounds=-1)


def test_secure_aggregation_is_shown_and_round_trips(tmp_path: Path) -> None:
    from client.approval import describe_manifest

    masked = _manifest(secure_aggregation=True)
    assert "masked by SecAgg+" in describe_manifest(masked)
    assert "in the clear to the server" in describe_manifest(_manifest())
    assert load_manifest(save_manifest(masked, tmp_path / "m.json")) == masked
    with pytest.raises(ManifestError, match="secure_aggregation must be true or false"):
        RunManifest.from_dict({**masked.to_dict(), "secure_aggregation": "yes"})


def test_the_approved_app_hash_covers_the_app_code_and_nothing_else(tmp_path: Path) -> None:
    """pyproject's fab-include: tests, fixtures and benchmarks are not shipped to sites and cannot move the hash."""
    import shutil

    from conftest import REPO

    app = tmp_path / "app"
    shutil.copytree(REPO, app, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".venv", "venv"))
    before = app_bundle_hash(app)
    (app / "tests" / "helper_module.py").write_text("X = 1\n")
    (app / "bench" / "extra.py").write_text("Y = 2\n")
    (app / "docs" / "note.md").write_text("# note\n")
    assert app_bundle_hash(app) == before
    with open(app / "client" / "app.py", "a") as fh:
        fh.write("\n# a changed line of site code\n")
    assert app_bundle_hash(app) != before
