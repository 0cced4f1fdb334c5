"""The server's per-round update path against a plain numpy weighted sum of the same arrays.

For 10 updates of DenseNet121, ResNet18 (MONAI, DP-compatible, 2D) and a synthetic 50M-float model, three paths
run side by side on the same in-memory Flower records, interleaved, median of the repeats:

- ``atoll``: what the ServerApp does per round for FedAvg: ``RoundBook.admit_train_reply`` of each reply with its
  (unsigned here: no ledger) record naming the update's BLAKE3 digest and the SHA-256 of the weights in, through
  ``make_validator(bound, accumulate=True)`` (one pass: zero-copy decode, dtype/shape/finite/norm checks, digest,
  weighted sum), then ``RoundBook.aggregate()`` and the SHA-256 of the new global weights that
  ``RunOutputs.digest`` signs. Run without and with ``max-update-norm``. Steady state: the round's global weights
  are the previous round's aggregate (their SHA-256, the sites' ``weights_in_sha256``, was computed then).
- ``old``: the path before the one-pass rewrite, kept here only as the "before" number: the per-tensor validator
  (``np.load`` of every tensor, float64 norm), the SHA-256 binding check through ``to_torch_state_dict()``,
  Flower's ``FedAvg.aggregate_train``, and the same digest of the new global.
- ``numpy``: ``acc += w * x`` per tensor with a preallocated scratch over zero-copy views of the same bytes
  (no checks, no hash): the arithmetic floor.

Throughput = bytes of the 10 updates / wall time. Headline ``ratio`` = the worst, over the three models and both
bound settings, of Atoll GB/s / numpy GB/s (target >= 0.5). ``--quick``: 3 repeats instead of 7; ``--no-old``
skips the slow "before" path. Prints the conditions (load, cores, threads) and one JSON object on the last line;
writes bench/results/aggregate.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from contract import wire  # noqa: E402
from models import UPDATE_HASH, build_model, state_dict_digest, state_dict_sha256  # noqa: E402
from server.sitebook import RoundBook  # noqa: E402
from server.update_pass import weights_sha256  # noqa: E402
from server.validation import make_validator  # noqa: E402

N_UPDATES = 10


def _state(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    if name == "float50m":  # a large model in few big tensors: the memory-bandwidth end of the range
        return {f"layer{i:02d}.weight": torch.randn(2_000_000) * 0.02 for i in range(25)}
    return build_model(name, spatial_dims=2, in_channels=1, num_classes=2).state_dict()


def _updates(sd: dict[str, torch.Tensor], seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(N_UPDATES):
        out.append({k: (v + 1e-3 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
                    for k, v in sd.items()})
    return out


def _reply(node: int, update: ArrayRecord, record: dict, num_examples: float) -> Message:
    content = RecordDict({wire.ARRAYS: update, wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: num_examples}),
                          wire.LEDGER: wire.ledger_record(record), wire.SITE: wire.site_record(f"site-{node}")})
    meta = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"a{node}",
                    group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(content=content, metadata=meta)


# -- the validator before the one-pass path: server/validation.py of the parent commit, verbatim ----------------
_MAX_LISTED = 3


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _old_update_norm(update: ArrayRecord, global_: ArrayRecord) -> float:
    """||update - global||_2 over the floating-point tensors, computed in float64.

    Integer tensors (e.g. BatchNorm's `num_batches_tracked` counters) are not model weights in the
    geometric sense and are left out of the norm; their dtype and shape are still checked.
    """
    total = 0.0
    for name, g in global_.items():
        a, b = update[name].numpy(), g.numpy()
        if np.issubdtype(b.dtype, np.floating) or np.issubdtype(b.dtype, np.complexfloating):
            d = a.astype(np.float64) - b.astype(np.float64)
            total += float(np.vdot(d, d).real)
    return math.sqrt(total)


def _old_validate_update(update: ArrayRecord, global_: ArrayRecord, max_norm: float | None) -> str | None:
    """Why `update` must not be aggregated, or None if it may be.

    Parameters
    ----------
    update : ArrayRecord
        The site's returned weights (the full model, as Atoll's sites send it).
    global_ : ArrayRecord
        The global weights the site was sent this round.
    max_norm : float or None
        Bound on ||update - global||_2; None = no bound.

    Returns
    -------
    str or None
        A one-line reason (wrong tensor names, dtype, shape, non-finite values, norm over the
        bound, undecodable tensor), or None.
    """
    if not isinstance(update, ArrayRecord):
        return f"update is a {type(update).__name__}, not an ArrayRecord"
    expected, got = list(global_.keys()), list(update.keys())
    missing = [n for n in expected if n not in update]
    extra = [n for n in got if n not in global_]
    if missing:
        return f"update lacks tensor(s) {_names(missing)}"
    if extra:
        return f"update has unexpected tensor(s) {_names(extra)}"
    for name in expected:
        want, have = global_[name], update[name]
        if have.dtype != want.dtype:
            return f"tensor {name!r} has dtype {have.dtype}, expected {want.dtype}"
        if tuple(have.shape) != tuple(want.shape):
            return f"tensor {name!r} has shape {tuple(have.shape)}, expected {tuple(want.shape)}"
        try:
            arr = have.numpy()
        except Exception:  # noqa: BLE001 - any decoding failure means the bytes are not a tensor
            return f"tensor {name!r} could not be decoded"
        if arr.dtype != np.dtype(want.dtype) or arr.shape != tuple(want.shape):
            return f"tensor {name!r} does not decode to its declared dtype/shape"
        if (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating)) \
                and not np.isfinite(arr).all():
            return f"tensor {name!r} has non-finite values (NaN or infinity)"
    if max_norm is not None:
        norm = _old_update_norm(update, global_)
        if not math.isfinite(norm):
            return "update norm overflows"
        if norm > max_norm:
            return f"update norm ||update - global|| = {norm:.4g} exceeds the bound {max_norm:.4g}"
    return None


def _old_validator(max_norm: float | None):
    return lambda update, global_: _old_validate_update(update, global_, max_norm)


def _fresh(records: list[ArrayRecord]) -> list[ArrayRecord]:
    """The same bytes in new Array objects, as each round receives them (nothing cached on the objects)."""
    return [ArrayRecord({k: Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=a.data)
                         for k, a in r.items()}) for r in records]


def _atoll(global_: ArrayRecord, updates: list[ArrayRecord], records: list[dict], bound: float | None) -> ArrayRecord:
    book = RoundBook(1, validator=make_validator(bound, accumulate=True))
    for i, (u, rec) in enumerate(zip(updates, records)):
        assert book.admit_train_reply(_reply(i + 1, u, rec, 100.0 + i), global_), book.sites
    new = book.aggregate()
    weights_sha256(new)  # what RunOutputs.digest hashes and signs (computed as the weights were built)
    return new


def _old(global_: ArrayRecord, updates: list[ArrayRecord], records: list[dict], bound: float | None) -> None:
    book = RoundBook(1, validator=_old_validator(bound))
    msgs = [_reply(i + 1, u, rec, 100.0 + i) for i, (u, rec) in enumerate(zip(updates, records))]
    accepted = [m for m in msgs if book.admit_train_reply(m, global_)]
    assert len(accepted) == len(msgs), book.sites
    new, _ = FedAvg().aggregate_train(1, accepted)
    state_dict_sha256(new.to_torch_state_dict())


def _numpy(updates: list[ArrayRecord]) -> None:
    views = [[np.frombuffer(a.data, np.dtype(a.dtype), int(np.prod(a.shape)),
                            len(a.data) - int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize) for a in r.values()]
             for r in updates]
    acc = [np.zeros_like(v) for v in views[0]]
    tmp = [np.empty_like(v) for v in views[0]]
    for i, vs in enumerate(views):
        w = (100.0 + i) / 1000.0
        for a, t, x in zip(acc, tmp, vs):
            np.multiply(x, w, out=t, casting="unsafe")
            np.add(a, t, out=a, casting="unsafe")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_model(name: str, repeats: int, with_old: bool = True) -> dict:
    sd = _state(name)
    global_ = ArrayRecord(sd)
    w_in = state_dict_sha256(sd)
    tensors = _updates(sd, 1)
    updates = [ArrayRecord(t) for t in tensors]
    old_records = [{"type": "round", "update_sha256": state_dict_sha256(t), "weights_in_sha256": w_in}
                   for t in tensors]
    # Atoll's steady state: the round's global weights are the previous round's aggregate, whose SHA-256 was
    # computed (once) when that round built and signed them.
    first = [{"type": "round", "update_sha256": state_dict_digest(t, UPDATE_HASH), "update_hash": UPDATE_HASH,
              "weights_in_sha256": w_in} for t in tensors]
    prev = _atoll(global_, _fresh(updates), first, None)
    new_records = [{**r, "weights_in_sha256": weights_sha256(prev)} for r in first]
    del tensors
    nbytes = sum(len(a.data) for r in updates for a in r.values())
    # a norm bound every update meets (so that every path does the whole work)
    bound = 10.0 * max(math.sqrt(sum(float(((u[k].numpy().astype(np.float64) - global_[k].numpy()) ** 2).sum())
                                     for k in global_.keys())) for u in updates[:1])
    paths = ("numpy", "atoll", "atoll_bound") + (("old", "old_bound") if with_old else ())
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(repeats):  # interleaved: load changes hit every path alike
        times["numpy"].append(_timed(lambda: _numpy(updates)))
        us = _fresh(updates)
        times["atoll"].append(_timed(lambda: _atoll(prev, us, new_records, None)))
        us = _fresh(updates)
        times["atoll_bound"].append(_timed(lambda: _atoll(prev, us, new_records, bound)))
        if not with_old:
            continue
        g, us = _fresh([global_])[0], _fresh(updates)
        times["old"].append(_timed(lambda: _old(g, us, old_records, None)))
        g, us = _fresh([global_])[0], _fresh(updates)
        times["old_bound"].append(_timed(lambda: _old(g, us, old_records, bound)))
    gbps = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
    nan = float("nan")
    gbps.setdefault("old", nan)
    gbps.setdefault("old_bound", nan)
    row = {"model": name, "tensors": len(sd), "update_mb": round(nbytes / N_UPDATES / 1e6, 1),
            **{f"{k}_gbps": round(v, 3) for k, v in gbps.items()},
            "ratio": round(gbps["atoll"] / gbps["numpy"], 3),
            "ratio_bound": round(gbps["atoll_bound"] / gbps["numpy"], 3),
            "old_ratio": round(gbps["old"] / gbps["numpy"], 3),
            "old_ratio_bound": round(gbps["old_bound"] / gbps["numpy"], 3),
            "speedup_vs_old": round(gbps["atoll"] / gbps["old"], 2),
            "speedup_vs_old_bound": round(gbps["atoll_bound"] / gbps["old_bound"], 2)}
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}  # --no-old: null


def conditions() -> dict:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "load_1m": round(load[0], 2), "load_5m": round(load[1], 2),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "numpy": np.__version__, "machine": platform.machine()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 repeats instead of 7 (same three models)")
    ap.add_argument("--models", default="densenet121,resnet18,float50m", help="comma-separated subset")
    ap.add_argument("--no-old", action="store_true", help="skip the slow pre-rewrite path (the 'before' columns)")
    args = ap.parse_args(argv)
    repeats = 3 if args.quick else 7
    cond = conditions()
    print(f"conditions: {json.dumps(cond)}; {N_UPDATES} updates per round, median of {repeats} interleaved repeats")
    rows = []
    nan = float("nan")
    print(f"{'model':12} {'MB/upd':>7} {'numpy':>7} {'atoll':>7} {'+bound':>7} {'old':>7} {'old+bnd':>7} "
          f"{'ratio':>6} {'r+bnd':>6} {'old r':>6}  (GB/s of update bytes)")
    for name in args.models.split(","):
        r = bench_model(name.strip(), repeats, with_old=not args.no_old)
        rows.append(r)
        print(f"{r['model']:12} {r['update_mb']:7.1f} {r['numpy_gbps']:7.2f} {r['atoll_gbps']:7.2f} "
              f"{r['atoll_bound_gbps']:7.2f} {r['old_gbps'] or nan:7.2f} {r['old_bound_gbps'] or nan:7.2f} "
              f"{r['ratio']:6.2f} "
              f"{r['ratio_bound']:6.2f} {r['old_ratio'] or nan:6.2f}", flush=True)
    worst = min(min(r["ratio"], r["ratio_bound"]) for r in rows)
    olds = [min(r["old_ratio"], r["old_ratio_bound"]) for r in rows if not args.no_old]
    out = {"ratio": worst, "target": 0.5, "old_ratio": min(olds) if olds else None,
           "models": rows, "conditions": {**cond, "load_1m_after": round(os.getloadavg()[0], 2)},
           "repeats": repeats, "updates": N_UPDATES}
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / "aggregate.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
