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
def listening_port():
    """A port something listens on: `atoll run start` checks the connection's address answers before `flwr run`."""
    import socket

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        yield srv.getsockname()[1]


@pytest.fixture
def flwr_calls(tmp_path, monkeypatch, listening_port) -> list:
    """The `flwr run` command lines `atoll run start` would execute (nothing is started)."""
    import server.run_cli as run_cli

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    _connections(tmp_path, demo={"address": f'"127.0.0.1:{listening_port}"', "insecure": "true"},
                 consortium={"address": f'"127.0.0.1:{listening_port}"', "root-certificates": '"/pki/ca.crt"'})
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


def test_a_connection_where_nothing_listens_fails_at_once(tmp_path, monkeypatch, capsys):
    import socket

    import server.run_cli as run_cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    _connections(tmp_path, gone={"address": f'"127.0.0.1:{dead}"', "root-certificates": '"/pki/ca.crt"'})
    calls: list = []
    monkeypatch.setattr(run_cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert main(["run", "start", "--superlink", "gone", "--run-dir", "/srv/runs"]) == 1
    assert f"nothing answers at 127.0.0.1:{dead}" in capsys.readouterr().err and calls == []
