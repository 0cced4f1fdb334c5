"""Every rule the budget guard applies is checked before any round: by ``atoll site check`` and by ``atoll site
approve`` (one shared function, :func:`privacy.policy.check_policy`), and a round refused for a policy rule says
which one (DELTA_TOO_LARGE, POLICY_INVALID, ...), never SITE_ERROR.
"""

from __future__ import annotations

import dataclasses

import time
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Context, Message, Metadata, RecordDict

from contract import wire
from client.site_config import create_secret_file
from contract import Mechanism
from privacy.guard import BudgetGuard, BudgetRefused, RoundRequest
from privacy.ledger import SiteLedger
from privacy.policy import SitePolicy, check_policy
from tests.dicom_factory import write_labels, write_site


def make_site(root: Path, privacy: str = "", patients: int = 10) -> Path:
    """A small labelled site with a site TOML (``privacy`` is the body of its [privacy] table)."""
    recs = write_site(root / "dicom", patients=patients, images_per_patient=2)
    write_labels(root / "labels.csv", recs)
    create_secret_file(root / "state" / "pseudonym.secret")
    toml = root / "site.toml"
    toml.write_text('[site]\nname = "hospital-p"\n[data]\ndicom_dir = "dicom"\nlabels_csv = "labels.csv"\n'
                    'val_fraction = 0.2\n' + (f"[privacy]\n{privacy}\n" if privacy else ""))
    return toml


def run_cli(argv: list[str]) -> int:
    from atoll.cli import build_parser

    args = build_parser().parse_args(argv)
    return int(args.func(args))


# -------------------------------------------------------------------------------------- the shared function


def test_check_policy_applies_the_guards_rules(tmp_path: Path) -> None:
    policy = SitePolicy.from_table({"delta": 0.5, "noise_multiplier": [1.0, 5.0]})
    codes = {f.code for f in check_policy(policy, num_patients=8) if f.blocking}
    assert codes == {"DELTA_TOO_LARGE"}
    run = Mechanism(dp=True, noise_multiplier=0.7, clip_norm=1.0, sample_rate=0.1, steps=10)
    codes = {f.code for f in check_policy(SitePolicy.from_table({"noise_multiplier": [1.0, 5.0]}), num_patients=8,
                                          run=run, rounds=3) if f.blocking}
    assert codes == {"NOISE_OUT_OF_POLICY"}
    # the budget: a run whose first round already exceeds it is blocked; one that fits partly is a warning
    tight = SitePolicy.from_table({"max_epsilon": 0.5})
    blocked = check_policy(tight, num_patients=50, history=[], rounds=3,
                           run=dataclasses.replace(run, noise_multiplier=1.0, steps=200))
    assert [f.code for f in blocked if f.blocking] == ["BUDGET_EXCEEDED"]
    partly = check_policy(SitePolicy.from_table({"max_epsilon": 4.0}), num_patients=50, history=[],
                          run=dataclasses.replace(run, noise_multiplier=1.0, steps=10), rounds=50)
    (note,) = partly
    assert not note.blocking and note.code == "BUDGET_EXCEEDED" and "of 50 rounds fit" in note.message
    # the same rule, the same answer as the guard at round time
    guard = BudgetGuard(SiteLedger(tmp_path / "l.jsonl", site="s"), SitePolicy.from_table({"noise_multiplier": [1.0, 5.0]}),
                        num_patients=8)
    with pytest.raises(BudgetRefused) as refused:
        guard.reserve(RoundRequest("r", 1, Mechanism(noise_multiplier=0.7, clip_norm=1.0, sample_rate=0.1, steps=10)), weights_in_sha256="0" * 64)
    assert refused.value.code == "NOISE_OUT_OF_POLICY"


def test_a_spent_budget_is_reported_by_check_policy(tmp_path: Path) -> None:
    policy = SitePolicy.from_table({"max_epsilon": 1.0})
    assert check_policy(policy, num_patients=50, history=[]) == []
    spent = check_policy(policy, num_patients=50, history=[(0.6, 0.5, 400)])
    assert [(f.code, f.blocking) for f in spent] == [("BUDGET_EXCEEDED", True)]


# -------------------------------------------------------------------------------------- site check / approve


