"""Server-side update validation and robust strategy assembly, with real Flower records and messages."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum

from contract import wire
from server.robust import STRATEGIES, StrategyError, build_strategy, strategy_parameters
from server.sitebook import RoundBook
from server.validation import make_validator, update_norm, validate_update


def _record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


GLOBAL = _record(w=np.zeros((3, 2), np.float32), b=np.zeros(2, np.float32), steps=np.array([7], np.int64))


def _like_global(delta: float = 0.0, **override: np.ndarray) -> ArrayRecord:
    arrays = {"w": np.full((3, 2), delta, np.float32), "b": np.zeros(2, np.float32),
              "steps": np.array([9], np.int64)}
    arrays.update(override)
    return _record(**arrays)


def _reply(node: int, arrays: ArrayRecord, num_examples: float = 10.0, **extra) -> Message:
    content = RecordDict({wire.ARRAYS: arrays, wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: num_examples}),
                          **extra})
    meta = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id=f"ask-{node}", group_id="1", created_at=time.time(), ttl=3600.0,
                    message_type="train")
    return Message(content=content, metadata=meta)


# -- validate_update -----------------------------------------------------------------------------------


def test_a_well_formed_update_passes():
    assert validate_update(_like_global(0.1), GLOBAL, max_norm=1.0) is None
    assert validate_update(_like_global(0.1), GLOBAL, max_norm=None) is None


def test_torch_state_dicts_validate_against_themselves():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    g = ArrayRecord(net.state_dict())
    assert validate_update(ArrayRecord(net.state_dict()), g, 1e-6) is None


@pytest.mark.parametrize("update,reason", [
    (_record(w=np.zeros((3, 2), np.float32), steps=np.array([1], np.int64)), "lacks tensor(s) 'b'"),
    (_record(w=np.zeros((3, 2), np.float32), b=np.zeros(2, np.float32), steps=np.array([1], np.int64),
             extra=np.zeros(1, np.float32)), "unexpected tensor(s) 'extra'"),
    (_like_global(w=np.zeros((2, 3), np.float32)), "'w' has shape (2, 3), expected (3, 2)"),
    (_like_global(w=np.zeros((3, 2), np.float64)), "'w' has dtype float64, expected float32"),
    (_like_global(steps=np.array([1], np.int32)), "'steps' has dtype int32, expected int64"),
    (_like_global(b=np.array([0.0, np.nan], np.float32)), "'b' has non-finite values"),
    (_like_global(b=np.array([np.inf, 0.0], np.float32)), "'b' has non-finite values"),
    (_like_global(b=np.array([-np.inf, 0.0], np.float32)), "'b' has non-finite values"),
])
def test_malformed_updates_are_rejected_with_a_reason(update, reason):
    problem = validate_update(update, GLOBAL, max_norm=None)
    assert problem is not None and reason in problem


def test_norm_bound_is_on_the_difference_to_the_global_weights():
    update = _like_global(0.5)                     # ||delta|| = sqrt(6 * 0.25) = 1.2247
    assert update_norm(update, GLOBAL) == pytest.approx(np.sqrt(1.5))
    assert validate_update(update, GLOBAL, max_norm=1.25) is None
    problem = validate_update(update, GLOBAL, max_norm=1.2)
    assert problem and "exceeds the bound" in problem and "1.225" in problem
    # same weights, different global: the norm follows the difference, not the weights
    shifted = _record(w=np.full((3, 2), 0.5, np.float32), b=np.zeros(2, np.float32), steps=np.array([7], np.int64))
    assert validate_update(update, shifted, max_norm=1e-9) is None


def test_integer_counters_are_not_part_of_the_norm():
    update = _like_global(0.0, steps=np.array([10**12], np.int64))
    assert update_norm(update, GLOBAL) == 0.0


def test_float16_overflow_in_the_norm_is_not_missed():
    g = _record(x=np.zeros(4, np.float16))
    u = _record(x=np.full(4, 60000.0, np.float16))  # finite in float16; squares overflow float16, not float64
    assert validate_update(u, g, max_norm=1.25e5) is None   # norm = 2 * 60000
    assert "exceeds" in validate_update(u, g, max_norm=1.15e5)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "1", True])
def test_invalid_bounds_are_a_programming_error(bad):
    with pytest.raises(ValueError, match="max_norm"):
        validate_update(_like_global(), GLOBAL, bad)
    with pytest.raises(ValueError, match="max_norm"):
        make_validator(bad)


def test_validator_plugs_into_the_round_book():
    """The hook the lead wires in: RoundBook(validator=make_validator(bound)) refuses a poisoned update."""
    book = RoundBook(1, validator=make_validator(1.0))
    good = _reply(1, _like_global(0.1), site=wire.site_record("hospital-a"))
    nan = _reply(2, _like_global(b=np.array([np.nan, 0], np.float32)), site=wire.site_record("hospital-b"))
    big = _reply(3, _like_global(100.0), site=wire.site_record("hospital-c"))
    assert book.admit_train_reply(good, GLOBAL) is True
    assert book.admit_train_reply(nan, GLOBAL) is False
    assert book.admit_train_reply(big, GLOBAL) is False
    assert book.sites["hospital-a"].status == "contributed"
    assert book.sites["hospital-b"].code == "UPDATE_REJECTED" and "non-finite" in book.sites["hospital-b"].message
    assert book.sites["hospital-c"].code == "UPDATE_REJECTED" and "exceeds" in book.sites["hospital-c"].message


def test_an_update_must_be_the_one_its_signed_record_names():
    """The poisoner's trick: a valid signed record for an honest update, shipped with another update."""
    from models import state_dict_sha256

    def sha(rec: ArrayRecord) -> str:
        return state_dict_sha256(rec.to_torch_state_dict())

    honest = _like_global(0.1)

    def signed(update_sha: str, weights_in: str = sha(GLOBAL)) -> dict:
        return {wire.LEDGER: wire.ledger_record({"type": "round", "update_sha256": update_sha,
                                                 "weights_in_sha256": weights_in, "epsilon_after": 1.0})}

    book = RoundBook(1, validator=make_validator(1.0))
    ok = _reply(1, honest, site=wire.site_record("hospital-a"), **signed(sha(honest)))
    swapped = _reply(2, _like_global(0.2), site=wire.site_record("hospital-b"), **signed(sha(honest)))
    stale = _reply(3, honest, site=wire.site_record("hospital-c"), **signed(sha(honest), weights_in="ab" * 32))
    assert book.admit_train_reply(ok, GLOBAL) is True
    assert book.admit_train_reply(swapped, GLOBAL) is False
    assert book.admit_train_reply(stale, GLOBAL) is False
    assert book.sites["hospital-b"].code == "UPDATE_NOT_AS_SIGNED" and "update_sha256" in book.sites["hospital-b"].message
    assert book.sites["hospital-c"].code == "UPDATE_NOT_AS_SIGNED" and "stale" in book.sites["hospital-c"].message
    # under SecAgg+ there is no single update to hash: the check is off there, and only there
    masked = RoundBook(1, bind_updates=False)
    assert masked.admit_train_reply(_reply(2, _like_global(0.2), site=wire.site_record("hospital-b"),
                                           **signed(sha(honest))), GLOBAL) is True


