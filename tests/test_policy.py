"""Site privacy policy: strict parsing with messages that name where + key, delta rules, policy hash."""

from __future__ import annotations

import tomllib

import pytest

from privacy.policy import PolicyError, SitePolicy

WHERE = "/sites/a/site.toml [privacy]"


def test_defaults_when_table_absent() -> None:
    p = SitePolicy.from_table(None, where=WHERE)
    assert p == SitePolicy()
    assert p.accountant == "rdp" and p.allow_non_dp is False and p.allow_large_delta is False
    assert "num-examples" in p.released_metrics


def test_full_table_from_interfaces_example() -> None:
    table = tomllib.loads("""
max_epsilon = 8.0
delta = 0.0
accountant = "PRV"
noise_multiplier = [0.5, 10.0]
clip_norm = [0.1, 10.0]
local_steps = [1, 1000]
max_sample_rate = 0.5
allow_non_dp = false
released_metrics = ["num-examples", "val_loss", "val_accuracy", "val_auc", "train_loss"]
""")
    p = SitePolicy.from_table(table, where=WHERE)
    assert p.accountant == "prv"
    assert p.noise_multiplier == (0.5, 10.0) and p.local_steps == (1, 1000) and p.max_sample_rate == 0.5
    assert p.released_metrics[0] == "num-examples"


def test_demo_sites_privacy_tables_parse() -> None:
    from atoll.demo_data import HOSPITALS, site_toml

    for spec in HOSPITALS:
        p = SitePolicy.from_table(tomllib.loads(site_toml(spec, 28))["privacy"], where=spec.name)
        assert p.max_epsilon == spec.max_epsilon
        assert set(p.released_metrics) >= {"num-examples", "train_loss", "val_auc"}


@pytest.mark.parametrize(("table", "key", "fragment"), [
    ({"max_epsilon": 0}, "max_epsilon", "must be > 0"),
    ({"max_epsilon": "8"}, "max_epsilon", "expected a number"),
    ({"max_epsilon": float("inf")}, "max_epsilon", "finite"),
    ({"delta": 1.5}, "delta", "0 (auto"),
    ({"accountant": "gdp"}, "accountant", "'rdp', 'prv'"),
    ({"noise_multiplier": [2.0, 1.0]}, "noise_multiplier", "greater than max"),
    ({"noise_multiplier": 1.0}, "noise_multiplier", "expected [min, max]"),
    ({"clip_norm": [0, 1]}, "clip_norm", "min must be > 0"),
    ({"local_steps": [1.5, 10]}, "local_steps[0]", "expected an integer"),
    ({"local_steps": [0, 10]}, "local_steps", ">= 1"),
    ({"max_sample_rate": 0}, "max_sample_rate", "(0, 1]"),
    ({"allow_non_dp": "yes"}, "allow_non_dp", "true or false"),
    ({"released_metrics": ["val_loss", "val_loss"]}, "released_metrics[1]", "listed twice"),
    ({"released_metrics": ["patient id"]}, "released_metrics[0]", "not a metric name"),
    ({"max_epsilom": 8}, "max_epsilom", "unknown key"),
])
def test_bad_values_name_where_and_key(table: dict, key: str, fragment: str) -> None:
    with pytest.raises(PolicyError) as err:
        SitePolicy.from_table(table, where=WHERE)
    msg = str(err.value)
    assert msg.startswith(f"{WHERE}.{key}"), msg
    assert fragment in msg


def test_delta_auto_and_explicit() -> None:
    assert SitePolicy().effective_delta(2000) == pytest.approx(1 / 20000)
    assert SitePolicy(delta=1e-6).effective_delta(2000) == 1e-6


def test_large_delta_needs_explicit_permission() -> None:
    big = SitePolicy.from_table({"delta": 1e-3}, where=WHERE)
    with pytest.raises(PolicyError, match=r"delta.*larger than 1/\(10 x 2000 patients\).*allow_large_delta"):
        big.effective_delta(2000)
    ok = SitePolicy.from_table({"delta": 1e-3, "allow_large_delta": True}, where=WHERE)
    assert ok.effective_delta(2000) == 1e-3
    with pytest.raises(PolicyError, match="num_patients"):
        SitePolicy().effective_delta(0)


def test_policy_hash_is_stable_and_sensitive() -> None:
    a = SitePolicy.from_table({"max_epsilon": 8.0}, where=WHERE)
    b = SitePolicy.from_table({"max_epsilon": 8}, where=WHERE)
    c = SitePolicy.from_table({"max_epsilon": 8.5}, where=WHERE)
    assert a.sha256() == b.sha256() == SitePolicy().sha256()
    assert a.sha256() != c.sha256()
    assert len(a.sha256()) == 64


def test_site_init_template_policy_parses() -> None:
    from privacy.cli import site_toml_template

    table = tomllib.loads(site_toml_template("hospital-z"))["privacy"]
    assert SitePolicy.from_table(table, where="template") == SitePolicy()
