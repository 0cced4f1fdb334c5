"""Ingest throughput on full-size radiographs: Atoll's first pass (header index + decode + MONAI preprocessing +
cache write) and its cached pass, each against a plain ``pydicom.dcmread(f).pixel_array`` loop over the same
files, interleaved in one run, medians over the repeats.

    python bench/ingest.py [--quick] [--source CR.dcm] [--files N] [--image-size S] [--repeats R]

The files are generated at run time (never committed) as 16-bit CR radiographs of the source's size — real chest
radiographs are about 2,000 x 2,500 pixels. ``--source`` names a real CR DICOM to derive them from (e.g. the
1955 x 1841, 15-bit MONOCHROME1 chest radiograph RG1_J2KI.dcm of pydicom's test data; it needs a JPEG 2000
decoder such as pylibjpeg-openjpeg): each file is that image shifted and mirrored (so no two files, and no two
cache entries, are alike), stored uncompressed. Without ``--source`` (or when it cannot be decoded) a smooth
15-bit 1955 x 1841 image is synthesised instead; the result says which.

Prints one JSON object (headline ``ratio`` = first-pass images/s / plain-decode images/s; ``cached_ratio`` =
cached-pass images/s / plain-decode images/s) with the conditions (load, threads) and writes
``bench/results/ingest.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from bench.conditions import conditions  # noqa: E402
from client.ingest import build_site_dataset  # noqa: E402
from client.site_config import default_site_config  # noqa: E402
from tests.dicom_factory import uid, write_dicom, write_labels  # noqa: E402

#: the size of RG1_J2KI.dcm, a real CR chest radiograph; used when there is no source to derive from
FULL_SIZE = (1955, 1841)


def source_image(source: Path | None) -> tuple[np.ndarray, str, str]:
    """(uint16 pixels, photometric interpretation, where they came from): the source's, or synthesised."""
    if source is not None:
        try:
            ds = pydicom.dcmread(source)
            pixels = ds.pixel_array
            if pixels.ndim == 2 and pixels.dtype == np.uint16:
                return pixels, str(ds.PhotometricInterpretation), f"derived from {source.name}"
            print(f"ingest: {source.name} is not a 16-bit single-frame image; synthesising", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to the synthetic radiograph
            print(f"ingest: cannot decode {source.name} ({type(exc).__name__}: {exc}); synthesising",
                  file=sys.stderr)
    rows, cols = FULL_SIZE
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    body = np.exp(-(((x - cols / 2) / (cols / 3)) ** 2 + ((y - rows / 2) / (rows / 2.2)) ** 2))
    ribs = 0.15 * np.sin(y / 40.0) * body
    noise = np.random.default_rng(0).normal(0, 0.02, (rows, cols)).astype(np.float32)
    return np.clip((body + ribs + noise) * 20000 + 800, 0, 32767).astype(np.uint16), "MONOCHROME1", "synthesised"


def write_radiographs(data: Path, base: np.ndarray, photometric: str, n: int, per_patient: int) -> list[dict]:
    """``n`` full-size 15-bit CR files, ``per_patient`` per patient, each a distinct shift/mirror of ``base``."""
    records = []
    rows, cols = base.shape
    for i in range(n):
        p, k = divmod(i, per_patient)
        pid = f"PAT{p:04d}"
        pixels = np.roll(base, (37 * i) % rows, axis=0)
        pixels = pixels[:, ::-1] if i % 2 else pixels
        sop = uid(f"bench-ingest-{i}")
        rel = f"{pid}/S1/{k:03d}.dcm"
        write_dicom(data / rel, patient_id=pid, patient_name=f"Bench^{pid}", sop_uid=sop, study_uid=uid(f"st-{pid}"),
                    series_uid=uid(f"se-{pid}"), accession=f"A{p:05d}", modality="CR", rows=rows, columns=cols,
                    photometric=photometric, pixels=np.ascontiguousarray(pixels), bits=16, seed=i,
                    extra={"BitsStored": 15, "HighBit": 14})
        records.append({"file": rel, "sop": str(sop), "label": p % 2})
    return records


def _plain(files: list[Path]) -> float:
    t = time.perf_counter()
    for f in files:
        pydicom.dcmread(f).pixel_array
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="12 files and 3 repeats instead of 40 and 5")
    ap.add_argument("--source", type=Path, default=None, help="a real 16-bit CR DICOM to derive the files from")
    ap.add_argument("--files", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=224, help="the run's image size (preprocessing target)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repetitions; medians reported")
    args = ap.parse_args(argv)
    n = args.files or (12 if args.quick else 40)
    repeats = args.repeats or (3 if args.quick else 5)
    before = conditions()
    base, photometric, origin = source_image(args.source)
    print(f"ingest: {n} files of {base.shape[0]}x{base.shape[1]} ({origin}), {repeats} repeats; conditions {before}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="atoll-bench-ingest-") as tmp:
        root = Path(tmp)
        data = root / "dicom"
        records = write_radiographs(data, base, photometric, n, per_patient=2)
        labels = write_labels(root / "labels.csv", records)
        files = sorted(data.rglob("*.dcm"))
        mb = sum(f.stat().st_size for f in files) / 1e6
        _plain(files)  # warm the OS page cache so every side reads from memory
        plain_s, first_s, cached_s = [], [], []
        for rep in range(repeats):  # interleaved, so a change of load hits every side alike
            plain_s.append(_plain(files))
            cfg = default_site_config(data, labels, state_dir=root / f"state{rep}", image_size=args.image_size)
            t = time.perf_counter()
            first = build_site_dataset(cfg)  # fresh cache dir: header index + decode + preprocess + cache write
            first_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            cached = build_site_dataset(cfg)
            cached_s.append(time.perf_counter() - t)
            used = len(first.train) + len(first.val)
            assert used == len(files) == len(cached.train) + len(cached.val), "bench data must be fully usable"
            assert cached.report["cache"]["misses"] == 0
    plain, first_m, cached_m = (statistics.median(x) for x in (plain_s, first_s, cached_s))
    plain_ips, first_ips, cached_ips = len(files) / plain, used / first_m, used / cached_m
    result = {
        "bench": "ingest",
        "ratio": round(first_ips / plain_ips, 3),
        "cached_ratio": round(cached_ips / plain_ips, 2),
        "files": len(files), "stored_size": list(base.shape), "bits_stored": 15, "source": origin,
        "megabytes": round(mb, 1), "image_size": args.image_size,
        "plain_decode_images_per_s": round(plain_ips, 2),
        "first_pass_images_per_s": round(first_ips, 2),
        "cached_pass_images_per_s": round(cached_ips, 2),
        "seconds": {"plain": [round(x, 3) for x in plain_s], "first_pass": [round(x, 3) for x in first_s],
                    "cached_pass": [round(x, 3) for x in cached_s]},
        "repeats": repeats, "statistic": "median over interleaved repeats",
        "quick": args.quick, "pydicom": pydicom.__version__,
        "conditions_start": before, "conditions_end": conditions(),
    }
    out = ROOT / "bench" / "results" / "ingest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
