"""One synchronisation of a site's mirror with its PACS: list, diff, fetch what is new, verify, commit.

1. Ask the PACS which instances match the query (QIDO-RS / C-FIND). An empty answer is an error that keeps the
   mirror (see :class:`~client.pacs.errors.NothingMatched`).
2. Diff by SOP Instance UID against the last complete mirror and the staging folder: an instance already
   mirrored is *unchanged* (DICOM forbids changing an instance without a new UID), one staged by an interrupted
   pull is not fetched again.
3. Fetch the rest series by series; check each object (:func:`client.pacs.verify.check_instance`) as it arrives and
   stage it durably, or quarantine it.
4. Only when every listed instance is accounted for (mirrored, staged or quarantined) commit the new mirror: the
   new ones move in, those gone from the PACS leave. Any failure before that leaves the last complete mirror as it
   was, and the next pull resumes from the staging folder.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

from client.pacs.errors import (
    EXIT_OK,
    EXIT_QUARANTINED,
    NothingMatched,
    PullError,
    SourceUnreachable,
    TransferIncomplete,
)
from client.pacs.mirror import Manifest, Mirror, now_utc
from client.pacs.source import PacsSource, SourceQuery
from client.pacs.transport import Received, RemoteInstance, Transport, open_transport
from client.pacs.verify import INVALID_UID, check_instance, valid_uid

if TYPE_CHECKING:  # pragma: no cover
    from client.site_config import SiteConfig

log = logging.getLogger("atoll.pacs")


class Progress(Protocol):
    """What a pull reports while it runs (the CLI draws it; tests may count or interrupt)."""

    def listed(self, total: int, to_fetch: int) -> None: ...

    def advance(self) -> None: ...


class _Stopped(Exception):
    """Another series' fetch failed: this one stops before its next instance (that failure is what is raised)."""


class _NoProgress:
    def listed(self, total: int, to_fetch: int) -> None:
        pass

    def advance(self) -> None:
        pass


@dataclass
class PullResult:
    """What one successful pull did (counts only; safe to print and to log on site)."""

    source: str
    listed: int = 0
    added: int = 0
    unchanged: int = 0
    quarantined: int = 0
    removed: int = 0
    resumed: int = 0  # of ``added``: staged by an earlier, interrupted pull and not fetched again
    seconds: float = 0.0
    reasons: Counter = field(default_factory=Counter)

    @property
    def exit_code(self) -> int:
        return EXIT_QUARANTINED if self.quarantined else EXIT_OK

    @property
    def mirrored(self) -> int:
        return self.listed - self.quarantined

    def summary(self) -> str:
        text = (f"{self.source}: {self.added} added, {self.unchanged} unchanged, {self.quarantined} quarantined, "
                f"{self.removed} removed; the mirror holds {self.mirrored} instance(s) ({self.seconds:.1f} s)")
        if self.resumed:
            text += f"; {self.resumed} of the added were kept from an interrupted pull"
        return text


def describe_query(q: SourceQuery) -> str:
    parts = [f"modality {', '.join(q.modalities)}" if q.modalities else "any modality"]
    if q.study_date:
        parts.append(f"study date {q.study_date}")
    if q.study_description:
        parts.append(f"study description {q.study_description!r}")
    if q.series_description:
        parts.append(f"series description {q.series_description!r}")
    return "; ".join(parts)


def pull(cfg: "SiteConfig", *, progress: Progress | None = None,
         transport: Callable[[PacsSource], Transport] = open_transport) -> PullResult:
    """Synchronise the site's mirror with its PACS (``atoll site pull``).

    Raises
    ------
    PullError: one subclass per failure (see :mod:`client.pacs.errors`); the last complete mirror is untouched.
    """
    if cfg.source is None:
        raise ValueError("this site reads a folder ([data].dicom_dir); only a site with [data.source] pulls")
    mirror = Mirror(cfg.state_dir)
    name = cfg.source.describe()
    with mirror.locked(name):
        try:
            result = _Pull(cfg.source, mirror, progress or _NoProgress(), transport).run()
        except PullError as e:
            mirror.record_attempt(e.exit_code, str(e))
            raise
        except KeyboardInterrupt:
            mirror.record_attempt(130, f"{name}: interrupted; the next pull resumes")
            raise
        mirror.record_attempt(result.exit_code, result.summary())
    return result


