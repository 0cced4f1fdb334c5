"""The SecAgg+ mask generator: a CSPRNG keyed by the whole agreed secret, in place of Flower's.

Flower 1.41's `pseudo_rand_gen` folds the secret to 32 bits for NumPy's Mersenne Twister (issue
#7522). These tests pin down what ours guarantees and show, on Flower's own function, the
collision ours removes.
"""

from __future__ import annotations

import hashlib
import importlib

import numpy as np
import pytest

from atoll import simulation
from scipy.stats import chisquare

from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flwr_prg
from privacy import secagg_prg
from privacy.secagg_prg import check_num_shares, pseudo_rand_gen

KEY = hashlib.sha256(b"atoll test key").digest()          # 32 bytes, like Flower's rd_seed
SHAPES = [(3, 4), (), (7,), (2, 2, 2)]
MOD = 1 << 32                                               # SecAggPlusWorkflow's default modulus_range


def _flip(key: bytes, bit: int) -> bytes:
    b = bytearray(key)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def test_same_signature_and_output_types_as_flowers():
    ours, theirs = pseudo_rand_gen(KEY, MOD, SHAPES), flwr_prg(KEY, MOD, SHAPES)
    assert [a.shape for a in ours] == [a.shape for a in theirs] == [(3, 4), (), (7,), (2, 2, 2)]
    assert [a.dtype for a in ours] == [a.dtype for a in theirs] == [np.int64] * 4
    assert all(((a >= 0) & (a < MOD)).all() for a in ours)


def test_deterministic_for_a_key():
    a, b = pseudo_rand_gen(KEY, MOD, SHAPES), pseudo_rand_gen(bytes(KEY), MOD, SHAPES)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_different_keys_give_unrelated_masks():
    other = hashlib.sha256(b"another key").digest()
    a, b = pseudo_rand_gen(KEY, MOD, [(10_000,)])[0], pseudo_rand_gen(other, MOD, [(10_000,)])[0]
    assert (a == b).mean() < 0.001          # chance agreement is 1/2**32 per element


def test_a_mask_does_not_depend_on_the_other_shapes():
    """Each tensor has its own keystream: changing one layer's shape leaves the others' masks alone."""
    a = pseudo_rand_gen(KEY, MOD, [(5,), (100,), (3, 3)])
    b = pseudo_rand_gen(KEY, MOD, [(5,), (7,), (3, 3)])
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[2], b[2])
    assert np.array_equal(a[1][:7], b[1])           # same stream, prefix
    # ... whereas Flower's single stream shifts every later mask
    fa, fb = flwr_prg(KEY, MOD, [(5,), (100,), (3, 3)]), flwr_prg(KEY, MOD, [(5,), (7,), (3, 3)])
    assert not np.array_equal(fa[2], fb[2])


def test_tensors_with_the_same_shape_get_different_masks():
    a, b = pseudo_rand_gen(KEY, MOD, [(64,), (64,)])
    assert not np.array_equal(a, b)


def test_uniform_chi_square_on_a_small_range():
    values = pseudo_rand_gen(KEY, 10, [(200_000,)])[0]
    counts = np.bincount(values, minlength=10)
    assert counts.size == 10
    assert chisquare(counts).pvalue > 1e-4, counts


def test_uniform_chi_square_on_the_secagg_range():
    values = pseudo_rand_gen(KEY, MOD, [(200_000,)])[0]
    counts, _ = np.histogram(values, bins=64, range=(0, MOD))
    assert chisquare(counts).pvalue > 1e-4, counts


