"""The `atoll` CLI answers help, usage and config errors without loading the ML stack, with documented exit codes.

Each check runs in a fresh interpreter (a subprocess), so what `sys.modules` holds afterwards is what that command
imported: behaviour, not timing (the timing is bench/cli_startup.py's).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO

# The heavy parts: none of them may load to print help or reject a bad option or config file.
HEAVY = ("torch", "monai", "opacus", "scipy", "ray", "pydicom", "flwr.serverapp", "flwr.clientapp", "flwr.simulation")

_PROBE = textwrap.dedent("""
    import json, sys
    from atoll.cli import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:  # argparse's --help and usage errors
        code = exc.code
    sys.stdout.flush()
    print("\\n@@" + json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,))


def atoll(*argv: str, home: Path | None = None, cwd: Path | None = None) -> tuple[int, list[str], str]:
    """Run `atoll ARGV` in a fresh interpreter: (exit code, heavy modules it imported, stdout + stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if home is not None:
        env["FLWR_HOME"] = str(home)
    res = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=env,
                         cwd=cwd or REPO, timeout=120)
    out, _, tail = res.stdout.rpartition("\n@@")
    assert tail, res.stdout + res.stderr
    probe = json.loads(tail)
    return probe["code"], probe["heavy"], out + res.stderr


@pytest.mark.parametrize("argv", [["--help"], ["site", "--help"], ["run", "--help"], ["run", "start", "--help"],
                                  ["run", "manifest", "--help"], ["audit", "verify", "--help"],
                                  ["consortium", "--help"], ["demo", "--help"], ["site", "check", "--help"]])
def test_help_needs_no_ml_stack(argv):
    code, heavy, out = atoll(*argv)
    assert code == 0, out
    assert heavy == [], f"`atoll {' '.join(argv)}` imported {heavy}"
    assert "exit codes:" in out and "3  not found" in out


def test_building_the_whole_parser_imports_no_ml_stack():
    code = "import sys; from atoll.cli import build_parser; build_parser(None); " \
           f"print([m for m in {HEAVY!r} if m in sys.modules])"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_a_site_config_typo_is_reported_before_the_ml_stack_loads(tmp_path):
    cfg = tmp_path / "site.toml"
    cfg.write_text('[site]\nname = "hospital-a"\n\n[data]\ndicom_dir = "dicom"\nlabel_colum = "label"\n')
    code, heavy, out = atoll("site", "check", "--config", str(cfg))
    assert code == 2, out
    assert "label_colum" in out
    assert heavy == []


@pytest.mark.parametrize("argv, fragment", [
    (["run", "start", "--run-dir", "/srv/runs", "--rounds", "0"], "num-server-rounds"),
    (["run", "start", "--run-dir", "relative/runs"], "absolute"),
    (["run", "start", "--run-dir", "/srv/runs", "--model", "resnet19"], "invalid choice"),
    (["run", "start", "--run-dir", "/srv/runs", "--strategy", "fedmedain"], "invalid choice"),
    (["run", "manifest", "--out", "m.json", "--noise-multiplier", "0"], "noise-multiplier"),
    (["demo", "--model", "resnet"], "atollnet"),
])
def test_run_setting_errors_are_usage_errors_without_the_ml_stack(argv, fragment, tmp_path):
    code, heavy, out = atoll(*argv, home=tmp_path)
    assert code == 2, out
    assert fragment in out
    assert heavy == []


def _flwr_home(tmp_path: Path, port: int = 1) -> Path:
    (tmp_path / "config.toml").write_text(
        f'[superlink]\ndefault = "alpha"\n\n[superlink.alpha]\naddress = "127.0.0.1:{port}"\nroot-certificates = "/x"\n\n'
        '[superlink.beta]\naddress = "127.0.0.1:2"\ninsecure = true\n')
    return tmp_path


def test_an_unknown_connection_fails_at_once_and_lists_the_known_ones(tmp_path):
    home = _flwr_home(tmp_path)
    code, heavy, out = atoll("run", "start", "--superlink", "gamma", "--run-dir", "/srv/runs", home=home)
    assert code == 3, out
    assert "'gamma'" in out and "alpha, beta" in out and "[superlink.my-consortium]" in out
    assert heavy == []
    from client.enroll import enroll_site

    site, _ = enroll_site(tmp_path / "site", "hospital-a")
    code, _, out = atoll("consortium", "register", str(site.public_key), "--name", "hospital-a", "--yes",
                         "--superlink", "gamma", home=home)
    assert code == 3 and "alpha, beta" in out, out


def test_without_a_flower_config_register_says_what_to_write(tmp_path):
    from client.enroll import enroll_site

    site, _ = enroll_site(tmp_path / "site", "hospital-a")
    code, _, out = atoll("consortium", "register", str(site.public_key), "--name", "hospital-a", "--yes",
                         home=tmp_path / "empty-home")
    assert code == 3, out
    assert "no SuperLink connection is defined" in out and "root-certificates" in out
    assert "39091" not in out  # never Flower's fallback local simulation SuperLink


def test_the_positional_connection_still_works_with_a_deprecation_note(tmp_path):
    home = _flwr_home(tmp_path)
    code, _, out = atoll("run", "start", "gamma", "--run-dir", "/srv/runs", home=home)
    assert code == 3 and "deprecated" in out and "--superlink gamma" in out, out


def test_not_a_run_folder_is_exit_3_for_status_stop_and_audit(tmp_path):
    (tmp_path / "runs" / "run-a").mkdir(parents=True)
    (tmp_path / "runs" / "run-a" / "settings.json").write_text("{}")
    for argv in (["run", "status"], ["run", "stop"], ["audit", "verify"], ["audit", "report", "--out", "r.html"]):
        code, heavy, out = atoll(*argv[:2], str(tmp_path / "nowhere"), *argv[2:], cwd=tmp_path)
        assert code == 3, (argv, out)
        code, heavy, out = atoll(*argv[:2], str(tmp_path / "runs"), *argv[2:], cwd=tmp_path)
        assert code == 3 and "is not a run folder" in out and "run-a" in out, (argv, out)
        assert heavy == []


def _run_folder(tmp_path: Path, rounds: int = 2) -> Path:
    from server.outputs import RunOutputs
    from server.settings import RunSettings

    settings = RunSettings(run_dir=str(tmp_path / "runs"), run_name="r1", num_server_rounds=rounds)
    return RunOutputs.create(tmp_path / "runs", "r1", settings, flower_run_id=42).root


def test_status_before_round_1_says_it_is_waiting(tmp_path):
    root = _run_folder(tmp_path)
    code, heavy, out = atoll("run", "status", str(root))
    assert code == 0, out
    assert "running — started, waiting for round 1 of 2" in out
    assert "not found" not in out and heavy == []


def test_a_killed_server_app_is_not_reported_as_running(tmp_path):
    """The ServerApp process writes the run folder and is then killed (SIGKILL): no status.json is ever written."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from server.outputs import RunOutputs
        from server.settings import RunSettings
        s = RunSettings(run_dir={str(tmp_path / 'runs')!r}, run_name="r1")
        RunOutputs.create(Path(s.run_dir), "r1", s, flower_run_id=7)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL
    root = tmp_path / "runs" / "r1"
    assert not (root / "status.json").exists()
    code, _, out = atoll("run", "status", str(root))
    assert code == 0, out
    assert "run r1: ended" in out and "killed or crashed" in out and "running" not in out.splitlines()[0]
    code, _, out = atoll("run", "stop", str(root))
    assert code == 1 and "not running" in out


