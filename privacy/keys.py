"""Site signing keys (Ed25519, via ``cryptography``): create, store, load, identify.

Each hospital signs every ledger record with its own Ed25519 key; the consortium enrolls only the public key
(``keys/<site>.pub``). The private key never leaves the site: it is written PKCS#8 PEM with mode 0600 from the
moment it exists (``os.open(..., 0o600)``, never chmod after the fact), optionally encrypted with a passphrase
(``BestAvailableEncryption``), and refused on load when group/others can read it (as ssh does).

The *key id* is the first 16 hex digits of SHA-256 over the raw 32-byte public key: short enough to print,
long enough that two enrolled keys never collide by chance, and computable from the ``.pub`` file alone.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PASSPHRASE_ENV = "ATOLL_SITE_KEY_PASSPHRASE"


class KeyFileError(ValueError):
    """A key file is missing, unreadable, of the wrong type or too open; the message names the file and the fix."""


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Short stable identifier of a key pair: sha256(raw public key)[:16] in hex."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """SubjectPublicKeyInfo PEM of the (public half of the) key: what the site sends to the consortium."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _env_passphrase(env: str | None = PASSPHRASE_ENV) -> bytes | None:
    value = os.environ.get(env) if env else None
    return value.encode("utf-8") if value else None


def write_private_key(key: Ed25519PrivateKey, path: str | Path, *, passphrase: bytes | None = None) -> Path:
    """Write ``key`` as PKCS#8 PEM, created 0600 with O_EXCL: an existing file is never overwritten.

    Raises :class:`KeyFileError` when the file exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    try:
        write_new_file(path, pem, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path}: already exists; refusing to overwrite a site key (move it away first)") from None
    fsync_dir(path.parent)
    return path


def write_public_key(key: Ed25519PublicKey | Ed25519PrivateKey, path: str | Path) -> Path:
    """Write the public PEM (0644; it is meant to be shared). Overwrites only an identical file."""
    path = Path(path)
    pem = public_key_pem(key)
    if path.exists() and path.read_bytes() != pem:
        raise KeyFileError(f"{path}: a different public key is already there; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pem)
    return path


def load_private_key(path: str | Path, passphrase: bytes | str | None = None, *,
                     passphrase_env: str | None = PASSPHRASE_ENV) -> Ed25519PrivateKey:
    """Load a site's Ed25519 private key (PEM, PKCS#8), decrypting with ``passphrase`` or ``$passphrase_env``.

    Raises :class:`KeyFileError` (naming the file and what to do) when the file is missing, readable by group or
    others, encrypted without a passphrase given, or not an Ed25519 key.
    """
    path = Path(path)
    try:
        st = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: site signing key not found; create one with `atoll site init`") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the site signing key ({exc.strerror})") from None
    if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path}: private key is accessible by group/others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run `chmod 600 {path}`")
    if isinstance(passphrase, str):
        passphrase = passphrase.encode("utf-8")
    if passphrase is None:
        passphrase = _env_passphrase(passphrase_env)
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:
        if passphrase is None:
            raise KeyFileError(f"{path}: the key is encrypted; set ${passphrase_env or PASSPHRASE_ENV} to its passphrase") from None
        raise KeyFileError(f"{path}: a passphrase was given but the key is not encrypted; unset it") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path}: not a readable PEM private key (wrong passphrase or corrupt file)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: expected an Ed25519 key, found {type(key).__name__}; create one with `atoll site init`")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Load an enrolled site public key (SubjectPublicKeyInfo PEM). Raises :class:`KeyFileError`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: public key not found") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read public key ({exc.strerror})") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: expected an Ed25519 public key, found {type(key).__name__}")
    return key


def ensure_site_key(private_key_path: str | Path, passphrase: bytes | str | None = None) -> bytes:
    """Create the site key at ``private_key_path`` if absent (0600), else load it; return its public PEM.

    Also writes the public half next to it (``<stem>.pub``) for the site admin's convenience.
    """
    path = Path(private_key_path)
    if isinstance(passphrase, str):
        passphrase = passphrase.encode("utf-8")
    if path.exists():
        key = load_private_key(path, passphrase)
    else:
        key = generate_private_key()
        write_private_key(key, path, passphrase=passphrase if passphrase is not None else _env_passphrase())
    pub_path = path.with_suffix(".pub")
    if not pub_path.exists():
        write_public_key(key, pub_path)
    return public_key_pem(key)


def write_new_file(path: str | Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (no window with wider permissions), never overwrite, fsync.

    The one way Atoll writes key and certificate files (site keys, node keys, the consortium CA):
    raises :class:`FileExistsError` if ``path`` exists.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, mode)  # the umask may have narrowed it; certificates and public keys stay world-readable


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a single call may write fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: Path) -> None:
    """Make a newly created directory entry durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
