"""DP-SGD vs plain training at the batch shapes sites really train with, per network and per clipping mode.

    python bench/dp_overhead.py [--quick] [--models NAME,...] [--modes bk,hooks,...] [--threads N]
                                [--rounds R] [--3d] [--no-round] [--allocator tcmalloc|system]

What it compares
----------------
DP-SGD does not train on a fixed batch: every step Poisson-samples patients with rate q, so its batch is
Binomial(N, q) with mean q*N. A DP step is therefore compared with a plain step at the SAME expected batch:
the plain step takes B examples, the DP step a Poisson batch of N = B / Q patients sampled at rate Q
(Q = 0.1), the batch sizes the Binomial's quantiles (stratified: ``poisson_batches``), shared by every DP
mode of a row.

Rows: AtollNet (28 and 64 px), ResNet18 and DenseNet121 at 64 px, batch 64; the 3D networks: AtollNet and
MONAI's ResNet10 as 3D classifiers (32^3 volumes, batch 16) and the hippocampus task's segmentation networks
``scalespace`` (fixed features + a per-voxel head, models/scalespace.py) and the U-Nets ``basicunet-small`` /
``basicunet`` on 32 x 48 x 32 volumes (the hippocampus demo's grid, batch 6) with the task's per-patient Dice +
CE loss.
Modes: ``bk`` (Atoll's fast clipping, privacy/fast_clipping.py, the ``auto`` choice for these networks) and
Opacus ``hooks`` (the reference); ``--modes`` adds the others of ``privacy.dpsgd.GRAD_SAMPLE_MODES``.

Then the site's ROUND as the ClientApp runs it: ``privacy.dpsgd.train_local`` (the call client/app.py makes)
for a number of local steps, DP (``auto`` mode, Poisson batches of q*P patients) vs plain (``batch_size`` =
the same expected batch), on AtollNet at the site default 28 px, runs interleaved.

Method
------
* Time: all contenders of a row (the plain step and one ``privacy.dpsgd.PrivateStep`` per mode — the object
  ``train_local`` uses) live in ONE process; after a warm-up (one step at B, and each DP contender one more at
  the largest batch of the row's schedule: the allocator's steady state, which a site reaches in its first
  steps), R rounds run each contender once in rotated order, in process CPU time (``time.process_time``:
  robust to a shared machine; wall time reported too).
  ``ratio`` = median over rounds of (DP step on that round's Poisson batch / plain step of the same round).
* Memory: one fresh subprocess per contender: build, one warm-up step, then a CLEAN baseline — gradients and
  Opacus' per-sample gradients released (``zero_grad(set_to_none=True)``), ``gc``, ``malloc_trim`` — VmRSS,
  the kernel's high-water mark reset (``/proc/self/clear_refs`` <- 5, Linux), 3 steps at exactly the expected
  batch, peak = VmHWM. ``mem_mb`` = peak - baseline: everything a step allocates (activations, per-sample
  gradients and norms, the gradients themselves); ``mem_ratio`` = DP / plain. Weights and momentum buffers
  are in the baseline of both.
* Allocator: the bench runs under the allocator a site's training process runs under (``client.allocator``:
  TCMalloc where installed, re-executing itself with ``LD_PRELOAD``; ``--allocator system`` for glibc's
  malloc, whose fragmentation under Poisson batch sizes costs DP steps page faults the plain step, always one
  size, does not pay). The memory children inherit it; their clean baseline also hands TCMalloc's cached free
  pages back to the system (``MallocExtension_ReleaseFreeMemory``), as ``malloc_trim`` does for glibc.
* Conditions printed and recorded: load average before/after, torch threads, CPU count, allocator.

Prints a table, then ONE JSON object on the last stdout line, and writes bench/results/dp_overhead.json
(``dp_overhead_3d.json`` with ``--3d``). Headline keys: ``ratio`` / ``mem_ratio`` for Atoll's default
network, size and mode; ``densenet121`` (its ``bk`` time and memory ratios) and ``round_ratio`` when run.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import opacus  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from client.allocator import CHOICE_ENV, CHOICES, LIBRARY, active_allocator, choice, site_env  # noqa: E402
from contract import Mechanism  # noqa: E402
from models import DEFAULT_MODEL, build_model  # noqa: E402
from privacy.dpsgd import (  # noqa: E402
    GRAD_SAMPLE_MODES,
    PrivateStep,
    make_optimizer,
    resolve_grad_sample_mode,
)

warnings.filterwarnings("ignore", message="Full backward hook is firing")

DEFAULT_IMAGE_SIZE = 28  # the site config default
LR = 0.05  # train_local's default optimizer (SGD, momentum 0.9) at the default run lr
Q = 0.1  # Poisson sampling rate of the DP steps: N = B / Q patients
MODES = ("bk", "hooks")


@dataclass(frozen=True)
class Row:
    """One network at one input shape; ``size`` is an int (2D, px) or a 'DxHxW' string (3D)."""

    model: str
    size: int | str
    batch: int
    seg: bool = False  # 3D segmentation (the task's Dice + CE loss) rather than classification

    @property
    def label(self) -> str:
        return f"{self.model} {self.size}{'px' if isinstance(self.size, int) else ''}"


ROWS_2D = [Row(DEFAULT_MODEL, 28, 64), Row(DEFAULT_MODEL, 64, 64), Row("resnet18", 64, 64),
           Row("densenet121", 64, 64)]
ROWS_3D = [Row(DEFAULT_MODEL, "32x32x32", 16), Row("resnet10", "32x32x32", 16),
           Row("scalespace", "32x48x32", 6, seg=True), Row("basicunet-small", "32x48x32", 6, seg=True),
           Row("basicunet", "32x48x32", 6, seg=True)]
QUICK = [Row(DEFAULT_MODEL, 28, 64)]


def _parse(spec: str) -> Row:
    """``--_mem`` round trip: 'model|size|batch|seg'."""
    model, size, batch, seg = spec.split("|")
    return Row(model, size if "x" in size else int(size), int(batch), seg == "1")


def _spec(row: Row) -> str:
    return f"{row.model}|{row.size}|{row.batch}|{int(row.seg)}"


def poisson_batches(expected: int, rounds: int, seed: int = 0) -> list[int]:
    """Batch sizes of ``rounds`` DP steps, shared by all modes of a row: the Binomial(N = expected / Q, Q)
    quantiles at (i + 1/2) / rounds, in a seeded shuffled order.

    Stratified rather than drawn, so that the sizes a row is timed at are spread over the Poisson batch's
    distribution around its mean, and the median round is a batch of about the expected size. Independent
    draws (this bench until session 7) gave DenseNet121 [65, 73, 57] at 3 rounds and a 10-round mean of 66.1
    for an expected 64: a ~3 % upward bias in the median ratio that said nothing about DP's cost.
    """
    from scipy.stats import binom

    n = round(expected / Q)
    sizes = [int(binom.ppf((i + 0.5) / rounds, n, Q)) for i in range(rounds)]
    order = torch.randperm(rounds, generator=torch.Generator().manual_seed(seed)).tolist()
    return [sizes[i] for i in order]


def _data(row: Row, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if isinstance(row.size, int):
        return torch.randn(n, 1, row.size, row.size), torch.randint(0, 2, (n,))
    size = tuple(int(v) for v in row.size.split("x"))
    x = torch.randn(n, 1, *size)
    return x, (torch.randint(0, 3, (n, *size)) if row.seg else torch.randint(0, 2, (n,)))


def _network(row: Row) -> tuple[nn.Module, object]:
    """(model, criterion factory) as train_local gets them."""
    if row.seg:
        from contract import TaskSpec
        from models import build_loss, build_task_model

        size = tuple(int(v) for v in row.size.split("x"))
        task = TaskSpec(kind="segmentation", spatial_dims=3, classes=(), labels=("anterior", "posterior"), size=size)
        return build_task_model(row.model, task), build_loss(task)
    dims = 2 if isinstance(row.size, int) else 3
    return build_model(row.model, spatial_dims=dims), lambda reduction: nn.CrossEntropyLoss(reduction=reduction)


class Contender:
    """A plain step (``mode == 'non-dp'``) or a ``PrivateStep`` in one mode, with a way to release grads."""

    def __init__(self, row: Row, mode: str, x: torch.Tensor, y: torch.Tensor) -> None:
        torch.manual_seed(1)
        self.mode, self.x, self.y = mode, x, y
        model, criterion = _network(row)
        opt = make_optimizer(model.parameters(), lr=LR)
        if mode == "non-dp":
            loss_fn = criterion("mean")
            self.optimizer = opt

            def step(n: int) -> None:
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x[:n]), y[:n]).backward()
                opt.step()

            self.step = step
        else:
            private = PrivateStep(model, opt, Mechanism(noise_multiplier=1.0, clip_norm=1.0, sample_rate=Q),
                                  expected_batch_size=row.batch, grad_sample_mode=mode, criterion=criterion)
            self.optimizer = private.optimizer
            self.step = lambda n: private.step(x[:n], y[:n])

    def release(self) -> None:
        """Drop gradients (and Opacus' per-sample gradients): what a clean baseline must not include."""
        self.optimizer.zero_grad(set_to_none=True)


def time_row(row: Row, modes: list[str], rounds: int) -> dict:
    sizes = poisson_batches(row.batch, rounds)
    x, y = _data(row, max(sizes + [row.batch]))
    contenders = [Contender(row, m, x, y) for m in ["non-dp", *modes]]
    for c in contenders:
        c.step(row.batch)
        if c.mode != "non-dp" and max(sizes) > row.batch:
            c.step(max(sizes))  # the allocator's steady state for this schedule, as after a site's first steps
    cpu: dict[str, list[float]] = {c.mode: [] for c in contenders}
    wall: dict[str, list[float]] = {c.mode: [] for c in contenders}
    for r in range(rounds):
        k = r % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            n = row.batch if c.mode == "non-dp" else sizes[r]
            t0, w0 = time.process_time(), time.perf_counter()
            c.step(n)
            cpu[c.mode].append(time.process_time() - t0)
            wall[c.mode].append(time.perf_counter() - w0)
    res = {}
    for c in contenders:
        ratios = [a / b for a, b in zip(cpu[c.mode], cpu["non-dp"], strict=True)]
        res[c.mode] = {"cpu_ms": round(statistics.median(cpu[c.mode]) * 1e3, 1),
                       "wall_ms": round(statistics.median(wall[c.mode]) * 1e3, 1),
                       "ratio": round(statistics.median(ratios), 3)}
    res["poisson_batches"] = sizes
    return res


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{key} not in /proc/self/status")


def _release_free_memory() -> None:
    """Return the allocator's cached free memory to the system: glibc's ``malloc_trim``, and TCMalloc's
    ``MallocExtension_ReleaseFreeMemory`` when it is the process's allocator (it keeps freed pages otherwise)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    release = getattr(ctypes.CDLL(None), "MallocExtension_ReleaseFreeMemory", None)
    if release is not None:
        release()


def _under_allocator(wanted: str, argv: list[str] | None) -> str:
    """Make sure this process runs under ``wanted`` (``client.allocator``): re-execute the script (``argv``:
    its arguments; None when ``main`` was called in-process, which is never replaced) with the site's
    environment when it does not. Returns the allocator the bench measures under."""
    active = active_allocator()
    if active == wanted or active == "unknown" or argv is None or os.environ.get("ATOLL_BENCH_REEXEC"):
        return active
    env = site_env({**os.environ, CHOICE_ENV: wanted})
    if wanted == "system":
        env["LD_PRELOAD"] = " ".join(p for p in env.get("LD_PRELOAD", "").split() if LIBRARY not in p)
    elif LIBRARY not in env.get("LD_PRELOAD", ""):
        print("note: TCMalloc is not installed (Debian/Ubuntu: apt-get install libtcmalloc-minimal4); "
              "measuring under glibc's malloc", file=sys.stderr)
        return active
    env["ATOLL_BENCH_REEXEC"] = "1"
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)
    raise AssertionError("unreachable")  # pragma: no cover


def _mem_child(row: Row, mode: str) -> None:
    """Subprocess body: peak resident-memory growth (MB) of 3 steps of one contender from a clean baseline."""
    x, y = _data(row, row.batch)
    c = Contender(row, mode, x, y)
    c.step(row.batch)  # warm-up: lazy kernel/optimizer-state allocations are not the step's working set
    c.release()  # ... but the gradients and per-sample gradients it left behind are
    gc.collect()
    _release_free_memory()  # hand freed heap back so reuse cannot hide growth
    base = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current RSS
    for _ in range(3):
        c.step(row.batch)
    print(json.dumps({"base_mb": base, "peak_mb": _status_mb("VmHWM")}))


def mem_row(row: Row, labels: list[str], threads: int) -> dict:
    res = {}
    for label in labels:
        cmd = [sys.executable, __file__, "--_mem", _spec(row), label, "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        res[label] = {"mem_mb": round(m["peak_mb"] - m["base_mb"], 1), "peak_rss_mb": round(m["peak_mb"], 1)}
    for label in labels:
        res[label]["mem_ratio"] = round(res[label]["mem_mb"] / max(res["non-dp"]["mem_mb"], 1e-9), 2)
    return res


def round_bench(repeats: int, steps: int, batch: int = 64) -> dict:
    """The site's round: ``train_local`` DP (auto mode) vs plain at the same expected batch, interleaved."""
    from privacy.dpsgd import train_local

    @dataclass
    class Data:
        images: torch.Tensor
        labels: torch.Tensor
        patients: torch.Tensor

    patients = round(batch / Q)
    g = torch.Generator().manual_seed(0)
    pat = torch.arange(patients).repeat_interleave(2)  # two images per patient, one drawn per sampled patient
    data = Data(torch.randn(len(pat), 1, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, generator=g),
                torch.randint(0, 2, (len(pat),), generator=g), pat)
    mechs = {"non-dp": Mechanism(steps=steps, dp=False),
             "dp": Mechanism(noise_multiplier=1.0, clip_norm=1.0, sample_rate=Q, steps=steps)}
    cpu: dict[str, list[float]] = {k: [] for k in mechs}
    wall: dict[str, list[float]] = {k: [] for k in mechs}
    for r in range(repeats + 1):
        for k in (list(mechs) if r % 2 == 0 else list(mechs)[::-1]):
            torch.manual_seed(1)
            model = build_model(DEFAULT_MODEL)
            t0, w0 = time.process_time(), time.perf_counter()
            train_local(model, data, mechs[k], lr=LR, device="cpu", batch_size=batch, seed=r, reproducible_dp=True)
            if r:  # the first pass is warm-up
                cpu[k].append(time.process_time() - t0)
                wall[k].append(time.perf_counter() - w0)
    ratios = [a / b for a, b in zip(cpu["dp"], cpu["non-dp"], strict=True)]
    return {"model": DEFAULT_MODEL, "image_size": DEFAULT_IMAGE_SIZE, "steps": steps, "batch": batch,
            "patients": patients, "sample_rate": Q, "repeats": repeats,
            "mode": resolve_grad_sample_mode(build_model(DEFAULT_MODEL)),
            "cpu_s": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
            "wall_s": {k: round(statistics.median(v), 3) for k, v in wall.items()},
            "ratio": round(statistics.median(ratios), 3)}


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="AtollNet at 28 px and a short round only, fewer repeats")
    ap.add_argument("--models", default=None, help="comma-separated networks: only their rows (e.g. densenet121)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"DP modes (default bk,hooks; any of {GRAD_SAMPLE_MODES})")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: stable on a shared CPU)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved repeats per row")
    ap.add_argument("--3d", dest="only_3d", action="store_true", help="only the 3D rows")
    ap.add_argument("--no-round", action="store_true", help="skip the train_local round")
    ap.add_argument("--allocator", choices=CHOICES, default=None,
                    help="memory allocator to measure under (default: the site's, client.allocator: tcmalloc "
                         "where installed, else glibc's malloc; 'system' = glibc's malloc)")
    ap.add_argument("--_mem", nargs=2, metavar=("ROW", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args._mem:  # the memory children inherit the parent's allocator
        try:
            wanted = args.allocator or choice()
        except ValueError as exc:  # a bad ATOLL_ALLOCATOR in the environment
            ap.error(str(exc))
        allocator = _under_allocator(wanted, sys.argv[1:] if argv is None else None)
    if args._mem:
        _mem_child(_parse(args._mem[0]), args._mem[1])
        return 0
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in GRAD_SAMPLE_MODES]
    if bad:
        ap.error(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(GRAD_SAMPLE_MODES)}")
    rows = ROWS_3D if args.only_3d else (QUICK if args.quick else ROWS_2D + ROWS_3D)
    if args.models:
        wanted = set(args.models.split(","))
        rows = [r for r in ROWS_2D + ROWS_3D if r.model in wanted]
    load_before = _load()
    atoll_mode = resolve_grad_sample_mode(build_model(DEFAULT_MODEL))  # what train_local uses by default
    rounds = args.rounds or (8 if args.quick else 12)
    print(f"conditions: load {load_before} on {os.cpu_count()} CPUs, torch threads {args.threads}, "
          f"allocator {allocator}, Poisson rate {Q}, medians over interleaved rounds")
    results = []
    for row in rows:
        small = row.model == DEFAULT_MODEL and row.size == DEFAULT_IMAGE_SIZE
        r = rounds if small else max(3, rounds // 3)
        times = time_row(row, modes, r)
        sizes = times.pop("poisson_batches")
        mem = mem_row(row, list(times), args.threads)
        steps = {k: {**times[k], **mem[k]} for k in times}
        results.append({"model": row.model, "size": row.size, "batch": row.batch, "rounds": r,
                        "poisson_batches": sizes, "steps": steps})
        print(f"\n{row.label}: plain batch {row.batch}, DP Poisson batches {sizes} ({r} rounds)")
        print(f"  {'mode':8s} {'cpu ms':>9s} {'wall ms':>9s} {'ratio':>7s} {'mem MB':>8s} {'mem ratio':>9s}")
        for k, v in steps.items():
            mark = "  <- Atoll (auto)" if k == resolve_grad_sample_mode(_network(row)[0]) else ""
            print(f"  {k:8s} {v['cpu_ms']:9.1f} {v['wall_ms']:9.1f} {v['ratio']:7.2f} {v['mem_mb']:8.1f} "
                  f"{v['mem_ratio']:9.2f}{mark}")
    rnd = None
    if not args.no_round and not args.only_3d and not args.models:
        rnd = round_bench(repeats=2 if args.quick else 4, steps=10 if args.quick else 30)
        print(f"\nround (train_local, {rnd['model']} {rnd['image_size']}px, {rnd['steps']} steps, plain batch "
              f"{rnd['batch']} vs DP q={Q} of {rnd['patients']} patients, mode {rnd['mode']}): "
              f"cpu s {rnd['cpu_s']}, ratio {rnd['ratio']:.2f}")
    head = next((c for c in results if c["model"] == DEFAULT_MODEL and c["size"] == DEFAULT_IMAGE_SIZE), results[0])
    head_mode = atoll_mode if atoll_mode in head["steps"] else modes[0]
    dense = next((c for c in results if c["model"] == "densenet121"), None)
    summary = {
        "ratio": head["steps"][head_mode]["ratio"],
        "mem_ratio": head["steps"][head_mode]["mem_ratio"],
        "mode": head_mode,
        "model": head["model"],
        "size": head["size"],
        "batch": head["batch"],
        "densenet121": None if dense is None or "bk" not in dense["steps"] else
        {"ratio": dense["steps"]["bk"]["ratio"], "mem_ratio": dense["steps"]["bk"]["mem_ratio"]},
        "round_ratio": None if rnd is None else rnd["ratio"],
        "quick": args.quick,
        "threads": args.threads,
        "allocator": allocator,
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": _load(),
        "sample_rate": Q,
        "time_method": "median over rounds of per-round process-CPU-time ratio (DP step on a Poisson batch of "
                       "expected size B vs plain step on B), contenders interleaved in one process",
        "mem_method": "VmHWM - VmRSS over 3 steps at batch B from a clean baseline (after a warm-up step, "
                      "gradients and per-sample gradients released), one fresh subprocess per contender",
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "machine": platform.machine(),
        "configs": results,
        "round": rnd,
    }
    out = ROOT / "bench" / "results" / ("dp_overhead_3d.json" if args.only_3d else "dp_overhead.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
