"""Print docker/requirements.lock: every runtime dependency of Atoll at the version installed here.

The lock is the closure of pyproject's ``dependencies`` (with their extras and markers, as this interpreter
evaluates them), pinned to what this environment has installed and tested, so that the images run exactly the
tested set and nothing of the test, bench or development tools. torch is left out: each Dockerfile pins it
itself (CUDA wheel for sites, CPU wheel for the SuperLink).

    python docker/lock.py > docker/requirements.lock
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HEADER = """\
# Exact versions of Atoll's runtime dependencies, as tested (flwr 1.41.0 on every host): the closure of
# pyproject's `dependencies` at the versions installed in the test environment.
# torch is pinned in each Dockerfile (CUDA wheel for sites, CPU wheel for the SuperLink).
# Regenerate: python docker/lock.py > docker/requirements.lock"""


def closure(requirements: list[str]) -> dict[str, md.Distribution]:
    """Installed distributions reachable from ``requirements`` (name -> distribution); fails on a missing one."""
    seen: dict[str, tuple[md.Distribution, set[str]]] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            sys.exit(f"lock.py: {req.name} (required as {req}) is not installed in this environment")
        before = seen[name][1] if name in seen else None
        extras = (before or set()) | set(req.extras)
        if before is not None and extras == before:
            continue
        seen[name] = (dist, extras)
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append(sub)
    return {name: dist for name, (dist, _) in seen.items()}


def main() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    dists = closure(pyproject["project"]["dependencies"])
    print(HEADER)
    for name in sorted(dists):
        if name != "torch":
            print(f"{dists[name].metadata['Name']}=={dists[name].version}")


if __name__ == "__main__":
    main()
