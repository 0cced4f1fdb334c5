"""One pass over one site's update: decode once, check it, hash it and add it to the round's weighted sum.

Why Atoll does this itself instead of chaining Flower's pieces: ``Array.numpy()`` copies every tensor out of
its bytes (``np.load``), and the checks, the hash the site signed, the norm bound and Flower's FedAvg each
decoded the update again, so 10 DenseNet121 updates moved 0.2 GB/s where a numpy weighted sum of the same arrays
moves 3 (bench/aggregate.py). Here each tensor is a zero-copy ``np.frombuffer`` view of the bytes Flower
received, and every check plus the weighted sum runs block by block over it while the block is in cache:

    hash(frame + block) -> d = block - global -> ||d||^2 (finite iff the block is) -> sum += weight * block

Small tensors (DenseNet121 has hundreds of them) are packed into one block first, so the per-call overhead is
paid per block, not per tensor. A block whose squared norm is not finite is looked at exactly (which tensor is
NaN or infinite, or did only the float32 square overflow), and a norm close to the bound is recomputed in float64,
so the fast path never changes a verdict. Reasons are those of :func:`server.validation.validate_update`.

Flower's strategies stay the aggregators of record for robust rules (median, Krum, ...): for them this pass only
checks and hashes (``WeightedSum`` is not used). For FedAvg/FedProx the sum built here *is* the aggregate, the
same weighted mean as Flower's ``aggregate_arrayrecords`` (tests/test_update_pass.py compares them).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord
from scipy.linalg import blas
from threadpoolctl import ThreadpoolController

from models import FramedDigest, tensor_frame

__all__ = ["BLOCK", "Inspection", "RoundPlan", "WeightedSum", "inspect_update", "weights_sha256"]

BLOCK = 1 << 18           # float32 elements per block (1 MiB): a block, its global and its sum fit in L2
_SMALL = BLOCK // 8        # float32 tensors below this many elements are packed with their neighbours
_NUMPY_STYPE = "numpy.ndarray"
_EXACT_NEAR_BOUND = 1e-3   # relative distance to the bound under which the norm is recomputed in float64
_MAX_LISTED = 3


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The header ``np.save`` (so Flower's ``Array(ndarray)``) writes before a C-order array's data."""
    meta = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, meta)
    except ValueError:  # a header over 64 KiB needs format 2.0, as np.save then writes
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, meta)
    return buf.getvalue()


def _c_order(a: np.ndarray) -> np.ndarray:
    """``a`` in C order, keeping 0-d arrays 0-d (``np.ascontiguousarray`` would make them 1-d)."""
    return a if a.flags.c_contiguous else a.copy(order="C")


def _is_float(dtype: np.dtype) -> bool:
    return bool(np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.complexfloating))


@dataclass(frozen=True)
class Slot:
    """One tensor of the round's global weights, as every update must carry it."""

    name: str
    dtype: np.dtype
    dtype_name: str          # the ``Array.dtype`` string the update must declare
    shape: tuple[int, ...]
    count: int
    header: bytes            # the npy header of a well-formed update's bytes (zero-copy fast path)
    frame: bytes             # what the update digest hashes before the tensor's data
    glob: np.ndarray         # the global tensor, flat
    offset: int              # start in the packed float32 buffer, or -1 (not float32: handled on its own)

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


def _declared(have: Array) -> tuple[np.dtype, tuple[int, ...]] | None:
    try:
        return np.dtype(have.dtype), tuple(int(d) for d in have.shape)
    except (TypeError, ValueError):
        return None


