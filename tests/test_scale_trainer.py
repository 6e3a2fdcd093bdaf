"""The trainer scaled out (issue 10): learner ranks under torchrun (gloo, 2 processes on this
CPU) and a fleet rollout worker. Services on 127.0.0.1, Redis DB 12; the store (data + tiny
policy) is test_trainer's, built once for the module.

- One step with 2 ranks (DDP, then FSDP2 `fully_shard`) gives the weights, gradients and EMA of
  the single-process step on the same data: the mean of the two ranks' losses, each on its
  rank's batch with its rank's noise (which is what data parallelism computes).
- A rank SIGKILLed mid-run (torchrun restarts the group): the ranks resume from the last
  distributed checkpoint and every imagined sample is consumed, none left pending; the newest
  checkpoint converts to plain weights the policy loads.
- A stateless rollout worker joins a run that a TrainerService is running, rolls out with the
  plan it fetches (config, stream, candidate version), and the run's learner consumes its samples.

Run as a script, this file is the rank worker of the first test (`--worker`).
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import _config, one_thread, services, store  # noqa: E402,F401  (fixtures reused)

REDIS_URL = os.environ.get("RISE_SCALE_REDIS", "redis://127.0.0.1:6379/12")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# A fresh rendezvous store for each generation of ranks torchrun starts (distributed.check_launcher)
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _learner_config(strategy: str):
    from services.trainer.config import LearnerConfig
    from services.trainer.distributed import DistributedConfig

    # offline only: the two ranks' batches come from their own shards of the data, no Redis timing involved
    return LearnerConfig(batch_size=8, offline_ratio=1.0, random_shift=2, seed=3, torch_threads=1,
                         distributed=DistributedConfig(strategy=strategy))


def _learner(registry, data: Path, run_dir: Path, strategy: str, world=None):
    from conftest import EMB
    from rise.data.loading import load_episodes_in_memory
    from services.trainer.learner import Learner
    from services.trainer.replay import ReplayConfig, ReplayQueue

    replay = ReplayQueue(ReplayConfig(url=REDIS_URL), f"rise-scale:{uuid.uuid4().hex[:8]}")  # never read: offline only
    return Learner(_learner_config(strategy), run_dir, registry, replay, load_episodes_in_memory(data, EMB), EMB,
                   "learner-eq", log=lambda *a: None, world=world)


def _grads(learner) -> dict:
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731  (FSDP shards -> whole)
    return {n: full(p.grad).detach().clone() for n, p in learner.model.named_parameters() if p.grad is not None}


def _weights(module) -> dict:
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    return {n: full(p).detach().clone() for n, p in module.named_parameters()}


def worker(args: dict) -> None:
    """One rank: for DDP then FSDP, draw this rank's batch, take one step; save the batch, and on rank 0 the result."""
    import threading

    import torch

    from rise.registry import Registry
    from services.trainer.distributed import DistributedConfig, init_world, shutdown_world

    torch.set_num_threads(1)
    out = Path(args["out"])
    world = init_world(DistributedConfig(backend="gloo"))
    try:
        for strategy in ("ddp", "fsdp"):
            learner = _learner(Registry(args["store"]), Path(args["data"]), out / f"run-{strategy}", strategy, world)
            assert world.strategy == strategy
            batch = learner.draw(threading.Event())
            (out / f"batch-{strategy}-{world.rank}.pkl").write_bytes(pickle.dumps(batch))
            learner.apply(learner.loss(batch))
            grads, weights, ema = _grads(learner), _weights(learner.model), _weights(learner.ema)  # collective under FSDP
            if world.is_main:
                torch.save({"grads": grads, "weights": weights, "ema": ema}, out / f"after-{strategy}.pt")
    finally:
        shutdown_world(world)


