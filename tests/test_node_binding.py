"""Issue 12, items 4-6: a run takes updates, refusals and metrics only from the enrolled node of each site.

Record level, with the real parts: sites' signed records from real budget guards, the real consortium ledger
verifying them against enrolled keys, real Flower ``Message`` s (the ``src_node_id`` Flower stamps on each reply),
the real ``RoundBook`` and Flower's own FedAvg for the weighting. The deployment-level variant (a rogue SuperNode
on 127.0.0.1) is in tests/test_deployment_adversarial.py.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from contract import wire
from models import state_dict_sha256
from contract import Mechanism
from privacy.guard import BudgetGuard, RoundRequest
from privacy.keys import ensure_site_key, load_private_key
from privacy.ledger import ConsortiumLedger, SiteLedger
from privacy.policy import SitePolicy
from privacy.registry import SiteEntry, SiteRegistry
from server.sitebook import RoundBook, SiteTrust

GLOBAL = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
SITES = ("hospital-a", "hospital-b", "hospital-c")
NODES = {"hospital-a": 11, "hospital-b": 12, "hospital-c": 13}
ROGUE = 99
CARD = 800  # training examples each site's dataset card declared


def _sha(rec: ArrayRecord) -> str:
    return state_dict_sha256(rec.to_torch_state_dict())


def _meta(node: int, kind: str) -> Metadata:
    return Metadata(run_id=1, message_id=f"{kind}-{node}-{time.monotonic_ns()}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id=f"ask-{node}", group_id="1", created_at=time.time(), ttl=3600.0,
                    message_type=kind)


def _train(node: int, arrays: ArrayRecord | None = None, *, site: str | None = None, record: dict | None = None,
           num_examples: float | None = None, refusal: tuple[str, str] | None = None) -> Message:
    content = RecordDict()
    if refusal:
        content[wire.REFUSAL] = wire.refusal_record(*refusal)
    else:
        content[wire.ARRAYS] = arrays
        content[wire.METRICS] = MetricRecord({wire.NUM_EXAMPLES: float(num_examples)})
    if site:
        content[wire.SITE] = wire.site_record(site)
    if record is not None:
        content[wire.LEDGER] = wire.ledger_record(record)
    return Message(content=content, metadata=_meta(node, "train"))


def _evaluate(node: int, site: str, auc: float, n: float = 100.0) -> Message:
    content = RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: n, "val_auc": auc}),
                          wire.SITE: wire.site_record(site)})
    return Message(content=content, metadata=_meta(node, "evaluate"))


class World:
    def __init__(self, root: Path, *, registry: bool = True, card: int | None = CARD) -> None:
        self.keys = root / "consortium" / "keys"
        self.keys.mkdir(parents=True)
        self.guards = {}
        reg = SiteRegistry(self.keys / "registry.json")
        for name in SITES:
            pem = root / name / "site_ed25519.pem"
            (self.keys / f"{name}.pub").write_bytes(ensure_site_key(pem))
            led = SiteLedger(root / name / "ledger.jsonl", site=name, signing_key=load_private_key(pem))
            self.guards[name] = BudgetGuard(led, SitePolicy.from_table({"max_epsilon": 20.0}, "t"), num_patients=400)
            reg.entries[name] = SiteEntry(name, node_id=NODES[name], train_examples=card, train_patients=400)
        if registry:
            reg.save()
        self.trust = SiteTrust(SiteRegistry.load(self.keys))
        self.ledger = ConsortiumLedger(root / "runs" / "run-1", keys_dir=self.keys)

    def book(self, rnd: int = 1) -> RoundBook:
        return RoundBook(rnd, self.ledger, trust=self.trust)

    def signed(self, name: str, update: ArrayRecord, rnd: int = 1, num_examples: int = CARD) -> dict:
        g = self.guards[name]
        res = g.reserve(RoundRequest("run-1", rnd, Mechanism(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.05, steps=10)), weights_in_sha256=_sha(GLOBAL))
        return json.loads(json.dumps(g.complete(res, update_sha256=_sha(update), num_examples=num_examples)))


def _upd(v: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(4, v, np.float32))})


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


# ------------------------------------------------------------------------------------------------ item 4


def test_a_replayed_record_from_a_rogue_node_is_not_taken_as_the_site(world: World) -> None:
    """A rogue ClientApp on a node the SuperLink admitted (not in the registry) ships hospital-a's captured signed
    record and update first: it must not replace hospital-a's contribution."""
    book = world.book()
    honest = _upd(0.1)
    rec = world.signed("hospital-a", honest)
    assert book.admit_train_reply(_train(ROGUE, honest, site="hospital-a", record=rec, num_examples=CARD), GLOBAL) \
        is False
    assert book.sites[f"node-{ROGUE}"].code == "NODE_NOT_ENROLLED"
    assert "hospital-a" not in book.sites  # nothing was filed under the honest site
    assert book.admit_train_reply(_train(NODES["hospital-a"], honest, site="hospital-a", record=rec,
                                         num_examples=CARD), GLOBAL) is True
    assert book.sites["hospital-a"].status == "contributed"


