"""Progress of long site steps (indexing, decoding, caching) on the operator's terminal, through ``rich``.

Shown on stderr only when it is a terminal, so logs, pipes and CI stay clean, and never with ``--quiet``. The
bar's text holds counts and step names only: no file names, UIDs or pseudonyms.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # pragma: no cover - typing only
    from rich.console import Console
    from rich.progress import Progress


@contextlib.contextmanager
def ingest_progress(enabled: bool | None = None, *, console: "Console | None" = None) -> Iterator["Progress | None"]:
    """A ``rich`` progress display for :func:`client.ingest.build_site_dataset`, or ``None`` when quiet.

    Parameters
    ----------
    enabled: ``True`` show, ``False`` never (``--quiet``), ``None`` only when stderr is a terminal.
    console: where to draw (default: a stderr console); tests pass a console on a string buffer.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console or Console(stderr=True)) as bar:
        yield bar
