"""DIMSE transport: C-FIND lists what matches (study -> series -> image), C-MOVE or C-GET retrieves it.

Built on pynetdicom. One association serves the whole pull. With ``retrieve = "move"`` Atoll runs its own storage
SCP on ``move_port`` for the duration of the pull (the PACS must know ``move_ae`` at this host and port); with
``retrieve = "get"`` the instances come back on the same association (no inbound port needed). Each C-STORE is
handed to the pull as it arrives, as the bytes the PACS sent (``encoded_dataset``), so nothing is re-encoded.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind as FIND,
    StudyRootQueryRetrieveInformationModelGet as GET,
    StudyRootQueryRetrieveInformationModelMove as MOVE,
)

from client.pacs.errors import (
    AssociationRejected,
    LocalSetupError,
    ProtocolError,
    SourceUnreachable,
    TransferIncomplete,
)
from client.pacs.source import DimseSource
from client.pacs.transport import Deliver, Received, RemoteInstance

_PENDING = (0xFF00, 0xFF01)
_SUCCESS = 0x0000
_WARNING = 0xB000
_MOVE_DESTINATION_UNKNOWN = 0xA801
#: C-GET: the storage classes requested on the association (at most 127 besides the C-GET context itself).
_GET_STORAGE = [
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX presentation / processing
    "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.2.1",  # MG
    "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1",  # CT, enhanced CT
    "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1",  # MR, enhanced MR
    "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1",  # US, US multi-frame
    "1.2.840.10008.5.1.4.1.1.7",  # secondary capture
    "1.2.840.10008.5.1.4.1.1.12.1",  # XA
    "1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.128",  # NM, PET
    "1.2.840.10008.5.1.4.1.1.66.4",  # segmentation
]
_GET_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                 RLELossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEG2000Lossless]


class DimseTransport:
    """One DIMSE peer for the duration of a pull."""

    def __init__(self, source: DimseSource) -> None:
        self.source = source
        self._name = source.describe()
        self._assoc: Association | None = None
        self._scp: Any = None
        self._deliver: Deliver | None = None
        self._lock = threading.Lock()
        self._stored = 0  # C-STOREs received for the current C-MOVE/C-GET
        self._log_level = logging.getLogger("pynetdicom").level

    # ---------------------------------------------------------------------------------------------------------
    def __enter__(self) -> "DimseTransport":
        # pynetdicom logs identifiers at DEBUG and its own wording of failures at ERROR; ours are the messages.
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        self._check_reachable()
        if self.source.retrieve == "move":
            self._start_storage_scp()
        try:
            self._assoc = self._associate()
        except BaseException:
            self._stop_storage_scp()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._assoc is not None and self._assoc.is_established:
                self._assoc.release()
        finally:
            self._stop_storage_scp()
            logging.getLogger("pynetdicom").setLevel(self._log_level)

    def _check_reachable(self) -> None:
        """A TCP connect first: tells "nobody listens" apart from "the PACS said no" (pynetdicom reports both
        as a failed association)."""
        try:
            with socket.create_connection((self.source.host, self.source.port), timeout=self.source.timeout):
                pass
        except OSError as e:
            raise SourceUnreachable(self._name, f"cannot connect ({e.strerror or type(e).__name__}: server down, "
                                                "refusing connections or unreachable)",
                                    "check that the PACS is running and [data.source].host/port, then pull "
                                    "again") from None

    def _start_storage_scp(self) -> None:
        ae = AE(ae_title=self.source.move_ae or self.source.calling_ae)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self._timeouts(ae)
        try:
            self._scp = ae.start_server(("", int(self.source.move_port or 0)), block=False,
                                        evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        except OSError as e:
            raise LocalSetupError(self._name, f"Atoll's storage SCP cannot listen on move_port "
                                              f"{self.source.move_port} ({e.strerror or type(e).__name__})",
                                  "choose a free [data.source].move_port (and register it at the PACS), or use "
                                  "retrieve = \"get\"") from None

    def _stop_storage_scp(self) -> None:
        if self._scp is not None:
            self._scp.shutdown()
            self._scp = None

    def _timeouts(self, ae: AE) -> None:
        t = self.source.timeout
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = t
        ae.connection_timeout = t

    def _associate(self) -> Association:
        s = self.source
        ae = AE(ae_title=s.calling_ae)
        self._timeouts(ae)
        ae.add_requested_context(FIND)
        roles = []
        if s.retrieve == "move":
            ae.add_requested_context(MOVE)
        else:
            ae.add_requested_context(GET)
            for uid in _GET_STORAGE:
                ae.add_requested_context(uid, _GET_SYNTAXES)
                roles.append(build_role(uid, scp_role=True))
        assoc = ae.associate(s.host, s.port, ae_title=s.called_ae, ext_neg=roles or None,
                             evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        if assoc.is_established:
            return assoc
        fix = (f"ask the PACS administrator to register calling AE title {s.calling_ae!r} (this host) as a known "
               f"modality allowed to query and retrieve, or set [data.source].calling_ae to the title it knows; "
               f"check [data.source].called_ae ({s.called_ae!r}) too")
        if assoc.is_rejected:
            prim = assoc.acceptor.primitive
            why = f"{prim.result_str}, {prim.reason_str}" if prim is not None else "no reason given"
            raise AssociationRejected(self._name, f"the PACS rejected the association from calling AE "
                                                  f"{s.calling_ae!r} ({why})", fix)
        raise AssociationRejected(self._name, "the PACS aborted the association request", fix)

    @property
    def assoc(self) -> Association:
        assert self._assoc is not None, "use the transport as a context manager"
        return self._assoc

    # ---------------------------------------------------------------------------------------------------------
    def _find(self, level: str, query: Dataset) -> list[Dataset]:
        query.QueryRetrieveLevel = level
        out: list[Dataset] = []
        for status, ident in self.assoc.send_c_find(query, FIND):
            code = getattr(status, "Status", None)
            if code is None:  # no answer: the association was aborted or timed out
                raise AssociationRejected(
                    self._name, f"the PACS ended the association without answering a {level}-level C-FIND (Orthanc "
                                "does this for a calling AE title it does not know; or the connection dropped)",
                    f"check that the PACS knows calling AE {self.source.calling_ae!r} and lets it query, then pull "
                    "again")
            if code in _PENDING:
                if ident is not None:
                    out.append(ident)
            elif code != _SUCCESS:
                raise ProtocolError(self._name, f"the PACS failed a {level}-level C-FIND (status 0x{code:04X})",
                                    "check the PACS's log; the query keys are in [data.source]")
        return out

    def list_instances(self) -> list[RemoteInstance]:
        q = self.source.query
        mods = q.modalities or (None,)
        studies: set[str] = set()
        for m in mods:
            ds = Dataset()
            ds.StudyInstanceUID = ""
            ds.StudyDate = q.study_date or ""
            if q.study_description:
                ds.StudyDescription = q.study_description
            if m:
                ds.ModalitiesInStudy = m
            studies |= {str(r.StudyInstanceUID) for r in self._find("STUDY", ds) if r.get("StudyInstanceUID")}
        series: set[tuple[str, str]] = set()
        for study in sorted(studies):
            for m in mods:
                ds = Dataset()
                ds.StudyInstanceUID = study
                ds.SeriesInstanceUID = ""
                ds.Modality = m or ""
                if q.series_description:
                    ds.SeriesDescription = q.series_description
                series |= {(study, str(r.SeriesInstanceUID)) for r in self._find("SERIES", ds)
                           if r.get("SeriesInstanceUID")}
        out: list[RemoteInstance] = []
        for study, ser in sorted(series):
            ds = Dataset()
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = ser
            ds.SOPInstanceUID = ""
            out.extend(RemoteInstance(study, ser, str(r.SOPInstanceUID)) for r in self._find("IMAGE", ds)
                       if r.get("SOPInstanceUID"))
        return out

    # ---------------------------------------------------------------------------------------------------------
    def _on_store(self, event: Any) -> int:
        """C-STORE from the PACS (C-MOVE sub-operation on our SCP, or C-GET on our association)."""
        deliver = self._deliver
        if deliver is None:
            return 0xA700  # nothing asked for right now: refuse (out of resources)
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as e:  # noqa: BLE001 - a malformed C-STORE is the PACS's problem, reported as such
            data, err = None, ("CORRUPT_HEADER", f"{type(e).__name__} while encoding the received dataset")
        else:
            err = None
        with self._lock:
            self._stored += 1
            deliver(Received(None, data, err))
        return _SUCCESS

    def fetch(self, study: str, series: str, sops: list[str], deliver: Deliver) -> None:
        ident = Dataset()
        ident.QueryRetrieveLevel = "IMAGE"
        ident.StudyInstanceUID = study
        ident.SeriesInstanceUID = series
        ident.SOPInstanceUID = sops if len(sops) > 1 else sops[0]  # a list of UIDs: one request per series
        self._deliver = deliver
        self._stored = 0
        try:
            if self.source.retrieve == "move":
                dest = self.source.move_ae or self.source.calling_ae
                responses = self.assoc.send_c_move(ident, dest, MOVE)
            else:
                responses = self.assoc.send_c_get(ident, GET)
            self._check_retrieve(responses, len(sops))
        finally:
            with self._lock:
                self._deliver = None

    def _check_retrieve(self, responses: Any, asked: int) -> None:
        op = "C-MOVE" if self.source.retrieve == "move" else "C-GET"
        for status, _ident in responses:
            code = getattr(status, "Status", None)
            if code is None:
                raise TransferIncomplete(self._name, f"the association ended during a {op}",
                                         "run `atoll site pull` again: it resumes where this one stopped")
            if code in _PENDING:
                continue
            if code in (_SUCCESS, _WARNING) or status.get("NumberOfFailedSuboperations") or self._stored:
                # Some sub-operations failed (Orthanc then answers a plain failure status, without counts, once
                # part of the series has arrived): the pull counts what did not arrive and says to pull again.
                return
            if code == _MOVE_DESTINATION_UNKNOWN:
                raise AssociationRejected(self._name, f"the PACS does not know the move destination "
                                                      f"{self.source.move_ae or self.source.calling_ae!r}",
                                          "register it at the PACS with this host and move_port, or use "
                                          "retrieve = \"get\"")
            hint = (f"if the PACS does not know move destination {self.source.move_ae or self.source.calling_ae!r} "
                    f"at this host and port {self.source.move_port}, register it there; else see the PACS's log"
                    if op == "C-MOVE" else "see the PACS's log")
            raise ProtocolError(self._name, f"the PACS failed the {op} of {asked} instance(s) (status 0x{code:04X})",
                                hint)

