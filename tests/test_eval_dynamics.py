"""`rise eval-dynamics` against a real dynamics server: the oracle (the simulator) is the upper
bound, persistence (the last frame repeated) the floor that ignores actions.

The dataset is collected here: two short noisy-expert handle-press episodes written in-process
with the same code a `rise data collect` worker runs (no spawned worker: faster). The oracle
version returns every 2nd frame of the chunk, which exercises the mapping of imagined frames to
dataset ticks: a wrong mapping could not reproduce the re-rendered frames exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from conftest import EMB, served
from rise.baselines import publish_baseline, publish_oracle_dynamics
from rise.batching import BatchingConfig
from rise.registry import Registry
from rise.serving import ServerConfig
from services.dynamics import evaluate as ev
from services.dynamics.server import DynamicsConfig, start

TASK, STEPS, SAMPLES, SEED = "handle-press", 24, 5, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from rise.data.collect import episode_seed, run_episode
    from rise.data.dataset import DatasetWriter
    from rise.sim.metaworld_sim import MetaWorldSim

    root = tmp_path_factory.mktemp("eval-dynamics") / TASK
    sim = MetaWorldSim(TASK, EMB, max_steps=STEPS)
    writer = DatasetWriter(root, EMB, sim_state_dim=sim.state_size)
    try:
        for i in range(2):
            writer.add(run_episode(sim, episode_seed(0, i), 0.2, 0.0, after_success=STEPS)[0])
    finally:
        writer.finalize()
        sim.close()
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """v0001 persistence ("stable"), v0002 the oracle with frame_stride 2 ("oracle")."""
    registry = Registry(tmp_path_factory.mktemp("eval-dynamics-store") / "store")
    registry.set_alias("dynamics", "stable", publish_baseline(registry, "dynamics", EMB).version)
    registry.set_alias("dynamics", "oracle", publish_oracle_dynamics(registry, EMB, frame_stride=2).version)
    config = DynamicsConfig(registry_root=registry.root, preload=["stable", "oracle"],
                            batching=BatchingConfig(max_batch_size=8, max_wait_ms=5),
                            server=ServerConfig(port=0, log_json=False))
    with served(start, config) as running:
        yield running


@pytest.fixture(scope="module")
def oracle(server, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("oracle-report")
    report = ev.evaluate_dynamics(server.address, [dataset], "all", samples=SAMPLES, version="oracle", seed=SEED,
                                  videos=1, out=out, progress=False)
    return report, out


@pytest.fixture(scope="module")
def persistence(server, dataset, tmp_path_factory) -> tuple[dict, Path]:
    """Through the command line, as a user runs it."""
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so the command is called by its name
    ev.register(app)
    out = tmp_path_factory.mktemp("persistence-report")
    result = CliRunner().invoke(app, ["eval-dynamics", "--dynamics", server.address, "--data", str(dataset),
                                      "--samples", str(SAMPLES), "--seed", str(SEED), "--videos", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "action_sensitive: NO, a shuffled chunk scores as well as the real one" in result.stdout
    return _strict_json(out / "report.json"), out


def _strict_json(path: Path) -> dict:
    def refuse(name):
        raise AssertionError(f"{path} holds {name}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_oracle_follows_actions_and_beats_persistence(oracle):
    report, out = oracle
    summary = _strict_json(out / "report.json")
    assert summary["versions"] == {"v0002": 2} and summary["samples"] == SAMPLES
    assert report.future_frames == EMB.chunk_length // 2 and report.frame_ticks == [2, 4, 6, 8]
    control = summary["controllability"]
    assert control["action_sensitive"] is True
    assert control["epe_anchor_real"] < 0.5 * control["epe_anchor_shuffled"], control
    assert control["paired_difference_ci95"][0] > 0 and control["futures_mean_abs_difference"] > 0
    metrics = summary["metrics"]
    # Against the video-decoded dataset the oracle is near the codec's limit, well above the floor.
    assert metrics["real"]["psnr"]["mean"] > metrics["persistence"]["psnr"]["mean"] + 2, metrics
    assert metrics["real"]["ssim"]["mean"] > metrics["persistence"]["ssim"]["mean"]
    assert metrics["real"]["epe_anchor"]["mean"] < metrics["persistence"]["epe_anchor"]["mean"]
    # Against frames re-rendered losslessly it is exact; the dataset itself is not (lossy video).
    render = summary["vs_render"]
    assert render["imagined"]["psnr"]["mean"] == "inf" and render["imagined"]["ssim"]["mean"] > 0.9999
    assert 25 < render["dataset"]["psnr"]["mean"] < 60 and render["imagined"]["samples"] == SAMPLES
    # The codec's loss is all that separates the oracle from the dataset.
    assert render["dataset"]["psnr"]["mean"] == pytest.approx(metrics["real"]["psnr"]["mean"])
    markdown = (out / "report.md").read_text()
    assert "action_sensitive: yes" in markdown and "videos/sample_000.gif" in markdown


def test_persistence_ignores_actions_and_is_flagged(persistence, oracle):
    summary, _ = persistence
    assert summary["versions"] == {"v0001": 2}
    control = summary["controllability"]
    assert control["action_sensitive"] is False
    assert control["paired_difference_mean"] == 0 and control["identical_futures_fraction"] == 1.0
    metrics = summary["metrics"]
    for metric in ("psnr", "ssim", "epe_step", "epe_anchor"):
        # Served persistence with either chunk equals the floor computed locally.
        assert metrics["real"][metric] == metrics["shuffled"][metric] == metrics["persistence"][metric], metric
    # The same seed draws the same start frames and shuffled chunks, whatever the model.
    def origins(samples):
        return [(s["episode"], s["frame"], s["shuffled_from"]["episode"], s["shuffled_from"]["frame"]) for s in samples]

    where = origins(summary["per_sample"])
    assert where == origins(oracle[0].samples)
    for episode, frame, other_episode, other_frame in where:
        assert 0 <= frame <= STEPS - 1 - EMB.chunk_length
        assert episode != other_episode or abs(frame - other_frame) >= EMB.chunk_length  # never its own chunk
    assert len(set(where)) == SAMPLES  # no start drawn twice
    # The local floor does not depend on the model, only on the ticks compared (the oracle's: 2, 4, 6, 8).
    floor = oracle[0].summary()["metrics"]["persistence"]["ssim"]["per_frame"]
    assert floor == pytest.approx(metrics["persistence"]["ssim"]["per_frame"][1::2])


def test_side_by_side_video_is_readable(oracle):
    import imageio.v3 as iio

    report, out = oracle
    assert report.videos == [str(out / "videos" / "sample_000.gif")]
    frames = iio.imread(report.videos[0], index=None)
    tile = EMB.image_height * ev.VIDEO_SCALE
    # Rows: real, imagined, shuffled; a label margin and the views side by side; the start + 4 imagined frames.
    assert frames.shape[1:] == (3 * tile, 72 + len(EMB.views) * tile, 3) and 2 <= frames.shape[0] <= 5


def test_psnr_is_torchmetrics_over_all_frames():
    import torch
    from torchmetrics.image import PeakSignalNoiseRatio

    rng = np.random.default_rng(0)
    pred = rng.integers(0, 256, (2, 4, 16, 16, 3), dtype=np.uint8)
    target = pred.copy()
    target[0, 1] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # one bad frame, others exact
    mse, ssim = ev._mse_ssim([(pred[0], target[0]), (pred[1], target[1])])
    assert mse.shape == ssim.shape == (2, 4) and (mse[1] == 0).all() and (ssim[1] > 0.9999).all()
    metric = PeakSignalNoiseRatio(data_range=255.0)
    for p, t in zip(pred, target):
        metric.update(torch.from_numpy(p).permute(0, 3, 1, 2).float(), torch.from_numpy(t).permute(0, 3, 1, 2).float())
    assert ev._psnr(mse) == pytest.approx(float(metric.compute()), rel=1e-5)
    assert ev._psnr(mse[1]) == float("inf")


def test_episode_specs():
    assert ev.parse_episodes(None, 4) == ev.parse_episodes("all", 4) == [0, 1, 2, 3]
    assert ev.parse_episodes("0,2-3", 5) == [0, 2, 3] and ev.parse_episodes("last:2", 5) == [3, 4]
    assert ev.parse_episodes([3, 1, 3], 5) == [1, 3]
    with pytest.raises(ValueError, match="out of range"):
        ev.parse_episodes("7", 5)


def test_verdict_tells_ignoring_actions_from_following_them_too_weakly():
    # The small model at 12,000 steps: the paired interval is above 0, the ratio just short of 1.1.
    weak = {"action_sensitive": False, "paired_difference_ci95": [0.034, 0.056], "epe_ratio": 1.0997}
    assert "too weakly" in ev.sensitivity_verdict(weak)
    ignores = {"action_sensitive": False, "paired_difference_ci95": [-0.002, 0.014], "epe_ratio": 1.01}
    assert "ignores the actions" in ev.sensitivity_verdict(ignores)
    assert ev.sensitivity_verdict({**weak, "action_sensitive": True}) == "yes"
    one_sample = {**weak, "paired_difference_ci95": [float("nan"), float("nan")]}
    assert "too few samples" in ev.sensitivity_verdict(one_sample)
