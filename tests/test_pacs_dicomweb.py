"""`atoll site pull` over DICOMweb (basic auth) against a real Orthanc: incremental, resumable, checked, private."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch
from contract import Mechanism
from flwr.app import ArrayRecord, Context, Message, Metadata, RecordDict

from contract import wire
from atoll.cli import main as atoll_main
from client.ingest import build_site_dataset
from client.pacs.errors import (
    EXIT_AUTH,
    EXIT_INCOMPLETE,
    EXIT_NOTHING_MATCHED,
    EXIT_QUARANTINED,
    EXIT_UNREACHABLE,
    AuthRefused,
    NothingMatched,
    SourceUnreachable,
    TransferIncomplete,
)
from client.pacs.fingerprint import site_dataset_fingerprint
from client.pacs.mirror import Mirror, require_complete_mirror
from client.pacs.pull import pull
from client.pacs.verify import RETRIEVE_FAILED, WRONG_INSTANCE
from client.site_config import load_site_config
from pacs_helpers import (  # noqa: F401 - fixtures
    Counting,
    assert_no_canary,
    dicomweb_site,
    instance,
    load,
    orthanc,
    swap_attachment,
)


def _fingerprint(cfg) -> str:
    return site_dataset_fingerprint(cfg.secret_file, build_site_dataset(cfg).sop_uids)


def test_first_pull_nothing_new_ten_new_and_removal(orthanc, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    sops = load(orthanc, range(12))
    toml = dicomweb_site(tmp_path, orthanc)
    cfg = load_site_config(toml)

    assert atoll_main(["site", "pull", "--config", str(toml)]) == 0
    out = capsys.readouterr()
    assert "12 added, 0 unchanged, 0 quarantined, 0 removed" in out.out
    m = Mirror(cfg.state_dir)
    assert m.files(m.mirror) == set(sops) and not m.files(m.incoming)
    first = _fingerprint(cfg)

    counting = Counting()
    r = pull(cfg, progress=counting)
    assert (r.added, r.unchanged, r.removed, counting.fetched) == (0, 12, 0, 0)  # nothing fetched again
    assert _fingerprint(cfg) == first

    new = load(orthanc, range(12, 22))
    counting = Counting()
    r = pull(cfg, progress=counting)
    assert (r.added, r.unchanged, counting.to_fetch, counting.fetched) == (10, 12, 10, 10)
    after_new = _fingerprint(cfg)
    assert after_new != first

    gone = [sops[0], new[0]]
    for sop in gone:
        orthanc.delete_instance(sop)
    r = pull(cfg)
    assert (r.added, r.unchanged, r.removed) == (0, 20, 2)
    assert not (set(gone) & m.files(m.mirror))
    ds = build_site_dataset(cfg)
    assert len(ds.sop_uids) == 20 and not set(gone) & set(ds.sop_uids)
    assert _fingerprint(cfg) not in (first, after_new)
    assert_no_canary(json.dumps(ds.card) + out.out + out.err + "\n".join(r.getMessage() for r in caplog.records))

    assert atoll_main(["site", "check", "--config", str(toml)]) == 0  # the mirror reads like a folder
    assert_no_canary(capsys.readouterr().out)


def test_interrupted_pull_resumes_without_fetching_again(orthanc, tmp_path):
    load(orthanc, range(9))
    cfg = load_site_config(dicomweb_site(tmp_path, orthanc))

    def interrupt() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pull(cfg, progress=Counting(after=4, action=interrupt))
    m = Mirror(cfg.state_dir)
    assert m.manifest() is None and not m.files(m.mirror), "nothing half-pulled is presented as a dataset"
    staged = len(m.files(m.incoming))
    assert 4 <= staged < 9  # series are fetched a few at a time: those in flight may land too
    assert json.loads(m.last_pull_path.read_text())["exit_code"] == 130

    counting = Counting()
    r = pull(cfg, progress=counting)
    assert (r.added, r.resumed, counting.to_fetch) == (9, staged, 9 - staged)
    assert len(m.files(m.mirror)) == 9 and not m.files(m.incoming)


def test_transfer_cut_mid_series_keeps_the_last_complete_mirror(orthanc, tmp_path):
    load(orthanc, range(6))
    cfg = load_site_config(dicomweb_site(tmp_path, orthanc))
    pull(cfg)
    load(orthanc, range(6, 12, 1), patient=50)  # one new series of 6 instances
    with pytest.raises(TransferIncomplete) as e:
        pull(cfg, progress=Counting(after=2, action=orthanc.stop))  # the PACS goes away mid-series
    assert e.value.exit_code == EXIT_INCOMPLETE and "resumes" in str(e.value) and orthanc.dicomweb in str(e.value)
    manifest = require_complete_mirror(cfg)  # a round would train on the last complete mirror
    assert len(manifest.instances) == 6
    assert len(build_site_dataset(cfg).sop_uids) == 6

    staged = len(Mirror(cfg.state_dir).files(Mirror(cfg.state_dir).incoming))
    assert 2 <= staged < 6
    orthanc.start()  # same storage, same ports
    counting = Counting()
    r = pull(cfg, progress=counting)
    assert (r.added, r.resumed, counting.to_fetch, r.unchanged) == (6, staged, 6 - staged, 6)


def test_server_down_wrong_password_and_empty_query_leave_the_mirror(orthanc, tmp_path):
    load(orthanc, range(3))
    cfg = load_site_config(dicomweb_site(tmp_path, orthanc))
    pull(cfg)

    bad = load_site_config(dicomweb_site(tmp_path / "bad", orthanc, password="wrong")
                           if (tmp_path / "bad").mkdir() is None else None)
    with pytest.raises(AuthRefused) as e:
        pull(bad)
    assert e.value.exit_code == EXIT_AUTH and "HTTP 401" in str(e.value) and "password_file" in str(e.value)

    empty = load_site_config(dicomweb_site(tmp_path / "empty", orthanc, extra='study_date = "19900101-19901231"')
                             if (tmp_path / "empty").mkdir() is None else None)
    with pytest.raises(NothingMatched) as e:
        pull(empty)
    assert e.value.exit_code == EXIT_NOTHING_MATCHED and "19900101-19901231" in str(e.value)

    orthanc.stop()
    with pytest.raises(SourceUnreachable) as e:
        pull(cfg)
    assert e.value.exit_code == EXIT_UNREACHABLE and "cannot connect" in str(e.value)
    assert "\n" not in str(e.value)
    assert len(require_complete_mirror(cfg).instances) == 3  # still trains on what it had


def test_cli_exit_codes_and_messages(orthanc, tmp_path, capsys):
    load(orthanc, range(2))
    toml = dicomweb_site(tmp_path, orthanc, password="wrong")
    assert atoll_main(["site", "pull", "--config", str(toml)]) == EXIT_AUTH
    err = capsys.readouterr().err
    assert err.startswith(f"error: dicomweb source {orthanc.dicomweb}: ") and "no complete mirror yet" in err
    assert "Traceback" not in err


def test_the_query_is_evaluated_by_the_pacs(orthanc, tmp_path):
    load(orthanc, range(3), study_date="20180101")
    load(orthanc, range(3, 6), study_date="20240101")
    load(orthanc, range(6, 9), study_date="20240101", description="ABDOMEN")
    load(orthanc, range(9, 12), study_date="20240101", modality="DX")
    cfg = load_site_config(dicomweb_site(tmp_path, orthanc, extra='study_date = "20200101-"\n'
                                                                   'study_description = "CHEST*"'))
    r = pull(cfg)
    assert r.listed == 3 and r.added == 3


def test_a_mixed_up_object_in_the_archive_is_quarantined(orthanc, tmp_path, capsys):
    sops = load(orthanc, range(6))
    # The PACS's storage area holds another object under sops[1]: one filed in another series (a mixed-up
    # attachment). Orthanc reads the stored header prefix to answer QIDO-RS, so the impostor keeps the layout.
    swap_attachment(orthanc, sops[1], "SeriesInstanceUID")
    toml = dicomweb_site(tmp_path, orthanc)
    cfg = load_site_config(toml)
    code = atoll_main(["site", "pull", "--config", str(toml)])
    out = capsys.readouterr().out
    assert code == EXIT_QUARANTINED
    manifest = Mirror(cfg.state_dir).manifest()
    assert manifest is not None and manifest.quarantined == {sops[1]: manifest.quarantined[sops[1]]}
    # Orthanc lists the impostor's series (read from the stored file) but cannot serve it there: the instance is
    # quarantined as RETRIEVE_FAILED; a server that served it would be caught as WRONG_INSTANCE (see test_pacs_dimse)
    assert manifest.quarantined[sops[1]][0] in (WRONG_INSTANCE, RETRIEVE_FAILED)
    assert set(manifest.instances) == set(sops) - {sops[1]}
    kept = len(list(Mirror(cfg.state_dir).quarantine.glob("*.bin")))  # a received object is kept for the admin
    assert kept == (1 if manifest.quarantined[sops[1]][0] == WRONG_INSTANCE else 0)
    assert "quarantined (" in out and manifest.quarantined[sops[1]][0] in out
    assert set(build_site_dataset(cfg).sop_uids) == set(manifest.instances)


@pytest.mark.slow
def test_a_round_trains_on_the_mirror_and_refuses_without_one(orthanc, tmp_path, caplog):
    """The ClientApp never talks to the PACS: with the PACS down it trains on the mirror; without a mirror it
    refuses with NO_COMPLETE_MIRROR; nothing identifying is in either reply."""
    from atoll.demo import approve_run
    from client.app import train
    from client.runtime import SITE_CONFIG_KEY, site_runtime
    from models import build_model
    from server.settings import RunSettings

    sops = load(orthanc, range(24))
    labels = {s: (i // 3) % 2 for i, s in enumerate(sops)}
    toml = dicomweb_site(tmp_path, orthanc, labels=labels)
    never = dicomweb_site(tmp_path / "never", orthanc, labels=labels) if (tmp_path / "never").mkdir() is None else None
    pull(load_site_config(toml))
    orthanc.stop()

    # q = 0.9: with 8 patients at q = 0.1 both Poisson batches can be empty (a NaN loss the egress guard blocks)
    settings = RunSettings(run_dir=str(tmp_path / "runs"), num_server_rounds=1, mechanism=Mechanism(steps=2, sample_rate=0.9))
    approve_run([toml, never], settings)
    arrays = ArrayRecord(build_model(settings.model, spatial_dims=2, in_channels=1, num_classes=2).state_dict())

    def message() -> Message:
        meta = Metadata(run_id=1, message_id=f"m-{time.time_ns()}", src_node_id=0, dst_node_id=7,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
                        message_type="train")
        return Message(content=RecordDict({wire.ARRAYS: arrays,
                                           wire.CONFIG: settings.round_config("pacs-run", 1).to_record()}),
                       metadata=meta)

    def ctx(path) -> Context:
        return Context(run_id=1, node_id=7, node_config={SITE_CONFIG_KEY: str(path)}, state=RecordDict(),
                       run_config={})

    caplog.set_level(logging.DEBUG)
    reply = train(message(), ctx(toml))
    assert wire.REFUSAL not in reply.content, reply.content
    runtime = site_runtime({SITE_CONFIG_KEY: str(toml)}, settings.task.image_size)
    assert runtime.dataset_fingerprint == site_dataset_fingerprint(runtime.config.secret_file, sops)
    refused = train(message(), ctx(never))
    code, text = wire.refusal_of(refused.content)
    assert code == wire.NO_COMPLETE_MIRROR and "atoll site pull" in text
    for r in (reply, refused):
        blob = repr(dict(r.content.get(wire.METRICS, {}))) + repr(dict(r.content.get(wire.LEDGER, {})))
        blob += repr(dict(r.content.get(wire.REFUSAL, {})))
        assert_no_canary(blob)
        assert str(orthanc.http_port) not in blob and "127.0.0.1" not in blob
    assert_no_canary("\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("atoll", "flwr"))))
