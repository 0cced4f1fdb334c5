"""The dataset fingerprint (issue 17 item 4): every signed ledger record carries it, and the audit report shows
when a site's dataset changed between runs — without learning anything about the data (a keyed hash)."""

from __future__ import annotations

import json
from pathlib import Path

from client.pacs.fingerprint import dataset_fingerprint
from privacy.audit import verify_run
from privacy.report import render_report
from tests.anchored_run import make_sites, run_anchored


def test_records_carry_the_fingerprint_and_the_report_shows_a_change_between_runs(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    sites = make_sites(tmp_path, keys, {"hospital-a": 20.0, "hospital-b": 20.0})
    secret = b"s" * 32
    before = dataset_fingerprint(secret, ["1.2.3.1", "1.2.3.2"])
    after = dataset_fingerprint(secret, ["1.2.3.1", "1.2.3.2", "1.2.3.3"])  # ten new images pulled, say
    for s in sites.values():
        s.guard.dataset_fingerprint = before
    run_anchored(tmp_path, sites, keys, run_name="run-1", rounds=1)
    sites["hospital-b"].guard.dataset_fingerprint = after
    run = run_anchored(tmp_path, sites, keys, run_name="run-2", rounds=1)

    records = [json.loads(line) for line in sites["hospital-b"].ledger_path.read_text().splitlines()]
    assert {r["type"] for r in records} == {"reservation", "round"}
    assert [r["dataset_fingerprint"] for r in records] == [before, before, after, after]  # signed with the record
    assert "1.2.3" not in sites["hospital-b"].ledger_path.read_text()

    result = verify_run(run.run_dir, run.site_ledgers, keys)
    assert result.ok, result.text()  # a changed dataset is information for the auditor, not a tampering error
    assert result.sites["hospital-b"].dataset_changes() == ["the dataset changed between runs run-1 and run-2"]
    assert result.sites["hospital-a"].dataset_changes() == []
    html = render_report(result, run.run_dir)
    assert "Datasets trained on" in html and "changed between runs run-1 and run-2" in html
    assert before.split(":")[-1][:12] in html and after.split(":")[-1][:12] in html


def test_the_audit_reports_its_progress_over_the_records(tmp_path: Path) -> None:
    """`atoll audit verify` over many records shows a bar: verify_run counts the records it recomputes."""
    keys = tmp_path / "keys"
    sites = make_sites(tmp_path, keys, {"hospital-a": 20.0, "hospital-b": 20.0})
    run = run_anchored(tmp_path, sites, keys, run_name="run-1", rounds=3)
    calls: list[tuple[int, int]] = []
    result = verify_run(run.run_dir, run.site_ledgers, keys, progress=lambda done, total: calls.append((done, total)))
    assert result.ok
    assert [d for d, _ in calls] == list(range(1, len(calls) + 1)) and calls[-1][0] <= calls[-1][1]
    assert calls[-1][0] >= 6 + 12  # 6 round records in the server copy; 12 reservation/round records on site
