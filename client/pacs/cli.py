"""``atoll site pull``: bring the site's mirror of its PACS up to date (nothing is written to the PACS).

    atoll site pull --config site.toml

Fetches only what is new, checks every instance, and commits the mirror only when complete; an interrupted pull
resumes. Exit codes: 0 up to date; 8 up to date but some retrieved objects were quarantined; 2 config or local
setup; 3 PACS unreachable; 4 credentials refused; 5 association/AE refused; 6 the query matched nothing;
7 transfer incomplete (run again to resume); 9 unexpected PACS answer; 10 another pull is running.
Whatever fails, the site keeps training on its last complete mirror.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(site_sub: Any) -> None:
    """Register ``pull`` under ``atoll site`` (``site_sub``: the site group's sub-parsers)."""
    p = site_sub.add_parser("pull", help="update the site's local mirror of its PACS ([data.source])",
                            description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="site TOML file with a [data.source] table")
    p.add_argument("--quiet", action="store_true", help="no progress, only the final line")
    p.set_defaults(func=run_pull)


class _Lines:
    """Plain progress lines (when stderr is not a terminal, e.g. a cron job's log)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.done, self.total, self._next = quiet, 0, 0, 0

    def listed(self, total: int, to_fetch: int) -> None:
        self.total = to_fetch
        self._next = max(1, to_fetch // 10)
        if not self.quiet:
            print(f"the PACS lists {total} matching instance(s); {to_fetch} to fetch", file=sys.stderr)

    def advance(self) -> None:
        self.done += 1
        if not self.quiet and (self.done >= self._next or self.done == self.total):
            print(f"  fetched {self.done}/{self.total}", file=sys.stderr)
            self._next = self.done + max(1, self.total // 10)

    def close(self) -> None:
        pass


class _Bar(_Lines):
    """A rich progress bar on a terminal."""

    def __init__(self) -> None:
        super().__init__(quiet=False)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(TextColumn("pulling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           console=Console(stderr=True), transient=True)
        self._task: Any = None

    def listed(self, total: int, to_fetch: int) -> None:
        print(f"the PACS lists {total} matching instance(s); {to_fetch} to fetch", file=sys.stderr)
        self._p.start()
        self._task = self._p.add_task("pull", total=to_fetch)

    def advance(self) -> None:
        self.done += 1
        if self._task is not None:
            self._p.advance(self._task)

    def close(self) -> None:
        self._p.stop()


def run_pull(args: argparse.Namespace) -> int:
    """Handler of ``atoll site pull``: one-line messages, no traceback, the exit codes above."""
    from client.pacs.errors import EXIT_CONFIG, PullError
    from client.site_config import ConfigError, load_site_config

    try:
        cfg = load_site_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if cfg.source is None:
        print(f"error: {cfg.path}: [data].dicom_dir is a folder; `atoll site pull` needs a [data.source] table "
              "naming the PACS (see docs/site-data.md)", file=sys.stderr)
        return EXIT_CONFIG
    from client.pacs.pull import pull

    progress: _Lines = _Bar() if sys.stderr.isatty() and not args.quiet else _Lines(args.quiet)
    try:
        result = pull(cfg, progress=progress)
    except PullError as e:
        progress.close()
        print(f"error: {e}", file=sys.stderr)
        print(_mirror_status(cfg), file=sys.stderr)
        return e.exit_code
    except ConfigError as e:  # a credential file changed since the config was loaded
        progress.close()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        progress.close()
        print(f"interrupted: {progress.done} instance(s) fetched so far are kept; run the pull again to resume",
              file=sys.stderr)
        print(_mirror_status(cfg), file=sys.stderr)
        return 130
    progress.close()
    print(result.summary())
    if result.quarantined:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(result.reasons.items()))
        print(f"quarantined ({reasons}); they are not in the mirror. Reasons per instance: "
              f"{cfg.state_dir / 'pacs' / 'manifest.json'}; the objects: {cfg.state_dir / 'pacs' / 'quarantine'}")
    return result.exit_code


def _mirror_status(cfg: Any) -> str:
    from client.pacs.mirror import Mirror

    manifest = Mirror(cfg.state_dir).manifest()
    if manifest is None:
        return ("the site has no complete mirror yet: it refuses training rounds (NO_COMPLETE_MIRROR) until a pull "
                "succeeds")
    return (f"the mirror was left as it was: the site trains on its last complete pull ({len(manifest.instances)} "
            f"instance(s), {manifest.completed_at})")