# -- build_strategy --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,cls,kwargs", [
    ("fedavg", FedAvg, {}),
    ("FedProx", FedProx, {"proximal_mu": 0.1}),
    ("fedmedian", FedMedian, {}),
    ("fed-trimmed-avg", FedTrimmedAvg, {"beta": 0.1}),
    ("krum", Krum, {"num_malicious_nodes": 1, "min_train_nodes": 5}),
    ("multikrum", MultiKrum, {"num_malicious_nodes": 1, "min_train_nodes": 5, "num_nodes_to_select": 3}),
    ("bulyan", Bulyan, {"num_malicious_nodes": 1, "min_train_nodes": 7}),
])
def test_every_named_strategy_is_flowers(name, cls, kwargs):
    strategy = build_strategy(name, **kwargs)
    assert type(strategy) is cls
    for k, v in kwargs.items():
        assert getattr(strategy, k) == v
    assert strategy.min_available_nodes >= strategy.min_train_nodes


def test_unknown_name_lists_the_choices():
    with pytest.raises(StrategyError, match="unknown strategy 'fedavgg'.*fedavg, fedprox, fedavgm, fedadam, fedmedian"):
        build_strategy("fedavgg")


@pytest.mark.parametrize("name,kwargs,match", [
    ("fedavg", {"beta": 0.1}, "unknown parameter.*beta"),
    ("fedprox", {"proximal_mu": -1.0}, "proximal_mu must be in"),
    ("fedprox", {"proximal_mu": "0.1"}, "proximal_mu must be a number"),
    ("fedtrimmedavg", {"beta": 0.5}, "beta must be in"),
    ("fedavg", {"fraction_train": 0.0}, "fraction_train must be in"),
    ("fedavg", {"fraction_train": float("nan")}, "fraction_train must be a number"),
    ("fedavg", {"min_train_nodes": 2.5}, "min_train_nodes must be an integer"),
    ("fedavg", {"min_train_nodes": True}, "min_train_nodes must be an integer"),
    ("fedavg", {"min_train_nodes": 3, "min_available_nodes": 2}, "min_available_nodes"),
    ("krum", {"num_malicious_nodes": 1, "min_train_nodes": 4}, r"min_train_nodes >= 5"),
    ("multikrum", {"num_malicious_nodes": 1, "min_train_nodes": 5, "num_nodes_to_select": 5},
     "num_nodes_to_select"),
    ("bulyan", {"num_malicious_nodes": 1, "min_train_nodes": 6}, r"min_train_nodes >= 7"),
    ("fedavg", {"weighted_by_key": ""}, "weighted_by_key must be a non-empty string"),
    ("fedavg", {"train_metrics_aggr_fn": 3}, "must be callable"),
])
def test_bad_parameters_fail_with_a_named_reason(name, kwargs, match):
    with pytest.raises(StrategyError, match=match):
        build_strategy(name, **kwargs)


