"""Site approval of runs: a hospital trains only for runs its operator approved.

A *run manifest* pins everything that decides what a run does with the site's data and
what leaves the site: the app code (hash of the Flower App Bundle content), the model, the
training and DP parameters, the number of rounds, and the declared outputs (tensor names,
shapes, dtypes; metric names). Its SHA-256 over a canonical JSON form is what the site
operator approves (``atoll site approve``) and what the ClientApp checks each round
(:meth:`ApprovalStore.check_approved`).

The ClientApp must build the manifest it checks from facts it observes itself — the app
hash of its own installed bundle (:func:`app_bundle_hash`), ``context.run_config`` and the
round's config record, the tensor specs of the model it builds — never from a manifest
the server sends, so a server cannot talk a site into a run it did not approve.

Approvals live in ``<state_dir>/approvals.jsonl``: append-only, one JSON object per line
(who, when, what), each line carrying the SHA-256 of the previous line so that edits to
history are detected (the check then fails closed).
"""

from __future__ import annotations

import datetime as _dt
import getpass
import hashlib
import io
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from contract import Mechanism, MechanismError, TaskError, TaskSpec
from contract.recipe import check_decay, check_multiplicity

MANIFEST_VERSION = 2  # 2: the task and the DP mechanism as their own sections
APPROVALS_FILE = "approvals.jsonl"
# FAB members that make up the app: code and configuration the code may read. Documentation
# (*.md) is left out so a README edit does not force every site to re-approve.
APP_HASH_SUFFIXES = (".py", ".toml", ".json", ".jsonl", ".yaml", ".yml")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A run manifest is malformed: the message names the field and what is expected."""


class RunNotApproved(Exception):
    """The run is not approved at this site. ``message`` is safe to send to the server (no paths, no ids)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ApprovalStoreError(Exception):
    """The local approval log cannot be read or is damaged (local message; may contain paths)."""


# ----------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class TensorSpec:
    """One tensor the site sends back: name, shape, NumPy dtype name (as ``flwr.app.Array.dtype``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class TrainingParams:
    """The local optimiser's settings that are not part of the DP mechanism (they change utility, not privacy).

    The mechanism itself (σ, C, q, steps, accountant) is the manifest's :class:`~contract.mechanism.Mechanism`.
    """

    batch_size: int
    lr: float
    proximal_mu: float = 0.0  # fedprox: weight of the proximal term pulling the site's model to the global one
    augment_multiplicity: int = 1  # K augmented views per sampled image, averaged before clipping (1 = off)
    ema_decay: float = 0.0    # the site releases the EMA of its DP iterates within a round (0 = off)

    def __post_init__(self) -> None:
        if not _is_num(self.lr) or self.lr <= 0:
            raise ManifestError(f"training.lr must be a finite positive number, got {self.lr!r}")
        object.__setattr__(self, "lr", float(self.lr))  # 1 and 1.0 must hash the same
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ManifestError(f"training.batch_size must be a positive integer, got {self.batch_size!r}")
        if not _is_num(self.proximal_mu) or self.proximal_mu < 0:
            raise ManifestError(f"training.proximal_mu must be a finite number >= 0, got {self.proximal_mu!r}")
        object.__setattr__(self, "proximal_mu", float(self.proximal_mu))
        try:
            check_multiplicity(self.augment_multiplicity, "training.augment_multiplicity")
            object.__setattr__(self, "ema_decay", check_decay(self.ema_decay, "training.ema_decay"))
        except ValueError as exc:
            raise ManifestError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"batch_size": self.batch_size, "lr": self.lr, "proximal_mu": self.proximal_mu}
        # The recipe options appear only when set, so the manifests (and hashes) sites approved before they
        # existed stay what they were.
        if self.augment_multiplicity != 1:
            out["augment_multiplicity"] = self.augment_multiplicity
        if self.ema_decay:
            out["ema_decay"] = self.ema_decay
        return out


TRAINING_FIELDS = ("batch_size", "lr", "proximal_mu", "augment_multiplicity", "ema_decay")


@dataclass(frozen=True)
class AggregationParams:
    """How the server combines the sites' updates: part of what a site approves (a robust rule protects it from
    other sites' poisoned updates only if it tolerates at least one)."""

    strategy: str = "fedavg"
    num_malicious: int = 0
    # contract.server_options.ServerOptions.non_default(): server momentum / FedAdam / EMA / threshold rule, by
    # config key; pinned only when set, so a manifest without them hashes as before
    server_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, str) or not re.match(r"^[a-z]{2,32}$", self.strategy):
            raise ManifestError(f"aggregation.strategy must be a strategy name, got {self.strategy!r}")
        if not _is_int(self.num_malicious) or self.num_malicious < 0:
            raise ManifestError(f"aggregation.num_malicious must be an integer >= 0, got {self.num_malicious!r}")
        from contract.server_options import ServerOptions

        if not isinstance(self.server_options, Mapping):
            raise ManifestError("aggregation.server_options must be an object of server option keys")
        try:
            opts = ServerOptions.from_config(dict(self.server_options), where="aggregation.server_options")
        except (TypeError, ValueError) as exc:
            raise ManifestError(str(exc)) from None
        unknown = set(self.server_options) - set(ServerOptions().to_config())
        if unknown:
            raise ManifestError(f"aggregation.server_options: unknown key(s) {', '.join(sorted(unknown))}")
        object.__setattr__(self, "server_options", opts.non_default())

    def __hash__(self) -> int:
        return hash((self.strategy, self.num_malicious, tuple(sorted(self.server_options.items()))))

    def to_dict(self) -> dict[str, Any]:
        out = {"strategy": self.strategy, "num_malicious": self.num_malicious}
        if self.server_options:
            out["server_options"] = dict(sorted(self.server_options.items()))
        return out


