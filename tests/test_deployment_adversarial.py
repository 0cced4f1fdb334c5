"""Deployment tests against an adversary, with real Flower processes on 127.0.0.1 (issue 6, item 8).

1. A poisoning site: hospital-b sends an update with a NaN, hospital-c one at distance 1e6 from the
   global weights (tests/fixtures/poison_app: Atoll's honest ClientApp, then the reply replaced after
   the site's own egress guard, as an attacker controlling a site would do). The server must reject
   both with a reason, aggregate hospital-a alone and complete the run.
2. A wire tap: every byte between the SuperNodes and the SuperLink of a plaintext (`--insecure`) run
   goes through a logging proxy (tests/wire_capture.py); the capture must hold no identifier of the
   demo DICOM headers, no site path, no site secret and no raw or preprocessed pixel row.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from atoll import demo_data
from atoll.demo import approve_run, prepare_site_keys
from atoll.demo_data import HOSPITALS
from atoll.localnet import LocalConsortium
from conftest import REPO
from models import state_dict_digest, state_dict_sha256
from contract import Mechanism
from server.settings import RunSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wire_capture import NeedleSearch, WireTap, http1_messages  # noqa: E402

pytestmark = pytest.mark.slow

POISON_APP = REPO / "tests" / "fixtures" / "poison_app"
NAMES = [h.name for h in HOSPITALS]
# Honest DP-SGD rounds of this size move the weights by about 0.7 (measured, 3 steps, sigma 1, C 1);
# the poisoned one moves them by 1e6. The bound sits between, with room for either side.
MAX_UPDATE_NORM = 50.0


def _settings(tmp_path: Path, name: str, keys: Path, **kw) -> RunSettings:
    return RunSettings(run_dir=str(tmp_path / "runs"), run_name=name, keys_dir=str(keys), num_server_rounds=2, num_sites=3, **kw, mechanism=Mechanism(steps=3))


def _weights(run: Path, rnd: int) -> dict[str, torch.Tensor]:
    return torch.load(run / "weights" / f"round-{rnd:03d}.pt", weights_only=True)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a))


# ----------------------------------------------------------------------------------- 1. poisoning
def _poison_app(dest: Path) -> Path:
    """The fixture app as submitted: its files plus the repository's run-config table (single source)."""
    import tomli_w

    app = tomllib.loads((POISON_APP / "pyproject.toml").read_text())
    repo = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert app["tool"]["flwr"]["app"]["components"] == {"serverapp": "server.app:app",
                                                        "clientapp": "poison_client:app"}
    assert "config" not in app["tool"]["flwr"]["app"], "the run config comes from the repository only"
    app["tool"]["flwr"]["app"]["config"] = repo["tool"]["flwr"]["app"]["config"]
    dest.mkdir(parents=True)
    shutil.copy2(POISON_APP / "poison_client.py", dest / "poison_client.py")
    (dest / "pyproject.toml").write_text(tomli_w.dumps(app))
    return dest


