"""SecAgg+ masks from a cryptographic generator, as a drop-in for Flower's `pseudo_rand_gen`.

Why: in Flower 1.41 the SecAgg+ masks (the private mask from each site's 32-byte seed and the
pairwise masks from each ECDH-agreed key) come from
`flwr.common.secure_aggregation.secaggplus_utils.pseudo_rand_gen`, which XOR-folds the key into a
32-bit seed for NumPy's Mersenne Twister (`RandomState`; flwr issue #7522). A server that sees one
site's masked vector can search the 2**32 seeds, and MT19937 is predictable from its output anyway,
so the masks hide nothing from a determined server. Here the agreed secret keys ChaCha20 (through
HKDF-SHA256 with a domain-separation label), so every bit of the secret matters and the masks are
computationally indistinguishable from uniform.

The call signature is Flower's, `pseudo_rand_gen(seed, num_range, dimensions_list)`, so it replaces
the original where Flower looks it up: `install()` rebinds the name in the two modules that import
it (the client mod and the server workflow). Both ends of a run must use it, since the server
removes masks by regenerating them; `csprng_secaggplus_mod` (client side) and
`server.secagg.SecureSecAggPlusWorkflow` (server side) install it in whichever process runs them.

Masks are uniform on [0, num_range) (rejection sampling, no modulo bias). Flower's draws from
[0, num_range - 2]; masks cancel modulo `num_range` either way, so that difference is harmless.
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Callable, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "DOMAIN",
    "MIN_SEED_BYTES",
    "PATCH_TARGETS",
    "check_num_shares",
    "csprng_secaggplus_mod",
    "derive_key",
    "install",
    "is_installed",
    "pseudo_rand_gen",
]

#: HKDF "info" label: keys derived here are never reused for anything else (domain separation).
DOMAIN = b"atoll/secagg+/mask-prg/v1"
#: The secrets Flower passes are a 32-byte random seed or a base64 text of a 32-byte ECDH key.
MIN_SEED_BYTES = 32
#: Modules that bind `pseudo_rand_gen` by name (checked against flwr 1.41.0).
PATCH_TARGETS = (
    "flwr.client.mod.secure_aggregation.secaggplus_mod",
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
)
_U64 = 1 << 64


def derive_key(seed: bytes) -> bytes:
    """The 256-bit ChaCha20 key for a SecAgg+ secret (HKDF-SHA256, info = DOMAIN).

    Every bit of `seed` feeds the key (unlike Flower's 32-bit XOR fold).
    """
    if not isinstance(seed, (bytes, bytearray)):
        raise TypeError(f"seed must be bytes, got {type(seed).__name__}")
    if len(seed) < MIN_SEED_BYTES:
        raise ValueError(f"seed must carry at least {MIN_SEED_BYTES} bytes, got {len(seed)}")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=DOMAIN).derive(bytes(seed))


def _stream(key: bytes, index: int):
    """An independent ChaCha20 keystream for the `index`-th tensor (nonce = index)."""
    # cryptography's 16-byte ChaCha20 nonce: 4-byte block counter (starts at 0) + 12-byte nonce.
    nonce = struct.pack("<IQI", 0, index, 0)
    return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()


def _uniform(encryptor, count: int, num_range: int) -> np.ndarray:
    """`count` integers uniform on [0, num_range) from the keystream, without modulo bias."""
    if count == 0:
        return np.empty(0, dtype=np.int64)
    if num_range & (num_range - 1) == 0:  # a power of two divides 2**64: masking is exact
        words = np.frombuffer(encryptor.update(bytes(8 * count)), dtype="<u8")
        return (words & np.uint64(num_range - 1)).astype(np.int64)
    limit = np.uint64((_U64 // num_range) * num_range)  # largest multiple of num_range <= 2**64
    out = np.empty(count, dtype=np.int64)
    filled = 0
    while filled < count:
        need = count - filled
        draw = need + (need >> 2) + 16  # rejection probability is < num_range / 2**64
        words = np.frombuffer(encryptor.update(bytes(8 * draw)), dtype="<u8")
        kept = words[words < limit][:need] % np.uint64(num_range)
        out[filled:filled + kept.size] = kept.astype(np.int64)
        filled += kept.size
    return out


def pseudo_rand_gen(seed: bytes, num_range: int, dimensions_list: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Masks for SecAgg+: one int64 array per shape, uniform on [0, num_range), keyed by `seed`.

    Parameters
    ----------
    seed : bytes
        The agreed secret (a site's private-mask seed or a pairwise ECDH-derived key), >= 32 bytes.
    num_range : int
        The modulus of the masked arithmetic (SecAgg+ `modulus_range`), 2 <= num_range <= 2**63.
    dimensions_list : list of tuple of int
        Shapes of the masks, in parameter order. `()` gives a 0-d array (as Flower's does).

    Returns
    -------
    list of numpy.ndarray
        int64 arrays. The i-th depends only on (seed, i, its own size): no array's mask shifts
        when another array's shape changes.
    """
    if isinstance(num_range, bool) or not isinstance(num_range, (int, np.integer)):
        raise TypeError(f"num_range must be an int, got {type(num_range).__name__}")
    num_range = int(num_range)
    if not 2 <= num_range <= 1 << 63:
        raise ValueError(f"num_range must be in [2, 2**63] so masks fit int64, got {num_range}")
    key = derive_key(seed)
    masks: list[np.ndarray] = []
    for index, shape in enumerate(dimensions_list):
        shape = tuple(int(d) for d in shape)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        values = _uniform(_stream(key, index), count, num_range)
        masks.append(values.reshape(shape) if shape else np.array(values[0], dtype=np.int64))
    return masks


def install() -> None:
    """Make Flower's SecAgg+ client mod and server workflow use this generator (idempotent).

    Rebinds `pseudo_rand_gen` in each module of PATCH_TARGETS. Raises RuntimeError when a module
    no longer binds that name (a Flower upgrade changed the patch point: re-check, do not guess).
    """
    for name in PATCH_TARGETS:
        module = importlib.import_module(name)
        if not hasattr(module, "pseudo_rand_gen"):
            raise RuntimeError(f"{name} has no 'pseudo_rand_gen' any more; the SecAgg+ mask generator "
                               "patch must be re-checked against this Flower version")
        module.pseudo_rand_gen = pseudo_rand_gen


def is_installed() -> bool:
    """True when every patch target uses this generator."""
    return all(getattr(importlib.import_module(n), "pseudo_rand_gen", None) is pseudo_rand_gen
               for n in PATCH_TARGETS)


def check_num_shares(num_shares: int | float, reconstruction_threshold: int | float) -> None:
    """Reject SecAgg+ parameters that Flower 1.41 accepts but that crash or weaken a run.

    An even integer `num_shares` (other than the number of sampled nodes) makes the server build
    `num_shares + 1` neighbours while the clients cut `num_shares` shares: an IndexError in the
    client's `_share_keys`. Odd integers and fractions are safe (Flower rounds fractions to odd).
    """
    for name, value in (("num_shares", num_shares), ("reconstruction_threshold", reconstruction_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"SecAgg+ {name} must be an int or a float, got {value!r}")
    if isinstance(num_shares, int):
        if num_shares != 1 and num_shares % 2 == 0:
            raise ValueError(f"SecAgg+ num_shares={num_shares} is an even integer, which crashes Flower 1.41 "
                             "clients; use an odd integer (e.g. 3, 5) or a fraction of the sampled sites "
                             "(e.g. 0.8)")
        if num_shares != 1 and num_shares < 3:
            raise ValueError(f"SecAgg+ num_shares={num_shares} must be 1 (all sites), an odd integer >= 3, "
                             "or a fraction in (0, 1]")
    elif not 0 < num_shares <= 1:
        raise ValueError(f"SecAgg+ num_shares={num_shares} as a fraction must be in (0, 1]")
    if isinstance(reconstruction_threshold, int):
        if reconstruction_threshold != 1 and reconstruction_threshold < 2:
            raise ValueError(f"SecAgg+ reconstruction_threshold={reconstruction_threshold} must be >= 2 "
                             "(or 1 for all shares)")
        if isinstance(num_shares, int) and num_shares != 1 and reconstruction_threshold >= num_shares:
            raise ValueError(f"SecAgg+ reconstruction_threshold={reconstruction_threshold} must be less than "
                             f"num_shares={num_shares}")
    elif not 0 < reconstruction_threshold <= 1:
        raise ValueError(f"SecAgg+ reconstruction_threshold={reconstruction_threshold} as a fraction must be "
                         "in (0, 1]")


def csprng_secaggplus_mod(msg, ctxt, call_next: Callable):
    """Flower's `secaggplus_mod` with masks from this module's generator.

    Use in place of `flwr.client.mod.secaggplus_mod` (legacy `ClientApp(client_fn=..., mods=[...])`).
    The patch is installed in the process that runs the ClientApp, right before the mod runs, so
    it holds in simulation workers and `flwr-clientapp` subprocesses alike.
    """
    from flwr.client.mod import secaggplus_mod

    if not is_installed():
        install()
    return secaggplus_mod(msg, ctxt, call_next)
