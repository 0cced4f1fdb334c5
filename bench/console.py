"""How long the lead's console page takes to load for a run of 20 rounds x 3 sites.

The run folder is written the way the ServerApp writes it (server/outputs.RunOutputs, server/sitebook.RoundBook)
with real signed ledger records from each site's budget guard (tests/console_helpers.RunWriter); the console is
the real ``atoll console --runs DIR`` process. Measured:

* ``server_page_ms`` / ``server_live_ms``: median wall time of ``GET /runs/<run>`` (the whole page, charts
  rendered server-side) and of ``GET /runs/<run>/live`` (the fragment the page polls), logged in, over HTTP;
* ``lead_page_load_ms`` (headline): median time from navigation start to the ``load`` event in headless
  Chromium (Navigation Timing), a fresh navigation each time; falls back to ``server_page_ms`` when Debian's
  chromium/chromium-driver are absent (``browser`` says which).

``--quick``: fewer repetitions. Prints one JSON object on the last line and writes bench/results/console.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.console_helpers import ConsoleProcess, RunWriter, browser_missing, new_browser  # noqa: E402

ROUNDS, SITES = 20, ["hospital-a", "hospital-b", "hospital-c"]


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args()
    reps_http, reps_browser = (5, 3) if args.quick else (30, 10)
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = RunWriter(Path(tmp), "bench-run", rounds=ROUNDS, sites=SITES)
        for k in range(1, ROUNDS + 1):
            run.round(k)
        run.finish()
        build_s = time.perf_counter() - t0
        console = ConsoleProcess("--runs", str(run.runs_dir))
        try:
            client = httpx.Client(base_url=console.base, timeout=60)
            client.get(console.url)
            page_path, live_path = "/runs/bench-run", "/runs/bench-run/live"
            first = client.get(page_path)
            assert first.status_code == 200 and f"round {ROUNDS} of {ROUNDS}" in first.text
            page_t, live_t = [], []
            for _ in range(reps_http):
                t = time.perf_counter()
                client.get(page_path)
                page_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                client.get(live_path)
                live_t.append(time.perf_counter() - t)
            browser_ms, browser = None, browser_missing() or "headless chromium"
            if not browser_missing():
                driver = new_browser(Path(tmp) / "profile")
                try:
                    driver.get(console.url)
                    loads = []
                    for _ in range(reps_browser):
                        driver.get(console.base + page_path)
                        ms = driver.execute_script(
                            "const n = performance.getEntriesByType('navigation')[0];"
                            "return n.loadEventEnd - n.startTime;")
                        loads.append(float(ms) / 1000)
                    browser_ms = _median_ms(loads)
                finally:
                    driver.quit()
        finally:
            console.stop()
    result = {
        "lead_page_load_ms": browser_ms if browser_ms is not None else _median_ms(page_t),
        "browser": browser,
        "server_page_ms": _median_ms(page_t),
        "server_page_p95_ms": round(sorted(page_t)[int(0.95 * (len(page_t) - 1))] * 1000, 1),
        "server_live_ms": _median_ms(live_t),
        "page_bytes": len(first.content),
        "rounds": ROUNDS, "sites": len(SITES), "reps_http": reps_http, "reps_browser": reps_browser,
        "build_run_seconds": round(build_s, 2), "quick": args.quick,
        "machine": f"{platform.machine()} {platform.python_version()}",
    }
    out = REPO / "bench" / "results" / "console.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
