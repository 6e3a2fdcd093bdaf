"""The trainer (services/trainer): RL in imagination through real services on 127.0.0.1 and a
real Redis. Models are small real ones: a tiny flow-matching policy trained for a few steps,
the linear value baseline, the persistence dynamics baseline; the data is a synthetic LeRobot
dataset written by `lerobot` (no simulator, to stay fast), except the gate which runs MetaWorld.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import EMB
from rise.registry import Registry

TASK = "reach"  # the dataset's task text is MetaWorld's, so the gate can evaluate it
REDIS_URL = os.environ.get("RISE_TEST_REDIS", "redis://127.0.0.1:6379/13")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two torch threads on two shared cores can be 100x slower than one (measured here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A dataset and a registry: tiny policy (stable), linear value, persistence dynamics."""
    from rise.baselines import publish_baseline
    from rise.data.dataset import DatasetWriter, Episode
    from services.policy.model import load_model_config
    from services.policy.train import train

    folder = tmp_path_factory.mktemp("trainer")
    writer = DatasetWriter(folder / "data", EMB)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        n = 24
        views = {v: rng.integers(0, 256, (n, EMB.image_height, EMB.image_width, 3), dtype=np.uint8) for v in EMB.views}
        actions = rng.uniform(-1, 1, (n, EMB.action_dim)).astype(np.float32)
        writer.add(Episode(views=views, states=rng.normal(size=(n, EMB.state_dim)).astype(np.float32) * 0.1,
                           actions=actions, task=TASK, success=bool(seed % 2)))
    writer.finalize()
    registry = Registry(folder / "store")
    summary = train(load_model_config("tiny", {"training.steps": 4, "training.batch_size": 8}), [folder / "data"],
                    folder / "policy-run", registry=registry.root, publish=True, progress=False, log=lambda *a: None)
    registry.set_alias("policy", "stable", summary["version"])
    for model in ("value", "dynamics"):
        registry.set_alias(model, "stable", publish_baseline(registry, model, EMB).version)
    return folder, registry