def test_no_modulo_bias_for_a_range_that_does_not_divide_2_64():
    """n = 3 * 2**61: reducing a 64-bit word mod n would put 3/8 of the mass below n/3 instead of 1/3."""
    n = 3 << 61
    values = pseudo_rand_gen(KEY, n, [(200_000,)])[0]
    assert values.min() >= 0 and values.max() < n
    low = float((values < (n // 3)).mean())
    assert abs(low - 1 / 3) < 0.006, low          # 0.375 would be > 30 standard deviations away


def test_every_key_bit_changes_the_masks():
    base = pseudo_rand_gen(KEY, MOD, [(4,)])[0]
    for bit in range(256):
        assert not np.array_equal(pseudo_rand_gen(_flip(KEY, bit), MOD, [(4,)])[0], base), bit


def test_flowers_generator_collides_outside_the_32_folded_bits_and_ours_does_not():
    """Flipping the same bit in two 4-byte words cancels in Flower's XOR fold: same masks, other key."""
    twin = _flip(_flip(KEY, 3), 3 + 32)
    assert twin != KEY
    theirs_a, theirs_b = flwr_prg(KEY, MOD, [(1000,)])[0], flwr_prg(twin, MOD, [(1000,)])[0]
    assert np.array_equal(theirs_a, theirs_b), "Flower's generator sees only 32 bits of the key"
    ours_a, ours_b = pseudo_rand_gen(KEY, MOD, [(1000,)])[0], pseudo_rand_gen(twin, MOD, [(1000,)])[0]
    assert not np.array_equal(ours_a, ours_b)


def test_flowers_generator_has_only_2_32_keys():
    """Any 32-byte key is equivalent to a key that is zero except for its first word."""
    words = [int.from_bytes(KEY[i:i + 4], "little") for i in range(0, 32, 4)]
    fold = 0
    for w in words:
        fold ^= w
    short = fold.to_bytes(4, "little") + bytes(28)
    assert np.array_equal(flwr_prg(KEY, MOD, [(100,)])[0], flwr_prg(short, MOD, [(100,)])[0])
    assert not np.array_equal(pseudo_rand_gen(KEY, MOD, [(100,)])[0], pseudo_rand_gen(short, MOD, [(100,)])[0])


def test_masks_cancel_modulo_the_range():
    """The SecAgg+ invariant: pairwise masks added by one site and subtracted by the other cancel."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 1000, 50), rng.integers(0, 1000, 50)
    mask = pseudo_rand_gen(KEY, MOD, [(50,)])[0]
    masked_x, masked_y = (x + mask) % MOD, (y - mask) % MOD
    assert not np.array_equal(masked_x, x)
    assert np.array_equal((masked_x + masked_y) % MOD, x + y)


@pytest.mark.parametrize("seed", [b"", b"short", bytes(31)])
def test_rejects_secrets_shorter_than_256_bits(seed):
    with pytest.raises(ValueError, match="at least 32 bytes"):
        pseudo_rand_gen(seed, MOD, [(2,)])


@pytest.mark.parametrize("num_range", [0, 1, (1 << 63) + 1])
def test_rejects_ranges_outside_int64(num_range):
    with pytest.raises(ValueError, match="num_range"):
        pseudo_rand_gen(KEY, num_range, [(2,)])


def test_accepts_the_base64_pairwise_keys_flower_derives():
    """Pairwise keys reach the generator as urlsafe-base64 text of a 32-byte ECDH/HKDF key (44 bytes)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key

    a, b = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    k_ab, k_ba = generate_shared_key(a, b.public_key()), generate_shared_key(b, a.public_key())
    assert k_ab == k_ba and len(k_ab) == 44
    assert np.array_equal(pseudo_rand_gen(k_ab, MOD, [(8,)])[0], pseudo_rand_gen(k_ba, MOD, [(8,)])[0])


def test_install_rebinds_flowers_client_mod_and_server_workflow(monkeypatch):
    # `import ... as` would resolve the client module's name to the mod function it re-exports
    mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    workflow = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")

    # monkeypatch restores Flower's originals after the test
    monkeypatch.setattr(mod, "pseudo_rand_gen", mod.pseudo_rand_gen)
    monkeypatch.setattr(workflow, "pseudo_rand_gen", workflow.pseudo_rand_gen)
    assert mod.pseudo_rand_gen is flwr_prg and not secagg_prg.is_installed()
    secagg_prg.install()
    assert mod.pseudo_rand_gen is pseudo_rand_gen and workflow.pseudo_rand_gen is pseudo_rand_gen
    assert secagg_prg.is_installed()


@pytest.mark.parametrize("num_shares", [4, 6, 2])
def test_even_integer_num_shares_is_refused(num_shares):
    with pytest.raises(ValueError, match="num_shares"):
        check_num_shares(num_shares, 2)


@pytest.mark.parametrize("num_shares,threshold", [(3, 2), (5, 3), (1, 1), (0.8, 0.6), (1.0, 0.5)])
def test_safe_secagg_parameters_pass(num_shares, threshold):
    check_num_shares(num_shares, threshold)


@pytest.mark.parametrize("num_shares,threshold", [(3, 3), (0.0, 0.5), (1.5, 0.5), (3, 0), (5, 1.5), ("3", 2)])
def test_inconsistent_secagg_parameters_are_refused(num_shares, threshold):
    with pytest.raises(ValueError):
        check_num_shares(num_shares, threshold)


# -- a legacy SecAgg+ run in Flower's simulation engine, with the patched generator on both ends ---------

N_SITES = 3


def _site_update(pid: int) -> list[np.ndarray]:
    rng = np.random.default_rng(100 + pid)
    return [rng.uniform(-1, 1, (4, 3)).astype(np.float32), rng.uniform(-1, 1, (5,)).astype(np.float32)]


def _site_examples(pid: int) -> int:
    return 10 * (pid + 1)


def _legacy_client_app():
    from flwr.client import ClientApp, NumPyClient

    from privacy.secagg_prg import csprng_secaggplus_mod

    class Site(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def fit(self, parameters, config):
            return _site_update(self.pid), _site_examples(self.pid), {}

    def client_fn(context):
        return Site(int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn, mods=[csprng_secaggplus_mod])


@pytest.mark.slow
def test_secaggplus_run_in_simulation_gives_fedavg_and_the_server_sees_only_masked_vectors(monkeypatch):
    """3 sites, 1 round of legacy SecAgg+ (num_shares=3, threshold=2) through server.secagg (~10 s).

    The aggregate equals plain FedAvg of the sites' updates (up to SecAgg+'s quantisation), which
    can only happen if the sites (Ray workers) masked with the same generator the server unmasked
    with, and the server process runs ours. What the server received from each site is masked: no
    coordinate lies within the stochastic rounding of that site's quantised plain update.
    """
    from flwr.common import bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, parameters_multiply
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.server import ServerApp
    from flwr.server.strategy import FedAvg

    from server.secagg import run_secaggplus

    for name in secagg_prg.PATCH_TARGETS:  # restore Flower's generator in this process afterwards
        module = importlib.import_module(name)
        monkeypatch.setattr(module, "pseudo_rand_gen", module.pseudo_rand_gen)
    held: dict = {"wire": []}

    class Recording:
        def __init__(self, grid) -> None:
            self._grid = grid

        def __getattr__(self, name):
            return getattr(self._grid, name)

        def send_and_receive(self, messages, timeout=None):
            replies = list(self._grid.send_and_receive(messages, timeout=timeout))
            held["wire"].extend(replies)
            return replies

    class KeepAggregate(FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            held["aggregate"] = parameters_to_ndarrays(out[0])
            held["failures"] = list(failures)
            held["installed"] = secagg_prg.is_installed()
            return out

    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context):
        zeros = [np.zeros((4, 3), np.float32), np.zeros(5, np.float32)]
        strategy = KeepAggregate(min_fit_clients=N_SITES, min_available_clients=N_SITES, fraction_evaluate=0.0,
                                 initial_parameters=ndarrays_to_parameters(zeros))
        run_secaggplus(Recording(grid), context, num_rounds=1, strategy=strategy, num_shares=3,
                       reconstruction_threshold=2)

    simulation.run_sites(server_app, _legacy_client_app(), N_SITES)  # fair share of the cores, nice 0

    assert "aggregate" in held, "the SecAgg+ round did not complete"
    assert held["installed"] and held["failures"] == []
    updates = [_site_update(i) for i in range(N_SITES)]
    weights = [_site_examples(i) for i in range(N_SITES)]
    fedavg = [sum(w * u[j] for u, w in zip(updates, weights)) / sum(weights) for j in range(2)]
    for got, want in zip(held["aggregate"], fedavg):
        np.testing.assert_allclose(got, want, atol=1e-3)

    masked = []
    for msg in held["wire"]:
        if not msg.has_error():
            rec = msg.content.config_records.get("secaggplus_configs")
            if rec is not None and "masked_params" in rec:
                masked.append([bytes_to_ndarray(b) for b in rec["masked_params"]])
    assert len(masked) == N_SITES
    # Each site's plain update as SecAgg+ quantises it before masking (max_weight 1000, ranges default).
    plains = []
    for pid in range(N_SITES):
        q_ratio = round(_site_examples(pid) / 1000.0 * 4194304)
        scaled = parameters_multiply(_site_update(pid), q_ratio / 4194304)
        plains.append(factor_combine(q_ratio, quantize(scaled, 8.0, 4194304)))
    for received in masked:
        for plain in plains:
            for r, p in zip(received[1:], plain[1:]):
                assert r.shape == p.shape
                assert not (np.abs(r.astype(np.int64) - p.astype(np.int64)) <= 1).any(), \
                    "a coordinate reached the server unmasked"
