"""The container images really built and run: `docker/smoke.sh` end to end, when asked for.

smoke.sh builds both images (a local Debian base where no registry is reachable), starts a SuperLink and two
hospitals (SuperNode in process isolation + the site's launcher) as read-only, capability-less containers on a
private network with TLS and node authentication, runs one round with `atoll run start`, checks the run's outputs
and that no site container wrote outside /state. The image builds take 10-30 minutes on a 2-core machine, so this
runs only with ATOLL_CONTAINER_TESTS=1 and a container engine (podman or docker) installed; CI leaves it skipped.
The static checks of the same files run every time in tests/test_docker.py.

    sudo ATOLL_CONTAINER_TESTS=1 python -m pytest -q -m slow tests/test_containers.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "docker" / "smoke.sh"


def _engine() -> str | None:
    wanted = os.environ.get("ATOLL_CONTAINER_ENGINE")
    return shutil.which(wanted) if wanted else shutil.which("podman") or shutil.which("docker")


@pytest.mark.slow
def test_smoke_script_builds_both_images_and_runs_a_round():
    if os.environ.get("ATOLL_CONTAINER_TESTS") != "1":
        pytest.skip("container smoke test: set ATOLL_CONTAINER_TESTS=1 to build the images and run docker/smoke.sh")
    if _engine() is None:
        pytest.skip("container smoke test: no container engine (apt-get install podman runc debootstrap)")
    res = subprocess.run(["bash", str(SMOKE)], capture_output=True, text=True,
                         timeout=int(os.environ.get("ATOLL_SMOKE_TEST_TIMEOUT", "5400")))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert re.search(r"^BUILD \S*atoll-superlink\S*: \d+ s, \d+ MB$", out, re.M), out[-3000:]
    assert re.search(r"^BUILD \S*atoll-site\S*: \d+ s, \d+ MB$", out, re.M), out[-3000:]
    # both hospitals' SuperNode and launcher containers, each with an empty `diff`
    clean = re.findall(r"^DIFF (\S+): empty", out, re.M)
    assert len(clean) == 4 and not re.search(r"^DIFF \S+: wrote", out, re.M), out[-3000:]
    # ... and each runs under TCMalloc, the site's allocator
    assert len(re.findall(r"^ALLOCATOR \S+: tcmalloc$", out, re.M)) == 4, out[-3000:]
    assert "RUN: one round, 2 sites" in out
