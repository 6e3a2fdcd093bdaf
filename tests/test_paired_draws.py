"""`bench/paired_draws.py`: two policies' evaluations pooled over draws, from the committed raw files."""

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from paired_draws import app, per_episode  # noqa: E402

sys.path.remove(str(BENCH))


def test_pools_table_and_judge_draws_as_results_md_reports():
    table = f"{BENCH}/paper_table_peg_insert_side_onpolicy_seed{{}}.json"
    judge = f"{BENCH}/judge_planning_onpolicy_peg_insert_side_s{{}}_{{}}_seed{{}}.json"
    pairs = []
    for s in (0, 1):
        pairs.append(f"seed {s}={table.format(s)}:peg-insert-side/eval-recap,{table.format(s)}:peg-insert-side/eval-rise-oracle")
        pairs += [f"seed {s}={judge.format(s, 'recap', k)},{judge.format(s, 'rise', k)}" for k in (1, 2)]
    result = CliRunner().invoke(app, ["--names", "RECAP,RISE", *pairs])
    assert result.exit_code == 0, result.output
    rows = {line.split(" | ")[0].strip("| *"): line for line in result.output.splitlines()}
    # the figures of RESULTS.md's "RISE from the policy's own states" section, computed there by hand
    assert "(9/50)" in rows["seed 0, draw 1"] and "(11/50)" in rows["seed 0, draw 1"]
    assert "1 / 16 (0.00027)" in rows["seed 1, draw 3"]
    assert "(47/150)" in rows["seed 1, 3 draws"] and "13 / 32" in rows["seed 1, 3 draws"]
    assert "(65/300)" in rows["all, 6 draws"] and "(88/300)" in rows["all, 6 draws"] and "19 / 42 (0.0044)" in rows["all, 6 draws"]


def test_a_source_that_names_no_evaluation_is_a_clear_error(tmp_path):
    table = BENCH / "paper_table_peg_insert_side_onpolicy_seed0.json"
    with pytest.raises(ValueError, match="name a stage of peg-insert-side/eval-imitation"):
        per_episode(f"{table}:peg-insert-side/eval-nothing")
    two_arms = tmp_path / "judge.json"
    two_arms.write_text(json.dumps({"arms": {"1": {"per_episode": []}, "4": {"per_episode": []}}}))
    with pytest.raises(ValueError, match=r"has arms \['1', '4'\]: name one"):
        per_episode(str(two_arms))
    assert per_episode(f"{two_arms}:4") == []
    result = CliRunner().invoke(app, [f"{table}"])
    words = " ".join(result.output.replace("│", " ").split())  # the error box wraps the message
    assert result.exit_code != 0 and "expected GROUP=SOURCE_A,SOURCE_B" in words
