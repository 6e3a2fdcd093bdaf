"""`rise data collect` end to end: real MetaWorld episodes through the CLI, read back through LeRobot.

handle-press is used because its expert succeeds within ~30-40 steps, so 40-step episodes are
short and, with --seed 13, give one failure (episode 0, which gets a burst of random actions)
and one success (episode 1, stopped 3 steps after it). Those outcomes depend on how
MetaWorldSim.reset draws layouts from a seed; if that changes, pick another seed.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rise.cli import app
from rise.data.collect import episode_seed, run_episode
from rise.data.dataset import DatasetError, DatasetWriter, image_key, open_dataset
from rise.data.loading import TaskBatchSampler, TrainingFrames, episode_sim_states
from rise.embodiment import PRESETS
from rise.sim.metaworld_sim import MetaWorldSim

EMB = PRESETS["metaworld"]
TASK, SEED, MAX_STEPS, AFTER_SUCCESS, NOISE, PERTURB = "handle-press", 13, 40, 3, 0.2, 0.2
# AV1 at CRF 30 on 64x64 frames: mean abs error 3-5 grey levels per frame, measured here.
VIDEO_TOLERANCE = 8.0


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("collect") / "handle-press"
    result = CliRunner().invoke(app, [
        "data", "collect", "--task", TASK, "--episodes", "2", "--workers", "2", "--out", str(out),
        "--seed", str(SEED), "--max-steps", str(MAX_STEPS), "--after-success", str(AFTER_SUCCESS),
        "--noise", str(NOISE), "--perturb-prob", str(PERTURB)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "2 episodes" in result.stdout and "success rate 50%" in result.stdout, result.stdout
    return out


@pytest.fixture(scope="module")
def sim():
    sim = MetaWorldSim(TASK, EMB, max_steps=MAX_STEPS)
    yield sim
    sim.close()


def _episode_rows(dataset, episode: int) -> range:
    row = dataset.meta.episodes[episode]
    return range(row["dataset_from_index"], row["dataset_to_index"])


def test_collected_episodes_match_the_simulator(collected, sim):
    dataset = open_dataset(collected, EMB, return_uint8=True)
    record = json.loads((collected / "meta" / "rise_collect.json").read_text())
    assert dataset.num_episodes == 2 and [e["success"] for e in record["episodes"]] == [False, True]
    assert record["episodes"][0]["perturbation"] is not None and record["episodes"][1]["first_success_step"] == 18
    for episode, info in enumerate(record["episodes"]):
        assert info["seed"] == episode_seed(SEED, episode)
        # Collection is deterministic per seed: rerunning the episode here gives the same data.
        expected, _ = run_episode(sim, info["seed"], NOISE, PERTURB, AFTER_SUCCESS)
        rows = _episode_rows(dataset, episode)
        assert len(rows) == len(expected) == info["length"]
        items = [dataset[i] for i in rows]
        assert items[0]["task"] == "handle press"
        assert all(bool(item["success"]) == expected.success for item in items)
        actions = torch.stack([item["action"] for item in items]).numpy()
        assert actions.dtype == np.float32 and np.array_equal(actions, expected.actions)
        assert np.abs(actions).max() <= 1.0
        states = torch.stack([item["observation.state"] for item in items]).numpy()
        assert np.array_equal(states, expected.states)
        assert np.array_equal(episode_sim_states(collected, episode), expected.sim_states)
        for view in EMB.views:
            frame = items[0][image_key(view)]
            assert frame.shape == (3, EMB.image_height, EMB.image_width) and frame.dtype == torch.uint8
            decoded = torch.stack([item[image_key(view)] for item in items]).permute(0, 2, 3, 1).numpy()
            error = np.abs(decoded.astype(np.int16) - expected.views[view]).mean(axis=(1, 2, 3))
            assert error.max() < VIDEO_TOLERANCE, (view, error.max())
    # The first frame is what a fresh simulator shows after reset(seed).
    first = sim.reset(record["episodes"][0]["seed"])
    decoded = dataset[_episode_rows(dataset, 0)[0]][image_key("corner")].permute(1, 2, 0).numpy()
    assert np.abs(decoded.astype(np.int16) - first.views["corner"]).mean() < VIDEO_TOLERANCE


def test_stored_sim_state_replays_the_episode(collected, sim):
    """Restoring a stored float64 state and stepping the stored actions retraces the episode.

    Not bit for bit: set_state re-solves the contact forces, which moves MuJoCo's solver warm
    start by ~1e-14; over 40 steps states drift by at most ~6e-11 (measured), far below
    anything visible or task-relevant.
    """
    dataset = open_dataset(collected, EMB)
    for episode, start, succeeds in ((0, 10, False), (1, 0, True)):  # 10: mid-episode, arm moving
        actions = np.stack(dataset.hf_dataset.select(_episode_rows(dataset, episode))["action"])
        sim_states = episode_sim_states(collected, episode)
        assert sim_states.dtype == np.float64 and sim_states.shape == (len(actions), sim.state_size)
        frame = sim.set_state(sim_states[start])
        np.testing.assert_allclose(frame.sim_state, sim_states[start], rtol=0, atol=1e-12)
        for t in range(start, len(actions) - 1):
            frame = sim.step(actions[t])
            np.testing.assert_allclose(frame.sim_state, sim_states[t + 1], rtol=0, atol=1e-8)
        # The last stored frame precedes the last step, which can be the one that succeeds.
        frame = sim.step(actions[-1])
        assert frame.success is succeeds


def test_collect_refuses_bad_arguments(collected, tmp_path):
    runner = CliRunner()
    again = runner.invoke(app, ["data", "collect", "--task", TASK, "--episodes", "1", "--out", str(collected)])
    assert again.exit_code != 0 and "already exists" in str(again.exception)
    unknown = runner.invoke(app, ["data", "collect", "--task", "juggle", "--episodes", "1", "--out", str(tmp_path / "x")])
    assert unknown.exit_code != 0 and "unknown MetaWorld task 'juggle'" in str(unknown.exception)
    assert not (tmp_path / "x").exists()


def test_missing_and_corrupt_datasets_give_clear_errors(collected, tmp_path):
    with pytest.raises(DatasetError, match="no LeRobot dataset at"):
        open_dataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="no LeRobot dataset at"):
        TrainingFrames([collected, tmp_path / "nowhere"], EMB)

    garbled = tmp_path / "garbled"
    shutil.copytree(collected, garbled)
    info = garbled / "meta" / "info.json"
    info.write_text(info.read_text()[:200])
    with pytest.raises(DatasetError, match="cannot open the LeRobot dataset"):
        open_dataset(garbled)

    no_data = tmp_path / "no-data"
    shutil.copytree(collected, no_data)
    for parquet in (no_data / "data").rglob("*.parquet"):
        parquet.unlink()
    with pytest.raises(DatasetError, match="cannot open the LeRobot dataset"):
        open_dataset(no_data)
    with pytest.raises(DatasetError, match="no frames for episode 0|cannot read simulator states"):
        episode_sim_states(no_data, 0)


def _small_dataset(root: Path, task: str, episodes: int, steps: int) -> None:
    """A second task's dataset, written in-process (same code path as a worker, no spawn)."""
    sim = MetaWorldSim(task, EMB, max_steps=steps)
    writer = DatasetWriter(root, EMB, sim_state_dim=sim.state_size)
    for i in range(episodes):
        writer.add(run_episode(sim, episode_seed(0, i), NOISE, 0.0, AFTER_SUCCESS)[0])
    writer.finalize()
    sim.close()


