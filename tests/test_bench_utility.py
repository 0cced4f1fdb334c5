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