def test_stop_writes_a_request_that_the_run_turns_into_a_recorded_stop(tmp_path):
    from server.outputs import RunOutputs
    from server.settings import RunSettings

    settings = RunSettings(run_dir=str(tmp_path / "runs"), num_server_rounds=3)
    out = RunOutputs.create(tmp_path / "runs", "r1", settings)
    out.history.append({"round": 1, "sites": {}})
    code, _, text = atoll("run", "stop", str(out.root), "--reason", "site b asked for a pause")
    assert code == 0, text
    request = out.stop_requested()
    assert request and request["reason"] == "site b asked for a pause"
    out.finish_stopped_by_lead(request, settings.num_server_rounds)  # what the ServerApp does before round 2
    status = json.loads((out.root / "status.json").read_text())
    assert status["stopped_by"] == "lead" and status["stopped_at_round"] == 1
    assert status["reason"].startswith("stopped by the lead at round 1 of 3")
    code, _, text = atoll("run", "status", str(out.root))
    assert "stopped — stopped by the lead at round 1 of 3" in text
    # a new run under the same name is refused (the stopped run's history stays; `atoll run resume` continues it)
    from server.outputs import RunFolderError
    with pytest.raises(RunFolderError, match="atoll run resume"):
        RunOutputs.create(tmp_path / "runs", "r1", settings)