def test_loader_and_task_centric_batches(collected, tmp_path):
    other = tmp_path / "plate-slide"
    _small_dataset(other, "plate-slide", episodes=2, steps=12)
    frames = TrainingFrames([collected, other], EMB, history=3)
    first = open_dataset(collected)
    assert len(frames) == first.num_frames + 24 and frames.tasks == ["handle press", "plate slide"]

    sample = frames[0]  # the first frame of the first episode
    for view in EMB.views:
        assert sample["views"][view].shape == (3, EMB.image_height, EMB.image_width, 3)
        assert sample["views"][view].dtype == torch.uint8
    assert sample["views_is_pad"].tolist() == [True, True, False]
    assert sample["state"].shape == (EMB.state_dim,) and sample["action"].shape == (EMB.chunk_length, EMB.action_dim)
    assert not sample["action_is_pad"].any() and float(sample["progress"]) == 0.0
    assert sample["task"] == "handle press" and bool(sample["success"]) is False

    last = frames[len(frames) - 1]  # the last frame of plate-slide's last episode
    assert last["task"] == "plate slide" and bool(last["success"]) is False and int(last["dataset_index"]) == 1
    assert float(last["progress"]) == 1.0 and last["action_is_pad"].tolist() == [False] + [True] * 7
    assert not last["views_is_pad"].any()
    floats = TrainingFrames(other, EMB, float_images=True)[5]["views"]["corner"]
    assert floats.shape == (1, 64, 64, 3) and floats.dtype == torch.float32 and 0 <= floats.min() <= floats.max() <= 1

    sampler = TaskBatchSampler(frames, tasks_per_batch=2, samples_per_task=4, num_batches=3, seed=0)
    batches = list(sampler)
    assert len(batches) == 3
    for batch in batches:
        tasks = [frames.tasks[frames.frame_task_ids[i]] for i in batch]
        assert sorted(tasks) == ["handle press"] * 4 + ["plate slide"] * 4
    loader = torch.utils.data.DataLoader(frames, batch_sampler=TaskBatchSampler(frames, 1, 4, num_batches=1))
    batch = next(iter(loader))
    assert batch["views"]["gripperPOV"].shape == (4, 3, 64, 64, 3) and len(set(batch["task"])) == 1
    assert batch["action"].shape == (4, EMB.chunk_length, EMB.action_dim)
    with pytest.raises(ValueError, match="hold 2 task"):
        TaskBatchSampler(frames, tasks_per_batch=3)


