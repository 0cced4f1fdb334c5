"""The site's egress guard on real Flower records: only declared tensors, released metrics and the
three known config records may leave; anything else is blocked with a generic message and logged
locally."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

from contract import wire
from client.egress import EgressBlocked, EgressPolicy, TensorSpec, check_reply, egress_guard_mod

NET = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 2))
GLOBAL = ArrayRecord(NET.state_dict())
RELEASED = ["val_loss", "val_accuracy", "train_loss"]
POLICY = EgressPolicy.for_model(GLOBAL, RELEASED)


def _update(**replace: np.ndarray) -> ArrayRecord:
    arrays = {k: Array(v.numpy().copy()) for k, v in GLOBAL.items()}
    arrays.update({k: Array(v) for k, v in replace.items()})
    return ArrayRecord(arrays)


def _train_reply(**extra) -> RecordDict:
    content = RecordDict({
        wire.ARRAYS: _update(),
        wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 120, "train_loss": 0.4}),
        wire.LEDGER: wire.ledger_record({"epsilon_after": 1.5, "round": 1}),
        wire.SITE: wire.site_record("hospital-a"),
    })
    for k, v in extra.items():
        content[k] = v
    return content


def test_a_normal_train_reply_passes():
    check_reply(_train_reply(), POLICY)


def test_evaluate_and_refusal_replies_pass():
    check_reply(RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 30, "val_accuracy": 0.8}),
                            wire.SITE: wire.site_record("hospital-a")}), POLICY)
    check_reply(RecordDict({wire.REFUSAL: wire.refusal_record("BUDGET_EXHAUSTED", "budget spent")}), POLICY)


def _blocked(content: RecordDict, policy: EgressPolicy = POLICY) -> EgressBlocked:
    with pytest.raises(EgressBlocked) as info:
        check_reply(content, policy)
    return info.value


W = "0.weight"  # the conv weight, shape (2, 1, 3, 3)


@pytest.mark.parametrize("content,detail", [
    (_train_reply(extra=ArrayRecord({"x": Array(np.zeros(3, np.float32))})), "undeclared array record 'extra'"),
    (RecordDict({wire.ARRAYS: _update(leak=np.zeros(4, np.float32))}), "extra: ['leak']"),
    (RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v.numpy()) for k, v in GLOBAL.items() if k != W})}),
     "missing: ['0.weight']"),
    (RecordDict({wire.ARRAYS: _update(**{W: np.zeros((2, 1, 3, 4), np.float32)})}), "declared float32(2, 1, 3, 3)"),
    (RecordDict({wire.ARRAYS: _update(**{W: np.zeros((2, 1, 3, 3), np.float64)})}), "is float64"),
    (RecordDict({wire.ARRAYS: _update(**{W: np.full((2, 1, 3, 3), np.nan, np.float32)})}), "non-finite"),
    (RecordDict({wire.ARRAYS: _update(**{W: np.full((2, 1, 3, 3), np.inf, np.float32)})}), "non-finite"),
    (_train_reply(metrics=MetricRecord({wire.NUM_EXAMPLES: 1, "patient_count": 17})), "'patient_count' is not released"),
    (_train_reply(metrics=MetricRecord({wire.NUM_EXAMPLES: 1, "train_loss": [0.1, 0.2, 0.3]})), "not a finite scalar"),
    (_train_reply(metrics=MetricRecord({wire.NUM_EXAMPLES: 1, "train_loss": float("nan")})), "not a finite scalar"),
    (_train_reply(debug=MetricRecord({"train_loss": 0.1})), "undeclared metric record 'debug'"),
    (_train_reply(notes=ConfigRecord({"text": "PatientID 12345"})), "undeclared config record 'notes'"),
    (_train_reply(site=ConfigRecord({"name": "hospital-a", "path": "/data/dicom/x.dcm"})), "undeclared key 'path'"),
    (_train_reply(site=ConfigRecord({"name": b"\x00" * 64})), "holds bytes"),
    (_train_reply(site=ConfigRecord({"name": ["a", "b"]})), "holds list"),
    (_train_reply(refusal=ConfigRecord({"code": "X", "message": "m" * 5000})), "limit 1000"),
])
def test_undeclared_or_malformed_content_is_blocked(content, detail, caplog):
    with caplog.at_level(logging.ERROR, logger="atoll.site.egress"):
        blocked = _blocked(content)
    assert detail in blocked.detail
    # what may cross the wire says nothing about the content ...
    text = str(blocked)
    assert "egress guard" in text and blocked.incident in text
    for secretish in ("patient", "PatientID", "/data", "leak", "0.weight", "12345"):
        assert secretish not in text
    # ... and the site's own log has the specifics under the same incident id
    assert any(blocked.incident in r.getMessage() and detail in r.getMessage() for r in caplog.records)


def test_policy_from_declared_outputs_matches_a_manifest():
    declared = {"tensors": [{"name": "w", "shape": [2, 2], "dtype": "float32"}], "metrics": ["val_auc"]}
    policy = EgressPolicy.from_declared(declared)
    assert policy.tensors == (TensorSpec("w", (2, 2), "float32"),)
    check_reply(RecordDict({wire.ARRAYS: ArrayRecord({"w": Array(np.ones((2, 2), np.float32))}),
                            wire.METRICS: MetricRecord({"val_auc": 0.7, wire.NUM_EXAMPLES: 3})}), policy)
    _blocked(RecordDict({wire.ARRAYS: ArrayRecord({"w": Array(np.ones((2, 3), np.float32))})}), policy)


# -- as a Flower client mod -----------------------------------------------------------------------------


def _incoming() -> Message:
    meta = Metadata(run_id=1, message_id="ask-1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(content=RecordDict({wire.ARRAYS: GLOBAL, wire.CONFIG: ConfigRecord({"lr": 0.1})}), metadata=meta)


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def test_mod_lets_a_declared_reply_through_unchanged():
    msg = _incoming()
    reply = egress_guard_mod(lambda ctx: RELEASED)(msg, _context(), lambda m, c: Message(_train_reply(), reply_to=m))
    assert wire.ARRAYS in reply.content.array_records and wire.REFUSAL not in reply.content.config_records


def test_mod_replaces_a_leaking_reply_by_a_generic_refusal():
    msg = _incoming()

    def leaky_handler(m: Message, c: Context) -> Message:
        content = _train_reply()
        content[wire.METRICS] = MetricRecord({wire.NUM_EXAMPLES: 120, "max_patient_age": 97.0})
        return Message(content, reply_to=m)

    reply = egress_guard_mod(lambda ctx: RELEASED)(msg, _context(), leaky_handler)
    assert list(reply.content.keys()) == [wire.REFUSAL]
    code, message = wire.refusal_of(reply.content)
    assert code == "EGRESS_BLOCKED" and "max_patient_age" not in message and "egress guard" in message
    assert reply.metadata.reply_to_message_id == "ask-1"


def test_policy_from_an_approved_run_manifest():
    """The approved manifest's declared outputs are exactly what the guard lets out."""
    from client.approval import RunManifest

    manifest = _manifest()
    policy = EgressPolicy.from_manifest(manifest)
    assert policy == EgressPolicy.from_declared(manifest.to_dict())
    check_reply(_train_reply(), policy)
    content = _train_reply()
    content[wire.METRICS] = MetricRecord({wire.NUM_EXAMPLES: 1, "val_auc": 0.5})   # not in the manifest
    assert "'val_auc' is not released" in _blocked(content, policy).detail
    assert isinstance(manifest, RunManifest)


