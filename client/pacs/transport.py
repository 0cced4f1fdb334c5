"""What a pull needs from a PACS, whatever the protocol: list the matching instances, fetch some of them.

A transport maps its protocol's failures onto :mod:`client.pacs.errors` (so the pull never sees a
``requests`` or ``pynetdicom`` exception) and hands every retrieved object to a callback as it arrives, so what
came before a cut is kept for the next pull.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from client.pacs.source import DicomWebSource, DimseSource, PacsSource


@dataclass(frozen=True, order=True)
class RemoteInstance:
    """One instance the PACS listed for the site's query (UIDs stay on site)."""

    study: str
    series: str
    sop: str


@dataclass(frozen=True)
class Received:
    """One retrieved object. ``asked`` is the SOP Instance UID requested, when the protocol says (WADO-RS per
    instance); ``data`` the DICOM Part 10 bytes, or None with ``error`` = (reason, detail) when the object could
    not even be parsed by the transport's library."""

    asked: str | None
    data: bytes | None
    error: tuple[str, str] | None = None


Deliver = Callable[[Received], None]


class Transport(Protocol):
    """A connection to one PACS for the duration of a pull (a context manager)."""

    def __enter__(self) -> "Transport": ...

    def __exit__(self, *exc: object) -> None: ...

    def list_instances(self) -> list[RemoteInstance]:
        """Every instance matching the source's query, as evaluated by the PACS (QIDO-RS / C-FIND)."""
        ...

    def fetch(self, study: str, series: str, sops: list[str], deliver: Deliver) -> None:
        """Retrieve ``sops`` (all in one series) and call ``deliver`` for each object received."""
        ...


def open_transport(source: PacsSource) -> Transport:
    """The transport for ``source`` (imports its protocol library only now)."""
    if isinstance(source, DicomWebSource):
        from client.pacs.dicomweb import DicomWebTransport

        return DicomWebTransport(source)
    if isinstance(source, DimseSource):
        from client.pacs.dimse import DimseTransport

        return DimseTransport(source)
    raise TypeError(f"unknown source kind {type(source).__name__}")