class RoundPlan:
    """The round's global weights laid out once for checking (and summing) every update against them.

    Slots are in sorted-name order, the order the update digest hashes them in; all float32 tensors live in one
    flat buffer (``g32``), the small ones first, so that packed small tensors are one contiguous range of it.
    """

    def __init__(self, global_: ArrayRecord) -> None:
        self.arrays = global_
        self.order = list(global_.keys())
        views: dict[str, np.ndarray] = {}
        meta: dict[str, tuple[np.dtype, tuple[int, ...], bytes]] = {}
        for name in self.order:
            arr = global_[name]
            declared = _declared(arr)
            if declared is None:
                raise ValueError(f"global tensor {name!r} declares dtype {arr.dtype!r}, which numpy does not know")
            dtype, shape = declared
            header = npy_header(dtype, shape)
            v = _view(arr, name, dtype, shape, header)
            if isinstance(v, str):
                raise ValueError(f"the round's global weights: {v}")
            views[name], meta[name] = v, (dtype, shape, header)
        # small float32 tensors first, then the large ones (each group in name order): the small ones are then
        # one contiguous range however they interleave with large ones by name, so they pack into full blocks
        f32 = sorted((n for n in views if meta[n][0] == np.float32), key=lambda n: (views[n].size >= _SMALL, n))
        self.g32 = np.concatenate([views[n] for n in f32]) if f32 else np.empty(0, np.float32)
        offsets, off = {}, 0
        for n in f32:
            offsets[n], off = off, off + views[n].size
        self.slots: list[Slot] = []
        for name in sorted(views):
            dtype, shape, header = meta[name]
            v, o = views[name], offsets.get(name, -1)
            self.slots.append(Slot(name, dtype, global_[name].dtype, shape, v.size, header,
                                   tensor_frame(name, str(dtype), shape, v.nbytes),
                                   self.g32[o:o + v.size] if o >= 0 else v, o))
        self.by_name = {s.name: s for s in self.slots}
        self._digests: dict[str, str] = {}
        # multithreaded BLAKE3 pays off when the bytes are mostly in large tensors (50M-float model: 2.1x the
        # wall throughput at load 25 on 2 cores); on DenseNet121's hundreds of small tensors it only costs CPU
        large = sum(s.nbytes for s in self.slots if s.count >= _PARALLEL_MIN)
        self.parallel_digest = PARALLEL_DIGEST and 2 * large >= sum(s.nbytes for s in self.slots)

    def global_digest(self, scheme: str = "sha256") -> str:
        """Digest of the global weights (sites sign its SHA-256 as ``weights_in_sha256``), once per round; the
        SHA-256 of weights this server aggregated itself was computed when they were built (``weights_sha256``)."""
        if scheme not in self._digests:
            cached = _cached_sha256(self.arrays) if scheme == "sha256" else None
            self._digests[scheme] = cached or _digest(self.slots, [s.glob for s in self.slots], scheme)
        return self._digests[scheme]


def _digest(slots: Sequence[Slot], views: Sequence[np.ndarray], scheme: str, parallel: bool = False) -> str:
    h = FramedDigest(scheme, parallel=parallel)
    for s, v in zip(slots, views):
        h.update(s.frame)
        if s.count:
            h.update(v)
    return h.hexdigest()


# The digest of an ArrayRecord this module built, keyed to the exact Array objects and bytes it holds: the
# round's signed digest and the next round's weights-in check then hash the new global weights once, not twice.
_SHA_ATTR = "_atoll_weights_sha256"


def _identity(arrays: ArrayRecord) -> tuple:
    return tuple((k, id(a), id(a.data)) for k, a in arrays.items())


def _cached_sha256(arrays: ArrayRecord) -> str | None:
    got = getattr(arrays, "__dict__", {}).get(_SHA_ATTR)
    return got[1] if got is not None and got[0] == _identity(arrays) else None


def weights_sha256(arrays: ArrayRecord) -> str:
    """``models.state_dict_sha256`` of an ArrayRecord, from zero-copy views (cached for weights built here)."""
    cached = _cached_sha256(arrays)
    return cached if cached is not None else RoundPlan(arrays).global_digest("sha256")


def _saxpy(x: np.ndarray, y: np.ndarray, a: float) -> None:
    """``y += a * x`` in place with BLAS (one fused pass; numpy needs two and a scratch buffer)."""
    out = blas.saxpy(x, y, a=a)
    if out is not y:  # f2py copied (y not a contiguous float32 array): write back
        y[...] = out


