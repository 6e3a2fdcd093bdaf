"""`bench/judge_planning.py`: the judge's picks executed in the simulator, through real policy,
value and oracle dynamics servers on 127.0.0.1 (untrained baseline models: the wiring is tested,
not the models)."""

import json
import subprocess
import sys
from pathlib import Path

from rise.baselines import publish_baseline
from rise.embodiment import PRESETS
from rise.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


def baseline_store(tmp_path: Path) -> Registry:
    """A store with the untrained linear policy and value as `stable` (the oracle dynamics is published by the bench)."""
    registry = Registry(tmp_path / "store")
    for model in ("policy", "value"):
        publish_baseline(registry, model, PRESETS["metaworld"], seed=0)
        registry.set_alias(model, "stable", "v0001")
    return registry


def test_best_of_g_runs_every_episode_to_its_end_and_the_oracle_showed_what_was_executed(tmp_path):
    registry = baseline_store(tmp_path)
    out = tmp_path / "planning.json"
    run = [sys.executable, str(ROOT / "bench" / "judge_planning.py"), "--store", str(registry.root), "--task", "push",
           "--groups", "1,2", "--episodes", "2", "--max-steps", "16", "--out", str(out)]
    subprocess.run(run, check=True, cwd=ROOT, timeout=600)
    result = json.loads(out.read_text())
    alone, best = result["arms"]["1"], result["arms"]["2"]
    for arm in (alone, best):
        assert [e["steps"] for e in arm["per_episode"]] == [16, 16]  # untrained: no success, to the step limit
        assert arm["decisions"] == 2 * 2  # 16 steps, chunks of 8
    assert alone["picked_position_counts"] is None
    assert sum(best["picked_position_counts"]) == best["decisions"]
    matched, judged = best["oracle_end_state_matches_executed"]
    assert judged > 0 and matched == judged  # what the judge scored is what the robot then did
    assert result["paired_with_policy_alone"]["2"] == {"only_first": 0, "only_second": 0, "p": 1.0}
    assert (tmp_path / "planning.png").stat().st_size > 0
    # Resumed with the same config: nothing runs again; with another config: refused, nothing lost.
    subprocess.run(run, check=True, cwd=ROOT, timeout=600)
    assert json.loads(out.read_text())["arms"] == result["arms"]
    refused = subprocess.run(run[:-4] + ["--max-steps", "24", "--out", str(out)], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert refused.returncode != 0 and "another config" in refused.stderr
    assert json.loads(out.read_text())["arms"] == result["arms"]
    # Two runs of one task pool into one: episodes and discordant pairs add up, the sign test is on the sums.
    pooled_out = tmp_path / "pooled.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "judge_planning.py"), "--pool", str(out), "--pool", str(out),
                    "--out", str(pooled_out)], check=True, cwd=ROOT, timeout=600)
    pooled = json.loads(pooled_out.read_text())["push"]
    assert pooled["runs"] == [str(out), str(out)]
    assert pooled["arms"]["2"]["episodes"] == 4 and pooled["arms"]["2"]["successes"] == 2 * best["successes"]
    assert pooled["arms"]["2"]["sign_test_p"] == 1.0
    assert (tmp_path / "pooled.png").stat().st_size > 0


def test_the_oracle_judge_picks_by_the_simulators_reward(tmp_path):
    registry = baseline_store(tmp_path)
    out = tmp_path / "planning.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "judge_planning.py"), "--store", str(registry.root), "--task",
                    "push", "--value", "oracle", "--groups", "2", "--episodes", "1", "--max-steps", "16", "--out", str(out)],
                   check=True, cwd=ROOT, timeout=600)
    result = json.loads(out.read_text())
    assert registry.manifest("value", result["config"]["versions"]["value"]).kind == "oracle"
    best = result["arms"]["2"]
    assert best["decisions"] == 2 and sum(best["picked_position_counts"]) == 2
    matched, judged = best["oracle_end_state_matches_executed"]
    assert matched == judged > 0
