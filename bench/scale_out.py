"""Scaling out on this machine (issue 10): dynamics replicas and learner processes.

Part 1, imagined samples per second with 1 vs 2 replicas of the dynamics service. Two rollout
workers (two `Rollouts` of the trainer, `--workers` episodes each, as two `rise worker rollout`
processes would run them) push to one Redis stream at once; policy and value are one service
each; dynamics is one `rise serve dynamics` process, or two behind one client channel
(`ipv4:127.0.0.1:p1,127.0.0.1:p2`, round robin, rise.transport). Both settings run in the same
process on the same services (the second replica idles in the 1-replica blocks), in interleaved
blocks (1 2 2 1 1 2 ...), so load from other jobs hits both alike.

Part 2, learner throughput with 1 vs 2 processes: the trainer's `Learner` (small-tier policy,
offline batches only, so it measures the update and not imagination) for `--learner-steps`
steps after 2 warm-up steps, once as one process and once under `torchrun --nproc-per-node 2`
(DDP over gloo; the global batch `--batch` split over the ranks). One torch thread per process.

    .venv/bin/python bench/scale_out.py [--blocks 4] [--rounds 4] [--workers 8] [--learner-steps 10] [--batch 32] \
        [--data DIR --store DIR] [--out bench/scale_out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import ServiceProcesses, build_store, machine  # noqa: E402

SETTINGS = ("1 replica", "2 replicas")


# ---- part 1: dynamics replicas ---------------------------------------------------------------------
async def replicas(args, store: Path, data: list[Path], work: Path, console: Console) -> dict:
    import torch

    from rise.data.loading import load_episodes_in_memory
    from rise.embodiment import load_embodiment
    from rise.registry import Registry
    from rise.transport import connect_dynamics, connect_policy, connect_value
    from services.trainer.config import RolloutConfig, ServicesConfig
    from services.trainer.replay import ReplayConfig, ReplayQueue
    from services.trainer.rollout import Rollouts, dynamics_shape, start_states

    torch.set_num_threads(1)
    embodiment = load_embodiment("metaworld")
    episodes = load_episodes_in_memory(data, embodiment)
    shape = dynamics_shape(Registry(store), "", embodiment.chunk_length)
    replay = ReplayQueue(ReplayConfig(url=args.redis), f"rise-bench:scale-out:{uuid.uuid4().hex[:8]}")
    replay.ensure_group()
    main = ServiceProcesses(store, work / "logs-main")
    second = ServiceProcesses(store, work / "logs-dynamics-2", models=("dynamics",))
    clients = []
    try:
        await main.wait_ready()
        await second.wait_ready()
        p1, p2 = (urls["dynamics"].removeprefix("grpc://") for urls in (main.urls, second.urls))
        dynamics_url = {"1 replica": f"grpc://{p1}", "2 replicas": f"ipv4:{p1},{p2}"}
        rollout_cfg = RolloutConfig(workers=args.workers, dynamics_steps=args.dynamics_steps)
        rollouts = {}
        for setting in SETTINGS:
            services = ServicesConfig(policy=main.urls["policy"], value=main.urls["value"], dynamics=dynamics_url[setting])
            rollouts[setting] = []
            for w in range(args.fleet):  # the fleet's workers: one channel each, as separate processes would have
                trio = (connect_policy(services.policy), connect_dynamics(services.dynamics), connect_value(services.value))
                clients += trio
                rollouts[setting].append(Rollouts(rollout_cfg, services, trio, start_states(episodes, shape), "bench",
                                                  seed=args.seed + w, log=console.print))

        async def block(setting: str, rounds: int) -> tuple[int, float]:
            t0 = time.perf_counter()
            counts = await asyncio.gather(*[_rounds(r, replay, rounds) for r in rollouts[setting]])
            return sum(counts), time.perf_counter() - t0

        for setting in SETTINGS:  # warm-up: MiniLM loads, channels connect
            await block(setting, 1)
        rows = []
        for b in range(args.blocks):
            for setting in (SETTINGS if b % 2 == 0 else SETTINGS[::-1]):
                load = os.getloadavg()[0]
                samples, seconds = await block(setting, args.rounds)
                rows.append({"block": b, "setting": setting, "samples": samples, "seconds": seconds,
                             "samples_per_s": samples / seconds, "loadavg_1min": load})
                console.print(f"  block {b} {setting}: {samples / seconds:.2f} samples/s (load {load:.1f})")
    finally:
        for client in clients:
            await client.close()
        main.stop()
        second.stop()
        replay.delete()
    summary = {}
    for setting in SETTINGS:
        mine = [r for r in rows if r["setting"] == setting]
        summary[setting] = {"samples": sum(r["samples"] for r in mine), "seconds": sum(r["seconds"] for r in mine),
                            "samples_per_s": sum(r["samples"] for r in mine) / sum(r["seconds"] for r in mine)}
    ratio = summary["2 replicas"]["samples_per_s"] / summary["1 replica"]["samples_per_s"]
    return {"summary": summary, "ratio_2_vs_1": ratio, "rows": rows,
            "per_block_ratio": [next(r["samples_per_s"] for r in rows if r["block"] == b and r["setting"] == "2 replicas") /
                                next(r["samples_per_s"] for r in rows if r["block"] == b and r["setting"] == "1 replica")
                                for b in range(args.blocks)]}


async def _rounds(rollouts, replay, rounds: int) -> int:
    pushed = 0
    for _ in range(rounds):
        pushed += await rollouts.produce(replay)
    return pushed


# ---- part 2: learner processes ----------------------------------------------------------------------
def learner_worker(args) -> None:
    """One learner process (a torchrun rank, or the single process): time `--learner-steps` steps."""
    import torch

    from rise.data.loading import load_episodes_in_memory
    from rise.embodiment import load_embodiment
    from rise.registry import Registry
    from services.trainer.config import LearnerConfig
    from services.trainer.distributed import DistributedConfig, init_world, shutdown_world
    from services.trainer.learner import Learner
    from services.trainer.replay import ReplayConfig, ReplayQueue

    torch.set_num_threads(1)
    config = LearnerConfig(batch_size=args.batch, offline_ratio=1.0, torch_threads=1,
                           distributed=DistributedConfig(strategy=args.strategy, backend="gloo"))
    world = init_world(config.distributed)
    try:
        embodiment = load_embodiment("metaworld")
        replay = ReplayQueue(ReplayConfig(url=args.redis), "rise-bench:scale-out:unused")  # offline only: never read
        learner = Learner(config, Path(tempfile.mkdtemp(prefix="scale-learner-")), Registry(args.store), replay,
                          load_episodes_in_memory(args.data, embodiment), embodiment, "bench", log=lambda *a: None,
                          world=world)
        stop = threading.Event()
        for _ in range(2):
            learner.train_step(stop)
        world.barrier()
        t0 = time.perf_counter()
        step_s = []
        for _ in range(args.learner_steps):
            t = time.perf_counter()
            learner.train_step(stop)
            step_s.append(time.perf_counter() - t)
        seconds = time.perf_counter() - t0
        if world.is_main:
            params = sum(p.numel() for p in learner.model.parameters())
            Path(args.learner_out).write_text(json.dumps({
                "processes": world.size, "strategy": world.strategy, "global_batch": args.batch, "steps": args.learner_steps,
                "seconds": seconds, "steps_per_s": args.learner_steps / seconds,
                "samples_per_s": args.learner_steps * args.batch / seconds, "step_s_median": float(np.median(step_s)),
                "policy_parameters": params, "loadavg_1min_end": os.getloadavg()[0]}))
    finally:
        shutdown_world(world)


def learners(args, store: Path, data: list[Path], work: Path, console: Console) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    common = [__file__, "--learner-worker", "--store", str(store), *sum((["--data", str(d)] for d in data), []),
              "--batch", str(args.batch), "--learner-steps", str(args.learner_steps), "--redis", args.redis,
              "--strategy", args.strategy]
    out = {}
    for processes in (1, 2, 1, 2)[:2 * args.learner_repeats]:
        target = work / f"learner-{processes}-{len(out)}.json"
        launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                             "--nproc-per-node", str(processes)]
        load = os.getloadavg()[0]
        done = subprocess.run([*launcher, *common, "--learner-out", str(target)], cwd=ROOT, env=env, capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError(f"learner with {processes} process(es) failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        result = {**json.loads(target.read_text()), "loadavg_1min_start": load}
        out.setdefault(str(processes), []).append(result)
        console.print(f"  learner, {processes} process(es): {result['steps_per_s']:.3f} steps/s, "
                      f"{result['samples_per_s']:.1f} samples/s (global batch {args.batch}; load {load:.1f})")
    best = {k: max(v, key=lambda r: r["steps_per_s"]) for k, v in out.items()}
    return {"runs": out, "ratio_2_vs_1": best["2"]["steps_per_s"] / best["1"]["steps_per_s"], "best": best}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8, help="imagined episodes per rollout worker (its batch per call)")
    parser.add_argument("--fleet", type=int, default=2, help="rollout workers running at once")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per worker per block")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per setting, interleaved")
    parser.add_argument("--dynamics-steps", type=int, default=4)
    parser.add_argument("--learner-steps", type=int, default=10)
    parser.add_argument("--learner-repeats", type=int, default=1, help="1 -> (1, 2) processes; 2 -> (1, 2, 1, 2)")
    parser.add_argument("--batch", type=int, default=32, help="learner global batch")
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    parser.add_argument("--skip", choices=["replicas", "learner"], action="append", default=[])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--data", type=Path, action="append", default=[])
    parser.add_argument("--store", type=Path)
    parser.add_argument("--task", default="pick-place")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "scale_out.json")
    parser.add_argument("--learner-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--learner-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.learner_worker:
        learner_worker(args)
        return 0

    console = Console()
    info = machine()
    started = time.perf_counter()
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="scale-out-")
    work = Path(args.workdir or tmp)
    work.mkdir(parents=True, exist_ok=True)
    result = {}
    try:
        data, store = args.data, args.store
        if store is None:
            import torch

            # build_store trains with 2 torch threads; on this 2-core box shared with other jobs that
            # is far slower than 1 (tests/test_trainer.py measured up to 100x), so pin it to 1 here.
            set_threads, torch.set_num_threads = torch.set_num_threads, lambda n: set_threads(1)
            try:
                data = build_store(work, data, args.task, args.episodes, args.train_steps, args.seed, console)
            finally:
                torch.set_num_threads = set_threads
            store = work / "store"
        store = store.resolve()
        if "replicas" not in args.skip:
            console.print("part 1: imagined samples/s, 1 vs 2 dynamics replicas")
            result["dynamics_replicas"] = asyncio.run(replicas(args, store, data, work, console))
        if "learner" not in args.skip:
            console.print("part 2: learner, 1 vs 2 processes")
            result["learner_processes"] = learners(args, store, data, work, console)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    if "dynamics_replicas" in result:
        r = result["dynamics_replicas"]
        console.print(f"dynamics replicas: 1 -> {r['summary']['1 replica']['samples_per_s']:.2f}, 2 -> "
                      f"{r['summary']['2 replicas']['samples_per_s']:.2f} samples/s (x{r['ratio_2_vs_1']:.2f})")
    if "learner_processes" in result:
        console.print(f"learner: 2 vs 1 processes x{result['learner_processes']['ratio_2_vs_1']:.2f}")
    console.print(f"machine: {info['nproc']} x {info['cpu']}, load {info['loadavg_start']} -> {info['loadavg_end']}, "
                  f"{time.perf_counter() - started:.0f} s")
    args.out.write_text(json.dumps({"command": " ".join([".venv/bin/python", *sys.argv]), "machine": info,
                                    "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                                 if k not in ("data", "learner_worker", "learner_out")},
                                    **result}, indent=1, default=str) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
