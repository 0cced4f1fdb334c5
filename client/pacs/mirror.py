"""The on-disk mirror of a PACS site, inside its state folder, and the check a round makes before using it.

Layout (``<state_dir>/pacs/``, folders 0700, files 0600)::

    mirror/<SOPInstanceUID>.dcm   the last COMPLETE pull: what ``[data].dicom_dir`` points at
    manifest.json                 what mirror/ holds (study/series of each instance) and what was quarantined
    incoming/<SOPInstanceUID>.dcm verified instances of a pull not yet committed (kept across an interruption,
                                  so the next pull fetches only the rest)
    quarantine/                   retrieved objects that failed the check, for the admin to inspect
    commit.json                   the commit journal (present only while a commit is being applied)
    last-pull.json                outcome of the latest pull attempt (time, exit code, message)
    pull.lock                     one pull at a time

Why a journal and not a folder swap: the ingest cache keys files by their path relative to ``dicom_dir`` and their
mtime, so the mirror must stay one folder whose unchanged files keep their names and mtimes across pulls (round 2
of a run after a pull then still decodes nothing twice). A commit moves the new files in (``os.replace`` within one
file system) and removes the gone ones; the journal, written first, lets an interrupted commit be finished later,
by the next pull or by the readiness check, without the PACS. Until a commit ends, readers see the previous
manifest and refuse nothing: ``mirror/`` only ever changes inside a commit.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from client.pacs.errors import EXIT_OK, EXIT_QUARANTINED, NoCompleteMirror, PullBusy

if TYPE_CHECKING:  # pragma: no cover
    from client.site_config import SiteConfig

log = logging.getLogger("atoll.pacs")

SCHEMA = "atoll.pacs-mirror/1"
SUFFIX = ".dcm"


def pacs_dir(state_dir: Path) -> Path:
    return state_dir / "pacs"


def mirror_dir(state_dir: Path) -> Path:
    """Where a PACS site's images are: its ``[data].dicom_dir``."""
    return pacs_dir(state_dir) / "mirror"


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` all or nothing (temporary file, fsync unless not ``durable``, rename), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


@dataclass
class Manifest:
    """What a complete mirror holds. ``instances``: SOP UID -> (study UID, series UID); ``quarantined``: SOP UID
    (or a placeholder when unreadable) -> (reason, detail). Stays on site (it holds UIDs)."""

    source: str
    completed_at: str
    instances: dict[str, tuple[str, str]] = field(default_factory=dict)
    quarantined: dict[str, tuple[str, str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "source": self.source, "completed_at": self.completed_at,
                "instances": {k: list(v) for k, v in sorted(self.instances.items())},
                "quarantined": {k: list(v) for k, v in sorted(self.quarantined.items())}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Manifest":
        if d.get("schema") != SCHEMA:
            raise ValueError(f"unknown mirror manifest schema {d.get('schema')!r}")
        return cls(source=str(d["source"]), completed_at=str(d["completed_at"]),
                   instances={k: (v[0], v[1]) for k, v in d["instances"].items()},
                   quarantined={k: (v[0], v[1]) for k, v in d.get("quarantined", {}).items()})


class Mirror:
    """The mirror folders of one site (see the module docstring for the layout)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = pacs_dir(state_dir)
        self.mirror = mirror_dir(state_dir)
        self.incoming = self.root / "incoming"
        self.quarantine = self.root / "quarantine"
        self.manifest_path = self.root / "manifest.json"
        self.journal_path = self.root / "commit.json"
        self.last_pull_path = self.root / "last-pull.json"
        self.lock_path = self.root / "pull.lock"

    def ensure(self) -> None:
        for d in (self.root, self.mirror, self.incoming, self.quarantine):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    @contextlib.contextmanager
    def locked(self, source: str) -> Iterator[None]:
        """Exclusive, non-blocking: a second pull (or a commit recovery during a pull) is refused, not queued."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise PullBusy(source, "another `atoll site pull` of this site is running",
                                   "wait for it to finish") from None
                raise
            yield
        finally:
            os.close(fd)

    # ---- reading ---------------------------------------------------------------------------------------------
    def manifest(self) -> Manifest | None:
        try:
            return Manifest.from_json(json.loads(self.manifest_path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None  # unreadable: treated as no complete mirror (the next pull rebuilds it)

    def files(self, folder: Path) -> set[str]:
        """SOP UIDs of the ``*.dcm`` files in ``folder``."""
        try:
            return {p.name[: -len(SUFFIX)] for p in os.scandir(folder) if p.name.endswith(SUFFIX) and p.is_file()}
        except FileNotFoundError:
            return set()

    # ---- writing ---------------------------------------------------------------------------------------------
    def stage(self, sop: str, data: bytes) -> None:
        """Keep one verified instance until the commit (survives an interruption).

        Not fsynced one by one (that would dominate a pull of small images): :meth:`commit` syncs the file system
        before its journal, and a pull re-checks what an earlier, interrupted pull staged before using it.
        """
        write_atomic(self.incoming / f"{sop}{SUFFIX}", data, durable=False)

    def keep_quarantined(self, index: int, sop: str | None, data: bytes | None) -> None:
        """Keep a rejected object for inspection (``quarantine/NNNNN[-<uid>].bin``); never read by training."""
        if data is not None:
            name = f"{index:05d}" + (f"-{sop}" if sop else "") + ".bin"
            write_atomic(self.quarantine / name, data)

    def clear_quarantine(self) -> None:
        for p in self.quarantine.glob("*.bin"):
            p.unlink(missing_ok=True)

    def commit(self, manifest: Manifest) -> None:
        """Make ``manifest`` the mirror: journal first, then move staged files in and remove the others."""
        os.sync()  # the staged files reach the disk before the journal that names them
        write_atomic(self.journal_path, json.dumps(manifest.to_json()).encode())
        self._apply(manifest)

    def recover(self) -> bool:
        """Finish a commit an interruption left half-applied; True if there was one."""
        if not self.journal_path.exists():
            return False
        self._apply(Manifest.from_json(json.loads(self.journal_path.read_text(encoding="utf-8"))))
        return True

    def _apply(self, manifest: Manifest) -> None:
        self.ensure()
        for sop in manifest.instances:
            dst = self.mirror / f"{sop}{SUFFIX}"
            if not dst.exists():
                os.replace(self.incoming / f"{sop}{SUFFIX}", dst)  # same file system: atomic, keeps the mtime
        keep = set(manifest.instances)
        for sop in self.files(self.mirror) - keep:
            (self.mirror / f"{sop}{SUFFIX}").unlink(missing_ok=True)
        for p in self.mirror.iterdir():  # anything else put there by hand is not part of the dataset
            if p.is_file() and not p.name.endswith(SUFFIX):
                p.unlink(missing_ok=True)
        _fsync_dir(self.mirror)
        for p in self.incoming.iterdir():  # committed ones were moved; the rest is no longer listed by the PACS
            if p.is_file():
                p.unlink(missing_ok=True)
        write_atomic(self.manifest_path, json.dumps(manifest.to_json(), indent=1).encode())
        self.journal_path.unlink(missing_ok=True)
        _fsync_dir(self.root)

    def record_attempt(self, exit_code: int, message: str) -> None:
        """Outcome of this pull attempt (on site; the readiness check logs it when the last one failed)."""
        with contextlib.suppress(OSError):
            write_atomic(self.last_pull_path, json.dumps({"at": now_utc(), "exit_code": exit_code,
                                                          "message": message}).encode())

    def last_attempt(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.last_pull_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None


def require_complete_mirror(cfg: "SiteConfig") -> Manifest:
    """The check a PACS site makes before it indexes its data (``site check``, every round): the local mirror
    must be complete. Never talks to the PACS.

    Finishes a commit an interruption left half-done (local only). A site whose last pull failed still has its
    previous complete mirror and trains on it; the caller may log :meth:`Mirror.last_attempt`.

    Raises
    ------
    NoCompleteMirror: never pulled successfully, or the mirror folder no longer matches its manifest.
    """
    assert cfg.source is not None, "only for a site with [data.source]"
    m = Mirror(cfg.state_dir)
    where = f"{cfg.path or 'site config'}: [data.source] {cfg.source.describe()}"
    pull = f"atoll site pull --config {cfg.path}" if cfg.path else "atoll site pull --config site.toml"
    if m.journal_path.exists():
        try:
            with m.locked(cfg.source.describe()):
                m.recover()
        except PullBusy:
            raise NoCompleteMirror(f"{where}: a pull is committing the mirror right now; retry in a moment") from None
    manifest = m.manifest()
    if manifest is None:
        raise NoCompleteMirror(f"{where}: no complete mirror in {m.mirror} (never pulled, or no pull has succeeded "
                               f"yet); run: {pull}")
    on_disk = m.files(m.mirror)
    if on_disk != set(manifest.instances):
        missing, extra = len(set(manifest.instances) - on_disk), len(on_disk - set(manifest.instances))
        raise NoCompleteMirror(f"{where}: the mirror in {m.mirror} does not match its manifest ({missing} file(s) "
                               f"missing, {extra} unexpected); run: {pull} (it repairs the mirror)")
    last = m.last_attempt()
    if last and last.get("exit_code") not in (EXIT_OK, EXIT_QUARANTINED):
        # No source name or address here: the site log may be read by more people than the site config.
        log.warning("the last PACS pull of this site failed (exit %s at %s); using the mirror completed at %s",
                    last.get("exit_code"), last.get("at"), manifest.completed_at)
    return manifest
