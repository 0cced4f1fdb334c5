"""bench/utility's arms: ``NAME:key=value,...`` are run-config overrides checked as a run checks them, and a bad
arm is refused up front with a message naming the arm and the key (not a traceback after an hour of runs)."""

from __future__ import annotations

import pytest

from bench.utility_arms import Arm, ArmError, arm_settings, parse_arm, run_config_keys, spread
from server.settings import RunSettings

KEYS = run_config_keys()


def test_an_arm_is_run_config_overrides_with_toml_values() -> None:
    arm = parse_arm("mix:lr=0.1, strategy=fedprox,proximal-mu=0.01,local-steps=40,secagg=false", KEYS)
    assert arm == Arm("mix", {"lr": 0.1, "strategy": "fedprox", "proximal-mu": 0.01, "local-steps": 40,
                              "secagg": False})
    s = arm_settings(arm, RunSettings(run_dir="/tmp/x"), seed=2)
    assert (s.lr, s.strategy, s.proximal_mu, s.mechanism.steps, s.seed) == (0.1, "fedprox", 0.01, 40, 2)
    assert s.model == RunSettings().model  # everything else stays the default recipe


@pytest.mark.parametrize("spec, words", [
    ("x:lrr=0.1", ["--arm x", "unknown run-config key 'lrr'", "did you mean lr"]),
    ("x:noise-multiplier=1", ["--arm x", "'noise-multiplier' is set by the bench", "--eps"]),
    ("x:seed=3", ["'seed' is set by the bench", "--seeds"]),
    ("lr=0.1", ["expected NAME:key=value"]),
    ("x:lr", ["'lr' is not key=value"]),
    ("x:", ["no overrides"]),
    ("default:lr=0.1", ["taken by a reference arm"]),
])
def test_a_bad_arm_is_refused_with_a_message_naming_it(spec: str, words: list[str]) -> None:
    with pytest.raises(ArmError) as err:
        parse_arm(spec, KEYS)
    for w in words:
        assert w in str(err.value)


def test_a_mistyped_or_out_of_range_value_is_the_runs_own_settings_error_named_by_arm() -> None:
    with pytest.raises(ArmError, match=r"--arm fast: run config 'lr' must be float"):
        arm_settings(parse_arm("fast:lr=quick", KEYS), RunSettings(run_dir="/tmp/x"))
    with pytest.raises(ArmError, match=r"--arm neg: run config 'lr' must be > 0"):
        arm_settings(parse_arm("neg:lr=-1", KEYS), RunSettings(run_dir="/tmp/x"))


def test_spread_reports_mean_std_range_and_every_run_leaving_out_missing_values() -> None:
    s = spread([0.5, 0.7, None, float("nan")])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1414, abs=1e-4)
    assert s["spread"] == pytest.approx(0.2) and len(s["runs"]) == 4
    assert spread([0.8])["std"] == 0.0 and spread([])["mean"] is None


def _fake_row(arm: str, val_acc: float, test_acc: float) -> dict:
    from bench.utility import _row

    runs = [{"test_accuracy": test_acc, "test_auc": 0.9, "val_accuracy": val_acc, "val_auc": 0.8, "seconds": 1.0,
             "epsilon_spent": {"a": 2.9, "b": 3.0}}]
    return _row("dp-fedavg", Arm(arm, {"lr": 0.1} if arm != "default" else {}), runs, epsilon_target=3.0,
                noise_multiplier=2.5)


def test_the_best_recipe_is_chosen_on_validation_never_on_the_test_split() -> None:
    from bench.utility import best_on_validation, markdown

    rows = [_fake_row("default", val_acc=0.70, test_acc=0.90), _fake_row("lr01", val_acc=0.80, test_acc=0.60)]
    best = best_on_validation(rows)
    assert best["3"]["arm"] == "lr01" and best["3"]["test_accuracy"] == 0.60
    table = markdown([{"results": rows}])
    assert "| dp-fedavg | lr01 (lr=0.1) | 3 | 2.50 | 1 | **0.600** |" in table and "OVER TARGET" not in table
    over = _fake_row("default", 0.7, 0.9)
    over["runs"][0]["epsilon_spent"]["b"] = 3.5
    from bench.utility import _row

    assert _row("dp-fedavg", Arm("default"), over["runs"], epsilon_target=3.0)["over_target"] is True