@dataclass(frozen=True)
class RunManifest:
    """What a site approves. Construct through :meth:`from_dict` or directly (values are validated).

    It pins the task (what is learnt from the site's data), the DP mechanism (what it costs), the code, the
    model's tensors and the metrics (what leaves the site), each as the one type both sides share.
    """

    app_hash: str
    model: str
    task: TaskSpec
    mechanism: Mechanism
    training: TrainingParams
    num_rounds: int
    outputs: tuple[TensorSpec, ...]
    metrics: tuple[str, ...]
    secure_aggregation: bool = False  # updates leave masked (SecAgg+): the server only ever sees their sum
    aggregation: AggregationParams = field(default_factory=AggregationParams)
    version: int = field(default=MANIFEST_VERSION)

    def __post_init__(self) -> None:
        # Normalise (sorted, deduplicated) so that equal runs hash equally, then validate.
        object.__setattr__(self, "outputs", tuple(sorted(self.outputs, key=lambda t: t.name)))
        object.__setattr__(self, "metrics", tuple(sorted(set(self.metrics))))
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "atoll_run_manifest": self.version,
            "app_hash": self.app_hash,
            "model": self.model,
            "task": self.task.to_manifest(),
            "mechanism": self.mechanism.to_dict(),
            "training": self.training.to_dict(),
            "num_rounds": self.num_rounds,
            "outputs": [t.to_dict() for t in self.outputs],
            "metrics": list(self.metrics),
            "secure_aggregation": self.secure_aggregation,
            "aggregation": self.aggregation.to_dict(),
        }

    def canonical_json(self) -> bytes:
        """Sorted keys, no whitespace, UTF-8; floats in Python's shortest round-trip form."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "run manifest") -> "RunManifest":
        """Parse and validate; :class:`ManifestError` names ``where`` and the offending field."""
        if not isinstance(data, Mapping):
            raise ManifestError(f"{where}: expected a JSON object")
        expected = {"atoll_run_manifest", "app_hash", "model", "task", "mechanism", "training", "num_rounds",
                    "outputs", "metrics"}
        unknown, missing = set(data) - expected - {"secure_aggregation", "aggregation"}, expected - set(data)
        if unknown:
            raise ManifestError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        if missing:
            raise ManifestError(f"{where}: missing field(s) {', '.join(sorted(missing))}")
        if data["atoll_run_manifest"] != MANIFEST_VERSION:
            raise ManifestError(f"{where}: atoll_run_manifest must be {MANIFEST_VERSION}, got {data['atoll_run_manifest']!r}")
        tr = data["training"]
        if not isinstance(tr, Mapping) or not {"batch_size", "lr"} <= set(tr) <= set(TRAINING_FIELDS):
            raise ManifestError(f"{where}: training must be an object with the fields {', '.join(TRAINING_FIELDS)}")
        agg = data.get("aggregation", {})
        if not isinstance(agg, Mapping) or not set(agg) <= {"strategy", "num_malicious", "server_options"}:
            raise ManifestError(f"{where}: aggregation must be an object with the fields strategy, num_malicious "
                                "(and optionally server_options)")
        try:
            task = TaskSpec.from_manifest(data["task"], where=f"{where}: task")
            mechanism = Mechanism.from_dict(data["mechanism"], where=f"{where}: mechanism")
        except (TaskError, MechanismError, ValueError) as err:
            raise ManifestError(str(err)) from None
        outs = data["outputs"]
        if not isinstance(outs, list):
            raise ManifestError(f"{where}: outputs must be a list")
        specs = []
        for i, o in enumerate(outs):
            if not isinstance(o, Mapping) or set(o) != {"name", "shape", "dtype"}:
                raise ManifestError(f"{where}: outputs[{i}] must be an object with name, shape, dtype")
            if not isinstance(o["shape"], list):
                raise ManifestError(f"{where}: outputs[{i}].shape must be a list of integers")
            specs.append(TensorSpec(o["name"], tuple(o["shape"]), o["dtype"]))
        if not isinstance(data["metrics"], list):
            raise ManifestError(f"{where}: metrics must be a list of names")
        try:
            return cls(
                app_hash=data["app_hash"],
                model=data["model"],
                task=task,
                mechanism=mechanism,
                training=TrainingParams(batch_size=tr["batch_size"], lr=tr["lr"],
                                        proximal_mu=tr.get("proximal_mu", 0.0),
                                        augment_multiplicity=tr.get("augment_multiplicity", 1),
                                        ema_decay=tr.get("ema_decay", 0.0)),
                aggregation=AggregationParams(**agg),
                num_rounds=data["num_rounds"],
                outputs=tuple(specs),
                metrics=tuple(data["metrics"]),
                secure_aggregation=data.get("secure_aggregation", False),
            )
        except ManifestError as err:
            raise ManifestError(f"{where}: {err}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _validate(m: RunManifest) -> None:
    if not isinstance(m.app_hash, str) or not _HEX64.match(m.app_hash):
        raise ManifestError("app_hash must be 64 lowercase hex characters (SHA-256)")
    if not isinstance(m.model, str) or not m.model or len(m.model) > 100:
        raise ManifestError("model must be a non-empty model name")
    if not _is_int(m.num_rounds) or m.num_rounds < 1:
        raise ManifestError(f"num_rounds must be a positive integer, got {m.num_rounds!r}")
    if not isinstance(m.training, TrainingParams):
        raise ManifestError("training must be TrainingParams")
    if not isinstance(m.task, TaskSpec) or m.task.problems():
        raise ManifestError(f"task is not a valid task description: {m.task.problems() if isinstance(m.task, TaskSpec) else m.task!r}")
    if not isinstance(m.mechanism, Mechanism) or m.mechanism.problems():
        raise ManifestError(f"mechanism is not a valid DP mechanism: {m.mechanism!r}")
    if not m.outputs:
        raise ManifestError("outputs must declare at least one tensor")
    names = [o.name for o in m.outputs]
    if len(set(names)) != len(names):
        raise ManifestError("outputs: tensor names must be unique")
    for o in m.outputs:
        if not isinstance(o.name, str) or not o.name:
            raise ManifestError("outputs: every tensor needs a non-empty name")
        if not all(_is_int(d) and d >= 0 for d in o.shape):
            raise ManifestError(f"outputs: tensor {o.name!r} shape must be non-negative integers")
        if not isinstance(o.dtype, str) or not re.match(r"^[a-z]+[0-9]*$", o.dtype):
            raise ManifestError(f"outputs: tensor {o.name!r} dtype must be a NumPy dtype name such as float32")
    for name in m.metrics:
        if not isinstance(name, str) or not name:
            raise ManifestError("metrics must be non-empty names")
    if not isinstance(m.secure_aggregation, bool):
        raise ManifestError(f"secure_aggregation must be true or false, got {m.secure_aggregation!r}")


def manifest_hash(manifest: RunManifest) -> str:
    """SHA-256 (hex) of the manifest's canonical JSON: the identity a site approves."""
    return hashlib.sha256(manifest.canonical_json()).hexdigest()


