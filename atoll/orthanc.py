"""A private Orthanc (the Debian packages ``orthanc`` + ``orthanc-dicomweb``) for ``atoll demo --pacs`` and the tests.

Each server runs on 127.0.0.1-only HTTP (``RemoteAccessAllowed: false``) with basic auth, free ports, its own
storage folder and config, and is stopped when the ``with`` block ends (even on an error). Nothing here is used by
a site in production: a hospital's PACS is its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import requests

PLUGIN_CANDIDATES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")
INSTALL_HINT = "install it with: sudo apt-get install -y orthanc orthanc-dicomweb"


class OrthancUnavailable(FileNotFoundError):
    """Orthanc or its DICOMweb plugin is not installed (the message says how to install them)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_orthanc() -> tuple[str, str]:
    """Paths of the Orthanc binary and its DICOMweb plugin, or :class:`OrthancUnavailable`."""
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
    if binary is None:
        raise OrthancUnavailable(f"Orthanc is not installed; {INSTALL_HINT}")
    plugin = next((p for p in PLUGIN_CANDIDATES if os.path.exists(p)), None)
    if plugin is None:
        raise OrthancUnavailable(f"the Orthanc DICOMweb plugin is not installed; {INSTALL_HINT}")
    return binary, plugin


@dataclass
class Orthanc:
    """One running Orthanc. ``with Orthanc(folder) as pacs:`` starts it; leaving the block stops it."""

    folder: Path
    username: str = "atoll"
    password: str = "atoll-demo-password"
    aet: str = "ORTHANC"
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # name -> (AET, host, port)
    extra: dict[str, Any] = field(default_factory=dict)  # more Orthanc options (e.g. DicomAlwaysAllowEcho)
    http_port: int = 0
    dicom_port: int = 0
    _proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def storage(self) -> Path:
        return self.folder / "storage"

    def config(self, plugin: str) -> dict[str, Any]:
        return {
            "Name": f"atoll-{self.folder.name}", "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage), "Plugins": [plugin],
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "SaveJobs": False, "StorageCompression": False, "HttpCompressionEnabled": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            **self.extra,
        }

    def start(self, timeout: float = 60.0) -> "Orthanc":
        binary, plugin = find_orthanc()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        self.http_port = self.http_port or free_port()
        self.dicom_port = self.dicom_port or free_port()
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(self.config(plugin), indent=1))
        log = open(self.folder / "orthanc.log", "ab")
        self._proc = subprocess.Popen([binary, str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start (code {self._proc.returncode}); see "
                                   f"{self.folder / 'orthanc.log'}")
            try:
                if self.session().get(f"{self.url}/system", timeout=2).ok and self._dicom_listening():
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout:.0f} s; see {self.folder / 'orthanc.log'}")

    def _dicom_listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after 15 s); safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- REST helpers (loading the demo data, and the tests' view of the server) ----------------------------
    def session(self) -> requests.Session:
        s = requests.Session()
        s.auth = (self.username, self.password)
        return s

    def upload(self, files: Iterable[Path | bytes]) -> dict[str, int]:
        """POST each DICOM file to ``/instances``; returns counts ``{"stored", "rejected"}`` (non-DICOM is rejected)."""
        counts = {"stored": 0, "rejected": 0}
        with self.session() as s:
            for f in files:
                data = f if isinstance(f, bytes) else Path(f).read_bytes()
                r = s.post(f"{self.url}/instances", data=data, timeout=60)
                counts["stored" if r.ok else "rejected"] += 1
        return counts

    def count_instances(self) -> int:
        with self.session() as s:
            return int(s.get(f"{self.url}/statistics", timeout=30).json()["CountInstances"])

    def orthanc_id(self, sop_uid: str) -> str:
        """Orthanc's own id of the instance with this SOP Instance UID."""
        with self.session() as s:
            hits = s.post(f"{self.url}/tools/lookup", data=sop_uid, timeout=30).json()
        ids = [h["ID"] for h in hits if h.get("Type") == "Instance"]
        if not ids:
            raise KeyError("no such instance in this Orthanc")
        return ids[0]

    def delete_instance(self, sop_uid: str) -> None:
        with self.session() as s:
            s.delete(f"{self.url}/instances/{self.orthanc_id(sop_uid)}", timeout=30).raise_for_status()

    def attachment_path(self, sop_uid: str) -> Path:
        """The file in the storage area holding this instance's DICOM bytes (uncompressed storage)."""
        with self.session() as s:
            info = s.get(f"{self.url}/instances/{self.orthanc_id(sop_uid)}/attachments/dicom/info",
                         timeout=30).json()
        uuid = info["Uuid"]
        return self.storage / uuid[0:2] / uuid[2:4] / uuid
