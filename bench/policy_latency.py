"""Latency of the learned policy's `act` through gRPC vs in-process, at batch 1 and batch 16.

The model is the flow-matching policy (`services/policy/model.py`, kind `flow_matching_policy`) at
the real `small` architecture (vision CNN, 4 x 192 transformer, frozen MiniLM text encoder); its
weights are trained for a couple of steps only, since speed does not depend on them. One registry
version, aliased `stable`, serves both modes:

  in-process   `FlowMatchingPolicy.act(views, state, tasks, bins, 0, 0)` called directly, on the
               version loaded as the server loads it (`ModelHost` + `load_by_kind(KINDS)` of
               services/policy/server.py), torch threads 1 in this process. No protobuf, no gRPC,
               no batcher.
  grpc batch   `rise serve policy` as a separate process (`torch_threads: 1`, default batching),
               called with `rise.transport.connect_policy(url).act(...)`: one `ActBatch` RPC per
               call (what the trainer's rollouts send), batch 1 and batch 16.
  grpc unary   batch 1 only: `PolicyService/Act` on a raw stub over `rise.serving.open_channel`,
               the request built from numpy on every call (what a robot sends). Its response's
               `meta.timing` (server queue and compute ms) is kept, to split the round trip.

Every call gets the same inputs: 3 metaworld views of random uint8 64x64x3, a random 4-d state,
one task text, advantage bin 10, seed 0, the model's default Euler steps (`num_steps` 0 -> 10).
The text embedding is cached per text by the MiniLM encoder, in both modes alike, so after the
warm-up a call costs vision + prefix + 10 transformer passes over the action chunk.

After `--warmup` untimed calls per mode and batch, `--blocks` blocks run; in each block every
batch size runs `--calls` calls per mode, the mode order reversed every other block, so that load
from other jobs on this shared machine hits the modes alike. The 1-minute load average is taken at
the start of every (block, batch) segment. Reported per mode and batch: p50 / p90 / p99 / mean ms
per call, p50 and mean ms per item, and the p50 ratio to in-process; per block, the same ratio.
p99 of 100 calls is the second-slowest call: read it as "near the worst seen".

Setup: with no `--store`, a small MetaWorld dataset is collected (`rise.data.collect.collect`,
`--task`, `--episodes`) or `--data` is used, and the small policy is trained `--train-steps` steps
with `services/policy/train.py: train()` and published as `stable` in a temporary registry.
`--workdir DIR` keeps data, registry and the service log for a later `--store DIR/store`.

    .venv/bin/python bench/policy_latency.py [--blocks 5] [--calls 20] [--warmup 5] [--batches 1 16] \
        [--store DIR | --data DIR] [--out bench/policy_latency.json]
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
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import ServiceProcesses, build_store, machine  # noqa: E402

IN_PROCESS, GRPC_BATCH, GRPC_UNARY = "in-process", "grpc ActBatch", "grpc Act (raw stub)"
TASK_TEXT = "pick and place a puck to a goal"
ADVANTAGE_BIN = 10


# ---- inputs and the three ways to call ------------------------------------------------------------
def make_inputs(embodiment, batch: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    h, w = embodiment.image_height, embodiment.image_width
    return {"views": {v: rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8) for v in embodiment.views},
            "states": rng.uniform(-0.5, 0.5, (batch, embodiment.state_dim)).astype(np.float32),
            "tasks": [TASK_TEXT] * batch, "bins": [ADVANTAGE_BIN] * batch}


class Callers:
    """One awaitable per mode: inputs -> (seconds, server timing or None). Each checks its chunk's shape."""

    def __init__(self, model, client, stub, embodiment):
        self.model, self.client, self.stub, self.emb = model, client, stub, embodiment

    def _check(self, actions: np.ndarray, batch: int) -> None:
        want = (batch, self.emb.chunk_length, self.emb.action_dim)
        if actions.shape != want or not np.isfinite(actions).all():
            raise RuntimeError(f"bad chunk {actions.shape}, expected {want}")

    async def call(self, mode: str, x: dict) -> tuple[float, dict | None]:
        batch = len(x["states"])
        if mode == IN_PROCESS:
            t = time.perf_counter()
            actions = self.model.act(x["views"], x["states"], x["tasks"], np.asarray(x["bins"], np.int64), 0, 0)
            seconds = time.perf_counter() - t
            self._check(np.asarray(actions), batch)
            return seconds, None
        if mode == GRPC_BATCH:
            t = time.perf_counter()
            chunks = await self.client.act(x["views"], x["states"], x["tasks"], x["bins"], 0, 0)
            seconds = time.perf_counter() - t
            self._check(chunks.actions, batch)
            return seconds, None
        from rise.proto.v1 import common_pb2, policy_pb2
        from rise.tensors import from_tensor, to_tensor

        t = time.perf_counter()  # a robot's call: build the request from numpy, send, decode the chunk
        obs = common_pb2.Observation(views={v: to_tensor(a[0]) for v, a in x["views"].items()}, state=to_tensor(x["states"][0]),
                                     task=x["tasks"][0], timestamp_ns=time.time_ns())
        reply = await self.stub.Act(policy_pb2.ActRequest(observation=obs, advantage_bin=x["bins"][0]))
        chunk = from_tensor(reply.chunk.actions, "chunk", "float32", (self.emb.chunk_length, self.emb.action_dim))
        seconds = time.perf_counter() - t
        self._check(chunk[None], 1)
        timing = reply.meta.timing
        return seconds, {"queue_ms": timing.queue_ms, "compute_ms": timing.compute_ms, "total_ms": timing.total_ms}


