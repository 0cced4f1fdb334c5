"""DICOMweb transport: QIDO-RS lists the matching series and their instances, WADO-RS retrieves each instance.

Built on dicomweb-client (the library MONAI Deploy and MONAI Label use), over a ``requests`` session that carries
the site's credentials (basic auth or a bearer token), its CA file and a timeout. Instances are retrieved one by
one in their stored transfer syntax (``application/dicom; transfer-syntax=*``): one request per instance keeps the
unit of resumption and of verification the instance, and keep-alive makes it cheap.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from typing import Any, Iterator

import pydicom
import requests
from dicomweb_client import DICOMwebClient

from client.ingest.quarantine import Reason, describe
from client.pacs.errors import AuthRefused, ProtocolError, SourceUnreachable
from client.pacs.source import DicomWebSource, read_credential
from client.pacs.transport import Deliver, Received, RemoteInstance
from client.pacs.verify import RETRIEVE_FAILED

_STUDY, _SERIES, _SOP, _MODALITY = "0020000D", "0020000E", "00080018", "00080060"
_ANY_SYNTAX = (("application/dicom", "*"),)


class _QidoSession(requests.Session):
    """A session with a default timeout that sends QIDO wildcards (``*``, ``?``) unescaped.

    RFC 3986 allows both characters in a query, and some servers match only the raw form: Orthanc 1.10 (Debian 12)
    does not percent-decode query arguments, so ``StudyDescription=CHEST%2A`` would match nothing.
    """

    def __init__(self, timeout: int) -> None:
        super().__init__()
        self._timeout = timeout

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if request.url and "?" in request.url:
            path, query = request.url.split("?", 1)
            request.url = path + "?" + query.replace("%2A", "*").replace("%3F", "?")
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._timeout
        return super().send(request, **kwargs)


def _session(source: DicomWebSource) -> requests.Session:
    s = _QidoSession(source.timeout)
    if source.username and source.password_file:
        s.auth = (source.username, read_credential(source.password_file, what="[data.source].password_file"))
    elif source.token_file:
        s.headers["Authorization"] = "Bearer " + read_credential(source.token_file, what="[data.source].token_file")
    if source.ca_file:
        s.verify = str(source.ca_file)
    return s


def _first(item: dict[str, Any], tag: str) -> str | None:
    """First value of one attribute of a DICOM JSON object (PS3.18 F.2), or None."""
    try:
        v = item[tag]["Value"][0]
    except (KeyError, IndexError, TypeError):
        return None
    return str(v).strip() or None


class DicomWebTransport:
    """One DICOMweb server for the duration of a pull."""

    #: Series fetched at once by the pull (HTTP waits overlap; one client and session per thread).
    workers = 4

    def __init__(self, source: DicomWebSource) -> None:
        self.source = source
        self._name = source.describe()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._quiet = _QuietLoggers()

    def __enter__(self) -> "DicomWebTransport":
        self._quiet.__enter__()
        self.client  # credentials are read (and checked) now, not in a worker thread
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()
        self._quiet.__exit__(*exc)

    @property
    def client(self) -> DICOMwebClient:
        """This thread's client (requests sessions are not meant to be shared between threads)."""
        client = getattr(self._local, "client", None)
        if client is None:
            session = _session(self.source)
            with self._lock:
                self._sessions.append(session)
            client = DICOMwebClient(self.source.url, session=session)
            # Retry only what a busy server answers (429/503/504), briefly: a down server must fail fast.
            client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=500)
            self._local.client = client
        return client

    def list_instances(self) -> list[RemoteInstance]:
        q = self.source.query
        base: dict[str, str] = {}
        if q.study_date:
            base["StudyDate"] = q.study_date
        if q.study_description:
            base["StudyDescription"] = q.study_description
        if q.series_description:
            base["SeriesDescription"] = q.series_description
        out: set[RemoteInstance] = set()
        for modality in q.modalities or (None,):
            # One all-instances search per modality (paged): a PACS with thousands of series answers it in one
            # go, where a search per series would cost a round trip each.
            filters = dict(base, **({"Modality": modality} if modality else {}))
            with self._errors("searching instances (QIDO-RS)"):
                found = self.client.search_for_instances(search_filters=filters, get_remaining=True,
                                                         fields=[_STUDY, _SERIES, _SOP])
            for item in found:
                study, ser, sop = _first(item, _STUDY), _first(item, _SERIES), _first(item, _SOP)
                if study and ser and sop:
                    out.add(RemoteInstance(study, ser, sop))
        return sorted(out)

    def fetch(self, study: str, series: str, sops: list[str], deliver: Deliver) -> None:
        for sop in sops:
            try:
                ds = self.client.retrieve_instance(study, series, sop, media_types=_ANY_SYNTAX)
            except requests.exceptions.HTTPError as e:
                code = e.response.status_code if e.response is not None else 0
                if code == 404 or (code >= 500 and code not in (503, 504)):
                    # Listed but not served (Orthanc: a UID its index does not hold, or a corrupt attachment):
                    # quarantined like a bad file, so one broken object cannot block every pull; asked again
                    # at the next pull.
                    deliver(Received(sop, None, (RETRIEVE_FAILED, f"listed by the PACS, but it could not be "
                                                                  f"retrieved (HTTP {code})")))
                    continue
                with self._errors("retrieving an instance (WADO-RS)"):
                    raise
            except requests.exceptions.RequestException:
                with self._errors("retrieving an instance (WADO-RS)"):
                    raise
            except Exception as e:  # noqa: BLE001 - dicomweb-client parses each part with pydicom
                reason = Reason.NOT_DICOM if isinstance(e, pydicom.errors.InvalidDicomError) else Reason.CORRUPT_HEADER
                deliver(Received(sop, None, (reason.value, describe(e))))
                continue
            buf = io.BytesIO()
            pydicom.dcmwrite(buf, ds, enforce_file_format=True)
            deliver(Received(sop, buf.getvalue()))

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Map ``requests`` failures onto the pull's errors (one line, naming the source and the fix)."""
        try:
            yield
        except requests.exceptions.SSLError:
            raise SourceUnreachable(self._name, f"TLS handshake failed while {doing}",
                                    "set [data.source].ca_file to the CA that signed the PACS certificate") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            what = "timed out" if isinstance(e, requests.exceptions.Timeout) else "cannot connect"
            raise SourceUnreachable(self._name, f"{what} while {doing} (server down, refusing connections or "
                                                "unreachable)", "check that the PACS is running and that "
                                                "[data.source].url is right, then pull again") from None
        except requests.exceptions.HTTPError as e:
            code = e.response.status_code if e.response is not None else 0
            if code in (401, 403):
                raise AuthRefused(self._name, f"the server refused the credentials (HTTP {code}) while {doing}",
                                  "check [data.source].username and the password_file (or token_file), and that "
                                  "this account may read these studies") from None
            if code == 404 and "instance" not in doing:
                raise ProtocolError(self._name, f"no DICOMweb service answers at this URL (HTTP 404) while {doing}",
                                    "set [data.source].url to the DICOMweb root, e.g. https://host/dicom-web") from None
            raise ProtocolError(self._name, f"the server answered HTTP {code} while {doing}",
                                "check the PACS's own log; pull again once it is fixed") from None
        except requests.exceptions.RequestException as e:
            raise ProtocolError(self._name, f"HTTP request failed while {doing} ({type(e).__name__})",
                                "check [data.source].url and the PACS's log") from None


class _QuietLoggers:
    """dicomweb-client and urllib3 log UIDs and URLs at INFO/DEBUG; a pull keeps them at WARNING."""

    NAMES = ("dicomweb_client", "urllib3")

    def __enter__(self) -> None:
        self._levels = {n: logging.getLogger(n).level for n in self.NAMES}
        for n in self.NAMES:
            logging.getLogger(n).setLevel(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        for n, level in self._levels.items():
            logging.getLogger(n).setLevel(level)
