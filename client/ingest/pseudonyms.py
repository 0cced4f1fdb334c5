"""Patient pseudonyms: HMAC-SHA256 of the PatientID under the site secret.

A pseudonym is stable for a site (same secret -> same key, so splits and caches are reproducible) and useless
outside it (without the secret it cannot be linked back to a PatientID, nor matched across hospitals). The raw
PatientID is hashed as soon as the header is read and never stored, logged or cached.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from client.site_config import MIN_SECRET_BYTES, ConfigError, check_secret_file

_DOMAIN_PATIENT = b"atoll/patient/v1\x00"
_DOMAIN_FINGERPRINT = b"atoll/secret-fingerprint/v1"


class Pseudonymizer:
    """Keyed hashing of patient identifiers (domain-separated, so a pseudonym is not reused for anything else)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"pseudonym secret must hold at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret

    @classmethod
    def from_file(cls, path: Path) -> "Pseudonymizer":
        """Load the site secret (surrounding whitespace ignored); a clear ConfigError if missing or weak."""
        check_secret_file(path, where="[site].secret_file")
        try:
            secret = path.read_bytes().strip()
        except OSError as e:
            raise ConfigError(f"[site].secret_file: cannot read {path} ({e.__class__.__name__}); check permissions") from None
        return cls(secret)

    def patient(self, patient_id: str) -> str:
        """Pseudonym (64 hex chars) of a PatientID; leading/trailing spaces (DICOM padding) are ignored."""
        return hmac.new(self._secret, _DOMAIN_PATIENT + patient_id.strip().encode("utf-8"), hashlib.sha256).hexdigest()

    def fingerprint(self) -> str:
        """Short non-secret fingerprint of the key, used to invalidate caches holding pseudonyms when it changes."""
        return hmac.new(self._secret, _DOMAIN_FINGERPRINT, hashlib.sha256).hexdigest()[:16]
