"""bench/round_overhead.py's definitions: the training time of a round is the union of the sites' training
intervals (queued sites add up, parallel ones overlap), the round wall runs from one round's end to the next, and
the timing hook wraps train_local in a fresh process without touching product code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.round_timing import ENV, busy_seconds, read_marks, round_cycles, write_sitecustomize

REPO = Path(__file__).resolve().parents[1]


def test_busy_time_is_the_union_of_the_training_intervals_within_the_window() -> None:
    assert busy_seconds([(0, 4), (4, 6)], 0, 10) == 6        # queued one after another: they add up
    assert busy_seconds([(0, 4), (1, 3), (2, 5)], 0, 10) == 5  # at once: they overlap
    assert busy_seconds([(0, 4), (6, 8)], 1, 7) == 4           # clipped to the round: 3 + 1
    assert busy_seconds([], 0, 10) == 0 and busy_seconds([(11, 12)], 0, 10) == 0


def test_round_cycles_leave_out_round_one_and_measure_between_round_ends(tmp_path: Path) -> None:
    f = tmp_path / "t.jsonl"
    lines = [{"kind": "train", "start": 0.0, "end": 9.0}, {"kind": "round", "t": 10.0},
             {"kind": "train", "start": 11.0, "end": 15.0}, {"kind": "train", "start": 14.0, "end": 17.0},
             {"kind": "round", "t": 20.0}]
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert round_cycles(f) == [{"round": 2, "wall_s": 10.0, "training_s": 6.0, "non_training_share": 0.4,
                                "wall_per_training": 1.6667}]


def test_the_hook_times_train_local_in_a_fresh_process(tmp_path: Path) -> None:
    hook = write_sitecustomize(tmp_path / "hook")
    marks = tmp_path / "marks.jsonl"
    code = ("import torch, privacy.dpsgd as d; from contract import Mechanism\n"
            "from privacy.dpsgd import train_local\n"
            "assert train_local is d.train_local and train_local.__wrapped__\n"
            "class D: images=torch.zeros(4,1,4,4); labels=torch.zeros(4,dtype=torch.int64); "
            "patients=torch.arange(4)\n"
            "train_local(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)), D(), "
            "Mechanism(dp=False, steps=1), lr=0.1, device='cpu')\n")
    env = dict(os.environ, **{ENV: str(marks)},
               PYTHONPATH=os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=tmp_path, timeout=120)
    trains, rounds = read_marks(marks)
    assert len(trains) == 1 and trains[0][1] >= trains[0][0] and rounds == []


def test_the_hook_does_nothing_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.round_timing import install

    monkeypatch.delenv(ENV, raising=False)
    before = list(sys.meta_path)
    install()
    assert sys.meta_path == before


def test_dp_overhead_times_dp_at_stratified_poisson_batches_centred_on_the_expected_one() -> None:
    """bench/dp_overhead.py: the DP step's batch sizes are Binomial(B / Q, Q) quantiles, so the median round is a
    batch of about B (one seeded draw of 3 sizes had put it at 65 for B = 64, and 10 at a mean of 66.1)."""
    from scipy.stats import binom

    from bench.dp_overhead import Q, poisson_batches

    for expected, rounds in ((64, 3), (64, 10), (16, 4), (6, 4)):
        sizes = poisson_batches(expected, rounds)
        assert len(sizes) == rounds and sizes == poisson_batches(expected, rounds)  # seeded
        n = round(expected / Q)
        assert sorted(sizes) == [int(binom.ppf((i + 0.5) / rounds, n, Q)) for i in range(rounds)]
        assert abs(sum(sizes) / rounds - expected) <= 0.1 * expected ** 0.5 + 0.5
    assert sorted(poisson_batches(64, 3))[1] == 64
    assert poisson_batches(64, 10) != sorted(poisson_batches(64, 10))  # shuffled: size not tied to time