def test_offset_noise_holds_one_offset_per_block():
    """`--offset-noise`: the executed action is the expert's plus one offset per 8-step block (where
    clipping leaves it alone), and episodes without offsets stay exactly as before."""
    from rise.sim.metaworld_sim import expert_policy

    quiet = MetaWorldSim(TASK, EMB, max_steps=MAX_STEPS, render=False)
    try:
        seed = episode_seed(SEED, 1)
        plain, _ = run_episode(quiet, seed, NOISE, 0.0, MAX_STEPS)
        assert np.array_equal(plain.actions, run_episode(quiet, seed, NOISE, 0.0, MAX_STEPS, offset_noise=0.0)[0].actions)
        episode, _ = run_episode(quiet, seed, 0.0, 0.0, MAX_STEPS, offset_noise=0.3, offset_every=8)
        # Replay the recorded actions and ask the (deterministic) expert what it would have done.
        expert, frame, residuals = expert_policy(quiet.task), quiet.reset(seed), []
        for action in episode.actions:
            wanted = np.asarray(expert.get_action(frame.raw_obs), np.float32)
            residuals.append(np.where(np.abs(action) < 0.999, action - wanted, np.nan))
            frame = quiet.step(action)
    finally:
        quiet.close()
    blocks = [np.array(residuals[i:i + 8]) for i in range(0, len(residuals), 8)]
    offsets = []
    for block in blocks:
        for dim in range(4):
            values = block[:, dim][~np.isnan(block[:, dim])]
            if len(values) >= 2:
                assert np.ptp(values) < 1e-5, (dim, values)  # one offset for the whole block
                offsets.append(values[0])
    assert len(offsets) >= 8 and np.std(offsets) > 0.1  # and a different one per block


@pytest.mark.skipif(os.geteuid() != 0, reason="SVT-AV1 raises the encoding thread's priority only for root")
def test_writing_a_dataset_keeps_the_thread_scheduling(tmp_path, sim):
    """SVT-AV1 puts the thread that encodes under SCHED_FIFO 99 as root and leaves it there (threads
    started meanwhile inherit it); a process that wrote a dataset must not starve the machine."""
    def real_time_threads() -> list[int]:
        return [int(t) for t in os.listdir("/proc/self/task")
                if os.sched_getscheduler(int(t)) in (os.SCHED_FIFO, os.SCHED_RR)]

    assert real_time_threads() == []
    writer = DatasetWriter(tmp_path / "d", EMB, sim_state_dim=sim.state_size)
    writer.add(run_episode(sim, episode_seed(0, 0), NOISE, 0.0, AFTER_SUCCESS)[0])
    writer.finalize()
    assert real_time_threads() == []  # the caller and the threads started while it encoded
    started = []  # and a thread the caller starts afterwards (glibc hands down what SVT set)
    thread = threading.Thread(target=lambda: started.append(os.sched_getscheduler(0)))
    thread.start()
    thread.join()
    assert started == [os.SCHED_OTHER]