def test_nan_and_huge_norm_updates_are_rejected_and_the_run_completes(fresh_consortium, tmp_path):
    app_dir = _poison_app(tmp_path / "poison_app")
    configs = [fresh_consortium / n / "site.toml" for n in NAMES]
    keys = prepare_site_keys(fresh_consortium, NAMES)
    settings = _settings(tmp_path, "poisoned", keys, min_sites=1, max_update_norm=MAX_UPDATE_NORM)
    # Which app hash do the sites check? poison_client.py imports the honest `client` package, which
    # is installed (editable) in this venv, so `client.manifest.installed_app_hash()` hashes the
    # checkout that package lives in (REPO), not the FAB that was submitted; the fixture's own FAB
    # hash is never looked at. approve_run approves exactly that manifest (as for the real app).
    # A site that runs an attacker's code cannot be protected by a check that code performs itself:
    # this test is about the SERVER's defence against a malicious site.
    approve_run(configs, settings)
    net = LocalConsortium(app_dir, configs, insecure=True, workdir=tmp_path / "net",
                          node_configs=[{}, {"poison": "nan"}, {"poison": "huge"}])
    with net:
        status = net.wait(net.submit(settings.to_run_config()), timeout=480)
        assert status == "finished:completed", net.tail("superlink")

    run = tmp_path / "runs" / "poisoned"
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    history = json.loads((run / "history.json").read_text())
    assert [h["round"] for h in history] == [1, 2]
    for entry in history:
        sites = entry["sites"]
        assert sorted(sites) == sorted(NAMES), entry
        a, b, c = (sites[n] for n in NAMES)
        assert a["status"] == "contributed" and "code" not in a, a
        assert b["status"] == "rejected" and b["code"] == "UPDATE_REJECTED", b
        assert "non-finite" in b["message"], b
        assert c["status"] == "rejected" and c["code"] == "UPDATE_REJECTED", c
        assert "norm" in c["message"] and "exceeds the bound" in c["message"], c
        assert "1e+06" in c["message"] or "1000000" in c["message"], c  # the reason states the norm seen
        # A rejected site still evaluated the (hospital-a) global model and still spent its privacy.
        assert all(s["epsilon"] > 0 for s in sites.values())
        assert all(s["val"] for s in sites.values()), "evaluation is unaffected by the rejection"
        assert not b["train"] and not c["train"], "a rejected reply's metrics are not recorded"

    # The global model is hospital-a's update path, bit for bit: FedAvg over one contributor.
    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    by = {(r["site"], r["server_round"]): r for r in ledger}
    w = [_weights(run, r) for r in range(3)]
    for rnd in (1, 2):
        assert all(torch.isfinite(t).all() for t in w[rnd].values()), f"round {rnd} weights are not finite"
        assert _distance(w[rnd], w[rnd - 1]) <= MAX_UPDATE_NORM
        rec = by[("hospital-a", rnd)]
        assert state_dict_digest(w[rnd], rec.get("update_hash", "sha256")) == rec["update_sha256"], \
            f"round {rnd} global weights are not exactly hospital-a's update"
        for n in NAMES:  # every site, poisoner or not, was sent the previous (clean) global weights
            assert by[(n, rnd)]["weights_in_sha256"] == state_dict_sha256(w[rnd - 1])

    # Consortium ledger: RoundBook stores a site's signed record BEFORE it validates the update, so
    # a rejected site's record is kept. That is the right behaviour: the site did train and spend
    # privacy (write-ahead, charged at the site), and the auditor must see every release.
    assert len(ledger) == 6, "one signed round record per site per round, rejected sites included"
    assert sorted(by) == sorted((n, r) for n in NAMES for r in (1, 2))
    # (The poisoners' records carry the hash of the honest update they computed, not of what they sent:
    # RoundBook does not compare a record's update_sha256 with the update that came with it.)


