"""Imagined samples per second of the trainer's rollout loop: through the services vs all models in one process.

The loop is the trainer's own (`services/trainer/rollout.py: Rollouts.round`, then
`ReplayQueue.push` in a thread, as `services/trainer/run.py` does). Per round, `--workers`
imagined episodes move one chunk forward with one batched call per model:

    policy.act -> dynamics.imagine -> value.score -> encode_sample x workers -> replay.push (Redis XADD)

Two modes, both on the same registry versions (real `small`-tier architectures; the weights are
trained for a couple of steps only, since speed does not depend on them):

  services    policy, value and dynamics as three `rise serve <name>` processes on 127.0.0.1
              (torch_threads 1 each), reached through `rise.transport.connect_{policy,dynamics,value}`
  in-process  the same `Rollouts` with adapters defined here: each holds a `ModelHost` with the
              service's own loader (`load_by_kind(KINDS)` of services/<name>/server.py, same
              preloaded aliases) and calls `model.act / imagine / score` in a worker thread, as
              the servers' batchers do, with torch threads 1 in this process. Not mocks: the same
              models without protobuf, gRPC and the extra processes.

Both modes push to one real Redis stream (`--redis`, a unique key deleted at the end). After
`--warmup` untimed rounds per mode (the MiniLM text encoders load on first use), the modes
alternate in `--blocks` pairs of blocks of `--rounds` rounds each, the order flipped every pair
(S I I S S I ...), so that load from other jobs on this shared machine hits both alike.

Per round we time: the three model calls (Rollouts' own stage timers: client-visible wall time,
so in `services` they include request building, the RPC and the server's decode/batcher),
`encode_sample` (wrapped here to time it: jpeg frames + protobuf), "other" (array stacking,
advantages, chaining = round minus the rest) and the push. Samples/s = imagined samples / (round
+ push) wall time; push share = push time / (round + push) time.

Setup: with no `--store`, a small MetaWorld dataset is collected (`rise.data.collect.collect`,
`--task`, `--episodes`) or `--data` is used, and policy, value and dynamics are trained for
`--train-steps` steps with their own train() functions and published as `stable` (the policy
also as `candidate`, the alias the rollouts use) in a temporary registry. `--workdir DIR` keeps
data, registry and service logs for a later `--data DIR/data/<task> --store DIR/store`.

    .venv/bin/python bench/trainer_throughput.py [--workers 8] [--rounds 10] [--blocks 3] [--warmup 2] \
        [--dynamics-steps 4] [--policy-steps 0] [--data DIR ... --store DIR] [--out bench/trainer_throughput.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import MODELS, ServiceProcesses, build_store, machine  # noqa: E402

MODES = ("services", "in-process")
STAGES = ("policy", "dynamics", "value", "encode", "other", "push")


# ---- setup: data and a registry of real small models ------------------------------------------------

# ---- mode "services": three `rise serve` processes (bench/common.py: ServiceProcesses) -----------


# ---- mode "in-process": the services' loaders and model calls, no transport ----------------------
class _Local:
    """A ModelHost with the service's KINDS and preloaded aliases; the model call runs in a worker
    thread, as the servers' batchers run it, so the event loop stays free alike in both modes."""

    def __init__(self, name: str, store: Path, embodiment: str):
        import importlib

        from rise.embodiment import load_embodiment
        from rise.model_host import ModelHost, ModelServiceConfig, load_by_kind
        from rise.registry import Registry

        kinds = importlib.import_module(f"services.{name}.server").KINDS
        self.host = ModelHost(Registry(store), name, load_embodiment(embodiment), load_by_kind(kinds, name))
        self.preload = ModelServiceConfig.model_fields["preload"].default
        self.views = self.host.embodiment.views

    async def start(self):
        await self.host.start(self.preload)
        return self

    async def close(self) -> None:
        pass