def test_exit_code_constants_agree_across_rooms():
    import atoll.cli
    import privacy.cli
    import server.consortium_cli
    import server.run_cli

    codes = (atoll.cli.EXIT_OK, atoll.cli.EXIT_FAILED, atoll.cli.EXIT_USAGE, atoll.cli.EXIT_NOT_FOUND)
    assert codes == (0, 1, 2, 3)
    for mod in (privacy.cli, server.consortium_cli, server.run_cli):
        assert (mod.EXIT_OK, mod.EXIT_FAILED, mod.EXIT_USAGE, mod.EXIT_NOT_FOUND) == codes, mod.__name__


def test_the_static_name_lists_match_the_registries():
    from models import MODEL_NAMES
    from server.robust import STRATEGIES
    from server.run_cli import MODEL_CHOICES, STRATEGY_CHOICES

    assert MODEL_CHOICES == tuple(MODEL_NAMES)
    assert STRATEGY_CHOICES == tuple(STRATEGIES)


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("path", [("run", "start"), ("run", "manifest")])
def test_every_run_option_has_help_and_shows_its_default(path):
    from atoll.cli import build_parser

    parser = _subparser(build_parser(None), *path)
    text = parser.format_help()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.option_strings or action.dest} has no help"
        if action.option_strings and action.default not in (None, "", False):
            assert f"(default: {action.default})" in " ".join(text.split()), action.option_strings
    for flag in ("--rounds", "--model", "--image-size", "--local-steps", "--lr", "--noise-multiplier", "--clip-norm"):
        assert flag in text
    if path == ("run", "start"):
        assert "--strategy" in text and "--max-update-norm" in text and "--min-sites" in text
        assert "--superlink" in text


def test_run_start_passes_strategy_and_norm_bound_and_prints_the_run_folder(tmp_path, monkeypatch, capsys):
    import socket

    import server.run_cli as run_cli
    from atoll.cli import main

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    monkeypatch.setenv("FLWR_HOME", str(_flwr_home(tmp_path, srv.getsockname()[1])))
    calls: list = []
    monkeypatch.setattr(run_cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert main(["run", "start", "--superlink", "alpha", "--run-dir", "/srv/runs", "--strategy", "FedMedian",
                 "--max-update-norm", "50"]) == 0
    out = capsys.readouterr().out
    config = calls[0][calls[0].index("--run-config") + 1]
    assert 'strategy="fedmedian"' in config and "max-update-norm=50.0" in config
    name = next(part.split("=", 1)[1].strip('"') for part in config.split() if part.startswith("run-name="))
    assert name.startswith("run-")
    assert f"run folder (on the SuperLink host): /srv/runs/{name}" in out
    assert f"atoll run status /srv/runs/{name}" in out and f"atoll run stop /srv/runs/{name}" in out
    srv.close()


def test_a_stop_after_round_k_waits_for_round_k(tmp_path):
    from server.outputs import RunOutputs
    from server.settings import RunSettings

    out = RunOutputs.create(tmp_path / "runs", "r1", RunSettings(run_dir=str(tmp_path / "runs"), num_server_rounds=5))
    code, _, text = atoll("run", "stop", str(out.root), "--after-round", "2")
    assert code == 0 and "once round 2 is done" in text, text
    assert out.stop_requested() is None  # before round 1: not due yet
    out.history.append({"round": 1, "sites": {}})
    assert out.stop_requested() is None
    out.history.append({"round": 2, "sites": {}})
    assert out.stop_requested()["after_round"] == 2