def test_site_check_refuses_a_delta_the_guard_would_refuse(tmp_path: Path, capsys) -> None:
    toml = make_site(tmp_path, "delta = 0.5")
    assert run_cli(["site", "check", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert "DELTA_TOO_LARGE" in err and "[privacy].delta" in err and "Traceback" not in err


def _manifest(tmp_path: Path, **training) -> Path:
    from client.approval import save_manifest
    from client.manifest import build_run_manifest

    cfg = wire.RoundConfig(run_id="m", server_round=1, num_rounds=2, mechanism=Mechanism(steps=5, **training))
    return save_manifest(build_run_manifest(cfg), tmp_path / "run-manifest.json")


def test_site_approve_refuses_a_run_its_policy_would_refuse(tmp_path: Path, capsys) -> None:
    toml = make_site(tmp_path / "site", "noise_multiplier = [1.0, 5.0]")
    manifest = _manifest(tmp_path, noise_multiplier=0.6)
    assert run_cli(["site", "approve", "--config", str(toml), "--manifest", str(manifest), "--yes"]) == 1
    out = capsys.readouterr().out
    assert "NOISE_OUT_OF_POLICY" in out and "not approved" in out
    assert not (tmp_path / "site" / "state" / "approvals.jsonl").exists()
    ok = _manifest(tmp_path, noise_multiplier=2.0)
    assert run_cli(["site", "approve", "--config", str(toml), "--manifest", str(ok), "--yes"]) == 0


def test_site_approve_checks_delta_against_the_sites_patients(tmp_path: Path, capsys) -> None:
    toml = make_site(tmp_path / "site", "delta = 0.5")
    manifest = _manifest(tmp_path, noise_multiplier=2.0)
    assert run_cli(["site", "approve", "--config", str(toml), "--manifest", str(manifest), "--yes"]) == 1
    assert "DELTA_TOO_LARGE" in capsys.readouterr().out


# -------------------------------------------------------------------------------------- round time


def _train_message(cfg: wire.RoundConfig, arrays: ArrayRecord) -> Message:
    meta = Metadata(run_id=1, message_id=f"m-{time.time_ns()}", src_node_id=0, dst_node_id=7,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(content=RecordDict({wire.ARRAYS: arrays, wire.CONFIG: cfg.to_record()}), metadata=meta)


@pytest.mark.parametrize("privacy, code", [("delta = 0.5", "DELTA_TOO_LARGE"), ("max_epsilon = -1", "POLICY_INVALID")])
def test_a_round_refused_for_a_policy_rule_carries_its_code(tmp_path: Path, privacy: str, code: str) -> None:
    from client.app import train
    from client.runtime import SITE_CONFIG_KEY
    from models import build_model

    toml = make_site(tmp_path, privacy)
    cfg = wire.RoundConfig(run_id="policy-run", server_round=1, mechanism=Mechanism(steps=2))
    arrays = ArrayRecord(build_model(cfg.model, spatial_dims=2, in_channels=1, num_classes=2).state_dict())
    ctx = Context(run_id=1, node_id=7, node_config={SITE_CONFIG_KEY: str(toml)}, state=RecordDict(), run_config={})
    reply = train(_train_message(cfg, arrays), ctx)
    got, message = wire.refusal_of(reply.content)
    assert got == code
    assert str(tmp_path) not in message and "site.toml" not in message


def test_site_check_and_approve_read_the_budget_from_the_sites_ledger(tmp_path: Path, capsys) -> None:
    toml = make_site(tmp_path / "site", "max_epsilon = 0.5")  # the hospital lowered its budget after spending
    guard = BudgetGuard(SiteLedger(tmp_path / "site" / "state" / "ledger.jsonl", site="hospital-p"),
                        SitePolicy.from_table({"max_epsilon": 1.0}), num_patients=8)
    while True:  # spend the whole budget, as rounds would
        try:
            guard.reserve(RoundRequest("spend", len(guard.history()), Mechanism(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.05, steps=10)), weights_in_sha256="0" * 64)
        except BudgetRefused:
            break
    assert guard.spent() > 0.5
    assert run_cli(["site", "check", "--config", str(toml)]) == 1
    assert "[BUDGET_EXCEEDED]" in capsys.readouterr().err
    manifest = _manifest(tmp_path, noise_multiplier=2.0)
    assert run_cli(["site", "approve", "--config", str(toml), "--manifest", str(manifest), "--yes"]) == 1
    assert "BUDGET_EXCEEDED" in capsys.readouterr().out
