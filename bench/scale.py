"""Scale: N simulated sites for a round or two — wall per round, peak memory, how many sites contributed.

    python bench/scale.py [--quick] [--sites N] [--rounds R] [--steps S]

Every site is a real Atoll site (its own site config, pseudonym secret, signing key, approval, preprocessing cache
and signed lifetime ledger) and runs the real ClientApp in Flower's simulation engine; the server is the real
ServerApp (validation, signed digests, evaluation, checkpoint per round). The sites share ONE generated DICOM
export on disk (read only, as a mounted PACS export would be): what scales is the number of sites, not the data.
Each site is small (``--patients`` patients of 2 images), so at q = 0.1 some sites draw only empty Poisson
batches in a round — a valid noise-only DP step whose update must still be released (``EMPTY_BATCHES``).

Round 1 also pays each site's first ingest (header index, decode, preprocessing cache); later rounds read the
cache. Peak memory is the RSS summed over this process and every process it starts (the Ray workers and Ray's own
daemons, re-parented or not: bench/conditions.TreeMemory), sampled every 0.5 s: pages shared between workers are
counted once per worker, so it over-states.

Prints one JSON object (headline ``contributed_fraction`` = sites whose update was accepted in every round ÷ sites;
also ``wall_per_round_s``, ``peak_memory_gib``) and writes ``bench/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.conditions import TreeMemory, conditions  # noqa: E402

SITE_TOML = """[site]
name = "{name}"
state_dir = "state"
secret_file = "pseudonym.secret"
signing_key = "keys/site_ed25519.pem"
device = "cpu"

[data]
dicom_dir = "{dicom}"
labels_csv = "{labels}"
label_column = "label"
modalities = ["CR"]
image_size = 28
val_fraction = 0.25
seed = 0

[privacy]
max_epsilon = 1000.0
released_metrics = ["num-examples", "train_loss", "train_seconds", "val_loss", "val_accuracy"]
"""


def make_sites(root: Path, n: int, patients: int) -> list[Path]:
    """One shared DICOM export + n site folders (config, secret, signing key) pointing at it."""
    from client.site_config import create_secret_file
    from privacy.keys import ensure_site_key
    from tests.dicom_factory import write_labels, write_site

    export = root / "shared-export"
    records = write_site(export / "dicom", patients=patients, images_per_patient=2, label_of=lambda p: p % 2)
    labels = write_labels(export / "labels.csv", records)
    keys = root / "consortium" / "keys"
    keys.mkdir(parents=True)
    configs = []
    for i in range(n):
        name = f"site-{i:04d}"
        site = root / name
        site.mkdir()
        create_secret_file(site / "pseudonym.secret")
        (keys / f"{name}.pub").write_bytes(ensure_site_key(site / "keys" / "site_ed25519.pem"))
        (site / "site.toml").write_text(SITE_TOML.format(name=name, dicom=export / "dicom", labels=labels))
        configs.append(site / "site.toml")
    return configs


class RoundClock(threading.Thread):
    """Notes the wall-clock time each round's entry appears in the run's history.json (the ServerApp writes it at
    the end of every round, after evaluation and the checkpoint)."""

    def __init__(self, history: Path, interval: float = 0.2) -> None:
        super().__init__(daemon=True, name="round-clock")
        self.history, self.interval = history, interval
        self.ends: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                n = len(json.loads(self.history.read_text()))
            except (OSError, ValueError):
                n = len(self.ends)
            while len(self.ends) < n:
                self.ends.append(time.time())
            self.stop.wait(self.interval)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 sites, 2 rounds")
    ap.add_argument("--sites", type=int, default=None, help="number of simulated sites (default 500; quick 20)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="DP-SGD steps per site and round")
    ap.add_argument("--patients", type=int, default=8, help="patients per site (2 images each)")
    args = ap.parse_args(argv)
    n = args.sites or (20 if args.quick else 500)
    before = conditions()
    print(f"scale: {n} sites, {args.rounds} rounds of {args.steps} DP steps; conditions {before}", file=sys.stderr)

    from atoll.demo import approve_run, simulate
    from contract import Mechanism
    from server.settings import RunSettings

    work = Path(tempfile.mkdtemp(prefix="atoll-bench-scale-"))
    t = time.perf_counter()
    configs = make_sites(work, n, args.patients)
    settings = RunSettings(num_server_rounds=args.rounds, run_dir=str(work / "runs"), run_name="scale",
                           keys_dir=str(work / "consortium" / "keys"), mechanism=Mechanism(steps=args.steps),
                           num_sites=n, min_sites=2)
    approve_run(configs, settings)
    setup_s = time.perf_counter() - t
    print(f"scale: {n} sites written and approved in {setup_s:.1f}s under {work}", file=sys.stderr)

    clock = RoundClock(work / "runs" / "scale" / "history.json")
    clock.start()
    start = time.time()
    with TreeMemory() as mem:
        outputs = simulate(settings, configs)
    clock.stop.set()
    clock.join()
    total = time.time() - start
    history = outputs.history
    while len(clock.ends) < len(history):  # a round recorded after the last poll
        clock.ends.append(time.time())

    per_round, every_round = [], None
    marks = [start, *clock.ends]
    for i, h in enumerate(history):
        statuses = [s["status"] for s in h["sites"].values()]
        contributed = {name for name, s in h["sites"].items() if s["status"] == "contributed"}
        every_round = contributed if every_round is None else every_round & contributed
        empty = sum(1 for s in h["sites"].values() if s.get("missing", {}).get("train_loss") == "EMPTY_BATCHES")
        per_round.append({
            "round": h["round"], "wall_s": round(marks[i + 1] - marks[i], 1),
            "train_wall_s": round(h["train_wall_seconds"], 1), "contributed": len(contributed),
            "not_contributed": {k: statuses.count(k) for k in set(statuses) if k != "contributed"},
            "all_batches_empty": empty,
        })
    contributed_all = len(every_round or ())
    result = {
        "bench": "scale",
        "contributed_fraction": round(contributed_all / n, 4),
        "sites": n, "rounds": args.rounds, "local_steps": args.steps, "patients_per_site": args.patients,
        "contributed_every_round": contributed_all,
        "wall_per_round_s": [r["wall_s"] for r in per_round],
        "peak_memory_gib": mem.peak_gib, "peak_processes": mem.peak_processes,
        "memory_per_site_mib": round(mem.peak / n / 2**20, 2),
        "status": outputs.status,
        "per_round": per_round,
        "setup_seconds": round(setup_s, 1), "run_seconds": round(total, 1),
        "definition": "round wall = time between the round entries appearing in history.json (round 1 from the "
                      "simulation start: Ray start-up and every site's first ingest included); peak memory = RSS "
                      "summed over every process the bench started",
        "conditions_start": before, "conditions_end": conditions(), "quick": args.quick,
    }
    out = REPO / "bench" / "results" / "scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