def test_a_registered_node_cannot_speak_as_another_site(world: World) -> None:
    book = world.book()
    upd = _upd(0.1)
    rec = world.signed("hospital-b", upd)
    assert book.admit_train_reply(_train(NODES["hospital-a"], upd, site="hospital-b", record=rec, num_examples=CARD),
                                  GLOBAL) is False
    assert book.sites["hospital-a"].code == "NODE_NOT_SITE"
    assert "hospital-b" not in book.sites and world.ledger.records() == []


def test_a_run_needs_enrolled_keys_except_the_loud_local_demo(tmp_path: Path, caplog) -> None:
    from server.app import check_trust
    from server.settings import RunSettings, SettingsError

    with pytest.raises(SettingsError, match="'keys-dir' is empty.*allow-unverified-demo"):
        check_trust(RunSettings(run_dir=str(tmp_path)))
    with caplog.at_level(logging.WARNING, logger="atoll.server"):
        trust = check_trust(RunSettings(run_dir=str(tmp_path), allow_unverified_demo=True))
    assert trust.verified is False and "UNVERIFIED DEMO RUN" in caplog.text
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "registry.json").write_text('{"v": 1, "sites": {"a": {"node_id": 1}, "b": {"node_id": 1}}}')
    with pytest.raises(SettingsError, match="node id 1 is registered for both 'a' and 'b'"):
        check_trust(RunSettings(run_dir=str(tmp_path), keys_dir=str(keys)))


def test_without_a_registry_the_first_signed_update_binds_the_node(tmp_path: Path) -> None:
    """No node ids known in advance (a local simulation): the node whose update first verified as hospital-a's is
    hospital-a for the rest of the run; another node naming hospital-a is refused, its metrics ignored."""
    w = World(tmp_path, registry=False)
    w.trust = SiteTrust()
    book = w.book()
    upd = _upd(0.1)
    assert book.admit_train_reply(_train(5, upd, site="hospital-a", record=w.signed("hospital-a", upd),
                                         num_examples=CARD), GLOBAL) is True
    upd2 = _upd(0.2)
    book2 = w.book(2)
    rec2 = w.signed("hospital-a", upd2, rnd=2)
    assert book2.admit_train_reply(_train(6, upd2, site="hospital-a", record=rec2, num_examples=CARD), GLOBAL) \
        is False
    assert "already speaks from another node" in book2.sites["node-6"].message
    book2.admit_evaluate_reply(_evaluate(6, "hospital-a", 0.01))
    assert "hospital-a" not in book2.sites or not book2.sites["hospital-a"].val
    assert book2.aggregated_val() == {}


# ------------------------------------------------------------------------------------------------ item 5


def test_num_examples_must_be_the_signed_count_within_the_card(world: World) -> None:
    book = world.book()
    a, b, c = _upd(1.0), _upd(3.0), _upd(100.0)
    assert book.admit_train_reply(_train(11, a, site="hospital-a", record=world.signed("hospital-a", a, num_examples=200),
                                         num_examples=200), GLOBAL)
    assert book.admit_train_reply(_train(12, b, site="hospital-b", record=world.signed("hospital-b", b, num_examples=600),
                                         num_examples=600), GLOBAL)
    # hospital-c claims 1e6 examples in the clear while its signed record says 800
    assert not book.admit_train_reply(_train(13, c, site="hospital-c", record=world.signed("hospital-c", c),
                                             num_examples=1e6), GLOBAL)
    assert book.sites["hospital-c"].code == "NUM_EXAMPLES_REJECTED" and "signed" in book.sites["hospital-c"].message


def test_a_signed_count_above_the_card_is_rejected(world: World) -> None:
    book = world.book()
    c = _upd(100.0)
    rec = world.signed("hospital-c", c, num_examples=10**6)
    assert not book.admit_train_reply(_train(13, c, site="hospital-c", record=rec, num_examples=10**6), GLOBAL)
    assert "more than the 800 training examples the site's dataset card declared" in book.sites["hospital-c"].message


def test_fedavg_weights_by_the_signed_bounded_count_only(world: World, tmp_path: Path) -> None:
    book = world.book()
    replies = []
    for name, v, n in (("hospital-a", 1.0, 200), ("hospital-b", 3.0, 600)):
        u = _upd(v)
        m = _train(NODES[name], u, site=name, record=world.signed(name, u, num_examples=n), num_examples=n)
        assert book.admit_train_reply(m, GLOBAL)
        replies.append(m)
    arrays, _ = FedAvg().aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), (1.0 * 200 + 3.0 * 600) / 800)
    # without a card count to bound it, every site weighs the same
    w2 = World(tmp_path / "nocard", card=None)
    book2 = w2.book()
    replies = []
    for name, v, n in (("hospital-a", 1.0, 200), ("hospital-b", 3.0, 600)):
        u = _upd(v)
        m = _train(NODES[name], u, site=name, record=w2.signed(name, u, num_examples=n), num_examples=n)
        assert book2.admit_train_reply(m, GLOBAL)
        replies.append(m)
    arrays, _ = FedAvg().aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), 2.0)


