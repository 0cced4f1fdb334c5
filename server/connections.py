"""The Flower CLI's SuperLink connections (``[superlink.NAME]`` blocks of ``$FLWR_HOME/config.toml``).

``atoll run start`` and ``atoll consortium register`` name a connection the same way (``--superlink NAME``) and
check it here before they call ``flwr``: an unknown name fails at once and lists the known ones, instead of Flower
falling back to starting a local simulation SuperLink or retrying a dead address for two minutes. Standard library
only (the CLI's parsers must stay fast).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXAMPLE_BLOCK = """[superlink]
default = "my-consortium"

[superlink.my-consortium]
address = "fl.example:8000"
root-certificates = "/abs/path/pki/ca.crt"   # the consortium CA (`atoll consortium init`)"""


class ConnectionNotFound(LookupError):
    """The connection name is not in the Flower config (the message lists the known ones and the file)."""


@dataclass(frozen=True)
class Connection:
    name: str
    conf: dict[str, Any]
    path: Path

    @property
    def insecure(self) -> bool:
        return self.conf.get("insecure") is True


def config_path() -> Path:
    """Flower's CLI config: ``$FLWR_HOME/config.toml`` (default ``~/.flwr/config.toml``)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr") / "config.toml"


def load_connections() -> tuple[dict[str, dict[str, Any]], str | None, Path]:
    """``(connections by name, the default name or None, the file)``; empty when the file is absent."""
    path = config_path()
    try:
        conf = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, None, path
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConnectionNotFound(f"cannot read the Flower connections file {path}: {exc}") from None
    table = conf.get("superlink", {})
    if not isinstance(table, dict):
        return {}, None, path
    conns = {k: v for k, v in table.items() if isinstance(v, dict)}
    default = table.get("default") if isinstance(table.get("default"), str) else None
    return conns, default, path


def resolve(name: str | None) -> Connection:
    """The connection called ``name`` (or Flower's default one when None); ConnectionNotFound otherwise."""
    conns, default, path = load_connections()
    wanted = name or default
    if wanted and wanted in conns:
        return Connection(wanted, conns[wanted], path)
    known = ", ".join(sorted(conns)) or "none"
    if not conns:
        why = f"no SuperLink connection is defined in {path}"
    elif wanted is None:
        why = f"no connection named and {path} sets no [superlink] default"
    else:
        why = f"no connection named {wanted!r} in {path}"
    raise ConnectionNotFound(f"{why} (known: {known}). Add a block like this one and pass --superlink NAME:\n"
                             + EXAMPLE_BLOCK)
