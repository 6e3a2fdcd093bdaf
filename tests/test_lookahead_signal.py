"""`bench/lookahead_signal.py`'s test of whether a start's first chunk changes its success: on
outcomes whose answer is known, and on the saved push measurement it was written for."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from lookahead_signal import chunk_effect_test, pool_saved, resummarize  # noqa: E402

sys.path.remove(str(BENCH))


def _outcomes(chunk_spread: float, starts: int = 200, group: int = 4, runs: int = 4, seed: int = 0) -> np.ndarray:
    """success [runs, starts * group]: each start has a success probability, each chunk adds its own
    offset (std `chunk_spread`), and the k-th runs of a start's chunks share most of their noise (as
    the bench's continuations share the policy's noise), which makes them end alike."""
    rng = np.random.default_rng(seed)
    start_p = rng.uniform(0.1, 0.9, size=(1, starts, 1))
    chunk_p = np.clip(start_p + rng.normal(0, chunk_spread, size=(1, starts, group)), 0, 1)
    shared = rng.uniform(size=(runs, starts, 1))
    own = rng.uniform(size=(runs, starts, group))
    draw = np.where(rng.uniform(size=(runs, starts, group)) < 0.8, shared, own)  # 80% of a run's noise is shared
    return (draw < chunk_p).reshape(runs, starts * group)


def test_chunks_worth_the_same_are_not_called_different_despite_shared_noise():
    success = _outcomes(chunk_spread=0.0)
    test = chunk_effect_test(success, group=4, permutations=2000)
    assert test["p_chunk_does_not_matter"] > 0.05, test
    # The binomial figure, which treats the runs as independent, would call them different: shared
    # noise makes a start's chunks end alike, so the right null is far below it.
    rate = success.mean(axis=0).reshape(-1, 4)
    binomial = float((rate.mean(axis=1) * (1 - rate.mean(axis=1)) / 4).mean())
    assert test["null_mean"] < 0.5 * binomial


def test_chunks_that_change_the_outcome_are_found():
    test = chunk_effect_test(_outcomes(chunk_spread=0.15), group=4, permutations=2000)
    assert test["p_chunk_does_not_matter"] < 0.01 and test["excess_over_null"] > 0, test


def test_the_push_measurement_resummarized_from_its_saved_rows(tmp_path):
    for suffix in (".json", ".npz"):
        shutil.copy(BENCH / f"lookahead_signal_push_k4{suffix}", tmp_path / f"push{suffix}")
    recorded = json.loads((tmp_path / "push.json").read_text())
    resummarize(tmp_path / "push.json")
    again = json.loads((tmp_path / "push.json").read_text())
    assert again["by_depth"] == recorded["by_depth"]
    for key in ("success_rate", "groups_mixed", "success_variance_between_a_starts_chunks"):
        assert again["outcomes"][key] == recorded["outcomes"][key]
    assert again["outcomes"]["chunk_effect_permutation"] == recorded["outcomes"]["chunk_effect_permutation"]
    assert (tmp_path / "push.png").stat().st_size > 0


def test_runs_on_other_starts_pool_into_one_summary(tmp_path):
    for name in ("a", "b"):
        for suffix in (".json", ".npz"):
            shutil.copy(BENCH / f"lookahead_signal_push_k4{suffix}", tmp_path / f"{name}{suffix}")
    pool_saved([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "pooled.json")
    one, pooled = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "pooled.json").read_text())
    assert pooled["starts"] == 2 * one["starts"]
    for key in ("success_rate", "success_variance_between_a_starts_chunks"):  # the same rows twice: the same means
        assert pooled["outcomes"][key] == one["outcomes"][key]
    assert pooled["outcomes"]["groups_mixed"] == 2 * one["outcomes"]["groups_mixed"]