# ------------------------------------------------------------------------------------------------ item 6


def test_a_rogue_refusal_does_not_merge_into_the_honest_sites_history(world: World) -> None:
    book = world.book()
    c = _upd(0.5)
    assert book.admit_train_reply(_train(13, c, site="hospital-c", record=world.signed("hospital-c", c),
                                         num_examples=CARD), GLOBAL)
    book.admit_train_reply(_train(ROGUE, site="hospital-c", refusal=("BUDGET_EXCEEDED", "site budget exhausted")),
                           GLOBAL)
    entry = book.as_dict()["sites"]
    assert entry["hospital-c"]["status"] == "contributed" and "code" not in entry["hospital-c"]
    assert entry[f"node-{ROGUE}"]["status"] == "refused" and entry[f"node-{ROGUE}"]["claimed_site"] == "hospital-c"


def test_rogue_evaluation_metrics_are_not_averaged(world: World) -> None:
    book = world.book()
    a = _upd(0.5)
    assert book.admit_train_reply(_train(11, a, site="hospital-a", record=world.signed("hospital-a", a),
                                         num_examples=CARD), GLOBAL)
    book.admit_evaluate_reply(_evaluate(11, "hospital-a", 0.8))
    book.admit_evaluate_reply(_evaluate(ROGUE, "hospital-a", 0.0, n=1e6))   # a stranger naming hospital-a
    book.admit_evaluate_reply(_evaluate(12, "hospital-c", 0.0, n=1e6))      # an enrolled node naming another site
    assert book.aggregated_val() == {"val_auc": pytest.approx(0.8)}
    sites = book.as_dict()["sites"]
    assert sites["hospital-a"]["val"]["val_auc"] == 0.8
    assert sites[f"node-{ROGUE}"]["code"] == "NODE_NOT_ENROLLED" and sites[f"node-{ROGUE}"]["val"] == {}
    assert sites["hospital-b"]["val"] == {} and sites["hospital-b"]["claimed_site"] == "hospital-c"


def test_without_a_registry_a_rogue_refusal_first_is_moved_out_when_the_site_proves_itself(tmp_path: Path) -> None:
    """Bound-by-first-signed-update mode, the rogue answers first: its refusal is filed (unverified) under the name
    it claims, then moved to its own node entry once the real hospital-c proves itself with a signed record."""
    w = World(tmp_path, registry=False)
    w.trust = SiteTrust()
    book = w.book()
    book.admit_train_reply(_train(ROGUE, site="hospital-c", refusal=("BUDGET_EXCEEDED", "site budget exhausted")),
                           GLOBAL)
    assert book.as_dict()["sites"]["hospital-c"]["verified"] is False
    c = _upd(0.5)
    assert book.admit_train_reply(_train(7, c, site="hospital-c", record=w.signed("hospital-c", c), num_examples=CARD),
                                  GLOBAL)
    sites = book.as_dict()["sites"]
    assert sites["hospital-c"]["status"] == "contributed" and "verified" not in sites["hospital-c"]
    assert sites[f"node-{ROGUE}"]["status"] == "refused" and sites[f"node-{ROGUE}"]["claimed_site"] == "hospital-c"


def test_register_site_binds_node_ledger_key_and_card(tmp_path: Path) -> None:
    """server.pki.register_site (what `atoll consortium register --keys-dir` calls with Flower's node id)."""
    from server.app import check_trust
    from server.pki import PKIError, register_site
    from server.settings import RunSettings, SettingsError

    keys = tmp_path / "keys"
    pub = tmp_path / "a" / "site_ed25519.pub"
    ensure_site_key(pub.with_suffix(".pem"))
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"split": {"train": {"images": 812, "patients": 400}, "val": {"images": "<10"}}}))
    entry = register_site(keys, "hospital-a", node_id=4711, ledger_key=pub, card=card)
    assert (entry.node_id, entry.train_examples, entry.train_patients) == (4711, 812, 400)
    assert (keys / "hospital-a.pub").read_bytes() == pub.read_bytes()
    other = tmp_path / "b" / "site_ed25519.pub"
    ensure_site_key(other.with_suffix(".pem"))
    with pytest.raises(PKIError, match="node id 4711 is registered for both"):
        register_site(keys, "hospital-b", node_id=4711, ledger_key=other)
    with pytest.raises(PKIError, match="a different public key is already there"):
        register_site(keys, "hospital-a", node_id=4711, ledger_key=other)
    trust = check_trust(RunSettings(run_dir=str(tmp_path), keys_dir=str(keys)))
    assert trust.site_of(4711) == "hospital-a"
    (keys / "hospital-a.pub").write_bytes(other.read_bytes())  # the enrolled key swapped behind the registry
    with pytest.raises(SettingsError, match="registry.json binds site 'hospital-a' to ledger key"):
        check_trust(RunSettings(run_dir=str(tmp_path), keys_dir=str(keys)))