# ---------------------------------------------------------------------------------- 2. wire tap
def _dicom_needles(site_root: Path) -> tuple[set[bytes], set[bytes]]:
    """(identifier strings from the headers, non-constant uint8 pixel rows) of one site's DICOM files."""
    text: set[bytes] = set()
    rows: set[bytes] = set()
    for path in sorted((site_root / "dicom").rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - the planted truncated file (it is quarantined at the site)
            continue
        for kw in ("PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID",
                   "SOPInstanceUID"):
            value = str(ds.get(kw, "") or "")
            if value:
                text.add(value.encode())
        if "PixelData" not in ds:
            continue
        try:
            pixels = np.asarray(ds.pixel_array)
        except Exception:  # noqa: BLE001 - unreadable pixels: quarantined at the site, nothing to find
            continue
        assert pixels.dtype == np.uint8 and pixels.shape == (28, 28)
        for r in pixels:
            if r.min() != r.max():
                rows.add(r.tobytes())
    return text, rows


def _preprocessed_rows(site_config: Path) -> set[bytes]:
    """Non-constant rows of the site's preprocessed images as float32 little-endian (from its cache)."""
    from client.ingest import build_site_dataset
    from client.site_config import load_site_config

    data = build_site_dataset(load_site_config(site_config))
    out: set[bytes] = set()
    for split in (data.train, data.val):
        imgs = split.images.to(torch.float32).numpy().astype("<f4")
        for r in imgs.reshape(-1, imgs.shape[-1]):
            if r.min() != r.max():
                out.add(r.tobytes())
    return out


def _search(search: NeedleSearch, haystacks: list[bytes]) -> dict[bytes, int]:
    found: dict[bytes, int] = {}
    for h in haystacks:
        found.update(search.find(h))
    return found


def test_captured_traffic_carries_no_identifier_and_no_pixel_data(fresh_consortium, tmp_path):
    t0 = time.perf_counter()
    configs = [fresh_consortium / n / "site.toml" for n in NAMES]
    keys = prepare_site_keys(fresh_consortium, NAMES)
    settings = _settings(tmp_path, "wiretap", keys)
    approve_run(configs, settings)
    net = LocalConsortium(REPO, configs, insecure=True, workdir=tmp_path / "net")
    with WireTap(("127.0.0.1", net.port)) as tap:
        net.supernode_superlink_address = tap.address  # the sites reach the SuperLink only through the tap
        with net:
            status = net.wait(net.submit(settings.to_run_config()), timeout=480)
            assert status == "finished:completed", net.tail("superlink")
    t_run = time.perf_counter() - t0
    up, down = tap.site_to_server(), tap.server_to_site()
    run = tmp_path / "runs" / "wiretap"
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 2 and all(s["status"] == "contributed" for h in history for s in h["sites"].values())

    # --- the capture is the real plaintext Fleet API carrying the run, not an empty or garbled stream.
    # Flower 1.41's SuperNode reaches the SuperLink over HTTP/1.1 (REST, protobuf bodies), not gRPC.
    model_bytes = sum(t.numel() * t.element_size() for t in _weights(run, 0).values())
    assert len(up) >= 3, "every SuperNode connected through the tap"
    assert sum(map(len, up)) > 3 * 2 * model_bytes, "three sites x two rounds of updates went through the tap"
    assert sum(map(len, down)) > 3 * 2 * 2 * model_bytes, "global weights (train + evaluate) came back"
    exchanges = []
    for u, d in zip(up, down):
        reqs, resps = http1_messages(u), http1_messages(d)  # raises on compressed or unframed bodies
        assert len(resps) <= len(reqs) <= len(resps) + 1, "one response per request, in order"
        exchanges += zip(reqs, resps)
    requests = [q for u in up for q in http1_messages(u)]
    responses = [r for _, r in exchanges]
    assert {m.start_line.split()[1] for m in requests} >= {"/v1/fleet/push-messages", "/v1/fleet/push-object",
                                                           "/v1/fleet/pull-object"}
    assert all(m.headers.get("content-type", "application/protobuf") == "application/protobuf"
               for m in requests + responses)
    up_bodies = [m.body for m in requests]
    down_bodies = [m.body for m in responses]
    assert sum(map(len, up_bodies)) > 3 * 2 * model_bytes
    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 6
    round1 = _weights(run, 1)
    control = NeedleSearch([r["sig"].encode() for r in ledger]
                           + [t.numpy().tobytes()[:64] for t in round1.values() if t.numel() >= 16])
    seen_up = _search(control, up_bodies)
    seen_down = _search(control, down_bodies)
    assert all(r["sig"].encode() in seen_up for r in ledger), \
        "the sites' signed ledger records must be readable in the site->server capture (plaintext)"
    assert all(t.numpy().tobytes()[:64] in seen_down for t in round1.values() if t.numel() >= 16), \
        "round 1's global weights must be visible, raw float32, in the server->site capture"

    # --- what must not be there
    t1 = time.perf_counter()
    # Literals of the app's own source code (atoll/demo_data.py), which the SuperLink ships to every site
    # in the FAB download (get-fab, plain in the response body): the canary prefixes and the demo
    # institutions' names. They are searched everywhere except in that download; all else everywhere.
    public = {demo_data.CANARY_NAME.encode(), demo_data.CANARY_ID.encode(), demo_data.CANARY_ACCESSION.encode(),
              *(h.institution.encode() for h in HOSPITALS)}
    private: set[bytes] = set()
    pixel_rows: set[bytes] = set()
    float_rows: set[bytes] = set()
    for name, cfg in zip(NAMES, configs):
        site = (fresh_consortium / name).resolve()
        ids, rows = _dicom_needles(site)
        private |= ids
        pixel_rows |= rows
        float_rows |= _preprocessed_rows(cfg)
        private |= {str(p).encode() for p in (site, site / "dicom", site / "labels.csv", site / "state")}
        private.add((site / "pseudonym.secret").read_text().strip().encode())  # the site's HMAC secret
    uids = sorted(n for n in private if n.startswith(b"1.2."))
    assert len(uids) > 10_000 and len(pixel_rows) > 100_000 and len(float_rows) > 100_000
    searches = {"canary or demo literal": NeedleSearch(public, key_len=8),
                "identifier, path or secret": NeedleSearch(private, key_len=8),
                "raw uint8 pixel row": NeedleSearch(pixel_rows),
                "preprocessed float32 pixel row": NeedleSearch(float_rows, key_len=16)}
    fab = [r for q, r in exchanges if q.start_line.split()[1] == "/v1/fleet/get-fab"]
    assert len(fab) == 3 and all(len(r.body) > 10_000 for r in fab), "each site downloaded the app once"
    not_fab = [r.body for q, r in exchanges if q.start_line.split()[1] != "/v1/fleet/get-fab"]

    # Positive control: the same detectors on a copy of the capture with one of each kind planted.
    patient_name = sorted(n for n in private if n.startswith(demo_data.CANARY_NAME.encode()))[0]
    public_name = HOSPITALS[1].institution.encode()
    planted = {"canary or demo literal": [demo_data.CANARY_ID.encode(), public_name],
               "identifier, path or secret": [patient_name, uids[0], str(fresh_consortium.resolve() / NAMES[2]).encode()],
               "raw uint8 pixel row": [sorted(pixel_rows)[len(pixel_rows) // 2]],
               "preprocessed float32 pixel row": [sorted(float_rows)[len(float_rows) // 2]]}
    copy = bytearray(max(up, key=len))
    for i, needle in enumerate(n for group in planted.values() for n in group):
        at = 1001 + 7919 * i  # odd offsets, inside the real traffic
        copy[at:at] = needle
    for what, search in searches.items():
        hits = search.find(bytes(copy))
        assert all(n in hits for n in planted[what]), f"the {what} detector missed a planted needle"

    leaks = {}
    for what, search in searches.items():
        down_hay = not_fab if what == "canary or demo literal" else down
        for direction, hay in (("site->server", up), ("server->site", down_hay)):
            hits = _search(search, hay)
            if hits:
                leaks[f"{what} ({direction})"] = sorted(h[:80] for h in hits)[:5]
    assert not leaks, f"the capture carries data that must never leave a site: {leaks}"
    print(f"\nwire capture: {len(up)} connections, site->server {sum(map(len, up)):,} bytes, server->site "
          f"{sum(map(len, down)):,} bytes; needles: {len(private) + len(public):,} strings, "
          f"{len(pixel_rows):,} uint8 rows, {len(float_rows):,} float32 rows; run {t_run:.0f}s, "
          f"search {time.perf_counter() - t1:.1f}s")
