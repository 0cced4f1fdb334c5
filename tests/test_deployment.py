"""The same app on Flower's deployment engine: a SuperLink and three SuperNodes on 127.0.0.1.

The runs share one consortium (the module-scoped `tls_net`: its start-up, PKI and node enrolment happen once); they
are kept together on one xdist worker (xdist_group; and --dist loadscope, pyproject) so that it starts only once.
"""

from __future__ import annotations

import json
import os

import pytest

from atoll.demo import approve_run, prepare_site_keys
from atoll.demo_data import HOSPITALS
from atoll.localnet import BIN, LocalConsortium, free_port
from conftest import REPO
from contract import Mechanism
from server.settings import RunSettings

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("deployment-tls")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_processes_are_cleaned_up_when_the_test_body_fails(demo_consortium, tmp_path):
    configs = [demo_consortium / h.name / "site.toml" for h in HOSPITALS[:1]]
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"):
        with LocalConsortium(REPO, configs, insecure=True, workdir=tmp_path / "net") as net:
            pids = [p.pid for p in net.procs]
            raise RuntimeError("boom")
    assert pids and not any(_alive(p) for p in pids)


def test_a_deployment_without_tls_must_say_insecure(tmp_path):
    with pytest.raises(ValueError, match="insecure"):
        LocalConsortium(REPO, [], insecure=False)


@pytest.fixture(scope="module")
def tls_net(module_consortium, tmp_path_factory):
    """Deployment as documented, started once for this module's runs: consortium CA + SuperLink cert, enrolled node
    keys, TLS everywhere, three SuperNodes. The runs of the tests below are separate Flower runs on it, one after
    the other, as a real consortium runs them. When it stops, every Flower process it started must be gone."""
    from client.enroll import enroll_site
    from server.pki import init_consortium

    tmp = tmp_path_factory.mktemp("tls-net")
    names = [h.name for h in HOSPITALS]
    configs = [module_consortium / n / "site.toml" for n in names]
    pki = init_consortium(tmp / "pki", hosts=["localhost"])
    node_keys = [enroll_site(tmp / "nodes" / n, n, ca_cert=pki.ca_cert)[0].private_key for n in names]
    tls = {"ca": pki.ca_cert, "cert": pki.server_cert, "key": pki.server_key}
    with LocalConsortium(REPO, configs, tls=tls, node_keys=node_keys, workdir=tmp / "net") as net:
        yield net
        pids = [p.pid for p in net.procs]
    assert not any(_alive(p) for p in pids), "every Flower process must be gone after the consortium stops"


def test_two_tls_rounds_across_three_enrolled_supernodes_and_a_plaintext_node_cannot_join(tls_net, module_consortium,
                                                                                          tmp_path):
    """Two rounds over TLS with node authentication; a SuperNode without TLS or an enrolled key never takes part."""
    import time

    names = [h.name for h in HOSPITALS]
    configs = [module_consortium / n / "site.toml" for n in names]
    keys = prepare_site_keys(module_consortium, names)
    run_dir = tmp_path / "runs"
    settings = RunSettings(run_dir=str(run_dir), run_name="deploy-test", keys_dir=str(keys), num_server_rounds=2,
                           num_sites=3, mechanism=Mechanism(steps=3))
    approve_run(configs, settings)
    net = tls_net
    plain = net._spawn("plaintext-node", [
        str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{net.port}",
        "--port", str(free_port()), "--node-config", f'site-config="{configs[0]}"'])
    status = net.wait(net.submit(settings.to_run_config()), timeout=480)
    assert status == "finished:completed", net.tail("superlink")
    nodes = net.flwr(["supernode", "ls", "--format", "json"]).stdout
    time.sleep(1)
    assert plain.poll() is not None or "plaintext" not in nodes
    out = run_dir / "deploy-test"
    history = json.loads((out / "history.json").read_text())
    assert [h["round"] for h in history] == [1, 2]
    for entry in history:
        assert sorted(entry["sites"]) == sorted(names)
        assert all(s["status"] == "contributed" for s in entry["sites"].values()), entry
        assert all(s["epsilon"] > 0 for s in entry["sites"].values())
        assert 0.0 <= entry["aggregated"]["val_accuracy"] <= 1.0
    assert (out / "weights" / "round-002.pt").exists()
    assert json.loads((out / "status.json").read_text())["status"] == "completed"
    ledger = (out / "ledger.jsonl").read_text().splitlines()
    assert len(ledger) == 6, ("one signed round record per site per round: only the three enrolled TLS nodes took "
                              "part; the plaintext node never did")


def test_a_run_the_sites_did_not_approve_is_refused_by_every_site(tls_net, module_consortium, tmp_path):
    """Real SuperNodes, no approval for this run's manifest: every site refuses before reserving any privacy."""
    names = [h.name for h in HOSPITALS]
    keys = prepare_site_keys(module_consortium, names)
    ledgers = [module_consortium / n / "state" / "ledger.jsonl" for n in names]
    before = [p.read_bytes() if p.exists() else b"" for p in ledgers]
    # lr 0.0123 appears in no approved manifest: nobody at the sites has seen this run
    settings = RunSettings(run_dir=str(tmp_path / "runs"), run_name="unapproved", keys_dir=str(keys),
                           num_server_rounds=2, num_sites=3, lr=0.0123, mechanism=Mechanism(steps=3))
    status = tls_net.wait(tls_net.submit(settings.to_run_config()), timeout=300)
    assert status == "finished:failed", status  # the Control API tells the lead the run did not complete
    out = tmp_path / "runs" / "unapproved"
    stopped = json.loads((out / "status.json").read_text())
    assert stopped["status"] == "stopped"
    assert stopped["reason"].count("RUN_NOT_APPROVED") == 3, stopped["reason"]
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1, "the run stops at round 1"
    for name in names:
        site = history[0]["sites"][name]
        assert site["status"] == "refused" and site["code"] == "RUN_NOT_APPROVED", site
        assert "approve" in site["message"] and str(module_consortium) not in site["message"]
    after = [p.read_bytes() if p.exists() else b"" for p in ledgers]
    assert after == before, "an unapproved run is refused before any privacy is reserved"
    assert not (out / "ledger.jsonl").exists()
