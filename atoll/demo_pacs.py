"""``atoll demo --pacs``: every demo hospital's export is served by its own Orthanc, and the sites pull from it.

For each hospital: start an Orthanc (127.0.0.1, free ports, basic auth, storage in ``DIR/<hospital>/orthanc``, kept
between demo runs so a rerun uploads nothing), load the hospital's export into it (REST upload; the junk files of
the export are refused by Orthanc as they would be by any PACS), write ``DIR/<hospital>/site-pacs.toml`` (the
hospital's ``site.toml`` with a DICOMweb ``[data.source]`` in place of ``dicom_dir``; same state folder, so the
site's lifetime privacy ledger is the same whether it reads the folder or the PACS), and run ``atoll site pull`` on it. The Orthancs are stopped before training starts: the rounds
read the mirrors only, as they must.
"""

from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from atoll.orthanc import Orthanc

log = logging.getLogger("atoll.demo")

PACS_TOML = "site-pacs.toml"


def pacs_site_toml(site_toml: str, url: str, password_file: Path) -> str:
    """The hospital's folder config turned into a PACS config: same site, same state folder (so the same lifetime
    ledger, keys and approvals: the same patients' images, whichever way they arrive), the mirror inside it."""
    text = re.sub(r'(?m)^dicom_dir = .*\n', "", site_toml)
    return text + (f'\n[data.source]                 # the hospital\'s PACS (a local Orthanc in this demo)\n'
                   f'kind = "dicomweb"\nurl = "{url}"\nusername = "atoll"\npassword_file = "{password_file.name}"\n')


def _upload(pacs: Orthanc, files: list[Path], workers: int = 4) -> dict[str, int]:
    chunks = [files[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(pacs.upload, chunks))
    return {k: sum(r[k] for r in results) for k in ("stored", "rejected")}


def serve_and_pull(out: Path, hospitals: list[str]) -> tuple[list[Path], dict[str, float]]:
    """Serve each hospital's export from its own Orthanc, pull every site, stop the Orthancs.

    Returns the PACS site configs (to train with) and the seconds spent (``start``, ``upload``, ``pull``).
    """
    from client.pacs.pull import pull
    from client.site_config import load_site_config

    timing = {"start": 0.0, "upload": 0.0, "pull": 0.0}
    configs: list[Path] = []
    with ExitStack() as stack:
        servers: dict[str, Orthanc] = {}
        t = time.perf_counter()
        for h in hospitals:
            pacs = Orthanc(out / h / "orthanc", password=f"demo-{h}")
            servers[h] = stack.enter_context(pacs)
        timing["start"] = time.perf_counter() - t
        t = time.perf_counter()
        for h, pacs in servers.items():
            files = sorted(p for p in (out / h / "dicom").rglob("*") if p.is_file())
            have = pacs.count_instances()
            if have:
                log.info("%s: its Orthanc already holds %d instances (kept from an earlier demo run)", h, have)
                continue
            counts = _upload(pacs, files)
            log.info("%s: loaded its export into a local Orthanc: %d stored, %d refused by the PACS",
                     h, counts["stored"], counts["rejected"])
        timing["upload"] = time.perf_counter() - t
        t = time.perf_counter()
        for h, pacs in servers.items():
            secret = out / h / "pacs.password"
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(pacs.password + "\n")
            toml = out / h / PACS_TOML
            toml.write_text(pacs_site_toml((out / h / "site.toml").read_text(), pacs.dicomweb, secret))
            result = pull(load_site_config(toml))
            log.info("%s: atoll site pull: %s", h, result.summary().split(": ", 1)[1])
            configs.append(toml)
        timing["pull"] = time.perf_counter() - t
    log.info("PACS servers stopped: training reads the sites' mirrors only (PACS setup %.0f s: start %.0f, "
             "upload %.0f, pull %.0f)", sum(timing.values()), timing["start"], timing["upload"], timing["pull"])
    return configs, timing