class WeightedSum:
    """The round's running FedAvg sum, ``sum_i w_i * update_i``, built in place as updates pass their checks.

    Float32 tensors are summed in float32 (as Flower's FedAvg does), other floating tensors in float64 and cast
    back; integer tensors (counters such as ``num_batches_tracked``) get the rounded weighted mean in their own
    dtype, so that next round's dtype check still accepts the sites' replies (Flower would make them float64).
    An update rejected after part of it was added (a NaN in its last tensor, a hash that does not match) is
    taken out by re-summing the accepted ones: the result is exactly the sum without it.
    """

    def __init__(self, plan: RoundPlan) -> None:
        self.plan = plan
        self.acc32 = np.zeros_like(plan.g32)
        self.other = {s.name: np.zeros(s.count, np.complex128 if np.issubdtype(s.dtype, np.complexfloating)
                                       else np.float64) for s in plan.slots if s.offset < 0}
        self.total = 0.0
        self.parts: list[tuple[list[np.ndarray], float]] = []
        self.dirty = False          # holds part of an update that was not committed

    def commit(self, views: list[np.ndarray], weight: float) -> None:
        """The update whose pass just added ``weight * views`` is accepted."""
        self.parts.append((views, float(weight)))
        self.total += float(weight)
        self.dirty = False

    def discard(self) -> None:
        """The update being added was rejected: rebuild the sum from the accepted ones if it was touched."""
        if not self.dirty:
            return
        self.acc32[:] = 0
        for v in self.other.values():
            v[:] = 0
        with _one_blas_thread():
            for views, w in self.parts:
                if w == 0:
                    continue
                for s, v in zip(self.plan.slots, views):
                    if s.offset >= 0:
                        if s.count:
                            _saxpy(v, self.acc32[s.offset:s.offset + s.count], w)
                    else:
                        self.other[s.name] += w * v
        self.dirty = False

    def add32(self, block: np.ndarray, start: int, weight: float) -> None:
        self.dirty = True
        _saxpy(block, self.acc32[start:start + block.size], weight)

    def result(self) -> ArrayRecord | None:
        """The weighted mean as an ArrayRecord in the global's tensor order, or None if no weight was summed.

        Consumes the sum (divided in place). The record's SHA-256 is computed here, once, for the round's signed
        digest and the next round's weights-in check (:func:`weights_sha256`).
        """
        if not self.parts or self.total <= 0:
            return None
        flats: dict[str, np.ndarray] = {}
        out: dict[str, Array] = {}
        live = [views for views, w in self.parts if w != 0]
        if len(live) == 1:  # the mean of one update is that update, bit for bit (Flower: x * 1.0)
            flats = {s.name: v for s, v in zip(self.plan.slots, live[0])}
        else:
            np.divide(self.acc32, np.float32(self.total), out=self.acc32)
        for s in self.plan.slots:
            if s.name in flats:
                continue
            if s.offset >= 0:
                flat = self.acc32[s.offset:s.offset + s.count]
            else:
                mean = self.other[s.name] / self.total
                flat = (np.rint(mean.real) if not _is_float(s.dtype) else mean).astype(s.dtype)
            flats[s.name] = flat
        sha = _hash_async(self.plan.slots, [flats[s.name] for s in self.plan.slots], "sha256")  # while copying
        for name in self.plan.order:
            s = self.plan.by_name[name]
            # npy bytes built directly: np.save through BytesIO would copy the tensor twice more
            out[name] = Array(dtype=s.dtype_name, shape=s.shape, stype=_NUMPY_STYPE,
                              data=b"".join((s.header, flats[name].reshape(-1).view(np.uint8))))
        record = ArrayRecord(out)
        if hasattr(record, "__dict__"):
            record.__dict__[_SHA_ATTR] = (_identity(record), sha.result())
        else:
            sha.result()
        self.parts, self.total = [], 0.0
        return record


@dataclass
class Inspection:
    """What one pass found: a reason to reject (or None), the update's digest and its distance to the global
    (``norm``: computed only under a norm bound)."""

    problem: str | None
    digest: str | None = None
    norm: float | None = None
    views: list[np.ndarray] | None = None   # the decoded tensors, by slot (for WeightedSum.commit)