def _manifest():
    from client.approval import RunManifest, outputs_from_state_dict

    from contract import Mechanism, TaskSpec

    data = {"atoll_run_manifest": 2, "app_hash": "0" * 64, "model": "atollnet", "task": TaskSpec().to_manifest(),
            "mechanism": Mechanism(noise_multiplier=1.0, clip_norm=1.0, steps=5).to_dict(),
            "training": {"batch_size": 32, "lr": 0.05},
            "num_rounds": 3, "outputs": [t.to_dict() for t in outputs_from_state_dict(NET.state_dict())],
            "metrics": RELEASED}
    return RunManifest.from_dict(data)


def test_bytes_hidden_after_a_tensors_payload_are_blocked():
    """`Array.numpy()` ignores trailing bytes but Flower sends `Array.data` whole: a covert channel."""
    honest = Array(GLOBAL["0.bias"].numpy().copy())
    smuggled = Array(dtype=honest.dtype, shape=honest.shape, stype=honest.stype,
                     data=honest.data + b"PatientName=DOE^JOHN")
    np.testing.assert_array_equal(smuggled.numpy(), honest.numpy())  # decodes to the same values
    content = _train_reply()
    arrays = {k: v for k, v in content[wire.ARRAYS].items()}
    arrays["0.bias"] = smuggled
    content[wire.ARRAYS] = ArrayRecord(arrays)
    blocked = _blocked(content, POLICY)
    assert "canonical" in blocked.detail and "DOE" not in str(blocked)
    # header padding is a channel too: re-pad the .npy header with extra spaces
    header_end = honest.data.index(b"\n") + 1
    padded = honest.data[:header_end - 1] + b" " * 64 + b"\n" + honest.data[header_end:]
    import struct
    padded = padded[:8] + struct.pack("<H", struct.unpack("<H", honest.data[8:10])[0] + 64) + padded[10:]
    repadded = Array(dtype=honest.dtype, shape=honest.shape, stype=honest.stype, data=padded)
    np.testing.assert_array_equal(repadded.numpy(), honest.numpy())
    arrays["0.bias"] = repadded
    content[wire.ARRAYS] = ArrayRecord(arrays)
    assert "canonical" in _blocked(content, POLICY).detail
