"""`bench/paper_table.py`: what each seed's RISE run is configured with."""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from paper_table import stage_key, trainer_overrides  # noqa: E402

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
