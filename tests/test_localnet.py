"""The local consortium harness without starting it (milliseconds): what its failure messages show."""

from __future__ import annotations

from atoll.localnet import LocalConsortium
from conftest import REPO


def test_tail_leaves_out_the_status_polls_of_wait_and_keeps_everything_else(tmp_path):
    net = LocalConsortium(REPO, [], insecure=True, workdir=tmp_path)
    log = tmp_path / "superlink.log"
    log.write_text("\n".join([
        "INFO : Starting Flower SuperLink",
        '2026-12-01T17:18:40.336Z INFO [uvicorn.access] 127.0.0.1:38918 - "POST /v1/control/list-runs HTTP/1.1" 200',
        "INFO :      ControlServicer.ListRuns",
        "ERROR : ServerApp raised: round 1: only 0 site(s) contributed",
        '2026-12-01T17:18:40.621Z INFO [uvicorn.access] 127.0.0.1:38918 - "POST /v1/control/list-runs HTTP/1.1" 200',
        "INFO :      ControlServicer.ListRuns",
    ]) + "\n")
    net.logs["superlink"] = log
    assert net.tail("superlink").splitlines() == ["INFO : Starting Flower SuperLink",
                                                  "ERROR : ServerApp raised: round 1: only 0 site(s) contributed"]
    assert net.tail("superlink", 1) == "ERROR : ServerApp raised: round 1: only 0 site(s) contributed"
    assert net.tail("no-such-process") == ""