def test_one_step_on_two_gloo_ranks_equals_the_single_process_step(store, tmp_path):
    import torch

    folder, registry = store
    args = {"out": str(tmp_path), "store": str(registry.root), "data": str(folder / "data")}
    env = {**os.environ, **TORCHRUN_ENV, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", __file__, "--worker", json.dumps(args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    for strategy in ("ddp", "fsdp"):
        batches = [pickle.loads((tmp_path / f"batch-{strategy}-{r}.pkl").read_bytes()) for r in range(2)]
        assert all(len(b.tasks) == 4 for b in batches)  # global batch 8 = 2 ranks x 4
        assert not np.array_equal(batches[0].states, batches[1].states)  # each rank its own shard
        # the single process, same data: the mean of the ranks' losses, one optimizer step
        single = _learner(registry, folder / "data", tmp_path / f"single-{strategy}", "auto")
        assert single.world.size == 1 and single.world.strategy == "single"
        single.apply((single.loss(batches[0]) + single.loss(batches[1])) / 2)
        ranks = torch.load(tmp_path / f"after-{strategy}.pt", weights_only=False)
        ours = {"grads": _grads(single), "weights": _weights(single.model), "ema": _weights(single.ema)}
        for key in ("grads", "weights", "ema"):
            assert ranks[key].keys() == ours[key].keys(), key
            for name, value in ours[key].items():
                torch.testing.assert_close(ranks[key][name], value, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{strategy} {key} {name}: {m}")
        moved = max(float((single.model.state_dict()[n] - single.ema.state_dict()[n]).abs().max()) for n in ours["weights"])
        assert moved > 0  # the step did change the weights (so equality above is not trivial)


def _children(pid: int) -> dict[int, int]:
    """{RANK: pid} of torchrun's worker processes (read from their environment)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
                continue
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = int(entry.name)
    return ranks


def test_a_torchrun_that_would_restart_ranks_on_a_shared_store_is_refused_with_the_fix():
    from services.trainer.distributed import check_launcher

    with pytest.raises(RuntimeError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        check_launcher({"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3"})
    check_launcher({"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "0"})  # never restarted
    check_launcher({"TORCHELASTIC_USE_AGENT_STORE": "False", "TORCHELASTIC_MAX_RESTARTS": "3"})  # a store per generation
    check_launcher({})  # not under torchrun


# A budget that keeps a hang from holding CI for long; the torchrun tree is always killed at the end.
@pytest.mark.timeout(420)
def test_a_rank_killed_mid_run_resumes_from_the_checkpoint_without_losing_a_sample(store, services, tmp_path):
    from rise.config import dump_config

    config = _config(store, services, tmp_path, **{
        "replay.url": REDIS_URL, "learner.offline_ratio": "0.0", "learner.steps": "14", "learner.batch_size": "4",
        "learner.checkpoint_every": "4", "learner.publish_every": "7", "rollout.max_samples": "32",
        "learner.replay_wait_s": "1", "learner.distributed.strategy": "ddp", "learner.distributed.timeout_s": "60"})
    config_file = tmp_path / "run.yaml"
    config_file.write_text(dump_config(config))
    env = {**os.environ, **TORCHRUN_ENV, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # up to 3 restarts: the kill costs one; on a loaded machine a restarted group's gloo rendezvous may time out and cost another
    command = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "3", "--monitor-interval", "0.5",
               "-m", "rise.cli", "train", "rise", "--config", str(config_file), "--run-id", "ranks", "--no-progress"]
    log = open(tmp_path / "torchrun.log", "w")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _kill_one_rank_and_check(process, config, store, tmp_path)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # torchrun and its ranks (a hung group must not outlive the test)
            process.wait()


def _kill_one_rank_and_check(process, config, store, tmp_path):
    from services.trainer import distributed
    from services.trainer.replay import ReplayQueue

    run_dir = tmp_path / "ranks"
    deadline, killed = time.time() + 240, None
    while time.time() < deadline and process.poll() is None:
        meta = distributed.read_meta(run_dir) if (run_dir / distributed.CHECKPOINTS / distributed.LATEST).exists() else None
        status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
        if meta and meta["step"] >= 4 and status.get("learner_step", 0) >= 6:  # past a checkpoint, before the next
            killed = _children(process.pid).get(1)
            if killed:
                os.kill(killed, signal.SIGKILL)  # rank 1 dies between checkpoints, holding read samples
                break
        time.sleep(0.1)
    assert killed, (tmp_path / "torchrun.log").read_text()[-4000:]
    replay = ReplayQueue(config.replay, f"{config.replay.stream}:ranks")
    assert process.wait(330) == 0, (tmp_path / "torchrun.log").read_text()[-6000:]
    stats = replay.stats()
    replay.delete()
    text = (tmp_path / "torchrun.log").read_text()
    meta = distributed.read_meta(run_dir)
    resumed = [int(step) for step in re.findall(r"learner: resumed at step (\d+)", text)]
    assert len(resumed) >= 2 and 4 <= min(resumed) and max(resumed) < 14, text[-3000:]  # both ranks, from a checkpoint
    assert meta["step"] == 14 and meta["world_size"] == 2 and meta["strategy"] == "ddp"
    assert stats["inserted"] == 32 and stats["pending"] == 0 and stats["depth"] == 0, stats
    assert stats["consumed"] + stats["stale"] + stats["malformed"] == 32, stats
    assert meta["samples_used"] >= stats["consumed"]  # at-least-once: re-delivered samples may be used twice
    assert len(meta["published"]) == 3 and store[1].aliases("policy")["candidate"] == meta["published"][-1]

    # the newest checkpoint -> the plain policy folder the service loads
    from services.policy.model import load_model

    import torch

    exported = distributed.export_checkpoint(run_dir, tmp_path / "exported", store[1])
    policy = load_model(exported)
    published = load_model(store[1].open("policy", meta["published"][-1]).path)  # rank 0's EMA at step 14
    for name, value in published.state_dict().items():
        torch.testing.assert_close(policy.state_dict()[name], value)


def test_a_fleet_worker_joins_a_running_trainer_and_its_samples_are_consumed(store, services, tmp_path):
    from rise.config import dump_config
    from rise.proto.v1 import trainer_pb2, trainer_pb2_grpc
    from rise.serving import ServerConfig, open_channel
    from services.trainer.replay import ReplayQueue
    from services.trainer.server import TrainerConfig, start
    from services.trainer.worker import run_worker

    # The trainer's own rollouts stop after 4 samples; the rest of the run's stream is the worker's.
    config = _config(store, services, tmp_path, **{
        "replay.url": REDIS_URL, "replay.min_size_to_sample": "2", "rollout.workers": "2", "rollout.group_size": "2", "rollout.max_samples": "4",
        "learner.steps": "1000", "learner.batch_size": "4", "learner.offline_ratio": "0.5",
        "learner.publish_every": "4", "learner.replay_wait_s": "0.5"})
    replay = ReplayQueue(config.replay, f"{config.replay.stream}:fleet")
    trainer = asyncio.run_coroutine_threadsafe(start(TrainerConfig(server=ServerConfig(port=0, log_json=False))),
                                               services.loop).result(30)
    logs: list[str] = []

    async def main():
        async with open_channel(trainer.address) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            await stub.StartRun(trainer_pb2.StartRunRequest(run_id="fleet", config_yaml=dump_config(config)))
            # a worker joins the running run, with nothing but the trainer's address
            pushed = await run_worker(trainer.address, "fleet", "worker-a", max_samples=16, log=logs.append)
            plan = await stub.GetRolloutPlan(trainer_pb2.GetRolloutPlanRequest(run_id="fleet"))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # the learner catches up with every sample pushed
                stats = replay.stats()
                if stats["consumed"] + stats["stale"] + stats["pending"] >= stats["inserted"]:
                    break
                await asyncio.sleep(0.2)
            await stub.StopRun(trainer_pb2.StopRunRequest(run_id="fleet"))  # checkpoints, then acknowledges
            async for status in stub.WatchRun(trainer_pb2.WatchRunRequest(run_id="fleet")):
                final = status
            return pushed, plan, final

    try:
        pushed, plan, final = asyncio.run(main())
        stats = replay.stats()
    finally:
        run = trainer.servicer.runs.get("fleet")
        if run is not None:  # a failed assertion above must not leave the learner thread training
            run.stop()
            asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(trainer.servicer.tasks["fleet"]), 120),
                                             services.loop).result(130)
        asyncio.run_coroutine_threadsafe(trainer.stop(0), services.loop).result(30)
        replay.delete()
    assert pushed == 16, logs
    assert plan.replay_stream == replay.key and plan.candidate_version.startswith("v")
    assert plan.run.state == trainer_pb2.RUN_STATE_RUNNING and "max_samples: 4" in plan.run.config_yaml
    assert any("worker worker-a: rolling out for run fleet" in line for line in logs), logs
    assert final.state == trainer_pb2.RUN_STATE_STOPPED and final.metrics["fleet_workers"] >= 1
    assert 16 < stats["inserted"] <= 20, stats  # the worker's 16 and the trainer's own (at most 4)
    assert stats["consumed"] + stats["stale"] == stats["inserted"] and stats["pending"] == 0 and stats["depth"] == 0, stats
    assert final.imagined_samples == stats["inserted"]


if __name__ == "__main__" and "--worker" in sys.argv:
    worker(json.loads(sys.argv[sys.argv.index("--worker") + 1]))
