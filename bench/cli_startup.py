"""CLI start-up: how long `atoll --help`, `atoll site --help` and a config-typo error take, against `python -c pass`.

Each command runs in a fresh interpreter (as a user's shell runs it), interleaved with the baseline in one loop so
that the machine's load hits both alike; medians over the repeats (default 15, ``--quick`` 5). The config-typo case
is ``atoll site check --config site.toml`` on a file with a misspelt key (exit 2, "unknown key"): the answer a
site admin waits for before any DICOM is read.

Headline key: ``ratio``, the slowest of the three medians divided by the baseline's median (1.0 = no slower than
starting Python). Also ``seconds`` per command and ``baseline_s``. The target is an answer in under 1 s.
Prints one JSON object on the last line and writes bench/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _time(cmd: list[str], env: dict[str, str], expect: int) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != expect:
        raise SystemExit(f"{' '.join(cmd[2:])}: exit {res.returncode}, expected {expect}\n{res.stdout}{res.stderr}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 repeats instead of 15")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    repeats = args.repeats or (5 if args.quick else 15)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        typo = Path(tmp) / "site.toml"
        typo.write_text('[site]\nname = "hospital-a"\n\n[data]\ndicom_dir = "dicom"\nlabel_colum = "label"\n')
        cases = {
            "atoll --help": ([py, "-m", "atoll.cli", "--help"], 0),
            "atoll site --help": ([py, "-m", "atoll.cli", "site", "--help"], 0),
            "atoll site check (config typo)": ([py, "-m", "atoll.cli", "site", "check", "--config", str(typo)], 2),
        }
        baseline_cmd = [py, "-c", "pass"]
        times: dict[str, list[float]] = {name: [] for name in cases}
        base: list[float] = []
        for name, (cmd, expect) in cases.items():  # warm the file cache once, outside the measurement
            _time(cmd, env, expect)
        for _ in range(repeats):
            for name, (cmd, expect) in cases.items():
                base.append(_time(baseline_cmd, env, 0))
                times[name].append(_time(cmd, env, expect))
    baseline = statistics.median(base)
    seconds = {name: round(statistics.median(t), 4) for name, t in times.items()}
    out = {
        "ratio": round(max(seconds.values()) / baseline, 2),
        "slowest_s": max(seconds.values()),
        "baseline_s": round(baseline, 4),
        "seconds": seconds,
        "ratios": {name: round(s / baseline, 2) for name, s in seconds.items()},
        "under_1s": all(s < 1.0 for s in seconds.values()),
        "repeats": repeats,
        "quick": bool(args.quick),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    for name, s in seconds.items():
        print(f"{name:<34} {s:7.3f} s   x{out['ratios'][name]:.2f} of `python -c pass` ({baseline:.3f} s)")
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "cli_startup.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
