"""DP-SGD step cost vs a plain step, for every Opacus per-sample-gradient mode Atoll considered.

    python bench/dp_overhead.py [--quick] [--threads N] [--rounds R] [--3d]

``--3d`` runs only the 3D segmentation rows (``basicunet-small`` on 32 x 48 x 32 volumes, the hippocampus demo's
network and grid, and ``basicunet``) with the task's per-patient Dice + CE loss; the full run includes them.

Prints a table, then ONE JSON object on the last stdout line, and writes bench/results/dp_overhead.json.
Headline keys: ``ratio`` (DP step time / non-DP step time) and ``mem_ratio`` (peak step memory ratio) for
Atoll's default network, image size, batch and grad-sample mode.

Method
------
* Time: every contender (the plain step and one ``privacy.dpsgd.PrivateStep`` per mode — the exact object
  ``train_local`` uses) is built in ONE process on the same batch; after warm-up, R rounds run each contender
  once, in rotated order. Each step is timed in process CPU time (``time.process_time``: robust to the
  machine being shared; wall time is reported too). ``ratio`` = median over rounds of
  (DP step / plain step of the same round). The plain step is forward + backward + the optimizer update on
  the batch mean loss, as ``train_local(dp=None)``; DP steps include clipping, noise and the same update
  (``train_local``'s default optimizer: SGD with momentum 0.9).
* Memory: torch's CPU allocations are invisible to tracemalloc, so each contender runs in a fresh subprocess:
  build, one warm-up step, ``malloc_trim``, baseline = VmRSS, reset the kernel's high-water mark
  (``/proc/self/clear_refs`` <- 5, Linux), 3 steps, peak = VmHWM (/proc/self/status). ``mem_mb`` = peak -
  baseline: the step's transient working set (activations, per-sample gradients, norms); ``mem_ratio`` = DP /
  plain. Persistent state (weights, momentum buffers) is in the baseline for both.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import opacus  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from contract import Mechanism  # noqa: E402
from models import DEFAULT_MODEL, build_model  # noqa: E402
from privacy.dpsgd import (  # noqa: E402
    GRAD_SAMPLE_MODES,
    PrivateStep,
    make_optimizer,
    resolve_grad_sample_mode,
)

warnings.filterwarnings("ignore", message="Full backward hook is firing")

DEFAULT_IMAGE_SIZE = 28  # INTERFACES.md site config default
BATCH = 64
LR = 0.05  # train_local's default optimizer (SGD, momentum 0.9) at the default run lr
FULL = [(DEFAULT_MODEL, 28, BATCH), (DEFAULT_MODEL, 64, BATCH), ("densenet121", 64, BATCH)]
QUICK = [(DEFAULT_MODEL, 28, BATCH)]
#: 3D segmentation rows: (network, "DxHxW", expected batch of volumes)
BATCH_3D = 6
ROWS_3D = [("basicunet-small", "32x48x32", BATCH_3D), ("basicunet", "32x48x32", BATCH_3D)]
MODES_3D = ("bk", "hooks")  # Atoll's mode for Conv/GroupNorm networks, and Opacus' reference


def _seg_task(px: str):
    from contract import TaskSpec

    size = tuple(int(v) for v in px.split("x"))
    return TaskSpec(kind="segmentation", spatial_dims=3, classes=(), labels=("anterior", "posterior"), size=size)


def _contenders(name: str, px: int, batch: int, modes: list[str]):
    """(label, step function) for the plain step and each DP mode, all on the same batch."""
    torch.manual_seed(0)
    criterion, task = None, None
    if isinstance(px, str):  # a 3D segmentation row
        from models import build_loss, build_task_model

        task = _seg_task(px)
        x = torch.randn(batch, 1, *task.size)
        y = torch.randint(0, 3, (batch, *task.size))
        criterion = build_loss(task)
        plain = build_task_model(name, task)
        loss_fn = criterion("mean")
    else:
        x = torch.randn(batch, 1, px, px)
        y = torch.randint(0, 2, (batch,))
        plain = build_model(name)
        loss_fn = nn.CrossEntropyLoss()
    opt = make_optimizer(plain.parameters(), lr=LR)

    def plain_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(plain(x), y).backward()
        opt.step()

    out = [("non-dp", plain_step)]
    for mode in modes:
        model = build_model(name) if task is None else build_task_model(name, task)
        private = PrivateStep(
            model, make_optimizer(model.parameters(), lr=LR), Mechanism(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.1),
            expected_batch_size=batch, grad_sample_mode=mode, **({} if criterion is None else {"criterion": criterion}),
        )
        out.append((mode, lambda p=private: p.step(x, y)))
    return out


def time_config(name: str, px: int, batch: int, modes: list[str], rounds: int) -> dict:
    contenders = _contenders(name, px, batch, modes)
    for _, fn in contenders:
        fn(), fn()
    cpu: dict[str, list[float]] = {k: [] for k, _ in contenders}
    wall: dict[str, list[float]] = {k: [] for k, _ in contenders}
    for r in range(rounds):
        order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
        for label, fn in order:
            t0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu[label].append(time.process_time() - t0)
            wall[label].append(time.perf_counter() - w0)
    res = {}
    for label, _ in contenders:
        ratios = [a / b for a, b in zip(cpu[label], cpu["non-dp"], strict=True)]
        res[label] = {
            "cpu_ms": round(statistics.median(cpu[label]) * 1e3, 2),
            "wall_ms": round(statistics.median(wall[label]) * 1e3, 2),
            "ratio": round(statistics.median(ratios), 3),
        }
    return res


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{key} not in /proc/self/status")


def _mem_child(name: str, px: int, batch: int, mode: str) -> None:
    """Subprocess body: print the peak resident-memory growth (MB) of 3 steps of one contender."""
    fn = dict(_contenders(name, px, batch, [] if mode == "non-dp" else [mode]))[mode]
    fn()  # warm-up: lazy kernel/optimizer-state allocations are not the step's working set
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so reuse cannot hide growth
    base = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current RSS
    for _ in range(3):
        fn()
    print(json.dumps({"base_mb": base, "peak_mb": _status_mb("VmHWM")}))


def mem_config(name: str, px: int, batch: int, labels: list[str], threads: int) -> dict:
    res = {}
    for label in labels:
        cmd = [sys.executable, __file__, "--_mem", name, str(px), str(batch), label, "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        res[label] = {"mem_mb": round(m["peak_mb"] - m["base_mb"], 1), "peak_rss_mb": round(m["peak_mb"], 1)}
    for label in labels:
        res[label]["mem_ratio"] = round(res[label]["mem_mb"] / max(res["non-dp"]["mem_mb"], 1e-9), 2)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="default network at 28 px only, fewer rounds")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: stable on a shared CPU)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--3d", dest="only_3d", action="store_true", help="only the 3D segmentation rows")
    ap.add_argument("--_mem", nargs=4, metavar=("MODEL", "PX", "BATCH", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._mem:
        name, px, batch, mode = args._mem
        _mem_child(name, px if "x" in px else int(px), int(batch), mode)
        return 0
    atoll_mode = resolve_grad_sample_mode(build_model(DEFAULT_MODEL))  # what train_local uses by default
    configs = ROWS_3D if args.only_3d else (QUICK if args.quick else FULL + ROWS_3D)
    rounds = args.rounds or (8 if args.quick else 15)
    results = []
    for name, px, batch in configs:
        modes = list(MODES_3D if isinstance(px, str) else GRAD_SAMPLE_MODES)
        r = rounds if name == DEFAULT_MODEL else max(3, rounds // 4)
        times = time_config(name, px, batch, modes, r)
        mem = mem_config(name, px, batch, list(times), args.threads)
        rows = {k: {**times[k], **mem[k]} for k in times}
        results.append({"model": name, "image_size": px, "batch": batch, "rounds": r, "steps": rows})
        print(f"\n{name} {px}px batch {batch} ({r} rounds, {args.threads} thread(s))")
        print(f"  {'mode':12s} {'cpu ms':>9s} {'wall ms':>9s} {'ratio':>7s} {'mem MB':>8s} {'mem ratio':>9s}")
        for k, v in rows.items():
            mark = "  <- Atoll default" if k == atoll_mode else ""
            print(f"  {k:12s} {v['cpu_ms']:9.1f} {v['wall_ms']:9.1f} {v['ratio']:7.2f} {v['mem_mb']:8.1f} {v['mem_ratio']:9.2f}{mark}")
    rows_3d = [c for c in results if isinstance(c["image_size"], str)]
    head = next((c for c in results if c["model"] == DEFAULT_MODEL and c["image_size"] == DEFAULT_IMAGE_SIZE),
                rows_3d[0] if rows_3d else None)
    if head is not results[0] and head["model"] != DEFAULT_MODEL:
        atoll_mode = "bk"
    summary = {
        "ratio": head["steps"][atoll_mode]["ratio"],
        "mem_ratio": head["steps"][atoll_mode]["mem_ratio"],
        "mode": atoll_mode,
        "model": head["model"],
        "image_size": head["image_size"],
        "batch": head["batch"],
        "ratio_3d": {f"{c['model']} {c['image_size']}": c["steps"]["bk"]["ratio"] for c in rows_3d},
        "quick": args.quick,
        "threads": args.threads,
        "time_method": "median over rounds of per-round process-CPU-time ratio, contenders interleaved in one process",
        "mem_method": "VmHWM - VmRSS over 3 steps after a warm-up step (high-water mark reset via /proc/self/clear_refs), one fresh subprocess per contender",
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "machine": platform.machine(),
        "configs": results,
    }
    out = ROOT / "bench" / "results" / ("dp_overhead_3d.json" if args.only_3d else "dp_overhead.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
