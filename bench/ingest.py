"""Ingest throughput: first pass (header index + decode + MONAI preprocess + cache write) and cached pass, each
against a plain ``pydicom.dcmread(f).pixel_array`` loop over the same generated CR-like files, in one run.

    python bench/ingest.py [--quick] [--files N] [--image-size S]

Prints one JSON object (headline ``ratio`` = first-pass images/s / plain-decode images/s; ``cached_ratio`` =
cached-pass images/s / plain-decode images/s) and writes ``bench/results/ingest.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from client.ingest import build_site_dataset  # noqa: E402
from client.site_config import default_site_config  # noqa: E402
from tests.dicom_factory import write_labels, write_site  # noqa: E402


def _plain(files: list[Path]) -> float:
    t = time.perf_counter()
    for f in files:
        pydicom.dcmread(f).pixel_array
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 files instead of 400")
    ap.add_argument("--files", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--rows", type=int, default=28, help="stored image size of the generated files")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repetitions, best kept (default 3; quick 2)")
    args = ap.parse_args(argv)
    n = args.files or (100 if args.quick else 400)
    args.repeats = args.repeats or (2 if args.quick else 3)
    per_patient = 4
    with tempfile.TemporaryDirectory(prefix="atoll-bench-ingest-") as tmp:
        root = Path(tmp)
        data = root / "dicom"
        records = write_site(data, patients=max(n // per_patient, 1), images_per_patient=per_patient, rows=args.rows)
        labels = write_labels(root / "labels.csv", records)
        files = sorted(data.rglob("*.dcm"))
        _plain(files)  # warm the OS page cache so every side reads from memory
        plain_s, first_s, cached_s = float("inf"), float("inf"), float("inf")
        for rep in range(args.repeats):  # interleaved; best of each (the machine may be shared)
            plain_s = min(plain_s, _plain(files))
            cfg = default_site_config(data, labels, state_dir=root / f"state{rep}", image_size=args.image_size)
            t = time.perf_counter()
            first = build_site_dataset(cfg)  # fresh cache dir: header index + decode + preprocess + cache write
            first_s = min(first_s, time.perf_counter() - t)
            t = time.perf_counter()
            cached = build_site_dataset(cfg)
            cached_s = min(cached_s, time.perf_counter() - t)
            used = len(first.train) + len(first.val)
            assert used == len(files) == len(cached.train) + len(cached.val), "bench data must be fully usable"
            assert cached.report["cache"]["misses"] == 0
    plain_ips, first_ips, cached_ips = len(files) / plain_s, used / first_s, used / cached_s
    result = {
        "bench": "ingest",
        "ratio": round(first_ips / plain_ips, 3),
        "cached_ratio": round(cached_ips / plain_ips, 2),
        "files": len(files),
        "stored_size": args.rows,
        "image_size": args.image_size,
        "plain_decode_images_per_s": round(plain_ips, 1),
        "first_pass_images_per_s": round(first_ips, 1),
        "cached_pass_images_per_s": round(cached_ips, 1),
        "repeats": args.repeats,
        "quick": args.quick,
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
    }
    out = ROOT / "bench" / "results" / "ingest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
