"""A replayed round costs no privacy only when the site sends the very bytes it already released."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, Metadata, RecordDict

from contract import wire
from client.release_cache import ReleaseCache
from models import UPDATE_HASH, build_model, state_dict_digest, state_dict_sha256
from contract import Mechanism
from server.settings import RunSettings


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.zeros(4)}


def test_put_then_get_returns_the_same_bytes(tmp_path: Path) -> None:
    cache = ReleaseCache(tmp_path)
    sha = cache.put(_update(), {"train_loss": 0.5})
    assert sha == state_dict_digest(_update(), UPDATE_HASH)  # what the round record signs as update_sha256
    got = cache.get(sha)
    assert got is not None and state_dict_digest(got.update, UPDATE_HASH) == sha and got.metrics == {"train_loss": 0.5}
    assert cache.get("ab" * 32) is None
    # an entry released before the digest was BLAKE3 is named by its SHA-256 and still resendable
    legacy = state_dict_sha256(_update())
    shutil.copy(cache.root / f"{sha}.pt", cache.root / f"{legacy}.pt")
    assert cache.get(legacy) is not None


def test_a_damaged_or_swapped_entry_is_never_sent(tmp_path: Path) -> None:
    cache = ReleaseCache(tmp_path)
    a, b = cache.put(_update(1), {}), cache.put(_update(2), {})
    (cache.root / f"{a}.pt").write_bytes(b"not a torch file")
    assert cache.get(a) is None
    shutil.copy(cache.root / f"{b}.pt", cache.root / f"{'cd' * 32}.pt")  # right format, wrong name
    assert cache.get("cd" * 32) is None
    with pytest.raises(ValueError, match="64-hex-digit"):
        cache.get("../../etc/passwd")


def test_only_the_newest_entries_are_kept(tmp_path: Path) -> None:
    cache = ReleaseCache(tmp_path, keep=2)
    shas = []
    for i in range(4):
        shas.append(cache.put(_update(i), {}))
        time.sleep(0.01)
    assert [cache.get(s) is not None for s in shas] == [False, False, True, True]


# -- through the ClientApp's train handler ----------------------------------------------------------------


def _train_message(settings: RunSettings, arrays: ArrayRecord, rnd: int = 1) -> Message:
    meta = Metadata(run_id=1, message_id=f"m-{rnd}-{time.time_ns()}", src_node_id=0, dst_node_id=7,
                    reply_to_message_id="", group_id=str(rnd), created_at=time.time(), ttl=3600.0,
                    message_type="train")
    cfg = settings.round_config("replay-run", rnd).to_record()
    return Message(content=RecordDict({wire.ARRAYS: arrays, wire.CONFIG: cfg}), metadata=meta)


@pytest.mark.slow
def test_the_clientapp_answers_a_replayed_round_with_the_same_update_and_no_new_charge(demo_consortium, tmp_path):
    from atoll.demo import approve_run
    from client.app import train
    from client.runtime import SITE_CONFIG_KEY, site_runtime

    site_dir = tmp_path / "hospital-c"
    shutil.copytree(demo_consortium / "hospital-c", site_dir, ignore=shutil.ignore_patterns("state"))
    cfg_path = site_dir / "site.toml"
    settings = RunSettings(run_dir=str(tmp_path / "runs"), num_server_rounds=1, mechanism=Mechanism(steps=2))
    approve_run([cfg_path], settings)
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model(settings.model, spatial_dims=2, in_channels=1, num_classes=2).state_dict())
    ctx = Context(run_id=1, node_id=7, node_config={SITE_CONFIG_KEY: str(cfg_path)}, state=RecordDict(),
                  run_config={})

    first = train(_train_message(settings, arrays), ctx)
    assert wire.REFUSAL not in first.content, first.content
    guard = site_runtime({SITE_CONFIG_KEY: str(cfg_path)}, settings.task.image_size).guard
    spent = guard.spent()
    records = len(guard.ledger.records())

    again = train(_train_message(settings, arrays), ctx)  # the server lost the reply and asks again
    assert wire.REFUSAL not in again.content
    sd1 = first.content[wire.ARRAYS].to_torch_state_dict()
    sd2 = again.content[wire.ARRAYS].to_torch_state_dict()
    assert state_dict_sha256(sd1) == state_dict_sha256(sd2), "the same released bytes, not a new noisy update"
    assert dict(again.content[wire.LEDGER]) == dict(first.content[wire.LEDGER])
    assert len(guard.ledger.records()) == records and guard.spent() == spent

    # under SecAgg+ a second answer (even the same bytes) would let the server subtract two sums: refused
    import dataclasses

    from client import secagg as client_secagg

    masked_settings = dataclasses.replace(settings, secagg=True)
    approve_run([cfg_path], masked_settings)

    def under_secagg(s: RunSettings) -> Message:
        token = client_secagg._MASKING.set(True)  # as inside the SecAgg+ masked-vector stage
        try:
            return train(_train_message(s, arrays), ctx)
        finally:
            client_secagg._MASKING.reset(token)

    assert wire.refusal_of(under_secagg(masked_settings).content)[0] == wire.ROUND_ALREADY_ANSWERED
    # what the site approved decides whether its update may leave in the clear, whatever the server asks
    assert wire.refusal_of(train(_train_message(masked_settings, arrays), ctx).content)[0] == wire.SECAGG_MISMATCH
    assert wire.refusal_of(under_secagg(settings).content)[0] == wire.SECAGG_MISMATCH
    assert len(guard.ledger.records()) == records and guard.spent() == spent

    # with the cached copy gone, the same request is a second release and is charged
    shutil.rmtree(site_dir / "state" / "released")
    third = train(_train_message(settings, arrays), ctx)
    assert wire.REFUSAL not in third.content
    assert guard.spent() > spent
    assert state_dict_sha256(third.content[wire.ARRAYS].to_torch_state_dict()) != state_dict_sha256(sd1)