def _view(have: Array, name: str, dtype: np.dtype, shape: tuple[int, ...], header: bytes) -> np.ndarray | str:
    """The tensor's values, flat: a zero-copy view of Flower's bytes if they are plain npy, else ``np.load``."""
    data = have.data
    count = math.prod(shape)
    if (have.stype == _NUMPY_STYPE and isinstance(data, bytes) and len(data) == len(header) + count * dtype.itemsize
            and data.startswith(header)):
        return np.frombuffer(data, dtype, count, len(header))
    try:  # another npy layout (Fortran order, format 2.0, trailing bytes): Flower's decoder, then checked
        arr = have.numpy()
    except Exception:  # noqa: BLE001 - any decoding failure means the bytes are not a tensor
        return f"tensor {name!r} could not be decoded"
    if arr.dtype != dtype or arr.shape != shape:
        return f"tensor {name!r} does not decode to its declared dtype/shape"
    return _c_order(arr).reshape(-1)


def _check_layout(update: ArrayRecord, plan: RoundPlan) -> str | None:
    expected, got = plan.order, list(update.keys())
    missing = [n for n in expected if n not in update]
    extra = [n for n in got if n not in plan.by_name]
    if missing:
        return f"update lacks tensor(s) {_names(missing)}"
    if extra:
        return f"update has unexpected tensor(s) {_names(extra)}"
    for name in expected:
        want, have = plan.by_name[name], update[name]
        if have.dtype != want.dtype_name:
            return f"tensor {name!r} has dtype {have.dtype}, expected {want.dtype_name}"
        if tuple(have.shape) != want.shape:
            return f"tensor {name!r} has shape {tuple(have.shape)}, expected {want.shape}"
    return None


def _non_finite(slots: Sequence[Slot], views: Sequence[np.ndarray]) -> str | None:
    for s, v in zip(slots, views):
        if _is_float(s.dtype) and not np.isfinite(v).all():
            return f"tensor {s.name!r} has non-finite values (NaN or infinity)"
    return None


def _sq64(a: np.ndarray, b: np.ndarray) -> float:
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.vdot(d, d).real)


#: BLAKE3 update digests of models whose bytes are mostly in tensors of ``_PARALLEL_MIN`` elements or more are
#: hashed on all cores (``blake3(max_threads=AUTO)``: the same digest); SHA-256 cannot be split
PARALLEL_DIGEST = True
_PARALLEL_MIN = 1 << 20
_HASHER: ThreadPoolExecutor | None = None
_BLAS: ThreadpoolController | None = None


def _one_blas_thread():
    """Context: one BLAS thread. The blocks are cache-sized; OpenBLAS's extra threads only queue behind busy
    cores (40x slower at load 16 on 2 cores). The controller is built once: building it scans the process maps."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def _hash_async(slots: Sequence[Slot], views: Sequence[np.ndarray], scheme: str, parallel: bool = False) -> Future:
    """The update's digest on a worker thread (hashlib and BLAKE3 release the GIL), overlapping the checks."""
    global _HASHER
    if _HASHER is None:
        _HASHER = ThreadPoolExecutor(1, thread_name_prefix="atoll-update-digest")
    return _HASHER.submit(_digest, slots, views, scheme, parallel and scheme == "blake3")


