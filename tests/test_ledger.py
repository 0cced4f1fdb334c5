"""Signed hash-chained ledger (site and consortium copies), site keys, and `atoll site init`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from privacy.keys import (
    KeyFileError, ensure_site_key, generate_private_key, key_id, load_private_key, load_public_key, public_key_pem,
    write_private_key,
)
from privacy.ledger import (
    GENESIS, ConsortiumLedger, LedgerError, SiteLedger, canonical_json, record_hash, sign_record, verify_record,
)

H = "ab" * 32


def _round_body(rnd: int, eps: float = 1.0) -> dict:
    return {"type": "round", "run_id": "run-1", "server_round": rnd, "epsilon_after": eps, "delta": 1e-5,
            "history": [[1.0, 0.05, 10 * rnd]], "update_sha256": H}


@pytest.fixture
def site_key(tmp_path: Path):
    path = tmp_path / "site" / "keys" / "site_ed25519.pem"
    pub_pem = ensure_site_key(path)
    keys = tmp_path / "consortium" / "keys"
    keys.mkdir(parents=True)
    (keys / "hospital-a.pub").write_bytes(pub_pem)
    return load_private_key(path), keys


# ------------------------------------------------------------------------------------------------ canonical JSON


def test_canonical_json_is_sorted_compact_utf8_and_roundtrips() -> None:
    rec = {"b": 0.1, "a": [1, 2.5e-07, "é"], "c": {"z": None, "y": True}}
    raw = canonical_json(rec)
    assert raw == '{"a":[1,2.5e-07,"é"],"b":0.1,"c":{"y":true,"z":null}}'.encode("utf-8")
    assert canonical_json(json.loads(raw)) == raw
    with pytest.raises(ValueError):
        canonical_json({"eps": float("inf")})


def test_sign_and_verify_detects_any_change() -> None:
    key = generate_private_key()
    rec = sign_record({"v": 1, "x": 1.5, "key_id": None}, key)
    assert rec["key_id"] == key_id(key)
    verify_record(json.loads(json.dumps(rec)), key.public_key())  # survives a JSON round trip
    with pytest.raises(LedgerError, match="field 'sig'"):
        verify_record({**rec, "x": 1.50001}, key.public_key())
    with pytest.raises(LedgerError, match="field 'key_id'"):
        verify_record(rec, generate_private_key().public_key())
    with pytest.raises(LedgerError, match="unsigned"):
        verify_record({k: v for k, v in rec.items() if k != "sig"}, key.public_key())


# ------------------------------------------------------------------------------------------------ keys


def test_site_key_created_0600_then_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "k" / "site_ed25519.pem"
    pem1 = ensure_site_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert pem1.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert ensure_site_key(path) == pem1  # loaded, not regenerated
    assert path.with_suffix(".pub").read_bytes() == pem1
    assert key_id(load_public_key(path.with_suffix(".pub"))) == key_id(load_private_key(path))


def test_private_key_refuses_overwrite_open_modes_and_wrong_passphrase(tmp_path: Path, monkeypatch) -> None:
    key = generate_private_key()
    path = write_private_key(key, tmp_path / "enc.pem", passphrase=b"s3cret")
    with pytest.raises(KeyFileError, match="already exists"):
        write_private_key(key, path)
    monkeypatch.delenv("ATOLL_SITE_KEY_PASSPHRASE", raising=False)
    with pytest.raises(KeyFileError, match="encrypted; set \\$ATOLL_SITE_KEY_PASSPHRASE"):
        load_private_key(path)
    monkeypatch.setenv("ATOLL_SITE_KEY_PASSPHRASE", "wrong")
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_private_key(path)
    monkeypatch.setenv("ATOLL_SITE_KEY_PASSPHRASE", "s3cret")
    assert key_id(load_private_key(path)) == key_id(key)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(path)
    with pytest.raises(KeyFileError, match="not found.*atoll site init"):
        load_private_key(tmp_path / "missing.pem")


# ------------------------------------------------------------------------------------------------ site ledger


def test_site_ledger_chains_signs_and_persists(tmp_path: Path, site_key) -> None:
    key, _ = site_key
    path = tmp_path / "state" / "ledger.jsonl"
    led = SiteLedger(path, site="hospital-a", signing_key=key)
    r0 = led.append({"type": "reservation", "x": 1})
    r1 = led.append({"type": "refusal", "x": 2})
    assert (r0["seq"], r0["prev"], r1["seq"], r1["prev"]) == (0, GENESIS, 1, record_hash(r0))
    assert r0["site"] == "hospital-a" and r0["key_id"] == key_id(key) and r0["v"] == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_bytes().splitlines()
    assert lines[1] == canonical_json(r1)  # written canonically: hash/signature reproducible from the file
    again = SiteLedger(path, site="hospital-a", signing_key=key)  # a restart sees everything
    assert again.records() == [r0, r1]
    verify_record(again.records()[1], key.public_key())
    with pytest.raises(LedgerError, match="belongs to site 'hospital-a'"):
        SiteLedger(path, site="hospital-b").records()


def test_unsigned_mode_records_have_no_signature(tmp_path: Path) -> None:
    rec = SiteLedger(tmp_path / "l.jsonl", site="s1").append({"type": "reservation"})
    assert rec["key_id"] is None and "sig" not in rec


def test_edited_site_ledger_is_refused_with_line(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    led = SiteLedger(path, site="s1")
    for i in range(3):
        led.append({"type": "reservation", "i": i})
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"i":1', '"i":7')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError, match="line 3: field 'prev'"):
        SiteLedger(path, site="s1").records()
    del lines[1]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError, match="line 2: field 'seq' is 2, expected 1"):
        SiteLedger(path, site="s1").records()


def test_torn_last_line_is_kept_and_stops_reads_and_appends(tmp_path: Path) -> None:
    """Issue 12 item 3: a torn tail is never cut (it may be a truncation of acknowledged records); the ledger stops
    with the line at fault until `atoll site repair-ledger` keeps it as charged (tests/test_torn_ledgers.py)."""
    from privacy.ledger import LedgerTornError

    path = tmp_path / "l.jsonl"
    SiteLedger(path, site="s1").append({"type": "reservation"})
    with open(path, "ab") as fh:
        fh.write(b'{"type":"reserv')  # crash in the middle of a write, or a cut
    led = SiteLedger(path, site="s1")
    with pytest.raises(LedgerTornError, match="line 2: torn last line"):
        led.records()
    with pytest.raises(LedgerTornError, match="repair-ledger"):
        led.append({"type": "reservation"})
    assert path.read_bytes().endswith(b'{"type":"reserv')  # nothing cut, nothing appended


# ------------------------------------------------------------------------------------------------ consortium ledger


def _site_rounds(tmp_path: Path, key, n: int = 3) -> list[dict]:
    led = SiteLedger(tmp_path / "state" / "ledger.jsonl", site="hospital-a", signing_key=key)
    out = []
    for rnd in range(1, n + 1):
        led.append({"type": "reservation", "run_id": "run-1", "server_round": rnd})
        out.append(json.loads(json.dumps(led.append(_round_body(rnd, eps=float(rnd))))))
    return out


def test_consortium_accepts_signed_records_and_appends_verbatim(tmp_path: Path, site_key) -> None:
    key, keys = site_key
    recs = _site_rounds(tmp_path, key)
    cl = ConsortiumLedger(tmp_path / "run", keys_dir=keys)
    for r in recs:
        cl.accept(r, site="hospital-a")
    assert (tmp_path / "run" / "ledger.jsonl").read_bytes().splitlines() == [canonical_json(r) for r in recs]
    assert [p["epsilon"] for p in cl.epsilon_series()["hospital-a"]] == [1.0, 2.0, 3.0]
    # a restarted server continues the per-site checks from the file
    cl2 = ConsortiumLedger(tmp_path / "run", keys_dir=keys)
    with pytest.raises(LedgerError, match="'seq' 5 does not follow the last accepted record's seq 5"):
        cl2.accept(recs[-1], site="hospital-a")


@pytest.mark.parametrize(("mutate", "site", "fragment"), [
    (lambda r: {**r, "epsilon_after": 0.5}, "hospital-a", "field 'sig': signature does not verify"),
    (lambda r: r, "hospital-x", "names site 'hospital-a' but came from site 'hospital-x'"),
    (lambda r: {k: v for k, v in r.items() if k != "sig"}, "hospital-a", "unsigned"),
    (lambda r: sign_record(r, generate_private_key()), "hospital-a", "field 'key_id'"),
    (lambda r: {**r, "type": "reservation"}, "hospital-a", "only 'round' records"),
    (lambda r: {k: v for k, v in r.items() if k != "seq"}, "hospital-a", "field 'seq' is missing"),
])
def test_consortium_rejects_bad_records(tmp_path: Path, site_key, mutate, site, fragment) -> None:
    key, keys = site_key
    rec = _site_rounds(tmp_path, key, 1)[0]
    cl = ConsortiumLedger(tmp_path / "run", keys_dir=keys)
    with pytest.raises(LedgerError, match=fragment.replace("(", r"\(")):
        cl.accept(mutate(rec), site=site)
    assert not (tmp_path / "run" / "ledger.jsonl").exists()


def test_unenrolled_site_and_replays_are_rejected(tmp_path: Path, site_key) -> None:
    key, keys = site_key
    recs = _site_rounds(tmp_path, key)
    (keys / "hospital-a.pub").rename(keys / "other.pub")
    cl = ConsortiumLedger(tmp_path / "run", keys_dir=keys)
    with pytest.raises(LedgerError, match="site 'hospital-a' is not enrolled"):
        cl.accept(recs[0], site="hospital-a")
    (keys / "other.pub").rename(keys / "hospital-a.pub")
    cl = ConsortiumLedger(tmp_path / "run2", keys_dir=keys)
    cl.accept(recs[1], site="hospital-a")
    with pytest.raises(LedgerError, match="replayed or reordered"):
        cl.accept(recs[0], site="hospital-a")
    with pytest.raises(LedgerError, match="replayed or reordered"):
        cl.accept(recs[1], site="hospital-a")
    cl.accept(recs[2], site="hospital-a")


def test_a_site_whose_ledger_was_deleted_is_rejected_in_the_next_run(tmp_path: Path, site_key) -> None:
    """Deleting its ledger is the one way a site could restart its lifetime budget: the server notices."""
    key, keys = site_key
    runs = tmp_path / "runs"
    first = _site_rounds(tmp_path / "before", key, 3)
    earlier = [runs / "run-1" / "ledger.jsonl"]
    cl = ConsortiumLedger(runs / "run-1", keys_dir=keys, earlier_runs=earlier)
    for r in first:
        cl.accept(r, site="hospital-a")
    restarted = _site_rounds(tmp_path / "after-deletion", key, 1)  # same key, a fresh ledger: seq 1 again
    with pytest.raises(LedgerError, match=r"behind what it reported in run 'run-1' \(seq 5.*reset or restored"):
        ConsortiumLedger(runs / "run-2", keys_dir=keys, earlier_runs=earlier).accept(restarted[0], site="hospital-a")
    # a ledger that went on growing is fine in a later run
    led = SiteLedger(tmp_path / "before" / "state" / "ledger.jsonl", site="hospital-a", signing_key=key)
    led.append({"type": "reservation", "run_id": "run-2", "server_round": 1})
    more = json.loads(json.dumps(led.append(_round_body(1, eps=4.0))))
    ConsortiumLedger(runs / "run-2", keys_dir=keys, earlier_runs=earlier).accept(more, site="hospital-a")


def test_consortium_without_keys_stores_but_warns(tmp_path: Path, caplog) -> None:
    led = SiteLedger(tmp_path / "l.jsonl", site="s1")
    rec = led.append(_round_body(1))
    with caplog.at_level(logging.WARNING, logger="atoll.ledger"):
        cl = ConsortiumLedger(tmp_path / "run")
    assert "UNVERIFIED" in caplog.text
    cl.accept(rec, site="s1")
    assert cl.records() == [rec]
    with pytest.raises(LedgerError, match="keys_dir .* does not exist"):
        ConsortiumLedger(tmp_path / "run", keys_dir=tmp_path / "nope")


# ------------------------------------------------------------------------------------------------ atoll site init


def _site_init_args(argv: list[str]) -> argparse.Namespace:
    from privacy.cli import add_site_init_parser

    parser = argparse.ArgumentParser(prog="atoll site")
    add_site_init_parser(parser.add_subparsers(dest="cmd"))
    return parser.parse_args(["init", *argv])


def test_site_init_creates_identity_and_refuses_overwrite(tmp_path: Path, capsys, monkeypatch) -> None:
    from client.site_config import load_site_config

    out = tmp_path / "hosp"
    monkeypatch.setenv("MY_PASS", "correct horse")
    args = _site_init_args(["--out", str(out), "--name", "hospital-z", "--passphrase-env", "MY_PASS"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    pem = out / "site_ed25519.pem"
    kid = key_id(load_private_key(pem, "correct horse"))
    assert f"key id        {kid}" in text and str(out / "site_ed25519.pub") in text
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    secret = out / "pseudonym.secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(bytes.fromhex(secret.read_text().strip())) == 32
    assert public_key_pem(load_private_key(pem, "correct horse")) == (out / "site_ed25519.pub").read_bytes()
    (out / "dicom").mkdir()  # the template only needs the admin to point dicom_dir at the PACS export
    cfg = load_site_config(out / "site.toml")
    assert cfg.name == "hospital-z" and cfg.signing_key == pem and cfg.secret_file == secret
    before = pem.read_bytes()
    args = _site_init_args(["--out", str(out), "--name", "hospital-z"])
    assert args.func(args) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert pem.read_bytes() == before


def test_site_init_rejects_bad_name_and_missing_passphrase(tmp_path: Path, capsys, monkeypatch) -> None:
    args = _site_init_args(["--out", str(tmp_path / "a"), "--name", "bad name/../x"])
    assert args.func(args) == 2 and "--name" in capsys.readouterr().err
    monkeypatch.delenv("NOPE_VAR", raising=False)
    args = _site_init_args(["--out", str(tmp_path / "a"), "--name", "ok", "--passphrase-env", "NOPE_VAR"])
    assert args.func(args) == 2 and "NOPE_VAR" in capsys.readouterr().err
    assert not (tmp_path / "a" / "site_ed25519.pem").exists()


def test_the_server_checks_each_run_against_the_earlier_runs_in_its_folder(tmp_path: Path, site_key) -> None:
    from types import SimpleNamespace

    from server.outputs import _consortium_ledger

    key, keys = site_key
    settings = SimpleNamespace(keys_dir=str(keys))
    runs = tmp_path / "runs"
    (runs / "run-1").mkdir(parents=True)
    (runs / "run-1" / "settings.json").write_text("{}")
    for r in _site_rounds(tmp_path / "before", key, 2):
        _consortium_ledger(runs / "run-1", settings).accept(r, site="hospital-a")
    restarted = _site_rounds(tmp_path / "after-deletion", key, 1)[0]
    with pytest.raises(LedgerError, match="reset or restored"):
        _consortium_ledger(runs / "run-2", settings).accept(restarted, site="hospital-a")
    (runs / "run-1" / "settings.json").unlink()  # not a run folder: not an earlier run
    _consortium_ledger(runs / "run-3", settings).accept(restarted, site="hospital-a")