def test_parameters_come_from_flowers_signatures():
    assert "proximal_mu" in strategy_parameters("fedprox")
    assert "num_malicious_nodes" in strategy_parameters("bulyan")
    assert set(STRATEGIES) == {"fedavg", "fedprox", "fedavgm", "fedadam", "fedmedian", "fedtrimmedavg", "krum",
                               "multikrum", "bulyan"}
    assert {"server_momentum", "server_learning_rate"} <= set(strategy_parameters("fedavgm"))
    assert {"eta", "beta_1", "beta_2", "tau"} <= set(strategy_parameters("fedadam"))


def _poisoned_round(n_honest: int, seed: int = 0) -> list[Message]:
    rng = np.random.default_rng(seed)
    replies = [_reply(i + 1, _record(w=(1.0 + 0.01 * rng.standard_normal((3, 2))).astype(np.float32)))
               for i in range(n_honest)]
    replies.append(_reply(99, _record(w=np.full((3, 2), 1e6, np.float32))))
    return replies


@pytest.mark.parametrize("name,kwargs,n_honest", [
    ("fedmedian", {}, 4),
    ("fedtrimmedavg", {"beta": 0.2}, 4),
    ("krum", {"num_malicious_nodes": 1, "min_train_nodes": 5}, 4),
    ("multikrum", {"num_malicious_nodes": 1, "min_train_nodes": 5, "num_nodes_to_select": 3}, 4),
    ("bulyan", {"num_malicious_nodes": 1, "min_train_nodes": 7}, 6),
])
def test_robust_strategies_resist_one_poisoned_update(name, kwargs, n_honest):
    """Real aggregate_train over real Messages: one site sends 1e6 everywhere, honest sites ~1.0."""
    arrays, _ = build_strategy(name, **kwargs).aggregate_train(1, _poisoned_round(n_honest))
    assert arrays is not None
    assert np.allclose(arrays["w"].numpy(), 1.0, atol=0.05), arrays["w"].numpy()
    # The same round through FedAvg is ruined: the poison dominates the weighted mean.
    plain, _ = build_strategy("fedavg").aggregate_train(1, _poisoned_round(n_honest))
    assert plain["w"].numpy().min() > 1e5