class _Pass:
    """One update's numeric pass: squared distance to the global (finite iff the update is) and the sum."""

    def __init__(self, plan: RoundPlan, total: WeightedSum | None, weight: float, *, distance: bool) -> None:
        self.plan, self.weight = plan, float(weight)
        self.distance = distance    # False (no norm bound): ||u||^2 alone tells finiteness, no subtraction
        self.total = total if total is not None and weight != 0 else None
        self.norm2 = 0.0
        self.pack = np.empty(min(BLOCK, max(plan.g32.size, 1)), np.float32)
        self.diff = np.empty_like(self.pack)
        self.start = 0              # flat offset of the pack's first element
        self.fill = 0
        self.members: list[tuple[Slot, np.ndarray]] = []

    def block(self, u: np.ndarray, start: int, members: Sequence[tuple[Slot, np.ndarray]]) -> str | None:
        """Check and sum ``u`` = flat float32 range ``[start, start + len(u))``."""
        g = self.plan.g32[start:start + u.size]
        if self.distance:
            d = self.diff[:u.size]
            np.subtract(u, g, out=d)
        else:
            d = u
        s = float(blas.sdot(d, d))
        if not math.isfinite(s):  # NaN/inf in the block, or only the float32 square overflowed: look exactly
            problem = _non_finite([m for m, _ in members], [v for _, v in members])
            if problem:
                return problem
            s = _sq64(u, g) if self.distance else 0.0
        if self.distance:
            self.norm2 += s
        if self.total is not None:
            self.total.add32(u, start, self.weight)
        return None

    def flush(self) -> str | None:
        if not self.fill:
            return None
        problem = self.block(self.pack[:self.fill], self.start, self.members)
        self.fill, self.members = 0, []
        return problem

    def tensor(self, s: Slot, v: np.ndarray) -> str | None:
        if s.offset < 0:  # float64/float16/integer tensors: rare and small, done whole
            if _is_float(s.dtype):
                if not np.isfinite(v).all():
                    return f"tensor {s.name!r} has non-finite values (NaN or infinity)"
                if self.distance:
                    self.norm2 += _sq64(v, s.glob)
            if self.total is not None:
                self.total.dirty = True
                self.total.other[s.name] += self.weight * v
            return None
        if s.count < _SMALL:
            if self.fill + s.count > self.pack.size or (self.fill and self.start + self.fill != s.offset):
                if problem := self.flush():
                    return problem
            if not self.fill:
                self.start = s.offset
            self.pack[self.fill:self.fill + s.count] = v
            self.fill += s.count
            self.members.append((s, v))
            return None
        # a large tensor does not flush the pack: the small ones lie together in ``g32`` (RoundPlan)
        for lo in range(0, s.count, BLOCK):
            b = v[lo:lo + BLOCK]
            if problem := self.block(b, s.offset + lo, [(s, b)]):
                return problem
        return None


def inspect_update(update: ArrayRecord, plan: RoundPlan, *, max_norm: float | None, scheme: str | None = None,
                   total: WeightedSum | None = None, weight: float = 0.0) -> Inspection:
    """Check ``update`` against the round's global weights in one pass; hash it and add it to ``total``.

    Parameters
    ----------
    update : ArrayRecord
        The site's returned weights (the full model).
    plan : RoundPlan
        The round's global weights (``RoundPlan(global_arrays)``, built once per round).
    max_norm : float or None
        Bound on ||update - global||_2 over the floating-point tensors (float64 near the bound); None = none.
    scheme : str or None
        Digest construction to compute (``models.HASH_SCHEMES``), on a worker thread while the checks run;
        None = no digest.
    total, weight : WeightedSum or None, float
        Where to add ``weight * update``. On a rejection the caller must call ``total.discard()``; on
        acceptance ``total.commit(result.views, weight)``.

    Returns
    -------
    Inspection
        ``problem`` is a one-line reason naming tensors by their parameter names only (no values), or None.
    """
    if not isinstance(update, ArrayRecord):
        return Inspection(f"update is a {type(update).__name__}, not an ArrayRecord")
    if problem := _check_layout(update, plan):
        return Inspection(problem)
    decoded = {}
    for name in plan.order:
        s = plan.by_name[name]
        v = _view(update[name], name, s.dtype, s.shape, s.header)
        if isinstance(v, str):
            return Inspection(v)
        decoded[name] = v
    views = [decoded[s.name] for s in plan.slots]
    digest = _hash_async(plan.slots, views, scheme, plan.parallel_digest) if scheme else None
    p = _Pass(plan, total, weight, distance=max_norm is not None)
    with _one_blas_thread():
        problem = next((pr for s, v in zip(plan.slots, views) if (pr := p.tensor(s, v))), None) or p.flush()
    if problem:  # the blocks are not visited in slot order (packs): name the first bad tensor in slot order
        return Inspection(_non_finite(plan.slots, views) or problem)
    norm = math.sqrt(p.norm2) if max_norm is not None else None
    if max_norm is not None:
        if abs(norm - max_norm) <= _EXACT_NEAR_BOUND * max_norm:  # float32 partial sums: decide exactly
            norm = math.sqrt(sum(_sq64(v, s.glob) for s, v in zip(plan.slots, views) if _is_float(s.dtype)))
        if not math.isfinite(norm):
            return Inspection("update norm overflows")
        if norm > max_norm:
            return Inspection(f"update norm ||update - global|| = {norm:.4g} exceeds the bound {max_norm:.4g}")
    return Inspection(None, digest.result() if digest is not None else None, norm, views)