def load_manifest(path: str | Path) -> RunManifest:
    """Read a ``run-manifest.json``; errors name the file."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{p} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{p} is not valid JSON ({err})") from None
    return RunManifest.from_dict(data, where=str(p))


def save_manifest(manifest: RunManifest, path: str | Path) -> Path:
    """Write a human-readable ``run-manifest.json`` (the hash is over the canonical form)."""
    p = Path(path).expanduser()
    p.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return p


def outputs_from_state_dict(state_dict: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
    """Tensor specs of a torch ``state_dict`` or any mapping of arrays (``.shape``/``.dtype``)."""
    specs = []
    for name, t in state_dict.items():
        dtype = str(t.dtype).removeprefix("torch.")
        specs.append(TensorSpec(str(name), tuple(int(d) for d in t.shape), dtype))
    return tuple(specs)


# ----------------------------------------------------------------------------- app hash
def _hash_members(members: Iterable[tuple[str, bytes]]) -> str:
    entries = sorted(
        (path, hashlib.sha256(data).hexdigest())
        for path, data in members
        if path.endswith(APP_HASH_SUFFIXES) and not path.startswith(".info/")
    )
    if not entries:
        raise ManifestError("the app bundle contains no code")
    return hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()


def app_bundle_hash_from_fab(fab: bytes) -> str:
    """App hash from FAB bytes: SHA-256 over sorted (path, SHA-256) of the code/config members."""
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        return _hash_members((n, z.read(n)) for n in z.namelist() if not n.endswith("/"))


def is_installed_bundle(root: str | Path) -> bool:
    """Whether ``root`` is a bundle Flower installed (``$FLWR_HOME/apps/<publisher>.<app>.<version>.<hash>``)."""
    from flwr.common.config import get_flwr_home

    apps = (get_flwr_home() / "apps").expanduser().resolve()
    return Path(root).expanduser().resolve().is_relative_to(apps)


def app_bundle_hash(root: str | Path) -> str:
    """App hash of the Flower app in ``root``: a project checkout or an installed FAB directory.

    The FAB is built in memory with Flower's own builder (same include/exclude rules,
    ``.gitignore``, rewritten ``pyproject.toml``), so the lead's checkout and the bundle a
    SuperNode installed under ``$FLWR_HOME/apps`` give the same hash, and caches
    (``__pycache__``) or test files never change it.
    """
    from flwr.cli.build import build_fab_from_disk  # Flower's FAB rules are the definition

    r = Path(root).expanduser().resolve()
    if not (r / "pyproject.toml").is_file():
        raise ManifestError(f"{r} is not a Flower app (no pyproject.toml)")
    if is_installed_bundle(r):
        # Flower unpacked every FAB member here (all but .info/): hash them as they are. Rebuilding a FAB from
        # this folder would apply `fab-exclude` again, to files the bundle never held, and Flower refuses
        # patterns that match nothing.
        return _hash_members((p.relative_to(r).as_posix(), p.read_bytes()) for p in sorted(r.rglob("*"))
                             if p.is_file() and "__pycache__" not in p.parts)
    try:
        fab = build_fab_from_disk(r)
    except ValueError as err:
        raise ManifestError(f"cannot bundle the Flower app in {r}: {err}") from None
    return app_bundle_hash_from_fab(fab)


# ----------------------------------------------------------------------------- approvals
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


class ApprovalStore:
    """Append-only approval log of one site (``<state_dir>/approvals.jsonl``)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.path = self.state_dir / APPROVALS_FILE

    # -- reading
    def records(self) -> list[dict[str, Any]]:
        """All records, oldest first; raises :class:`ApprovalStoreError` if the chain is broken."""
        if not self.path.exists():
            return []
        try:
            raw = self.path.read_bytes()
        except OSError as err:
            raise ApprovalStoreError(f"cannot read {self.path}: {err.strerror}") from None
        records, prev = [], None
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ApprovalStoreError(f"{self.path} line {n} is not JSON; the approval log is damaged") from None
            if rec.get("prev_sha256") != prev:
                raise ApprovalStoreError(
                    f"{self.path} line {n} does not follow line {n - 1} (hash chain broken); "
                    "the approval log was edited or truncated"
                )
            prev = hashlib.sha256(line).hexdigest()
            records.append(rec)
        return records

    def status(self) -> dict[str, dict[str, Any]]:
        """Latest record per manifest hash (``action`` is ``approve`` or ``revoke``)."""
        latest: dict[str, dict[str, Any]] = {}
        for rec in self.records():
            latest[rec["manifest_sha256"]] = rec
        return latest

    def is_approved(self, digest: str) -> bool:
        rec = self.status().get(digest)
        return rec is not None and rec["action"] == "approve"

    def approved_app_hashes(self) -> set[str]:
        """App hashes of the manifests approved and not revoked: the only bundles allowed to run here
        (``client.launcher`` checks them before any code of a bundle runs)."""
        return {str(rec["manifest"]["app_hash"]) for rec in self.status().values()
                if rec["action"] == "approve" and isinstance(rec.get("manifest"), dict)}

    # -- writing
    def _append(self, record: dict[str, Any]) -> dict[str, Any]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        records_raw = self.path.read_bytes().splitlines() if self.path.exists() else []
        self.records()  # refuse to extend a damaged log
        last = next((l for l in reversed(records_raw) if l.strip()), None)
        record["prev_sha256"] = hashlib.sha256(last).hexdigest() if last is not None else None
        line = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return record

    def approve(self, manifest: RunManifest, *, by: str | None = None) -> dict[str, Any]:
        """Record the operator's approval of ``manifest`` (who, when, the full manifest)."""
        return self._append({
            "action": "approve",
            "manifest_sha256": manifest_hash(manifest),
            "at": _now(),
            "by": by or getpass.getuser(),
            "manifest": manifest.to_dict(),
        })

    def revoke(self, digest: str, *, by: str | None = None, reason: str = "") -> dict[str, Any]:
        """Withdraw an approval; later rounds of that run are refused."""
        if not self.is_approved(digest):
            raise ApprovalStoreError(f"run manifest {digest} is not currently approved here")
        return self._append({
            "action": "revoke", "manifest_sha256": digest, "at": _now(),
            "by": by or getpass.getuser(), "reason": reason,
        })

    # -- the check the ClientApp makes
    def check_approved(self, manifest: RunManifest) -> None:
        """Return if ``manifest`` is approved; else raise :class:`RunNotApproved` with a reason.

        The reason is safe to send to the server: it names manifest hashes and manifest
        fields, never paths or people. A damaged approval log fails closed.
        """
        digest = manifest_hash(manifest)
        short = digest[:12]
        try:
            status = self.status()
        except ApprovalStoreError:
            raise RunNotApproved(
                f"run {short} refused: this site's approval log is damaged; the site operator must repair it"
            ) from None
        rec = status.get(digest)
        if rec is not None and rec["action"] == "approve":
            return
        if rec is not None:
            raise RunNotApproved(f"run {short} refused: its approval was revoked by this site")
        approved = [r["manifest"] for r in status.values() if r["action"] == "approve"]
        mine = manifest.to_dict()
        hint = ""
        same_app = [a for a in approved if a.get("app_hash") == manifest.app_hash]
        if approved and not same_app:
            hint = f"; the app code (app hash {manifest.app_hash[:12]}) was never approved here"
        elif same_app:
            closest = min((_diff(mine, a) for a in same_app), key=len)
            hint = f"; it differs from an approved run in: {', '.join(closest)}"
        raise RunNotApproved(
            f"run {short} refused: it is not approved at this site{hint}. "
            "The site operator must review it and run `atoll site approve`"
        )


