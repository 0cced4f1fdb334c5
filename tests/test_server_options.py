"""Server-side options of issue 19: FedAvgM / FedAdam on the released aggregate, the server EMA, and the decision
threshold chosen from the sites' released validation counts. Unit tests of their privacy claims (post-processing
of released values only) and of their run-config checks; Flower's own strategies, no stand-ins."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from contract import threshold
from contract.server_options import ServerOptions
from server.settings import RunSettings, SettingsError


def _settings(tmp_path, **cfg) -> RunSettings:
    return RunSettings.from_run_config({"run-dir": str(tmp_path), **cfg})


def _rec(**arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()})


def _replies(updates: list[tuple[ArrayRecord, int]]) -> list[RecordDict]:
    return [RecordDict({"arrays": a, "metrics": MetricRecord({"num-examples": n})}) for a, n in updates]


@pytest.mark.parametrize("cfg", [{"strategy": "fedavgm", "server-momentum": 0.9},
                                 {"strategy": "fedadam", "fedadam-eta": 0.01}])
def test_server_optimizer_state_is_computed_from_the_released_aggregate_only(tmp_path, cfg):
    """Two different sets of site updates with the same weighted mean give the same new global model and the same
    optimiser state, round after round: the strategy can only have used the mean (post-processing)."""
    from server.app import build_strategy
    from server.checkpoint import strategy_state

    sets = [[(_rec(w=[1.0, 2.0], b=[0.5]), 10), (_rec(w=[3.0, 0.0], b=[-0.5]), 30)],
            [(_rec(w=[2.5, 0.5], b=[-0.25]), 40)],  # one site, already the mean of the first set
            [(_rec(w=[4.5, -1.5], b=[-1.0]), 20), (_rec(w=[0.5, 2.5], b=[0.5]), 20)]]
    means = [aggregate_arrayrecords(_replies(s), "num-examples") for s in sets]
    assert all(np.allclose(m["w"].numpy(), means[0]["w"].numpy()) for m in means)
    outs, states = [], []
    for _ in sets:
        strategy = build_strategy(_settings(tmp_path, **cfg))
        g = _rec(w=[0.0, 0.0], b=[0.0])
        for rnd in (1, 2, 3):
            g = strategy.step(rnd, g, aggregate_arrayrecords(_replies(sets[rnd - 1]), "num-examples"))
        outs.append(g)
        states.append(strategy_state(strategy))
    for g in outs[1:]:
        for k in ("w", "b"):
            np.testing.assert_allclose(g[k].numpy(), outs[0][k].numpy(), rtol=1e-6)
    with pytest.raises(TypeError, match="released aggregate only"):
        strategy.aggregate_train(4, [])  # the sites' replies never reach it


def test_fedavgm_step_is_flowers_heavy_ball_rule_and_keeps_dtype(tmp_path):
    from server.app import build_strategy

    s = build_strategy(_settings(tmp_path, **{"strategy": "fedavgm", "server-momentum": 0.5, "server-lr": 0.8}))
    g0 = _rec(w=[0.0, 1.0])
    g1 = s.step(1, g0, _rec(w=[1.0, 1.0]))  # pseudo-gradient g0 - agg = [-1, 0]; momentum starts at it
    np.testing.assert_allclose(g1["w"].numpy(), [0.8, 1.0])
    g2 = s.step(2, g1, _rec(w=[1.8, 0.0]))  # pg = [-1, 1]; v = 0.5 [-1, 0] + pg = [-1.5, 1]
    np.testing.assert_allclose(g2["w"].numpy(), [0.8 + 0.8 * 1.5, 1.0 - 0.8], rtol=1e-6)
    assert g2["w"].numpy().dtype == np.float32


def test_server_optimizer_state_survives_a_checkpoint(tmp_path):
    """The resume path restores FedAdam's moments: the next step equals an uninterrupted run's."""
    from server.app import build_strategy
    from server.checkpoint import load_state, save_state

    cfg = {"strategy": "fedadam", "fedadam-eta": 0.05}
    a, b = build_strategy(_settings(tmp_path, **cfg)), build_strategy(_settings(tmp_path, **cfg))
    g = _rec(w=[0.0, 0.0])
    g = a.step(1, g, _rec(w=[1.0, -1.0]))
    sha = save_state(tmp_path / "state.pt", a)
    from server.checkpoint import load_strategy_state
    load_strategy_state(b, load_state(tmp_path / "state.pt", sha)["strategy"])
    nxt = _rec(w=[0.5, 0.5])
    np.testing.assert_allclose(a.step(2, g, nxt)["w"].numpy(), b.step(2, g, nxt)["w"].numpy())


@pytest.mark.parametrize("cfg, match", [
    ({"strategy": "fedavg", "server-momentum": 0.9}, "applies to strategy \"fedavgm\" only"),
    ({"strategy": "fedavgm"}, "FedAvgM is exactly FedAvg"),
    ({"strategy": "fedavgm", "server-momentum": 0.9, "fedadam-tau": 0.1}, "applies to strategy \"fedadam\" only"),
    ({"strategy": "fedavgm", "server-momentum": 1.0}, "server-momentum' must be in"),
    ({"strategy": "fedadam", "fedadam-eta": 0.0}, "fedadam-eta' must be > 0"),
    ({"server-ema": 1.0}, "server-ema' must be in"),
    ({"decision-threshold": "youden"}, "must be one of argmax, validation"),
    ({"decision-threshold": "validation", "task": "segmentation", "classes": "", "labels": "a",
      "spatial-dims": 3, "image-size": 16}, "needs a binary classification task"),
    ({"strategy": "fedmedian", "secagg": True}, "post-process the sum"),
])
def test_server_options_that_mean_nothing_are_refused(tmp_path, cfg, match):
    with pytest.raises(SettingsError, match=match):
        _settings(tmp_path, **cfg)


def test_server_optimizers_run_under_secagg_and_the_manifest_pins_the_options(tmp_path):
    from client.approval import RunManifest, manifest_hash
    from client.manifest import build_run_manifest

    for strategy, extra in (("fedavgm", {"server-momentum": 0.9}), ("fedadam", {})):
        _settings(tmp_path, strategy=strategy, secagg=True, **extra)  # only the sum is post-processed
    plain = build_run_manifest(_settings(tmp_path).round_config("r", 1))
    assert "server_options" not in plain.to_dict()["aggregation"]  # manifests without options hash as before
    m = build_run_manifest(_settings(tmp_path, **{"strategy": "fedavgm", "server-momentum": 0.9,
                                                  "server-ema": 0.5}).round_config("r", 1))
    assert m.aggregation.server_options == {"server-momentum": 0.9, "server-ema": 0.5}
    assert manifest_hash(RunManifest.from_dict(m.to_dict())) == manifest_hash(m) != manifest_hash(plain)
    other = build_run_manifest(_settings(tmp_path, **{"strategy": "fedavgm", "server-momentum": 0.8,
                                                      "server-ema": 0.5}).round_config("r", 1))
    assert manifest_hash(other) != manifest_hash(m), "a site approves the server momentum"
    bad = m.to_dict()
    bad["aggregation"]["server_options"] = {"server-momentom": 0.9}
    from client.approval import ManifestError
    with pytest.raises(ManifestError, match="unknown key"):
        RunManifest.from_dict(bad)


def test_round_config_carries_the_options_to_the_site(tmp_path):
    from contract.wire import RoundConfig

    s = _settings(tmp_path, **{"strategy": "fedadam", "fedadam-beta2": 0.9, "decision-threshold": "validation"})
    cfg = RoundConfig.from_record(s.round_config("r", 1).to_record())
    assert cfg.server_options == s.server_options == ServerOptions(fedadam_beta2=0.9, decision_threshold="validation")


# ------------------------------------------------------------------------------------------------ server EMA


def test_server_ema_is_an_average_of_the_global_models_and_resumes_from_its_file(tmp_path):
    from server.server_ema import ema_path, save_round_ema

    def path(r):
        return tmp_path / f"round-{r:03d}.pt"

    ws = [{"w": torch.tensor([float(r), 2.0 * r]), "step": torch.tensor(r)} for r in (1, 2, 3)]
    for r, w in enumerate(ws, 1):
        save_round_ema(path, r, w, 0.5)
    ema = torch.load(ema_path(path(3)), weights_only=True)
    # ema1 = w1, ema2 = .5 w1 + .5 w2, ema3 = .5 ema2 + .5 w3 = [2.25, 4.5]; integer buffers are not averaged
    torch.testing.assert_close(ema["w"], torch.tensor([2.25, 4.5]))
    assert int(ema["step"]) == 3
    assert ema_path(path(3)).name == "round-003-ema.pt"


# ------------------------------------------------------------------------------------------------ decision threshold


def test_threshold_counts_are_coarse_and_a_small_class_releases_nothing():
    probs = [0.9] * 12 + [0.3] * 3 + [0.1] * 7 + [0.6] * 4
    labels = [1] * 15 + [0] * 11
    c = threshold.counts(probs, labels)
    assert set(c) == set(threshold.metric_keys())
    assert all(v % threshold.SUPPRESSION == 0 for v in c.values()), "no count below the suppression is exact"
    assert c["val_threshold_counts_pos"] == 15 and c["val_threshold_counts_neg"] == 10
    assert threshold.counts([0.9] * 10 + [0.1] * 4, [1] * 10 + [0] * 4) == {}  # 4 negatives < 5


def test_the_server_picks_the_threshold_with_the_best_pooled_balanced_accuracy():
    # site A: positives at 0.3, negatives at 0.1; site B: positives at 0.35, negatives at 0.2 -> 0.25..0.30 separate
    a = threshold.counts([0.3] * 10 + [0.1] * 10, [1] * 10 + [0] * 10)
    b = threshold.counts([0.35] * 20 + [0.2] * 10, [1] * 20 + [0] * 10)
    t, ba = threshold.choose(threshold.pool([a, b, {"val_auc": 0.9}]))  # a site without counts is left out
    assert ba == 1.0 and 0.2 < t <= 0.3
    assert threshold.choose(threshold.pool([])) is None


def test_only_a_policy_listing_val_threshold_counts_releases_them(tmp_path):
    from client.egress import release_metrics
    from privacy.policy import PolicyError, SitePolicy

    counts = threshold.counts([0.9] * 10 + [0.1] * 10, [1] * 10 + [0] * 10)
    metrics = {"val_auc": 0.9, **counts}
    no, _ = release_metrics(metrics, threshold.expand({"val_auc"}))
    assert set(no.keys()) == {"val_auc"}
    yes, _ = release_metrics(metrics, threshold.expand({"val_auc", "val_threshold_counts"}))
    assert set(yes.keys()) == {"val_auc", *counts}
    with pytest.raises(PolicyError, match="list \"val_threshold_counts\""):
        SitePolicy.from_table({"released_metrics": ["val_threshold_counts_03_pos"]})


def test_round_book_records_the_chosen_threshold_and_does_not_average_the_counts():
    from server.sitebook import RoundBook

    from server.sitebook import SiteRound

    book = RoundBook(1, None, None)
    a = threshold.counts([0.3] * 10 + [0.1] * 10, [1] * 10 + [0] * 10)
    for name, val in (("a", {"num-examples": 20.0, "val_auc": 1.0, **a}), ("b", {"num-examples": 20.0})):
        book.sites[name] = SiteRound(status="contributed", val=val)
    out = book.as_dict()
    assert out["decision_threshold"]["sites"] == ["a"] and out["decision_threshold"]["threshold"] == 0.3
    assert not any(k.startswith("val_threshold_counts") for k in out["aggregated"])


def test_atoll_run_evaluate_scores_a_site_at_the_runs_threshold_from_its_released_counts():
    from contract.task import TaskSpec
    from server.evaluate_matrix import evaluated_cell

    released = {"num-examples": 20.0, "val_accuracy": 0.5, "val_auc": 1.0,
                **threshold.counts([0.3] * 10 + [0.1] * 10, [1] * 10 + [0] * 10)}
    assert threshold.accuracy_at(released, 0.3) == 1.0 and threshold.accuracy_at(released, 0.5) == 0.5
    cell = evaluated_cell(TaskSpec(), released, {}, decision_threshold=0.3)
    assert cell.metrics["val_accuracy_at_threshold"] == 1.0
    assert not any(k.startswith("val_threshold_counts") for k in {**cell.metrics, **cell.missing})
    assert "val_accuracy_at_threshold" not in evaluated_cell(TaskSpec(), released, {}).metrics
