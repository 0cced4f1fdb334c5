"""The server's one-pass update path (server/update_pass.py): same verdicts as the separate checks, the digest
the site signed, and Flower's FedAvg — with real Flower records, messages and strategies, no mocks."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from contract import wire
from models import HASH_SCHEMES, UPDATE_HASH, state_dict_digest, state_dict_sha256
from server import update_pass
from server.robust import sums_in_one_pass
from server.sitebook import RoundBook
from server.update_pass import BLOCK, RoundPlan, inspect_update, npy_header, weights_sha256
from server.validation import make_validator


def _net_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A model with one tensor spanning several blocks, many small ones, and an integer counter."""
    g = torch.Generator().manual_seed(seed)
    sd = {"big.weight": torch.randn(2 * BLOCK + 123, generator=g),
          **{f"layer{i:02d}.bias": torch.randn(7 + i, generator=g) for i in range(30)},
          "norm.num_batches_tracked": torch.tensor(5, dtype=torch.int64),
          "head.weight": torch.randn(3, 5, generator=g).double()}
    return sd


def _near(sd: dict[str, torch.Tensor], seed: int, scale: float = 1e-2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v + seed
            for k, v in sd.items()}


def _reply(node: int, arrays: ArrayRecord, num_examples: float, record: dict | None = None) -> Message:
    content = RecordDict({wire.ARRAYS: arrays, wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: num_examples}),
                          wire.SITE: wire.site_record(f"hospital-{node}")})
    if record is not None:
        content[wire.LEDGER] = wire.ledger_record(record)
    meta = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id=f"ask-{node}", group_id="1", created_at=time.time(), ttl=3600.0,
                    message_type="train")
    return Message(content=content, metadata=meta)


def _signed(update: dict[str, torch.Tensor], global_sd: dict[str, torch.Tensor], scheme: str = UPDATE_HASH) -> dict:
    rec = {"type": "round", "update_sha256": state_dict_digest(update, scheme),
           "weights_in_sha256": state_dict_sha256(global_sd), "epsilon_after": 1.0}
    if scheme != "sha256":
        rec["update_hash"] = scheme
    return rec


def _with(record: ArrayRecord, name: str, arr: np.ndarray) -> ArrayRecord:
    out = ArrayRecord({k: v for k, v in record.items()})
    out[name] = Array(arr)
    return out


GLOBAL_SD = _net_state()


@pytest.mark.parametrize("arr", [np.zeros((3, 2), np.float32), np.array(7, np.int64), np.zeros((0, 4), np.float16),
                                 np.zeros(5, np.complex64), np.zeros((2, 3, 4), bool)])
def test_npy_header_is_what_flower_writes(arr):
    data = Array(arr).data
    header = npy_header(arr.dtype, arr.shape)
    assert data.startswith(header) and len(data) == len(header) + arr.nbytes


def test_server_digests_are_the_site_digests():
    """The server hashes Flower's bytes, the site hashes torch tensors: both constructions must agree."""
    upd = _near(GLOBAL_SD, 1)
    rec = ArrayRecord(upd)
    plan = RoundPlan(ArrayRecord(GLOBAL_SD))
    for scheme in HASH_SCHEMES:
        got = inspect_update(rec, plan, max_norm=None, scheme=scheme)
        assert got.problem is None and got.digest == state_dict_digest(upd, scheme)
    assert state_dict_digest(upd, "sha256") == state_dict_sha256(upd)
    assert state_dict_digest(upd, "blake3") != state_dict_sha256(upd)
    # what the round digest signs = what the audit recomputes from the saved weights (state_dict_sha256)
    assert weights_sha256(rec) == state_dict_sha256(rec.to_torch_state_dict())
    assert plan.global_digest("sha256") == state_dict_sha256(GLOBAL_SD)