def stats(ms: list[float], batch: int) -> dict:
    a = np.asarray(ms)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"calls": len(a), "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(a.mean()),
            "max_ms": float(a.max()), "p50_ms_per_item": float(p50) / batch, "mean_ms_per_item": float(a.mean()) / batch,
            "items_per_s": 1000 * batch / float(a.mean())}


async def bench(args, store: Path, work: Path, console: Console) -> dict:
    import torch

    from rise.embodiment import load_embodiment
    from rise.model_host import ModelHost, ModelServiceConfig, load_by_kind
    from rise.proto.v1 import policy_pb2_grpc
    from rise.registry import Registry
    from rise.serving import open_channel
    from rise.transport import connect_policy
    from services.policy.server import KINDS

    torch.set_num_threads(1)  # as the server with torch_threads: 1
    logging.getLogger("rise.model_host").setLevel(logging.ERROR)  # "alias not in registry" for candidate/latest
    embodiment = load_embodiment(args.embodiment)
    console.print("starting `rise serve policy` and loading the same version in this process")
    t = time.perf_counter()
    server = ServiceProcesses(store, work / "service-logs", models=("policy",))
    client = channel = None
    try:
        host = ModelHost(Registry(store), "policy", embodiment, load_by_kind(KINDS, "policy"))
        await host.start(ModelServiceConfig.model_fields["preload"].default)
        loaded = host.get("stable")
        routes = dict((await server.wait_ready())["policy"])
        console.print(f"  ready in {time.perf_counter() - t:.0f} s; in-process {loaded.version} "
                      f"({loaded.manifest.kind}), server routes {routes}")
        if routes.get("stable") != loaded.version:
            raise RuntimeError(f"the server routes stable to {routes.get('stable')}, in-process has {loaded.version}")
        client = connect_policy(server.urls["policy"])
        channel = open_channel(server.urls["policy"].removeprefix("grpc://"))
        callers = Callers(loaded.model, client, policy_pb2_grpc.PolicyServiceStub(channel), embodiment)
        inputs = {b: make_inputs(embodiment, b, args.seed + b) for b in args.batches}
        modes = {b: [IN_PROCESS, GRPC_BATCH] + ([GRPC_UNARY] if b == 1 and not args.no_unary else []) for b in args.batches}

        rows: list[dict] = []
        load: list[dict] = []
        total = sum(len(modes[b]) * (args.warmup + args.blocks * args.calls) for b in args.batches)
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("warm-up", total=total)
            for b in args.batches:
                for mode in modes[b]:
                    progress.update(task, description=f"warm-up: batch {b}, {mode}")
                    for _ in range(args.warmup):
                        await callers.call(mode, inputs[b])
                        progress.advance(task)
            for block in range(args.blocks):
                for b in args.batches:
                    load.append({"block": block, "batch": b, "loadavg_1min": os.getloadavg()[0]})
                    for mode in (modes[b] if block % 2 == 0 else modes[b][::-1]):
                        progress.update(task, description=f"block {block + 1}/{args.blocks}: batch {b}, {mode}")
                        for _ in range(args.calls):
                            seconds, timing = await callers.call(mode, inputs[b])
                            rows.append({"block": block, "batch": b, "mode": mode, "ms": seconds * 1e3,
                                         **({"server": timing} if timing else {})})
                            progress.advance(task)
    finally:
        if client is not None:
            await client.close()
        if channel is not None:
            await channel.close()
        server.stop()

    summary, blocks = {}, []
    for b in args.batches:
        base = stats([r["ms"] for r in rows if r["batch"] == b and r["mode"] == IN_PROCESS], b)
        for mode in modes[b]:
            mine = [r for r in rows if r["batch"] == b and r["mode"] == mode]
            s = stats([r["ms"] for r in mine], b)
            s["p50_ratio_vs_in_process"] = s["p50_ms"] / base["p50_ms"]
            s["mean_ratio_vs_in_process"] = s["mean_ms"] / base["mean_ms"]
            if mode == GRPC_UNARY:
                for key in ("queue_ms", "compute_ms", "total_ms"):
                    s[f"server_{key}_p50"] = float(np.median([r["server"][key] for r in mine]))
            summary[f"batch {b}: {mode}"] = {"batch": b, "mode": mode, **s}
        for block in range(args.blocks):
            p50 = {m: float(np.median([r["ms"] for r in rows if r["batch"] == b and r["mode"] == m and r["block"] == block]))
                   for m in modes[b]}
            blocks.append({"block": block, "batch": b, **{f"{m} p50_ms": v for m, v in p50.items()},
                           **{f"{m} / in-process p50": p50[m] / p50[IN_PROCESS] for m in modes[b] if m != IN_PROCESS},
                           "loadavg_1min_at_start": next(x["loadavg_1min"] for x in load if x["block"] == block and x["batch"] == b)})
    return {"version": loaded.version, "kind": loaded.manifest.kind, "routes": routes, "summary": summary,
            "blocks": blocks, "rows": rows,
            "parameters": sum(p.numel() for p in loaded.model.model.parameters()),
            "default_num_steps": loaded.model.config.default_num_steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=5, help="interleaved blocks")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per mode, batch and block")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per mode and batch first")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes")
    parser.add_argument("--no-unary", action="store_true", help="skip the raw unary Act mode at batch 1")
    parser.add_argument("--data", type=Path, action="append", default=[], help="LeRobot dataset(s) to train on (default: collect)")
    parser.add_argument("--store", type=Path, help="registry with a `stable` small flow-matching policy; skips training")
    parser.add_argument("--task", default="pick-place", help="MetaWorld task to collect when no --data")
    parser.add_argument("--episodes", type=int, default=2, help="episodes to collect when no --data")
    parser.add_argument("--train-steps", type=int, default=2, help="training steps when no --store")
    parser.add_argument("--embodiment", default="metaworld")
    parser.add_argument("--workdir", type=Path, help="keep data, registry and service log here (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "policy_latency.json")
    args = parser.parse_args()

    console = Console(width=max(Console().width, 140))
    info = machine()
    started = time.perf_counter()
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="policy-latency-")
    work = Path(args.workdir or tmp)
    work.mkdir(parents=True, exist_ok=True)
    try:
        data, store = args.data, args.store
        if store is None:
            data = build_store(work, data, args.task, args.episodes, args.train_steps, args.seed, console, models=("policy",))
            store = work / "store"
        setup_s = time.perf_counter() - started
        result = asyncio.run(bench(args, store.resolve(), work, console))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()

    table = Table("batch", "mode", "p50 ms", "p90 ms", "p99 ms", "mean ms", "p50 ms/item", "mean ms/item", "p50 vs in-process",
                  title=f"small flow-matching policy act ({result['default_num_steps']} Euler steps), "
                        f"{args.blocks} x {args.calls} calls per mode and batch, interleaved")
    for s in result["summary"].values():
        table.add_row(str(s["batch"]), s["mode"], *[f"{s[k]:.1f}" for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms")],
                      f"{s['p50_ms_per_item']:.2f}", f"{s['mean_ms_per_item']:.2f}", f"{s['p50_ratio_vs_in_process']:.2f}x")
    console.print(table)
    for b in args.batches:
        per = [blk for blk in result["blocks"] if blk["batch"] == b]
        ratios = {k: [blk[k] for blk in per] for k in per[0] if k.endswith("/ in-process p50")}
        for k, v in ratios.items():
            console.print(f"batch {b}, per block {k}: " + ", ".join(f"{x:.2f}" for x in v))
        console.print(f"batch {b}, load average at block starts: " + ", ".join(f"{blk['loadavg_1min_at_start']:.1f}" for blk in per))
    unary = result["summary"].get(f"batch 1: {GRPC_UNARY}")
    if unary:
        console.print(f"unary Act, server-side p50: queue {unary['server_queue_ms_p50']:.1f} ms, compute "
                      f"{unary['server_compute_ms_p50']:.1f} ms, handler total {unary['server_total_ms_p50']:.1f} ms")
    console.print(f"machine: {info['nproc']} x {info['cpu']}, load {info['loadavg_start']} -> {info['loadavg_end']}; "
                  f"setup {setup_s:.0f} s, total {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({
            "command": " ".join([".venv/bin/python", *sys.argv]), "machine": info,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "data"},
            "data": [str(d) for d in data], "task_text": TASK_TEXT, "advantage_bin": ADVANTAGE_BIN,
            "setup_s": setup_s, "total_s": time.perf_counter() - started, **result}, indent=1) + "\n")
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
