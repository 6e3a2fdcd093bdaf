"""`bench/merge_tables.py`: tables run apart (other tasks, other seeds) become one, on the real
state files the success tables were measured with."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from merge_tables import merge_states  # noqa: E402
from paper_table import State, paired_table, pool_curves, stage_key  # noqa: E402

sys.path.remove(str(BENCH))


def _state(name: str) -> dict:
    return json.loads((BENCH / name).read_text())


def _as_seed(state: dict, seed: int) -> dict:
    """The same table as if it had been run with `--seeds <seed>` (a run's keys carry no seed)."""
    return {**state, "config": {**state["config"], "seeds": [seed]}}


def test_tables_of_other_tasks_keep_their_stages():
    pick, peg = _state("paper_table_pick_place_15k.json"), _state("paper_table_peg_insert_side_15k.json")
    merged = merge_states([pick, peg])
    assert {k: v for k, v in merged.items() if k != "config"} == \
        {k: v for s in (pick, peg) for k, v in s.items() if k != "config"}
    assert merged["config"]["seeds"] == [0]


def test_other_seeds_move_under_their_seed_and_pool_in_the_table(tmp_path):
    seed0 = _state("paper_table_push_rollouts.json")
    seed1 = {k: v for k, v in _as_seed(_state("paper_table_push_rise.json"), 1).items()
             if not k.endswith("collect")}
    merged = merge_states([seed0, seed1])
    assert merged["config"]["seeds"] == [0, 1]
    assert merged["push/eval-recap"] == seed0["push/eval-recap"]
    assert merged["push/seed1/eval-recap"] == seed1["push/eval-recap"]
    assert merged["push/collect"] == seed0["push/collect"]
    # methods of both: the rollout methods of seed 0, the RISE runs of seed 1, in the table's order
    assert merged["config"]["methods"] == ["imitation", "recap", "recap-rollouts", "recap-rollouts-outcome",
                                           "recap-continued", "rise", "rise-oracle"]

    files = [tmp_path / "seed0.json", tmp_path / "seed1.json"]
    for path, state in zip(files, (seed0, seed1)):
        path.write_text(json.dumps(state))
    subprocess.run([sys.executable, str(BENCH / "merge_tables.py"), *map(str, files), "--out", str(tmp_path / "m")],
                   check=True, capture_output=True)
    table = json.loads((tmp_path / "m" / "table.json").read_text())["push"]
    recap = seed0["push/eval-recap"]["successes"] + seed1["push/eval-recap"]["successes"]
    assert (table["recap"]["successes"], table["recap"]["episodes"], table["recap"]["seeds"]) == (recap, 100, 2)
    assert table["recap"]["seed_rates"] == [seed0["push/eval-recap"]["successes"] / 50,
                                            seed1["push/eval-recap"]["successes"] / 50]
    assert table["recap-continued"]["episodes"] == 50  # run with seed 0 only
    assert "(seeds: " in (tmp_path / "m" / "table.md").read_text()
    assert (tmp_path / "m" / "success.png").stat().st_size > 0


def test_a_stage_two_tables_hold_is_refused():
    push = _state("paper_table_push_rollouts.json")
    with pytest.raises(ValueError, match="two tables hold push/imitation"):
        merge_states([push, push])


def test_another_config_is_refused_with_the_keys_that_differ():
    push = _state("paper_table_push_rollouts.json")
    other = _as_seed(push, 1)
    other["config"] = {**other["config"], "policy_steps": 3000}
    with pytest.raises(ValueError, match="policy_steps differ"):
        merge_states([push, other])


def test_curves_of_the_seeds_pool_step_by_step():
    merged = _state("paper_table_push_rise_seeds.json")
    curves = [merged[k]["points"] for k in ("push/curve-rise", "push/seed1/curve-rise", "push/seed2/curve-rise")]
    pooled = pool_curves(curves)
    assert [p["learner_step"] for p in pooled] == [p["learner_step"] for p in curves[0]]
    for i, point in enumerate(pooled):
        assert point["successes"] == sum(c[i]["successes"] for c in curves)
        assert (point["episodes"], point["seeds"]) == (60, 3)
    # a step one seed lacks pools the others
    partial = pool_curves([curves[0], curves[1][:-1]])
    assert (partial[-1]["episodes"], partial[-1]["seeds"]) == (20, 1) and partial[0]["episodes"] == 40


def test_the_paired_table_splits_the_layouts_the_seeds_solved_differently(tmp_path):
    path = tmp_path / "state.json"
    path.write_text((BENCH / "paper_table_push_rise_seeds.json").read_text())
    state = State(path)
    seeds = [0, 1, 2]
    table = paired_table(["push"], ["imitation", "recap", "rise", "rise-offline90"], state,
                         lambda task, seed, stage: stage_key(task, seed, seeds, stage), seeds)
    # the last session's count by hand: RECAP alone 13 layouts, RISE alone 4 of 150; offline 0.9 (seeds 1, 2) 6 vs 7
    assert "| push | 13 / 4 (p 0.05) | 6 / 7 (p 1.00) |" in table
    # without RECAP there is nothing to pair with
    assert paired_table(["push"], ["imitation", "rise"], state, lambda *a: "", seeds) == ""