@pytest.mark.parametrize("where", ["big.weight", "layer17.bias", "head.weight"])
def test_a_flipped_byte_changes_the_digest_and_is_refused(where):
    """The digest binds the bytes: one flipped byte (past the first block of a big tensor, inside a packed small
    tensor, in a float64 tensor) is a different update than the one the site signed."""
    upd = _near(GLOBAL_SD, 2)
    glob = ArrayRecord(GLOBAL_SD)
    record = ArrayRecord(upd)
    arr = record[where]
    data = bytearray(arr.data)
    data[-2] ^= 0x01  # a low mantissa bit: still finite, still within any sane norm bound
    record[where] = Array(dtype=arr.dtype, shape=tuple(arr.shape), stype=arr.stype, data=bytes(data))
    plan = RoundPlan(glob)
    assert inspect_update(record, plan, max_norm=None, scheme=UPDATE_HASH).digest != state_dict_digest(upd, UPDATE_HASH)
    book = RoundBook(1, validator=make_validator(100.0, accumulate=True))
    assert book.admit_train_reply(_reply(1, record, 10.0, _signed(upd, GLOBAL_SD)), glob) is False
    assert book.sites["hospital-1"].code == "UPDATE_NOT_AS_SIGNED"
    assert "blake3 digest" in book.sites["hospital-1"].message and "update_sha256" in book.sites["hospital-1"].message


def test_records_without_update_hash_are_checked_as_sha256_and_unknown_schemes_are_refused():
    upd = _near(GLOBAL_SD, 3)
    glob = ArrayRecord(GLOBAL_SD)
    book = RoundBook(1, validator=make_validator(None, accumulate=True))
    assert book.admit_train_reply(_reply(1, ArrayRecord(upd), 10.0, _signed(upd, GLOBAL_SD, "sha256")), glob)
    odd = {**_signed(upd, GLOBAL_SD), "update_hash": "md5"}
    assert book.admit_train_reply(_reply(2, ArrayRecord(upd), 10.0, odd), glob) is False
    assert book.sites["hospital-2"].code == "UPDATE_NOT_AS_SIGNED" and "'md5'" in book.sites["hospital-2"].message
    stale = {**_signed(upd, GLOBAL_SD), "weights_in_sha256": "ab" * 32}
    assert book.admit_train_reply(_reply(3, ArrayRecord(upd), 10.0, stale), glob) is False
    assert "stale" in book.sites["hospital-3"].message


def _bad(kind: str) -> tuple[ArrayRecord, str]:
    base = ArrayRecord(_near(GLOBAL_SD, 4))
    big = base["big.weight"].numpy().copy()
    if kind == "nan_late":
        big[-1] = np.nan  # in the last block: earlier blocks were already summed
        return _with(base, "big.weight", big), "'big.weight' has non-finite values"
    if kind == "inf_packed":
        small = base["layer21.bias"].numpy().copy()
        small[3] = -np.inf
        return _with(base, "layer21.bias", small), "'layer21.bias' has non-finite values"
    if kind == "nan_float64":
        h = base["head.weight"].numpy().copy()
        h[1, 1] = np.nan
        return _with(base, "head.weight", h), "'head.weight' has non-finite values"
    if kind == "shape":
        return _with(base, "layer03.bias", np.zeros(4, np.float32)), "'layer03.bias' has shape (4,), expected (10,)"
    if kind == "dtype":
        return _with(base, "big.weight", big.astype(np.float64)), "'big.weight' has dtype float64, expected float32"
    if kind == "norm":
        return _with(base, "big.weight", big + 1.0), "exceeds the bound"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nan_late", "inf_packed", "nan_float64", "shape", "dtype", "norm"])
def test_rejections_keep_their_reasons_and_leave_the_sum_untouched(kind):
    """A rejected update (even one found bad after part of it was summed) changes nothing in the aggregate."""
    glob = ArrayRecord(GLOBAL_SD)
    good = [_near(GLOBAL_SD, s) for s in (10, 11)]
    bad, reason = _bad(kind)
    book = RoundBook(1, validator=make_validator(50.0, accumulate=True))
    assert book.admit_train_reply(_reply(1, ArrayRecord(good[0]), 3.0), glob)
    assert book.admit_train_reply(_reply(2, bad, 5.0), glob) is False
    assert book.admit_train_reply(_reply(3, ArrayRecord(good[1]), 7.0), glob)
    site = book.sites["hospital-2"]
    assert site.code == "UPDATE_REJECTED" and reason in site.message, site.message
    clean = RoundBook(1, validator=make_validator(50.0, accumulate=True))
    assert clean.admit_train_reply(_reply(1, ArrayRecord(good[0]), 3.0), glob)
    assert clean.admit_train_reply(_reply(3, ArrayRecord(good[1]), 7.0), glob)
    got, want = book.aggregate(), clean.aggregate()
    for k in want.keys():
        assert np.array_equal(got[k].numpy(), want[k].numpy()), k