class _Pull:
    def __init__(self, source: PacsSource, mirror: Mirror, progress: Progress,
                 transport: Callable[[PacsSource], Transport]) -> None:
        self.source, self.mirror, self.progress, self.transport = source, mirror, progress, transport
        self.name = source.describe()
        self.ok: set[str] = set()
        self.quarantined: dict[str, tuple[str, str]] = {}
        self._kept = 0
        self._invalid = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()

    def run(self) -> PullResult:
        t0 = time.perf_counter()
        m = self.mirror
        m.ensure()
        m.recover()  # a commit an interruption left half-applied (local only)
        previous = m.manifest()
        before = set(previous.instances) if previous else set()
        with self.transport(self.source) as t:
            listed = t.list_instances()
            if not listed:
                raise NothingMatched(self.name, f"the query matched no instance ({describe_query(self.source.query)})",
                                     "check the query keys in [data.source] (modality, study_date, descriptions) "
                                     "or the PACS; the mirror was left unchanged")
            remote = self._remote(listed)
            have = before & m.files(m.mirror)
            staged = self._recheck(m.files(m.incoming) & set(remote), remote)
            todo = sorted(set(remote) - have - staged)
            self.progress.listed(len(remote), len(todo))
            m.clear_quarantine()
            series: dict[tuple[str, str], list[str]] = defaultdict(list)
            for sop in todo:
                series[(remote[sop].study, remote[sop].series)].append(sop)
            self._fetch_all(t, sorted(series.items()), total=len(todo))
        instances = {sop: (r.study, r.series) for sop, r in remote.items() if sop not in self.quarantined}
        assert set(instances) <= have | staged | self.ok, "commit only what is on disk"
        m.commit(Manifest(source=self.name, completed_at=now_utc(), instances=instances, quarantined=self.quarantined))
        return PullResult(source=self.name, listed=len(remote) + self._invalid, added=len(self.ok) + len(staged),
                          unchanged=len(have & set(instances)), quarantined=len(self.quarantined),
                          removed=len(before - set(instances)), resumed=len(staged),
                          seconds=time.perf_counter() - t0,
                          reasons=Counter(r for r, _ in self.quarantined.values()))

    def _recheck(self, staged: set[str], remote: dict[str, RemoteInstance]) -> set[str]:
        """What an interrupted pull staged is checked again (it was not fsynced); a bad file is fetched again."""
        good = set()
        for sop in staged:
            path = self.mirror.incoming / f"{sop}.dcm"
            try:
                ok = check_instance(path.read_bytes(), {sop: (remote[sop].study, remote[sop].series)}, sop).problem is None
            except OSError:
                ok = False
            if ok:
                good.add(sop)
            else:
                path.unlink(missing_ok=True)
        return good

    def _remote(self, listed: list[RemoteInstance]) -> dict[str, RemoteInstance]:
        """SOP UID -> listing; a UID that is not a DICOM UID is quarantined (it cannot name a file)."""
        remote: dict[str, RemoteInstance] = {}
        self._invalid = 0
        for r in listed:
            if valid_uid(r.sop) and valid_uid(r.study) and valid_uid(r.series):
                remote[r.sop] = r
            else:
                self._invalid += 1
                self.quarantined[f"invalid-uid-{self._invalid}"] = (INVALID_UID, "the PACS listed an instance whose "
                                                                                 "UIDs are not DICOM UIDs")
        return remote

    def _fetch_all(self, t: Transport, batches: list[tuple[tuple[str, str], list[str]]], *, total: int) -> None:
        """Fetch every series; several at once when the transport allows (DICOMweb), else one by one (DIMSE:
        one association). The first failure stops the others before their next instance and is raised."""
        workers = int(getattr(t, "workers", 1))
        if workers <= 1:
            for (study, ser), sops in batches:
                self._fetch_series(t, study, ser, sops, total=total)
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="atoll-pull") as pool:
            futures = [pool.submit(self._fetch_series, t, study, ser, sops, total=total)
                       for (study, ser), sops in batches]
            try:
                for f in as_completed(futures):
                    f.result()
            except BaseException:
                self._stop.set()
                for f in futures:
                    f.cancel()
                raise

    def _fetch_series(self, t: Transport, study: str, series: str, sops: list[str], *, total: int) -> None:
        wanted = {sop: (study, series) for sop in sops}
        strays: list[tuple[str, str]] = []

        def deliver(rx: Received) -> None:
            with self._lock:
                _deliver(rx)

        def _deliver(rx: Received) -> None:
            if self._stop.is_set():
                raise _Stopped()
            if rx.data is None:
                sop, problem = rx.asked, rx.error
            else:
                checked = check_instance(rx.data, wanted, rx.asked)
                sop, problem = checked.sop, checked.problem
            if problem is None:
                assert sop is not None
                if sop not in self.ok:
                    self.mirror.stage(sop, rx.data)  # type: ignore[arg-type]
                    self.ok.add(sop)
                    self.progress.advance()
                return
            self._kept += 1
            self.mirror.keep_quarantined(self._kept, sop if sop and valid_uid(sop) else None, rx.data)
            key = rx.asked if rx.asked is not None else sop
            if key in wanted and key not in self.ok:
                if key not in self.quarantined:
                    self.quarantined[key] = problem  # type: ignore[assignment]
                    self.progress.advance()
            else:
                strays.append(problem)  # type: ignore[arg-type]

        if self._stop.is_set():
            raise _Stopped()
        try:
            t.fetch(study, series, sops, deliver)
        except SourceUnreachable as e:
            raise TransferIncomplete(self.name, f"the connection was lost during the transfer, after "
                                                f"{len(self.ok)} of {total} new instance(s) ({e.problem})",
                                     "run `atoll site pull` again once the PACS is back: it resumes where this one "
                                     "stopped; until then the site trains on its last complete mirror") from None
        with self._lock:
            self._account(sops, strays, total)

    def _account(self, sops: list[str], strays: list[tuple[str, str]], total: int) -> None:
        missing = [s for s in sops if s not in self.ok and s not in self.quarantined]
        for sop, (reason, detail) in zip(list(missing), strays):
            # C-MOVE/C-GET do not say which request an object answers: one that is not what was asked for,
            # arriving while an asked one does not, is taken as the PACS's answer to it.
            self.quarantined[sop] = (reason, f"{detail}; it arrived in place of a requested instance")
            missing.remove(sop)
            self.progress.advance()
        if missing:
            raise TransferIncomplete(self.name, f"{len(missing)} of {len(sops)} requested instance(s) of a series did "
                                                f"not arrive ({len(self.ok)} of {total} new instance(s) are kept)",
                                     "run `atoll site pull` again: it resumes; until then the site trains on its last "
                                     "complete mirror")
