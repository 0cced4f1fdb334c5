"""No metric's NaN blocks a whole reply: what is defined is released, and what is missing says why (a fixed code
the egress guard allows, free of identifiers). A one-class validation split (val_auc undefined) and a round whose
Poisson batches were all empty (train_loss undefined; a valid DP step) still answer, and history says why.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

from contract import Mechanism, wire
from client.egress import EgressBlocked, EgressPolicy, TensorSpec, check_reply, release_metrics
from client.evaluation import evaluate_model, missing_reasons
from client.site_config import create_secret_file
from tests.dicom_factory import write_labels, write_site

POLICY = EgressPolicy((TensorSpec("w", (2,), "float32"),), frozenset({"val_loss", "val_auc", "train_loss"}))


def test_release_metrics_keeps_the_defined_and_says_why_the_rest_is_missing() -> None:
    metrics, missing = release_metrics({"val_loss": 0.5, "val_auc": math.nan, "val_accuracy": math.inf,
                                        "secret": 1.0}, allowed={"val_loss", "val_auc", "val_accuracy"},
                                       reasons={"val_auc": "SINGLE_CLASS"})
    assert dict(metrics) == {"val_loss": 0.5}
    assert dict(missing) == {"val_auc": "SINGLE_CLASS", "val_accuracy": "NOT_FINITE"}
    content = RecordDict({wire.METRICS: metrics, wire.MISSING: missing})
    check_reply(content, EgressPolicy((), frozenset({"val_loss", "val_auc", "val_accuracy"})))
    _, none = release_metrics({"val_loss": 0.5}, allowed={"val_loss"})
    assert none is None


@pytest.mark.parametrize("record", [
    ConfigRecord({"val_auc": "PATIENT PAT0001 only"}),   # free text: could carry anything
    ConfigRecord({"val_kappa": "NOT_FINITE"}),           # a metric the policy does not release
    ConfigRecord({"val_auc": ["NOT_FINITE"]}),
])
def test_the_egress_guard_allows_only_known_reasons_for_released_metrics(record) -> None:
    content = RecordDict({wire.ARRAYS: ArrayRecord({"w": Array(torch.zeros(2).numpy())}), wire.MISSING: record})
    with pytest.raises(EgressBlocked):
        check_reply(content, POLICY)


def test_evaluation_explains_what_it_cannot_compute() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x = torch.randn(6, 1, 2, 2)
    one_class = evaluate_model(model, x, torch.zeros(6, dtype=torch.int64), torch.device("cpu"))
    assert math.isnan(one_class["auc"]) and missing_reasons(one_class, torch.zeros(6)) == {"auc": "SINGLE_CLASS"}
    empty = evaluate_model(model, x[:0], torch.zeros(0, dtype=torch.int64), torch.device("cpu"))
    assert missing_reasons(empty, torch.zeros(0)) == {"loss": "NO_DATA", "accuracy": "NO_DATA", "auc": "NO_DATA"}


def test_history_records_why_a_sites_metric_is_missing() -> None:
    from server.sitebook import RoundBook

    book = RoundBook(1)
    meta = Metadata(run_id=1, message_id="e", src_node_id=3, dst_node_id=0, reply_to_message_id="x", group_id="1",
                    created_at=time.time(), ttl=60.0, message_type="evaluate")
    content = RecordDict({wire.METRICS: MetricRecord({"num-examples": 4.0, "val_loss": 0.7}),
                          wire.MISSING: wire.missing_record({"val_auc": "SINGLE_CLASS"}),
                          wire.SITE: wire.site_record("hospital-q")})
    book.admit_evaluate_reply(Message(content, metadata=meta))
    site = book.as_dict()["sites"]["hospital-q"]
    assert site["val"] == {"num-examples": 4.0, "val_loss": 0.7} and site["missing"] == {"val_auc": "SINGLE_CLASS"}


# ------------------------------------------------------------------------------- through the ClientApp handlers


def _site(root: Path, label_of) -> Path:
    recs = write_site(root / "dicom", patients=10, images_per_patient=2, label_of=label_of)
    write_labels(root / "labels.csv", recs)
    create_secret_file(root / "state" / "pseudonym.secret")
    toml = root / "site.toml"
    toml.write_text('[site]\nname = "hospital-n"\n[data]\ndicom_dir = "dicom"\nlabels_csv = "labels.csv"\n'
                    'val_fraction = 0.3\n[privacy]\nmax_epsilon = 50.0\n')
    return toml


def _message(kind: str, cfg: wire.RoundConfig, arrays: ArrayRecord) -> Message:
    meta = Metadata(run_id=1, message_id=f"{kind}-{time.time_ns()}", src_node_id=0, dst_node_id=7,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0, message_type=kind)
    return Message(content=RecordDict({wire.ARRAYS: arrays, wire.CONFIG: cfg.to_record()}), metadata=meta)


def _approved(toml: Path, cfg: wire.RoundConfig) -> tuple[Context, ArrayRecord]:
    from client.approval import ApprovalStore
    from client.manifest import build_run_manifest
    from client.runtime import SITE_CONFIG_KEY
    from models import build_model

    ApprovalStore(toml.parent / "state").approve(build_run_manifest(cfg), by="test")
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model(cfg.model, spatial_dims=2, in_channels=1, num_classes=2).state_dict())
    ctx = Context(run_id=1, node_id=7, node_config={SITE_CONFIG_KEY: str(toml)}, state=RecordDict(), run_config={})
    return ctx, arrays


def test_a_one_class_validation_split_still_releases_loss_and_accuracy(tmp_path: Path) -> None:
    from client.app import evaluate

    toml = _site(tmp_path, label_of=lambda p: 0)
    cfg = wire.RoundConfig(run_id="one-class", server_round=1, mechanism=Mechanism(steps=2))
    ctx, arrays = _approved(toml, cfg)
    reply = evaluate(_message("evaluate", cfg, arrays), ctx)
    assert wire.refusal_of(reply.content) is None, wire.refusal_of(reply.content)
    metrics = dict(reply.content[wire.METRICS])
    assert {"val_loss", "val_accuracy", wire.NUM_EXAMPLES} <= set(metrics) and "val_auc" not in metrics
    assert wire.missing_of(reply.content) == {"val_auc": "SINGLE_CLASS"}


def test_a_round_whose_poisson_batches_were_all_empty_still_sends_its_update(tmp_path: Path) -> None:
    from client.app import train

    toml = _site(tmp_path, label_of=lambda p: p % 2)
    cfg = wire.RoundConfig(run_id="empty-batches", server_round=1, mechanism=Mechanism(steps=2, sample_rate=1e-6))
    ctx, arrays = _approved(toml, cfg)
    msg = _message("train", cfg, arrays)
    reply = train(msg, ctx)
    assert wire.refusal_of(reply.content) is None, wire.refusal_of(reply.content)
    assert wire.ARRAYS in reply.content and wire.LEDGER in reply.content
    update = reply.content[wire.ARRAYS].to_torch_state_dict()
    assert all(torch.isfinite(v).all() for v in update.values())  # noise only, and released
    assert "train_loss" not in reply.content[wire.METRICS]
    assert wire.missing_of(reply.content) == {"train_loss": "EMPTY_BATCHES"}
    assert not any(k.startswith("atoll_") for k in reply.content[wire.METRICS])  # site-local bookkeeping stays

    def charges() -> list:
        from client.runtime import open_site_ledger
        from client.site_config import load_site_config
        from privacy.guard import charges as ledger_charges

        return ledger_charges(open_site_ledger(load_site_config(toml)).records())

    charge = (cfg.mechanism.noise_multiplier, 1e-6, 2)
    assert charges() == [charge]  # charged once, for the 2 noise-only steps it took
    again = train(msg, ctx)  # the same round again (a lost reply): the same bytes, not charged twice
    assert wire.refusal_of(again.content) is None and charges() == [charge]
    assert wire.missing_of(again.content) == {"train_loss": "EMPTY_BATCHES"}
    assert torch.equal(again.content[wire.ARRAYS].to_torch_state_dict()["classifier.weight"],
                       update["classifier.weight"])