def test_the_norm_bound_is_decided_in_float64_at_the_edge():
    glob = ArrayRecord(GLOBAL_SD)
    upd = ArrayRecord(_near(GLOBAL_SD, 5))
    exact = float(np.sqrt(sum(((upd[k].numpy().astype(np.float64) - glob[k].numpy().astype(np.float64)) ** 2).sum()
                              for k in glob.keys() if k != "norm.num_batches_tracked")))
    plan = RoundPlan(glob)
    assert inspect_update(upd, plan, max_norm=exact * (1 + 1e-12)).problem is None
    assert "exceeds" in inspect_update(upd, plan, max_norm=exact * (1 - 1e-9)).problem
    assert inspect_update(upd, plan, max_norm=exact * 2).norm == pytest.approx(exact, rel=1e-4)


def test_fedavg_on_admission_equals_flowers_fedavg():
    glob = ArrayRecord(GLOBAL_SD)
    updates = [_near(GLOBAL_SD, s) for s in range(20, 24)]
    weights = [12.0, 30.0, 1.0, 57.0]
    book = RoundBook(1, validator=make_validator(None, accumulate=True))
    msgs = [_reply(i + 1, ArrayRecord(u), w, _signed(u, GLOBAL_SD)) for i, (u, w) in enumerate(zip(updates, weights))]
    assert all(book.admit_train_reply(m, glob) for m in msgs)
    ours = book.aggregate()
    flowers, _ = FedAvg().aggregate_train(1, [_reply(i + 1, ArrayRecord(u), w) for i, (u, w)
                                               in enumerate(zip(updates, weights))])
    assert list(ours.keys()) == list(glob.keys())
    for k in glob.keys():
        a, b = ours[k].numpy(), flowers[k].numpy()
        if k == "norm.num_batches_tracked":  # a counter stays an integer (Flower's would be float64)
            assert a.dtype == np.int64 and a == np.rint(b)
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert weights_sha256(ours) == state_dict_sha256(ours.to_torch_state_dict())  # the cached digest is right
    # the aggregate is a plain Flower record: the next round checks updates against it
    nxt = _near({k: torch.from_numpy(v.numpy().copy()) for k, v in ours.items()}, 30)
    assert make_validator(None)(ArrayRecord(nxt), ours) is None


def test_one_contributor_is_the_global_model_bit_for_bit():
    glob = ArrayRecord(GLOBAL_SD)
    upd = _near(GLOBAL_SD, 6)
    book = RoundBook(1, validator=make_validator(None, accumulate=True))
    assert book.admit_train_reply(_reply(1, ArrayRecord(upd), 37.0), glob)
    assert state_dict_sha256(book.aggregate().to_torch_state_dict()) == state_dict_sha256(upd)


def test_other_npy_layouts_fall_back_to_flowers_decoder():
    """Fortran-order bytes (a valid npy a site could send) decode through np.load and hash as C-order data."""
    glob = ArrayRecord(GLOBAL_SD)
    upd = _near(GLOBAL_SD, 7)
    rec = ArrayRecord(upd)
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(upd["head.weight"].numpy()))
    rec["head.weight"] = Array(dtype="float64", shape=(3, 5), stype="numpy.ndarray", data=buf.getvalue())
    got = inspect_update(rec, RoundPlan(glob), max_norm=None, scheme=UPDATE_HASH)
    assert got.problem is None and got.digest == state_dict_digest(upd, UPDATE_HASH)
    rec["head.weight"] = Array(dtype="float64", shape=(3, 5), stype="numpy.ndarray", data=b"\x93NUMPY garbage")
    assert "could not be decoded" in inspect_update(rec, RoundPlan(glob), max_norm=None).problem


