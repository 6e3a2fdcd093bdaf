"""`bench/paper_table.py`: what each seed's RISE run is configured with; forking a table for a RISE ablation."""

import json
import sys
from pathlib import Path

import pytest
import typer

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from paper_table import fork_table, rise_methods, shaped_by_set, stage_config, stage_key, trainer_overrides  # noqa: E402

sys.path.remove(str(BENCH))


def test_each_seed_starts_imagination_from_its_own_rollouts(tmp_path):
    from services.trainer.config import load_run_config

    given = {"start_data": '["{folder}/rollouts-recap"]', "learner.offline_ratio": "0.1"}
    seeds = [0, 2]
    for seed in seeds:
        folder = tmp_path / stage_key("peg-insert-side", seed, seeds, "")  # the table's own layout
        run = load_run_config(None, {"data": "[]", **trainer_overrides(given, folder)})
        assert run.start_data == [folder / "rollouts-recap"]
        assert run.learner.offline_ratio == 0.1
    assert given["start_data"] == '["{folder}/rollouts-recap"]'  # the table's config keeps the placeholder
    assert trainer_overrides({"x": '{"a": 1}'}, tmp_path) == {"x": '{"a": 1}'}  # other braces are left alone


def test_the_oracle_judge_is_a_rise_run_with_the_simulator_as_world_model_that_a_fork_trains_again():
    cfg = {"methods": ["imitation", "recap", "rise-oracle", "rise-oracle-judge"], "offline_ratios": [0.3]}
    assert rise_methods(cfg) == {"rise-oracle": ("oracle", None), "rise-oracle-judge": ("oracle", None),
                                 "rise-offline30": ("learned", 0.3)}
    assert shaped_by_set("peg-insert-side/rise-oracle-judge") and shaped_by_set("peg-insert-side/eval-rise-oracle-judge")


def test_a_fork_copies_every_stage_but_the_rise_runs_and_moves_their_paths(tmp_path):
    """The stages of a real table (stop 35's seed 2), the folders a table writes; the fork keeps imitation, value,
    labels and RECAP with their files under its own folder, and leaves the RISE run and its evaluation to train again."""
    source, out = tmp_path / "table-a", tmp_path / "table-b"
    text = (BENCH / "paper_table_peg_insert_side_demos_seed2.json").read_text()
    state = json.loads(text.replace("/work/main/runs/table-pis-demos-s2/", f"{source}/"))
    task = source / "peg-insert-side"
    for name in ("data/meta/info.json", "recap/model/weights.safetensors", "store/policy/v0002/manifest.json",
                 "rise-oracle/checkpoint.pt", "eval-recap/episode.json"):
        (task / name).parent.mkdir(parents=True, exist_ok=True)
        (task / name).write_text(name)
    (task / "recap/model/rise-notes.txt").write_text("inside a model: copied whatever its name")
    (source / "state.json").write_text(json.dumps(state))
    cfg = {**state["config"], "set": {**state["config"]["set"], "learner.ema_decay": "0.98"}}
    out.mkdir()
    fork_table(source, out, cfg)

    forked = json.loads((out / "state.json").read_text())
    assert forked["config"] == cfg
    assert [k for k in state if k not in forked] == ["peg-insert-side/rise-oracle", "peg-insert-side/eval-rise-oracle"]
    assert forked["peg-insert-side/recap"]["model"] == str(out / "peg-insert-side/recap/model")
    assert forked["peg-insert-side/eval-recap"]["per_episode"] == state["peg-insert-side/eval-recap"]["per_episode"]
    assert (out / "peg-insert-side/recap/model/rise-notes.txt").exists()
    assert (out / "peg-insert-side/store/policy/v0002/manifest.json").exists()
    assert not (out / "peg-insert-side/rise-oracle").exists()
    assert stage_config(forked["config"]) == stage_config(cfg)  # a resumed fork passes the table's config check


def test_a_fork_refuses_a_table_trained_otherwise(tmp_path):
    source = tmp_path / "table-a"
    source.mkdir()
    state = json.loads((BENCH / "paper_table_peg_insert_side_demos_seed2.json").read_text())
    (source / "state.json").write_text(json.dumps(state))
    with pytest.raises(typer.BadParameter, match="only the RISE runs may differ"):
        fork_table(source, tmp_path / "out", {**state["config"], "recap_steps": 1500})
    with pytest.raises(typer.BadParameter, match="no state.json"):
        fork_table(tmp_path / "nothing", tmp_path / "out", state["config"])
