"""`bench/guidance_gap.py --against`: how far a version's prompted chunks moved from another version's;
`--state-lag`: how far they move when the policy reads an earlier robot state."""

import json
import sys
from pathlib import Path

from typer.testing import CliRunner

from conftest import EMB

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import guidance_gap  # noqa: E402

sys.path.remove(str(BENCH))


def test_shift_from_a_version_is_zero_for_itself_and_measured_for_another(tmp_path):
    """Two tiny flow-matching policies (training seeds 0 and 1) on a real LeRobot dataset."""
    from rise.data.dataset import DatasetWriter
    from rise.registry import Registry
    from services.policy.model import load_model_config
    from services.policy.train import train
    from test_value import synthetic_episode

    data = tmp_path / "data"
    writer = DatasetWriter(data, EMB)
    for i in range(2):
        writer.add(synthetic_episode(bool(i), seed=i))
    writer.finalize()
    registry = Registry(tmp_path / "store")
    for seed in (0, 1):
        train(load_model_config("tiny", {"training.steps": 2, "training.seed": seed}), [data], tmp_path / f"run{seed}",
              registry=registry.root, publish=True, progress=False, log=lambda *a: None)
    out = tmp_path / "gap.json"
    result = CliRunner().invoke(guidance_gap.app, [
        "--store", str(registry.root), "--version", "v0001", "--version", "v0002", "--against", "v0001",
        "--data", str(data), "--frames", "6", "--batch", "4", "--state-lag", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["versions"]["v0001"]["shift_from_v0001"]["mean_abs"] == 0.0  # the same weights, frames and noise
    assert report["versions"]["v0002"]["shift_from_v0001"]["mean_abs"] > 0.0  # other weights (seed 1)
    assert report["noise_spread_v0001"]["mean_abs"] > 0.0  # a flow-matching policy's chunks depend on its noise
    assert report["versions"]["v0002"]["shift_from_v0001"]["frames"] == 6
    assert report["noise_spread_v0001"]["frames"] == 6
    # The states of 3 ticks earlier (the synthetic arm moves every tick) move the chunks; frames at an
    # episode's start read their own state (nothing earlier), so they do not.
    lag = report["versions"]["v0001"]["shift_reading_the_state_3_ticks_earlier"]
    assert lag["frames"] == 6 and lag["mean_abs"] > 0.0
