"""`atoll site pull` over DIMSE (C-FIND + C-MOVE to Atoll's storage SCP, or C-GET) against a real Orthanc."""

from __future__ import annotations

import json

import pytest

from atoll.cli import main as atoll_main
from client.ingest import build_site_dataset
from client.pacs.errors import (
    EXIT_INCOMPLETE,
    EXIT_PROTOCOL,
    EXIT_REJECTED,
    EXIT_UNREACHABLE,
    AssociationRejected,
    ProtocolError,
    SourceUnreachable,
    TransferIncomplete,
)
from client.pacs.mirror import Mirror, require_complete_mirror
from client.pacs.pull import pull
from client.pacs.verify import WRONG_INSTANCE
from client.site_config import load_site_config
from pacs_helpers import (  # noqa: F401 - fixtures
    Counting,
    assert_no_canary,
    dimse_site,
    load,
    orthanc,
    orthanc_defaults,
    swap_attachment,
)


def test_c_move_first_pull_nothing_new_new_and_removal(orthanc, tmp_path, capsys):
    sops = load(orthanc, range(9))
    toml = dimse_site(tmp_path, orthanc)
    cfg = load_site_config(toml)
    assert atoll_main(["site", "pull", "--config", str(toml)]) == 0
    out = capsys.readouterr()
    assert "9 added, 0 unchanged, 0 quarantined, 0 removed" in out.out
    counting = Counting()
    r = pull(cfg, progress=counting)
    assert (r.added, r.unchanged, counting.fetched) == (0, 9, 0)
    load(orthanc, range(9, 19))
    r = pull(cfg)
    assert (r.added, r.unchanged) == (10, 9)
    orthanc.delete_instance(sops[4])
    r = pull(cfg)
    assert (r.added, r.unchanged, r.removed) == (0, 18, 1)
    ds = build_site_dataset(cfg)
    assert len(ds.sop_uids) == 18 and sops[4] not in ds.sop_uids
    assert_no_canary(json.dumps(ds.card) + out.out + out.err)


def test_c_get_pull(orthanc, tmp_path):
    sops = load(orthanc, range(6))
    cfg = load_site_config(dimse_site(tmp_path, orthanc, retrieve="get"))
    r = pull(cfg)
    assert (r.added, r.quarantined) == (6, 0)
    assert set(build_site_dataset(cfg).sop_uids) == set(sops)


def test_unknown_calling_ae_is_rejected(orthanc, tmp_path, capsys):
    load(orthanc, range(3))
    toml = dimse_site(tmp_path, orthanc, calling_ae="STRANGER")
    assert atoll_main(["site", "pull", "--config", str(toml)]) == EXIT_REJECTED
    err = capsys.readouterr().err
    assert "rejected the association from calling AE 'STRANGER'" in err and "register calling AE title" in err
    assert len(err.strip().splitlines()) == 2  # the error line and what the site trains on meanwhile


def test_unknown_calling_ae_with_orthancs_packaged_defaults(orthanc_defaults, tmp_path):
    """Orthanc's defaults accept any association but drop a C-FIND from an AE title it does not know."""
    load(orthanc_defaults, range(3))
    cfg = load_site_config(dimse_site(tmp_path, orthanc_defaults, calling_ae="STRANGER"))
    with pytest.raises(AssociationRejected) as e:
        pull(cfg)
    assert e.value.exit_code == EXIT_REJECTED and "calling AE 'STRANGER'" in str(e.value)


def test_move_destination_the_pacs_does_not_know(orthanc, tmp_path):
    load(orthanc, range(3))
    cfg = load_site_config(dimse_site(tmp_path, orthanc, extra='move_ae = "NOTREGISTERED"'))
    with pytest.raises((ProtocolError, AssociationRejected)) as e:
        pull(cfg)
    assert e.value.exit_code in (EXIT_PROTOCOL, EXIT_REJECTED) and "NOTREGISTERED" in str(e.value)
    assert Mirror(cfg.state_dir).manifest() is None


def test_server_down(orthanc, tmp_path):
    load(orthanc, range(3))
    cfg = load_site_config(dimse_site(tmp_path, orthanc))
    pull(cfg)
    orthanc.stop()
    with pytest.raises(SourceUnreachable) as e:
        pull(cfg)
    assert e.value.exit_code == EXIT_UNREACHABLE and f"127.0.0.1:{orthanc.dicom_port}" in str(e.value)
    assert len(require_complete_mirror(cfg).instances) == 3


def test_c_move_delivers_another_object_than_asked(orthanc, tmp_path):
    sops = load(orthanc, range(6))
    impostor = swap_attachment(orthanc, sops[2])  # Orthanc sends another SOP Instance UID for sops[2]
    cfg = load_site_config(dimse_site(tmp_path, orthanc))
    r = pull(cfg)
    assert (r.added, r.quarantined, r.exit_code) == (5, 1, 8)
    manifest = Mirror(cfg.state_dir).manifest()
    assert manifest is not None and manifest.quarantined[sops[2]][0] == WRONG_INSTANCE
    assert impostor not in manifest.instances and sops[2] not in manifest.instances


def test_c_move_that_cannot_send_every_instance_is_incomplete(orthanc, tmp_path):
    """A series the PACS cannot send whole (one stored file is damaged, so its C-STORE sub-operation fails):
    nothing of it is presented as complete; the rest waits in staging for the next pull."""
    sops = load(orthanc, range(6))
    cfg = load_site_config(dimse_site(tmp_path, orthanc))
    orthanc.attachment_path(sops[4]).write_bytes(b"\0" * 64)
    with pytest.raises(TransferIncomplete) as e:
        pull(cfg)
    assert e.value.exit_code == EXIT_INCOMPLETE and "did not arrive" in str(e.value) and "again" in str(e.value)
    m = Mirror(cfg.state_dir)
    assert m.manifest() is None and not m.files(m.mirror)
    assert sops[4] not in m.files(m.incoming) and len(m.files(m.incoming)) >= 2  # its series-mates at least