def test_only_weighted_mean_strategies_sum_on_admission():
    assert sums_in_one_pass("fedavg") and sums_in_one_pass("FedProx")
    assert sums_in_one_pass("fedavgm") and sums_in_one_pass("fedadam")  # they post-process the one-pass mean
    assert not any(sums_in_one_pass(n) for n in ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"))


def test_a_round_with_no_weight_aggregates_to_nothing():
    glob = ArrayRecord(GLOBAL_SD)
    book = RoundBook(1, validator=make_validator(None, accumulate=True))
    assert book.admit_train_reply(_reply(1, ArrayRecord(_near(GLOBAL_SD, 8)), 0.0), glob)
    assert book.aggregate() is None  # Flower's FedAvg would divide by zero here


def test_the_site_signs_which_construction_it_used(tmp_path):
    """Site side: the guard writes update_hash into the signed round record; the audit rejects unknown ones."""
    from contract import Mechanism
    from privacy.guard import BudgetGuard, RoundRequest
    from privacy.keys import generate_private_key
    from privacy.ledger import SiteLedger
    from privacy.policy import SitePolicy

    ledger = SiteLedger(tmp_path / "ledger.jsonl", site="hospital-a", signing_key=generate_private_key())
    guard = BudgetGuard(ledger, SitePolicy.from_table({"max_epsilon": 10.0}), num_patients=100)
    mech = Mechanism(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.1, steps=5)
    res = guard.reserve(RoundRequest(run_id="r", server_round=1, mechanism=mech), weights_in_sha256="a" * 64)
    rec = guard.complete(res, update_sha256="b" * 64, update_hash=UPDATE_HASH)
    assert rec["update_hash"] == UPDATE_HASH == "blake3"
    res2 = guard.reserve(RoundRequest(run_id="r", server_round=2, mechanism=mech), weights_in_sha256="a" * 64)
    assert "update_hash" not in guard.complete(res2, update_sha256="c" * 64)  # legacy default: SHA-256
    with pytest.raises(ValueError, match="update_hash"):
        guard.complete(res2, update_sha256="c" * 64, update_hash="md5")
    from privacy.audit import _Auditor

    auditor = _Auditor(tmp_path / "run", None)
    auditor.check_update_hash(rec, "site", 2)
    assert auditor.result.findings == []
    auditor.check_update_hash({**rec, "update_hash": "md5"}, "site", 2)
    [finding] = auditor.result.findings
    assert finding.level == "error" and finding.field == "update_hash" and "'md5'" in finding.message


def test_the_hash_runs_on_one_reused_worker():
    plan = RoundPlan(ArrayRecord(GLOBAL_SD))
    inspect_update(ArrayRecord(_near(GLOBAL_SD, 9)), plan, max_norm=None, scheme=UPDATE_HASH)
    first = update_pass._HASHER
    inspect_update(ArrayRecord(_near(GLOBAL_SD, 9)), plan, max_norm=None, scheme=UPDATE_HASH)
    assert first is not None and update_pass._HASHER is first


def test_a_model_of_large_tensors_is_hashed_on_all_cores_to_the_same_digest():
    """Multithreaded BLAKE3 (models whose bytes are mostly in large tensors) binds exactly the bytes the site
    hashed with one thread; DenseNet-like models of many small tensors keep one thread."""
    g = torch.Generator().manual_seed(3)
    sd = {"a.bias": torch.randn(5, generator=g), "big.weight": torch.randn(update_pass._PARALLEL_MIN + 7, generator=g)}
    plan = RoundPlan(ArrayRecord(sd))
    assert plan.parallel_digest and not RoundPlan(ArrayRecord(GLOBAL_SD)).parallel_digest
    upd = _near(sd, 4)
    got = inspect_update(ArrayRecord(upd), plan, max_norm=None, scheme=UPDATE_HASH)
    assert got.problem is None and got.digest == state_dict_digest(upd, UPDATE_HASH)


def test_the_first_bad_tensor_in_name_order_is_named_although_packs_are_checked_later():
    """Small tensors are checked when their pack fills, after large ones that follow them by name: the reason
    still names the first non-finite tensor in name order."""
    g = torch.Generator().manual_seed(5)
    sd = {"a.bias": torch.randn(5, generator=g), "big.weight": torch.randn(BLOCK + 3, generator=g)}
    bad = {k: v.clone() for k, v in sd.items()}
    bad["a.bias"][2] = float("nan")
    bad["big.weight"][7] = float("inf")
    got = inspect_update(ArrayRecord(bad), RoundPlan(ArrayRecord(sd)), max_norm=None)
    assert got.problem == "tensor 'a.bias' has non-finite values (NaN or infinity)"
