"""One `imagine` call through gRPC (`rise serve dynamics`) and through Triton (`rise serve-triton
dynamics`), side by side, with the persistence model: the transports' own cost.

Each server runs in a process of its own, as deployed (the gRPC DynamicsService; pytriton's Triton
server process plus its model process); this process is the client, using `rise.transport` for
both, so every timed call covers the client-visible path: numpy in -> request -> server -> model
-> response -> numpy out. The embodiment is MetaWorld's (3 views of 64x64 RGB, 8-action chunks),
history T=1, so at batch B one call sends B x 36 KiB and receives B x 288 KiB (8 future frames).
Both servers batch with the same settings (`--wait-ms`, the service default 2 ms: a lone request
waits that long for company on both). After a warm-up, calls alternate transport by transport in a
shuffled order per round, so machine noise hits both alike; batch 1 and batch 8 likewise. An
in-process call (model.imagine, no transport) is timed too, for the floor.

    .venv/bin/python bench/dynamics_transport.py [--iterations 200] [--warmup 20] [--wait-ms 2] [--out results.json]

Reference-sized frames (the gRPC cost a GPU world model pays on top of its compute): `--embodiment
piper_dual --transports grpc --batches 1 2 4 8 --max-message-mb 512` (3 views of 224x224, 50 frames
per chunk: 22.6 MB back per imagined chunk, twice the paper tier's 25 frames of 192x256).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rise.baselines import publish_baseline  # noqa: E402
from rise.batching import BatchingConfig  # noqa: E402
from rise.embodiment import PRESETS  # noqa: E402
from rise.registry import Registry  # noqa: E402

EMB = PRESETS["metaworld"]  # the default; --embodiment piper_dual sends reference-sized frames
BATCHES = (1, 8)


def _grpc_server(root: str, wait_ms: float, ready, stop, max_message_mb: float = 64, embodiment: str = EMB.name) -> None:
    from rise.serving import ServerConfig
    from services.dynamics.server import DynamicsConfig, start

    logging.disable(logging.INFO)

    async def main():
        config = DynamicsConfig(registry_root=Path(root), preload=["stable"], batching=BatchingConfig(max_wait_ms=wait_ms),
                                embodiment=embodiment,
                                server=ServerConfig(port=0, log_json=False, max_message_mb=max_message_mb))
        running = await start(config)
        ready.put(f"grpc://{running.address}")
        await asyncio.to_thread(stop.wait)
        await running.stop(0)

    asyncio.run(main())


def _triton_server(root: str, wait_ms: float, ready, stop, embodiment: str = EMB.name) -> None:
    from rise.triton_binding import TritonSettings, serve_triton
    from services.dynamics.triton import DynamicsTritonConfig

    logging.disable(logging.INFO)
    config = DynamicsTritonConfig(registry_root=Path(root), preload=["stable"], batching=BatchingConfig(max_wait_ms=wait_ms),
                                  embodiment=embodiment,
                                  triton=TritonSettings(grpc_port=0, http_port=0, metrics_port=0, print_server_log=False))
    running = serve_triton("dynamics", config)
    ready.put(f"{running.url}|{running.startup_s}")
    stop.wait()
    running.stop()


def inputs(batch: int, seed: int = 0, emb=EMB) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    history = {v: rng.integers(0, 256, (batch, 1, emb.image_height, emb.image_width, 3), dtype=np.uint8) for v in emb.views}
    return history, rng.uniform(-1, 1, (batch, emb.chunk_length, emb.action_dim)).astype(np.float32)


def stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "calls": len(a)}


async def measure(urls: dict[str, str], iterations: int, warmup: int, seed: int, emb=EMB, batches=BATCHES,
                  max_message_mb: float = 64) -> dict:
    from rise.serving import ClientConfig
    from rise.transport import connect_dynamics
    from services.dynamics.persistence import PersistenceDynamics

    clients = {name: connect_dynamics(url, ClientConfig(address="", max_message_mb=max_message_mb))
               for name, url in urls.items()}
    model = PersistenceDynamics(emb.chunk_length, emb)
    rng = random.Random(seed)
    timings: dict[tuple[str, int], list[float]] = {}
    try:
        for round_ in range(warmup + iterations):
            jobs = [(name, b) for name in [*clients, "in-process"] for b in batches]
            rng.shuffle(jobs)
            for name, batch in jobs:
                history, actions = inputs(batch, round_, emb)
                start = time.perf_counter()
                if name == "in-process":
                    frames = model.imagine(history, actions)
                else:
                    frames = (await clients[name].imagine(history, actions)).frames
                elapsed = (time.perf_counter() - start) * 1000
                assert frames[emb.views[0]].shape == (batch, emb.chunk_length, emb.image_height, emb.image_width, 3)
                if round_ >= warmup:
                    timings.setdefault((name, batch), []).append(elapsed)
    finally:
        for client in clients.values():
            await client.close()
    return {f"{name} b{batch}": stats(ms) for (name, batch), ms in sorted(timings.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--wait-ms", type=float, default=BatchingConfig().max_wait_ms)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--embodiment", default="metaworld", choices=sorted(PRESETS),
                        help="piper_dual: 3 views of 224x224, 50 frames per chunk (~22 MiB per imagined chunk)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--transports", default="grpc,triton", help="Subset of grpc,triton.")
    parser.add_argument("--max-message-mb", type=float, default=64, help="Server and client gRPC message cap.")
    args = parser.parse_args()
    emb, transports = PRESETS[args.embodiment], args.transports.split(",")

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(Path(tmp) / "store")
        registry.set_alias("dynamics", "stable", publish_baseline(registry, "dynamics", emb).version)
        stop = ctx.Event()
        queues = {"grpc": ctx.Queue(), "triton": ctx.Queue()}
        targets = {"grpc": (_grpc_server, (args.max_message_mb, emb.name)), "triton": (_triton_server, (emb.name,))}
        procs = [ctx.Process(target=targets[t][0], args=(str(registry.root), args.wait_ms, queues[t], stop, *targets[t][1]),
                             daemon=True) for t in transports]
        for p in procs:
            p.start()
        try:
            urls, startup = {}, "nan"
            if "grpc" in transports:
                urls["grpc"] = queues["grpc"].get(timeout=120)
            if "triton" in transports:
                urls["triton"], startup = queues["triton"].get(timeout=300).split("|")
            results = asyncio.run(measure(urls, args.iterations, args.warmup, args.seed, emb, args.batches,
                                          args.max_message_mb))
        finally:
            stop.set()
            for p in procs:
                p.join(60)
                if p.is_alive():
                    p.terminate()

    print(f"imagine, persistence model, {emb.name} embodiment ({len(emb.views)} views {emb.image_height}x{emb.image_width}, "
          f"T=1, {emb.chunk_length} future frames); "
          f"{args.iterations} calls each after {args.warmup} warm-up rounds, interleaved; wait {args.wait_ms} ms")
    print(f"Triton startup (serve_triton, one model): {float(startup):.1f} s")
    print(f"{'':18} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name, s in results.items():
        print(f"{name:18} {s['p50_ms']:8.2f} {s['p90_ms']:8.2f} {s['p99_ms']:8.2f} {s['mean_ms']:8.2f}")
    if args.out:
        args.out.write_text(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {mp.cpu_count()} CPUs",
                                        "embodiment": emb.name, "batches": args.batches, "max_message_mb": args.max_message_mb,
                                        "iterations": args.iterations, "wait_ms": args.wait_ms, "triton_startup_s": float(startup),
                                        "results": results}, indent=2))


if __name__ == "__main__":
    main()