class Services:
    """policy, value and dynamics services on an event loop in a background thread."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running = {name: self.start(name, 0) for name in ("policy", "value", "dynamics")}

    def start(self, name: str, port: int):
        from rise.serving import ServerConfig
        from rise.services import service

        config_cls, start = service(name)
        config = config_cls(registry_root=self.registry.root, torch_threads=1, server=ServerConfig(port=port, log_json=False))
        return asyncio.run_coroutine_threadsafe(start(config), self.loop).result(120)

    def stop(self, name: str) -> None:
        asyncio.run_coroutine_threadsafe(self.running[name].stop(0), self.loop).result(30)

    def url(self, name: str) -> str:
        return f"grpc://{self.running[name].address}"

    def close(self) -> None:
        for name in self.running:
            self.stop(name)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def services(store):
    running = Services(store[1])
    yield running
    running.close()


def _config(store, services, run_dir: Path, **overrides):
    from services.trainer.config import load_run_config

    folder, registry = store
    base = {"out": str(run_dir), "registry_root": str(registry.root), "data": json.dumps([str(folder / "data")]),
            "services.policy": services.url("policy"), "services.value": services.url("value"),
            "services.dynamics": services.url("dynamics"), "services.retry_backoff_s": "0.2",
            "replay.url": REDIS_URL, "replay.stream": f"rise-test:{uuid.uuid4().hex[:8]}", "replay.min_size_to_sample": "4",
            "rollout.workers": "4", "learner.steps": "6", "learner.batch_size": "8",
            "learner.offline_ratio": "0.5", "learner.publish_every": "3", "learner.checkpoint_every": "2",
            "learner.replay_wait_s": "5", "gate.every_versions": "0"}
    base.update({k: str(v) for k, v in overrides.items()})
    return load_run_config(None, base)


def _replay(config, run_id: str):
    from services.trainer.replay import ReplayQueue

    return ReplayQueue(config.replay, f"{config.replay.stream}:{run_id}")


def test_short_run_pushes_consumes_acks_and_the_policy_service_serves_the_new_version(store, services, tmp_path):
    from rise.transport import connect_policy
    from services.trainer.run import TrainerRun

    config = _config(store, services, tmp_path)
    run = TrainerRun(config, "short", log=lambda *a: None)
    seen = []

    async def main():
        queue = run.watch()
        task = asyncio.create_task(run.run())
        while (status := await queue.get()) is not None:
            seen.append(status.state)
        final = await task
        async with connect_policy(services.url("policy")) as policy:
            views = {v: np.zeros((1, EMB.image_height, EMB.image_width, 3), np.uint8) for v in EMB.views}
            chunks = await policy.act(views, np.zeros((1, EMB.state_dim), np.float32), [TASK], [10], version="candidate")
        return final, chunks

    final, chunks = asyncio.run(main())
    stats = _replay(config, "short").stats()
    _replay(config, "short").delete()
    assert final.state == "succeeded", final.message
    assert final.learner_step == 6 and "running" in seen
    assert stats["inserted"] >= 4 and stats["consumed"] > 0 and stats["pending"] == 0
    versions = store[1].versions("policy")
    assert final.policy_version == versions[-1] and len(versions) >= 3  # init + published at steps 3 and 6
    assert chunks.version == final.policy_version  # the service answers `candidate` with the run's newest
    assert store[1].aliases("policy")["candidate"] == final.policy_version
    rows = [json.loads(line) for line in (tmp_path / "short" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and {"loss", "imagined_per_s", "replay_depth", "staleness"} <= set(rows[-1])


def test_malformed_entries_are_skipped_and_counted(store, services, tmp_path):
    from services.trainer.run import TrainerRun

    config = _config(store, services, tmp_path, **{"learner.offline_ratio": "0.0", "learner.steps": "3"})
    replay = _replay(config, "bad")
    replay.ensure_group()
    replay.push([b"not a protobuf", b"\x08\x96\x01garbage"])
    final = asyncio.run(TrainerRun(config, "bad", log=lambda *a: None).run())
    stats = replay.stats()
    replay.delete()
    assert final.state == "succeeded", final.message
    assert stats["malformed"] == 2


def test_a_dynamics_service_restarted_mid_run_does_not_end_the_run(store, services, tmp_path):
    from services.trainer.run import TrainerRun

    logs: list[str] = []
    config = _config(store, services, tmp_path, **{"learner.steps": "8", "services.retry_attempts": "20"})
    port = services.running["dynamics"].port

    def restart():
        while not (tmp_path / "flaky" / "metrics.jsonl").exists():
            time.sleep(0.1)
        services.stop("dynamics")
        time.sleep(1.5)
        services.running["dynamics"] = services.start("dynamics", port)

    thread = threading.Thread(target=restart)
    thread.start()
    final = asyncio.run(TrainerRun(config, "flaky", log=logs.append).run())
    thread.join(60)
    _replay(config, "flaky").delete()
    assert final.state == "succeeded", final.message
    assert any("dynamics.imagine" in line and "retry" in line.lower() for line in logs), logs[-5:]


def test_a_killed_learner_resumes_without_losing_a_sample(store, services, tmp_path):
    """SIGKILL the `rise train rise` process mid-run, start it again: every sample is used and acknowledged once."""
    config = _config(store, services, tmp_path, **{"learner.offline_ratio": "0.0", "learner.steps": "12",
                                                   "learner.batch_size": "4", "learner.checkpoint_every": "5",
                                                   "learner.publish_every": "100", "rollout.max_samples": "32",
                                                   "learner.replay_wait_s": "2"})
    config_file = tmp_path / "run.yaml"
    from rise.config import dump_config

    config_file.write_text(dump_config(config))
    command = [sys.executable, "-m", "rise.cli", "train", "rise", "--config", str(config_file), "--run-id", "killed", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoint = tmp_path / "killed" / "learner.pt"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        status = tmp_path / "killed" / "status.json"
        if checkpoint.exists() and status.exists() and json.loads(status.read_text())["learner_step"] >= 6:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.stdout.read().decode()[-3000:]
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    replay = _replay(config, "killed")
    assert replay.stats()["pending"] > 0  # read, used in steps, not yet checkpointed -> not acknowledged

    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stats = replay.stats()
    replay.delete()
    import torch

    saved = torch.load(checkpoint, weights_only=False)
    assert stats["inserted"] == 32 and stats["pending"] == 0 and stats["depth"] == 0
    assert stats["consumed"] + stats["stale"] + stats["malformed"] == 32
    # at-least-once: a sample may be used twice (killed between a checkpoint and its ack), never lost
    assert saved["samples_used"] >= stats["consumed"] and saved["step"] == 12


def test_trainer_service_starts_watches_and_stops_a_run(store, services, tmp_path):
    import grpc

    from rise.config import dump_config
    from rise.proto.v1 import trainer_pb2, trainer_pb2_grpc
    from rise.serving import ServerConfig, open_channel
    from services.trainer.server import TrainerConfig, start

    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        metrics_port = sock.getsockname()[1]
    config = _config(store, services, tmp_path, **{"learner.steps": "1000", "metrics_port": metrics_port})
    scraped = []
    trainer = asyncio.run_coroutine_threadsafe(
        start(TrainerConfig(server=ServerConfig(port=0, log_json=False))), services.loop).result(30)

    async def main():
        async with open_channel(trainer.address) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.StartRun(trainer_pb2.StartRunRequest(config_yaml="learner: {steps: -1}"))
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "steps" in bad.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetRun(trainer_pb2.GetRunRequest(run_id="nope"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            started = await stub.StartRun(trainer_pb2.StartRunRequest(run_id="served", config_yaml=dump_config(config),
                                                                     overrides={"learner.publish_every": "2"}))
            assert started.state == trainer_pb2.RUN_STATE_RUNNING and "publish_every: 2" in started.config_yaml
            states = []
            async for status in stub.WatchRun(trainer_pb2.WatchRunRequest(run_id="served")):
                states.append(status.state)
                if status.learner_step >= 2 and trainer_pb2.RUN_STATE_STOPPING not in states:
                    url = f"http://127.0.0.1:{metrics_port}/metrics"
                    scraped.append(await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode()))
                    await stub.StopRun(trainer_pb2.StopRunRequest(run_id="served"))
            final = await stub.GetRun(trainer_pb2.GetRunRequest(run_id="served"))
            return states, final

    try:
        states, final = asyncio.run(main())
    finally:
        asyncio.run_coroutine_threadsafe(trainer.stop(0), services.loop).result(30)
        _replay(config, "served").delete()
    assert final.state == trainer_pb2.RUN_STATE_STOPPED and 2 <= final.learner_step < 1000
    assert states[-1] == trainer_pb2.RUN_STATE_STOPPED and final.policy_version.startswith("v")
    assert "loss" in final.metrics and final.imagined_samples > 0
    assert 'rise_trainer_loss{run="served"}' in scraped[0] and "rise_trainer_replay_depth" in scraped[0]


def test_rise_run_commands_start_stop_and_report_a_served_run(store, services, tmp_path):
    """`rise run start/status/stop/watch` against a real TrainerService, as separate processes."""
    from rise.config import dump_config
    from rise.serving import ServerConfig
    from services.trainer.server import TrainerConfig, start

    config = _config(store, services, tmp_path, **{"learner.steps": "1000"})
    (tmp_path / "run.yaml").write_text(dump_config(config))
    (tmp_path / "bad.yaml").write_text(dump_config(config).replace("steps: 1000", "steps: -1"))
    trainer = asyncio.run_coroutine_threadsafe(
        start(TrainerConfig(server=ServerConfig(port=0, log_json=False))), services.loop).result(30)

    def rise_run(*args, timeout=120):
        done = subprocess.run([sys.executable, "-m", "rise.cli", "run", *args, "--trainer", trainer.address], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
        return done.returncode, done.stdout, done.stderr

    try:
        code, out, err = rise_run("start", "--config", str(tmp_path / "bad.yaml"), "--run-id", "bad")
        assert code == 1 and "INVALID_ARGUMENT" in err and "steps" in err, err
        code, out, err = rise_run("status", "nope")
        assert code == 1 and "NOT_FOUND" in err, err

        code, out, err = rise_run("start", "--config", str(tmp_path / "run.yaml"), "--run-id", "cli", "--no-watch",
                                  "--set", "learner.publish_every=2")
        assert code == 0 and json.loads(out)["state"] == "running", out + err
        deadline = time.time() + 240
        while time.time() < deadline:
            code, out, err = rise_run("status", "cli")
            if json.loads(out)["learner_step"] >= 2:
                break
            time.sleep(1)
        code, out, err = rise_run("stop", "cli", "--wait", "120")
        stopped = json.loads(out)
        assert code == 0 and stopped["state"] == "stopped" and 2 <= stopped["learner_step"] < 1000, out + err
        assert stopped["policy_version"].startswith("v") and "loss" in stopped["metrics"]
        code, out, err = rise_run("watch", "cli")  # an ended run: its final status at once
        assert code == 0 and json.loads(out)["learner_step"] == stopped["learner_step"], out + err
        code, out, err = rise_run("status", "cli", "--config")
        assert code == 0 and "publish_every: 2" in out and "steps: 1000" in out
    finally:
        asyncio.run_coroutine_threadsafe(trainer.stop(0), services.loop).result(30)
        _replay(config, "cli").delete()


def test_gate_evaluates_in_the_simulator_and_promotes_only_with_confidence(store, services, tmp_path):
    from services.trainer.gate import beats
    from services.trainer.run import TrainerRun

    assert beats(18, 20, 6, 20, 0.9)[0] and not beats(11, 20, 9, 20, 0.9)[0] and not beats(5, 20, 9, 20, 0.9)[0]
    config = _config(store, services, tmp_path, **{"gate.every_versions": "1", "gate.episodes": "2",
                                                   "gate.max_steps": "16", "learner.steps": "3"})
    final = asyncio.run(TrainerRun(config, "gated", log=lambda *a: None).run())
    _replay(config, "gated").delete()
    assert final.state == "succeeded", final.message
    history = json.loads((tmp_path / "gated" / "gate.json").read_text())
    assert history[0]["role"] == "initial" and history[0]["task"] == "reach" and history[0]["episodes"] == 2
    candidates = [h for h in history if h["role"] == "candidate"]
    assert candidates and candidates[-1]["version"] == final.policy_version
    stable = store[1].aliases("policy")["stable"]
    # a tiny untrained policy fails every episode: 0/2 never beats 0/2, so stable does not move
    assert all(not h["promoted"] for h in candidates) or stable == candidates[-1]["version"]


def test_the_learner_starts_from_a_policy_with_the_frozen_minilm_text_encoder(store, tmp_path):
    """The small and paper tiers read task texts with MiniLM (a module holding a lock): the EMA copy must still build."""
    from rise.data.loading import load_episodes_in_memory
    from services.policy.model import load_model_config
    from services.policy.train import train
    from services.trainer.config import LearnerConfig, ReplayConfig
    from services.trainer.learner import Learner
    from services.trainer.replay import ReplayQueue

    folder, _ = store
    registry = Registry(tmp_path / "store")
    summary = train(load_model_config("tiny", {"training.steps": 1, "training.batch_size": 4, "text.encoder": "minilm"}),
                    [folder / "data"], tmp_path / "run", registry=registry.root, publish=True, progress=False,
                    log=lambda *a: None)
    registry.set_alias("policy", "stable", summary["version"])
    replay = ReplayQueue(ReplayConfig(url=REDIS_URL), f"rise-test:{uuid.uuid4().hex[:8]}")
    learner = Learner(LearnerConfig(), tmp_path / "learner", registry, replay, load_episodes_in_memory(folder / "data", EMB),
                      EMB, "learner-test", log=lambda *a: None)
    trained = [name for name, p in learner.model.named_parameters() if p.requires_grad]
    assert trained and [n for n, _ in learner.ema.named_parameters()] == [n for n, _ in learner.model.named_parameters()]
    replay.delete()


def test_group_advantages_rank_the_chunks_of_one_start_whatever_the_start_is_worth():
    """Absolute advantages say "easy start"; group-relative ones say which chunk of that start was better."""
    from services.trainer.rollout import BIN_EDGES, advantage

    current = np.array([0.8] * 4 + [0.1] * 4, np.float32)  # an easy start, then a hard one
    gains = np.array([0.30, 0.31, 0.32, 0.33, -0.12, -0.10, -0.08, -0.06], np.float32)
    imagined = (current + gains)[:, None] + np.zeros((1, 3), np.float32)

    absolute, absolute_bins = advantage(current, imagined, 5.0, group_size=1)
    np.testing.assert_allclose(absolute, np.clip(5.0 * gains, -1, 1), atol=1e-6)  # the reference's formula
    assert np.array_equal(absolute_bins, np.digitize(absolute, BIN_EDGES))
    assert set(absolute_bins[:4]) == {10} and max(absolute_bins[4:]) <= 5  # start decides, action does not

    relative, bins = advantage(current, imagined, 5.0, group_size=4)
    np.testing.assert_allclose(relative[:4], relative[4:], atol=1e-4)  # same ranking in both starts
    assert np.all(np.diff(relative[:4]) > 0) and abs(relative[:4].mean()) < 1e-6
    assert bins[0] < bins[3] and bins[3] >= 9 and bins[0] <= 2
    same, same_bins = advantage(current[:4], np.full((4, 3), 0.9, np.float32), 5.0, group_size=4)
    assert np.all(same == 0) and set(same_bins) == {6}  # nothing to tell apart: the middle bin


def test_a_rollout_group_shares_its_start_chains_in_step_and_restarts_together(store, services, tmp_path):
    from rise.data.loading import load_episodes_in_memory
    from services.trainer.replay import decode_sample
    from services.trainer.rollout import Rollouts, dynamics_shape, open_clients, start_states

    with pytest.raises(ValueError, match="multiple of rollout.group_size"):
        _config(store, services, tmp_path, **{"rollout.workers": "6", "rollout.group_size": "4"})
    config = _config(store, services, tmp_path, **{"rollout.workers": "4", "rollout.group_size": "2",
                                                    "rollout.max_chain": "2", "rollout.policy_version": "stable"})
    folder, registry = store
    episodes = load_episodes_in_memory(folder / "data", EMB)
    starts = start_states(episodes, dynamics_shape(registry, "stable", EMB.chunk_length))

    async def rounds(n: int):
        clients = await open_clients(config.services)
        try:
            rollouts = Rollouts(config.rollout, config.services, clients, starts, "group-test", seed=3)
            return [[decode_sample(p) for p in await rollouts.round(frame_encoding="raw")] for _ in range(n)]
        finally:
            for client in clients:
                await client.close()

    samples = asyncio.run(rounds(3))
    assert [[s.chain_index for s in r] for r in samples] == [[0] * 4, [1] * 4, [0] * 4]
    first = samples[0]
    for a, b in ((0, 1), (2, 3)):  # a group: one start (frames and state), different chunks
        assert all(np.array_equal(first[a].views[v], first[b].views[v]) for v in EMB.views)
        assert np.array_equal(first[a].state, first[b].state)
        assert not np.allclose(first[a].actions, first[b].actions)
    # Persistence dynamics imagines no change: every chunk of a start is worth the same -> middle bin.
    assert {s.advantage_bin for r in samples for s in r} == {6}


def _first_round(store, services, tmp_path, **overrides):
    """One rollout round (seed 5, policy `stable`) with these config overrides -> (decoded samples, timing_s)."""
    from rise.data.loading import load_episodes_in_memory
    from services.trainer.replay import decode_sample
    from services.trainer.rollout import Rollouts, dynamics_shape, open_clients, start_states

    folder, registry = store
    starts = start_states(load_episodes_in_memory(folder / "data", EMB), dynamics_shape(registry, "stable", EMB.chunk_length))
    config = _config(store, services, tmp_path, **{"rollout.policy_version": "stable", **overrides})

    async def first_round():
        clients = await open_clients(config.services)
        try:
            rollouts = Rollouts(config.rollout, config.services, clients, starts, "round-test", seed=5)
            return [decode_sample(p) for p in await rollouts.round(frame_encoding="raw")], rollouts.timing_s
        finally:
            for client in clients:
                await client.close()

    return asyncio.run(first_round())


def _first_round_actions(store, services, tmp_path, **overrides) -> np.ndarray:
    """The chunks [workers, chunk, A] of one rollout round with these config overrides."""
    return np.stack([s.actions for s in _first_round(store, services, tmp_path, **overrides)[0]])


def test_exploration_noise_and_offset_are_added_to_the_proposed_chunks(store, services, tmp_path):
    def actions(noise: float, offset: float = 0.0):
        return _first_round_actions(store, services, tmp_path, **{"rollout.workers": "8",
                                                                 "rollout.exploration_noise": str(noise),
                                                                 "rollout.exploration_offset": str(offset)})

    plain, noisy = actions(0.0), actions(0.5)
    assert 0.4 < float(np.std(noisy - plain)) < 0.6  # the same starts and policy samples, plus the noise
    offset = actions(0.0, 0.5) - plain  # one offset per chunk and dimension, every step
    np.testing.assert_allclose(offset, np.repeat(offset[:, :1], offset.shape[1], axis=1), atol=1e-5)
    assert 0.3 < float(np.std(offset[:, 0])) < 0.7


def test_proposal_bins_prompt_each_group_position_with_its_own_bin(store, services, tmp_path):
    with pytest.raises(ValueError, match="one bin in 1..10 per group position"):
        _config(store, services, tmp_path, **{"rollout.workers": "4", "rollout.group_size": "2",
                                              "rollout.proposal_bins": "[10, 7, 4]"})

    def actions(bins: str):
        return _first_round_actions(store, services, tmp_path, **{"rollout.workers": "4", "rollout.group_size": "2",
                                                                 "rollout.proposal_bins": bins})

    best, mixed = actions("[10, 10]"), actions("[10, 1]")
    # The same starts and noise: the first position of each group asks for bin 10 both times, the second for 1.
    np.testing.assert_allclose(best[0::2], mixed[0::2], atol=1e-5)
    assert not np.allclose(best[1::2], mixed[1::2], atol=1e-3)


def test_act_groups_gives_a_group_one_noise_so_its_chunks_differ_only_by_observation(store, services):
    from rise.transport import connect_policy
    from services.trainer.rollout import act_groups

    rng = np.random.default_rng(0)
    one = {v: rng.integers(0, 256, (1, EMB.image_height, EMB.image_width, 3), dtype=np.uint8) for v in EMB.views}
    views = {v: np.repeat(x, 4, axis=0) for v, x in one.items()}  # 4 rows, the same observation
    states, tasks, bins = np.zeros((4, EMB.state_dim), np.float32), [TASK] * 4, [10] * 4

    async def both():
        policy = connect_policy(services.url("policy"))
        try:
            plain = await policy.act(views, states, tasks, bins, 0, 7, version="stable")
            grouped = await act_groups(policy, views, states, tasks, bins, 0, 7, 2, version="stable")
            return plain.actions, grouped.actions
        finally:
            await policy.close()

    plain, grouped = asyncio.run(both())
    assert not np.allclose(plain[0], plain[1])  # one seeded call: every row its own noise
    np.testing.assert_allclose(grouped[0], grouped[1], atol=1e-6)  # groups (0, 1) and (2, 3): one noise each
    np.testing.assert_allclose(grouped[2], grouped[3], atol=1e-6)
    assert not np.allclose(grouped[0], grouped[2])


def test_lookahead_scores_each_proposal_over_the_chunks_imagined_after_it(store, services, tmp_path):
    def first_round(lookahead: int):
        return _first_round(store, services, tmp_path, **{"rollout.workers": "4", "rollout.group_size": "2",
                                                          "rollout.lookahead_chunks": str(lookahead)})

    (plain, _), (ahead, timing) = first_round(0), first_round(2)
    frames = EMB.chunk_length  # the persistence model's future frames per chunk
    assert [len(s.value_imagined) for s in plain] == [frames] * 4
    assert [len(s.value_imagined) for s in ahead] == [3 * frames] * 4  # the proposal + 2 imagined chunks
    for a, b in zip(plain, ahead):  # the same proposals, stored as before; only their scoring looked further
        np.testing.assert_allclose(a.actions, b.actions, atol=1e-6)
        np.testing.assert_allclose(b.value_imagined[:frames], a.value_imagined, atol=1e-5)
    assert timing["lookahead"] > 0 and "lookahead" in ahead[0].timing_ms


def test_group_best_picks_the_highest_gain_of_each_group():
    from services.trainer.rollout import group_best

    gains = np.array([0.1, 0.5, 0.2, 0.3, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -0.5, -3.0], np.float32)
    assert group_best(gains, 4).tolist() == [1, 4, 10]
    assert group_best(gains, 2).tolist() == [1, 3, 4, 6, 8, 10]


def test_train_on_best_pushes_only_each_groups_pick_under_the_prompts_bin(store, services, tmp_path):
    from services.trainer.rollout import group_best, value_gain

    with pytest.raises(ValueError, match="group_size >= 2"):
        _config(store, services, tmp_path, **{"rollout.group_size": "1", "rollout.train_on": "best"})

    def first_round(train_on: str):
        return _first_round(store, services, tmp_path, **{"rollout.workers": "8", "rollout.group_size": "4",
                                                          "rollout.train_on": train_on})[0]

    every, best = first_round("all"), first_round("best")
    picks = group_best(value_gain(np.array([s.value_current for s in every]),
                                  np.array([s.value_imagined for s in every])), 4)
    assert len(every) == 8 and len(best) == 2  # one sample per group of four
    for pick, sample in zip(picks, best):  # the same round, only the group's pick kept, prompted bin
        np.testing.assert_allclose(sample.actions, every[pick].actions, atol=1e-6)
        assert sample.advantage == pytest.approx(every[pick].advantage)
        assert sample.advantage_bin == 10


def test_start_data_adds_starts_but_not_training_data(store, services, tmp_path):
    """`start_data` (e.g. the policy's own rollouts): imagination starts from its frames too; the learner's
    offline data stays `data`."""
    from rise.data.dataset import DatasetWriter, Episode
    from rise.data.loading import load_episodes_in_memory
    from services.trainer.rollout import dynamics_shape, run_start_states

    folder, registry = store
    rollouts = tmp_path / "rollouts"
    writer = DatasetWriter(rollouts, EMB)
    n = 10  # dark frames (7): recognisable after video coding among the offline data's random ones (mean 127)
    writer.add(Episode(views={v: np.full((n, EMB.image_height, EMB.image_width, 3), 7, np.uint8) for v in EMB.views},
                       states=np.zeros((n, EMB.state_dim), np.float32), actions=np.zeros((n, EMB.action_dim), np.float32),
                       task=TASK, success=False))
    writer.finalize()
    offline = load_episodes_in_memory([folder / "data"], EMB)
    shape = dynamics_shape(registry, "stable", EMB.chunk_length)
    plain = run_start_states(_config(store, services, tmp_path), offline, EMB, shape)
    assert plain.episodes is offline and len(plain.frames) == len(offline)

    config = _config(store, services, tmp_path, start_data=json.dumps([str(rollouts)]))
    starts = run_start_states(config, offline, EMB, shape)
    assert len(starts.frames) == len(offline) + n
    rng = np.random.default_rng(0)
    from_rollouts = [float(s.history[EMB.views[0]][-1].mean()) < 30 for s in (starts.draw(rng) for _ in range(400))]
    assert 0.05 < np.mean(from_rollouts) < 0.5  # both kinds, in proportion to their frames (10 of 82)
    assert config.data == [folder / "data"]  # what the learner trains on is unchanged
