"""The site's memory allocator: TCMalloc for the processes that train, glibc's malloc as the fallback.

Why: DP-SGD trains on Poisson batches, so every step allocates tensors of a new size. glibc's malloc fragments
under that pattern: its heap keeps growing and each new page is a page fault the kernel must zero. Measured on
DenseNet121 at 64 px, Poisson batches around 64, one thread: steps on batches above the mean cost 0.3-0.9 s of
system time on top of a ~2 s step, and the 21st step (a batch of 74, smaller than one seen before) still faulted
54,000 pages; the plain step, always one size, settles after its first. With TCMalloc (gperftools'
size-class allocator, which PyTorch's CPU performance guide recommends) the faults stop once the largest
batch has been seen. Only speed and memory change: the arithmetic, and so every gradient and ε, is the same.

The allocator is chosen when a process starts (``LD_PRELOAD``), so this module does not switch the running
process: ``site_env`` gives the environment for the site processes Atoll starts (``atoll.localnet``'s
SuperNodes and launchers, whose ClientApp processes inherit it; the site image, docker/Dockerfile.client, sets
the same variables), and ``active_allocator`` says which one a process runs under (bench conditions). This is
site-installed code, kept out of the app bundle: what starts a process is not part of a round.

``ATOLL_ALLOCATOR=system`` keeps glibc's malloc (e.g. to compare, or where TCMalloc misbehaves). Where the
library is not installed (Debian/Ubuntu: ``apt-get install libtcmalloc-minimal4``) the environment is left
as it is: a site without it trains the same, only slower on DP steps.
"""

from __future__ import annotations

import ctypes.util
import functools
import os
from collections.abc import Mapping
from pathlib import Path

#: the environment variable a site (or a bench) sets to ``system`` to keep glibc's malloc
CHOICE_ENV = "ATOLL_ALLOCATOR"
CHOICES = ("tcmalloc", "system")
#: gperftools' TCMalloc without the heap profiler (Debian/Ubuntu package libtcmalloc-minimal4)
LIBRARY = "tcmalloc_minimal"
#: TCMalloc reports every allocation above this many bytes on stderr (default 1 GiB): a 3D batch's
#: activations pass that legitimately, and the report would fill the site's log
QUIET_ENV = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def choice(env: Mapping[str, str] | None = None) -> str:
    """The allocator asked for in ``env`` (default: this process's environment): ``tcmalloc`` unless
    ``ATOLL_ALLOCATOR=system``. Any other value is a configuration error, named."""
    value = (env if env is not None else os.environ).get(CHOICE_ENV, "tcmalloc").strip().lower() or "tcmalloc"
    if value not in CHOICES:
        raise ValueError(f"{CHOICE_ENV}={value!r}: choose one of {', '.join(CHOICES)}")
    return value


@functools.lru_cache(maxsize=1)
def tcmalloc_library() -> str | None:
    """The TCMalloc shared library to preload (a path or a soname the dynamic linker resolves), or None
    when it is not installed. Looked up once per process (``find_library`` runs ``ldconfig``)."""
    found = ctypes.util.find_library(LIBRARY)
    if found:
        return found
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        p = Path(d) / f"lib{LIBRARY}.so.4"
        if p.exists():
            return str(p)
    return None


def site_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default: this process's) that starts a process under TCMalloc when it is installed
    and not declined (``ATOLL_ALLOCATOR=system``); otherwise the same variables, unchanged."""
    out = dict(env if env is not None else os.environ)
    if choice(out) != "tcmalloc":
        return out
    lib = tcmalloc_library()
    if lib is None:
        return out
    preload = out.get("LD_PRELOAD", "").replace(":", " ").split()
    if not any(LIBRARY in Path(p).name for p in preload):
        out["LD_PRELOAD"] = " ".join([lib, *preload])
    for k, v in QUIET_ENV.items():
        out.setdefault(k, v)
    return out


def active_allocator(maps: Path = Path("/proc/self/maps")) -> str:
    """``tcmalloc`` when the process has TCMalloc mapped (it replaced malloc at start), else ``system``;
    ``unknown`` where /proc is not readable (not Linux)."""
    try:
        text = maps.read_text()
    except OSError:
        return "unknown"
    return "tcmalloc" if "libtcmalloc" in text else "system"