class LocalPolicy(_Local):
    async def act(self, views, states, tasks, advantage_bins, num_steps=0, seed=0, *, version="", timeout_s=None):
        from rise.observations import check_advantage_bins
        from rise.transport import Chunks

        loaded = self.host.get(version)
        bins = np.asarray(check_advantage_bins(advantage_bins, len(states), "advantage_bins"), np.int64)
        actions = await asyncio.to_thread(loaded.model.act, {v: views[v] for v in self.views},
                                          np.asarray(states, np.float32), list(tasks), bins, num_steps, seed)
        return Chunks(np.asarray(actions, np.float32), loaded.version)


class LocalDynamics(_Local):
    async def imagine(self, history, actions, num_steps=0, seed=0, *, version="", tasks=None, sim_states=None,
                      timeout_s=None):
        from rise.transport import Imagination

        loaded = self.host.get(version)
        extra = {"tasks": tasks, "sim_states": sim_states} if getattr(loaded.model, "needs_sim_state", False) else {}
        output = await asyncio.to_thread(loaded.model.imagine, {v: history[v] for v in self.views},
                                         np.asarray(actions, np.float32), num_steps, seed, **extra)
        from services.dynamics.server import model_output

        frames, sim_states, states = model_output(output)
        none = [None] * len(actions)
        return Imagination(frames, list(sim_states or none), loaded.version, None if states is None else list(states))


class LocalValue(_Local):
    async def score(self, frames, tasks, *, version="", timeout_s=None):
        from rise.transport import Scores

        loaded = self.host.get(version)
        batch, count = len(tasks), frames[self.views[0]].shape[1]
        # As the value server's batcher does: B items x F frames -> one call on B * F frames.
        flat = {v: frames[v].reshape(batch * count, *frames[v].shape[2:]) for v in self.views}
        values = await asyncio.to_thread(loaded.model.score, flat, [t for t in tasks for _ in range(count)])
        return Scores(np.asarray(values, np.float32).reshape(batch, count), loaded.version)


# ---- the measurement ------------------------------------------------------------------------------
class EncodeTimer:
    """Wraps rollout.py's `encode_sample` (looked up as a module global per call) to add up its time."""

    def __init__(self):
        import services.trainer.rollout as rollout

        self.module, self.original, self.seconds = rollout, rollout.encode_sample, 0.0

        def timed(**kwargs):
            t = time.perf_counter()
            try:
                return self.original(**kwargs)
            finally:
                self.seconds += time.perf_counter() - t

        rollout.encode_sample = timed

    def restore(self) -> None:
        self.module.encode_sample = self.original


async def one_round(rollouts, replay, encode: EncodeTimer, encoding: str, quality: int) -> dict:
    before, enc0 = dict(rollouts.timing_s), encode.seconds
    t0 = time.perf_counter()
    payloads = await rollouts.round(encoding, quality)
    t1 = time.perf_counter()
    await asyncio.to_thread(replay.push, payloads)  # as services/trainer/run.py pushes
    t2 = time.perf_counter()
    ms = {k: (rollouts.timing_s[k] - before[k]) * 1e3 for k in ("policy", "dynamics", "value")}
    ms["encode"] = (encode.seconds - enc0) * 1e3
    ms["other"] = (t1 - t0) * 1e3 - sum(ms.values())
    ms["push"] = (t2 - t1) * 1e3
    return {"samples": len(payloads), "round_ms": (t2 - t0) * 1e3, "payload_bytes": sum(map(len, payloads)), **ms}


def summarize(rows: list[dict]) -> dict:
    total_s = sum(r["round_ms"] for r in rows) / 1e3
    samples = sum(r["samples"] for r in rows)
    out = {"rounds": len(rows), "samples": samples, "seconds": total_s, "samples_per_s": samples / total_s,
           "samples_per_s_without_push": samples / (total_s - sum(r["push"] for r in rows) / 1e3),
           "push_share": sum(r["push"] for r in rows) / 1e3 / total_s,
           "round_ms_median": float(np.median([r["round_ms"] for r in rows])),
           "payload_kib_per_sample": sum(r["payload_bytes"] for r in rows) / samples / 1024}
    for stage in STAGES:
        values = np.asarray([r[stage] for r in rows])
        out[f"{stage}_ms_mean"], out[f"{stage}_ms_median"] = float(values.mean()), float(np.median(values))
        out[f"{stage}_share"] = float(values.sum() / 1e3 / total_s)
    return out


