"""`atoll run start` refuses a plaintext connection unless told it is a demo, and then says so loudly."""

from __future__ import annotations

import pytest

from atoll.cli import main


def _connections(home, **conns: dict) -> None:
    lines = ["[superlink]", 'default = "local"']
    for name, conf in conns.items():
        lines += ["", f"[superlink.{name}]"] + [f"{k} = {v}" for k, v in conf.items()]
    (home / "config.toml").write_text("\n".join(lines) + "\n")


@pytest.fixture
def flwr_calls(tmp_path, monkeypatch) -> list:
    """The `flwr run` command lines `atoll run start` would execute (nothing is started)."""
    import server.run_cli as run_cli

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    _connections(tmp_path, demo={"address": '"127.0.0.1:9093"', "insecure": "true"},
                 consortium={"address": '"fl.example:8000"', "root-certificates": '"/pki/ca.crt"'})
    calls: list = []
    monkeypatch.setattr(run_cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    return calls


def test_an_insecure_connection_is_refused_before_anything_runs(flwr_calls, capsys):
    assert main(["run", "start", "demo", "--run-dir", "/srv/runs"]) == 2
    err = capsys.readouterr().err
    assert "insecure = true" in err and "--allow-insecure-demo" in err
    assert flwr_calls == []


def test_an_explicit_demo_flag_lets_it_run_with_a_loud_warning(flwr_calls, capsys):
    assert main(["run", "start", "demo", "--run-dir", "/srv/runs", "--allow-insecure-demo"]) == 0
    assert "WARNING: INSECURE RUN" in capsys.readouterr().err
    assert flwr_calls and flwr_calls[0][1] == "run" and flwr_calls[0][3] == "demo"


def test_a_tls_connection_runs_without_warning(flwr_calls, capsys):
    assert main(["run", "start", "consortium", "--run-dir", "/srv/runs"]) == 0
    assert "INSECURE" not in capsys.readouterr().err
    assert flwr_calls[0][3] == "consortium"