def check_approved(manifest: RunManifest, state_dir: str | Path) -> None:
    """Module-level form of :meth:`ApprovalStore.check_approved`."""
    ApprovalStore(state_dir).check_approved(manifest)


# ----------------------------------------------------------------------------- CLI
def describe_manifest(manifest: RunManifest) -> str:
    """Human-readable account of what the run will do and what leaves the site."""
    t, mech, task = manifest.training, manifest.mechanism, manifest.task
    n_params = sum(math.prod(o.shape) for o in manifest.outputs)
    lines = [
        f"Run manifest {manifest_hash(manifest)}",
        f"  App code       sha256 {manifest.app_hash}",
        "                 (compare with the hash the consortium lead announced)",
        f"  Task           {task.describe()}"
        + (f", modalities {', '.join(task.modalities)}" if task.modalities else ""),
        f"  Model          {manifest.model}: {len(manifest.outputs)} tensors, {n_params:,} parameters",
        f"  Rounds         {manifest.num_rounds}",
        f"  Local training {mech.steps} steps per round, learning rate {t.lr:g}, batch size {t.batch_size}"
        + (f", FedProx proximal term mu={t.proximal_mu:g}" if t.proximal_mu else "")
        + (f", {t.augment_multiplicity} augmented views per image (averaged before clipping)"
           if t.augment_multiplicity != 1 else "")
        + (f", releases the moving average (decay {t.ema_decay:g}) of its DP iterates" if t.ema_decay else ""),
        f"  Aggregation    {manifest.aggregation.strategy}"
        + (f", tolerating {manifest.aggregation.num_malicious} malicious site(s)"
           if manifest.aggregation.num_malicious else "")
        + (", server post-processing " + ", ".join(f"{k}={v}" for k, v in manifest.aggregation.server_options.items())
           if manifest.aggregation.server_options else ""),
    ]
    if mech.dp:
        acct = f", accountant {mech.accountant}" if mech.accountant else ", accountant of this site's policy"
        lines.append(f"  Privacy        DP-SGD: noise multiplier {mech.noise_multiplier:g}, clip norm "
                     f"{mech.clip_norm:g}, sample rate {mech.sample_rate:g}{acct}")
        if mech.adaptive_clip:  # contract.mechanism: the same charge, the noise split with a released count
            lines.append(f"                 adaptive clipping from C {mech.clip_norm:g} (target unclipped quantile "
                         f"{mech.target_unclipped_quantile:g}, step {mech.clip_lr:g}); count noise "
                         f"{mech.count_noise:g}, gradient noise {mech.gradient_noise():.4g}")
    else:
        lines.append("  Privacy        DP OFF: model updates leave WITHOUT differential privacy")
    lines.append("  Leaves the site each round:")
    lines.append(("    model update (masked by SecAgg+: the server sees only the sum over sites): "
                  if manifest.secure_aggregation else "    model update (in the clear to the server): ")
                 + ", ".join(f"{o.name} {o.dtype}{list(o.shape)}" for o in manifest.outputs))
    lines.append("    metrics: " + (", ".join(manifest.metrics) if manifest.metrics else "(none)"))
    return "\n".join(lines)