async def bench(args, store: Path, data: list[Path], work: Path, console: Console) -> dict:
    import torch

    from rise.data.loading import load_episodes_in_memory
    from rise.embodiment import load_embodiment
    from rise.registry import Registry
    from rise.transport import connect_dynamics, connect_policy, connect_value
    from services.trainer.config import RolloutConfig, ServicesConfig
    from services.trainer.replay import ReplayConfig, ReplayQueue
    from services.trainer.rollout import Rollouts, StartStates, dynamics_shape

    torch.set_num_threads(1)  # the services run with torch_threads: 1
    logging.getLogger("rise.model_host").setLevel(logging.ERROR)  # "alias not in registry": value/dynamics have no candidate
    embodiment = load_embodiment(args.embodiment)
    registry = Registry(store)
    versions = {name: registry.aliases(name) for name in MODELS}
    episodes = load_episodes_in_memory(data, embodiment)
    shape = dynamics_shape(registry, "", embodiment.chunk_length)
    rollout_cfg = RolloutConfig(workers=args.workers, dynamics_steps=args.dynamics_steps, policy_steps=args.policy_steps)
    replay_cfg = ReplayConfig(url=args.redis)
    replay = ReplayQueue(replay_cfg, f"rise-bench:trainer-throughput:{uuid.uuid4().hex[:8]}")
    replay.ensure_group()  # as services/trainer/run.py does before its first push

    console.print("starting policy, value, dynamics services and loading the in-process models")
    t = time.perf_counter()
    processes = ServiceProcesses(store, work / "service-logs")
    encode = EncodeTimer()
    clients = {}
    try:
        local = await asyncio.gather(LocalPolicy("policy", store, args.embodiment).start(),
                                     LocalDynamics("dynamics", store, args.embodiment).start(),
                                     LocalValue("value", store, args.embodiment).start())
        routes = await processes.wait_ready()
        console.print(f"  ready in {time.perf_counter() - t:.0f} s; routes {routes}")
        remote = (connect_policy(processes.urls["policy"]), connect_dynamics(processes.urls["dynamics"]),
                  connect_value(processes.urls["value"]))
        clients = {"services": remote, "in-process": tuple(local)}
        services_cfg = ServicesConfig(**{name: processes.urls[name] for name in MODELS})
        # Same seed: both modes start from the same real frames and draw the same restarts.
        rollouts = {mode: Rollouts(rollout_cfg, services_cfg, clients[mode], StartStates(episodes, shape, None),
                                   f"bench-{mode}", seed=args.seed, log=console.print) for mode in MODES}
        rows: dict[str, list[dict]] = {mode: [] for mode in MODES}
        order, load = [], {}
        for b in range(args.blocks):
            order += [(b, m) for m in (MODES if b % 2 == 0 else MODES[::-1])]
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("warm-up", total=len(MODES) * (args.warmup + args.blocks * args.rounds))
            for mode in MODES:
                for _ in range(args.warmup):
                    await one_round(rollouts[mode], replay, encode, args.frame_encoding, args.jpeg_quality)
                    progress.advance(task)
            for block, mode in order:
                progress.update(task, description=f"block {block + 1}/{args.blocks}: {mode}")
                load[(block, mode)] = os.getloadavg()[0]
                for _ in range(args.rounds):
                    row = await one_round(rollouts[mode], replay, encode, args.frame_encoding, args.jpeg_quality)
                    rows[mode].append({"block": block, **row})
                    progress.advance(task)
        stats = replay.stats()
    finally:
        encode.restore()
        for client in clients.get("services", ()):
            await client.close()
        processes.stop()
        replay.delete()

    summary = {mode: summarize(rows[mode]) for mode in MODES}
    blocks = []
    for b in range(args.blocks):
        per = {mode: summarize([r for r in rows[mode] if r["block"] == b])["samples_per_s"] for mode in MODES}
        blocks.append({"block": b, **{f"{m}_samples_per_s": v for m, v in per.items()},
                       "ratio": per["services"] / per["in-process"],
                       **{f"{m}_loadavg_1min_at_start": load[(b, m)] for m in MODES}})
    ratio = summary["services"]["samples_per_s"] / summary["in-process"]["samples_per_s"]
    return {"versions": versions, "routes": routes, "replay_inserted": stats["inserted"],
            "summary": summary, "ratio_services_vs_in_process": ratio, "blocks": blocks, "rows": rows,
            "dynamics_history": shape.history, "dynamics_stride": shape.stride}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8, help="imagined episodes per round (the batch of every call)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per block")
    parser.add_argument("--blocks", type=int, default=3, help="blocks per mode, interleaved")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per mode first")
    parser.add_argument("--dynamics-steps", type=int, default=4, help="denoising steps of imagine (0: the model's default)")
    parser.add_argument("--policy-steps", type=int, default=0, help="denoising steps of act (0: the model's default)")
    parser.add_argument("--frame-encoding", choices=["jpeg", "raw"], default="jpeg", help="replay frames (trainer default jpeg)")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14", help="replay Redis (a unique key, deleted at the end)")
    parser.add_argument("--data", type=Path, action="append", default=[], help="LeRobot dataset(s) (default: collect)")
    parser.add_argument("--store", type=Path, help="registry with stable policy/value/dynamics (+ policy candidate); "
                                                   "skips training (needs --data)")
    parser.add_argument("--task", default="pick-place", help="MetaWorld task to collect when no --data")
    parser.add_argument("--episodes", type=int, default=3, help="episodes to collect when no --data")
    parser.add_argument("--train-steps", type=int, default=2, help="training steps per model (per stage) when no --store")
    parser.add_argument("--embodiment", default="metaworld")
    parser.add_argument("--workdir", type=Path, help="keep data, registry and service logs here (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "trainer_throughput.json")
    args = parser.parse_args()
    if args.store and not args.data:
        parser.error("--store needs --data (the rollouts start from the dataset's frames)")

    console = Console(width=max(Console().width, 150))  # the table has 11 columns
    info = machine()
    started = time.perf_counter()
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="trainer-throughput-")
    work = Path(args.workdir or tmp)
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = args.data
        store = args.store
        if store is None:
            data = build_store(work, data, args.task, args.episodes, args.train_steps, args.seed, console)
            store = work / "store"
        setup_s = time.perf_counter() - started
        result = asyncio.run(bench(args, store.resolve(), data, work, console))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()

    s = result["summary"]
    base = s["in-process"]["samples_per_s"]
    table = Table("mode", "samples/s", "vs in-process", "round ms (median)", *[f"{k} ms" for k in STAGES], "push share",
                  title=f"trainer rollout loop: {args.workers} workers, dynamics {args.dynamics_steps or 'default'} steps, "
                        f"policy {args.policy_steps or 'default'} steps; {args.blocks} x {args.rounds} rounds per mode, "
                        f"interleaved; mean ms per round")
    for mode in MODES:
        m = s[mode]
        table.add_row(mode, f"{m['samples_per_s']:.2f}", f"{m['samples_per_s'] / base:.2f}x", f"{m['round_ms_median']:.0f}",
                      *[f"{m[f'{k}_ms_mean']:.1f}" for k in STAGES], f"{100 * m['push_share']:.1f}%")
    console.print(table)
    console.print("per block, services / in-process: " + ", ".join(f"{b['ratio']:.2f}" for b in result["blocks"]))
    console.print(f"machine: {info['nproc']} x {info['cpu']}, load {info['loadavg_start']} -> {info['loadavg_end']}; "
                  f"setup {setup_s:.0f} s, total {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({
            "command": " ".join([".venv/bin/python", *sys.argv]), "machine": info,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "data"},
            "data": [str(d) for d in data], "setup_s": setup_s, "total_s": time.perf_counter() - started, **result},
            indent=1) + "\n")
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
