"""Round-trip cost of the gRPC policy path for one piper_dual observation, next to an in-process call.

One observation = 3 views of uint8 224x224x3 (3 x 147 KiB raw) + a 14-d float32 state; the answer
is a 50x14 float32 action chunk from the linear baseline policy (published into a temporary
registry and aliased "stable"). Every timed call covers the whole client-visible path: build the
ActRequest from numpy (rise.tensors.to_tensor), get the answer, decode the chunk (from_tensor).

  in-process   PolicyServicer(host).Act(request, None) awaited directly, same ModelHost, no network
  unary raw    PolicyService/Act over a grpc.aio channel (rise.serving.open_channel), raw views
  stream raw   PolicyService/StreamAct, one long-lived stream, one request -> one response
  unary jpeg   PolicyService/Act with views sent as JPEG (quality 90): client encodes, server decodes

The server runs in this process on 127.0.0.1:0 (same event loop as the client, so client and server
share one interpreter), with the per-RPC access log silenced. After a warm-up, modes are interleaved
call by call in a shuffled order per round, so machine noise hits all of them alike. calls/s is
sequential throughput (one call in flight) = 1000 / mean ms. The server is started through
rise.model_host.start_model_service with exactly the arguments services.policy.server.start passes,
because start() does not return the ModelHost that the in-process mode must share. A second table
times the pieces alone (request build, JPEG encode/decode, protobuf (de)serialisation, the model).

    .venv/bin/python bench/grpc_overhead.py [--iterations 300] [--warmup 30] [--out results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from rise.baselines import publish_baseline
from rise.embodiment import PRESETS
from rise.model_host import load_by_kind, start_model_service
from rise.observations import decode_views
from rise.proto.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from rise.registry import Registry
from rise.serving import ServerConfig, open_channel
from rise.tensors import from_tensor, to_tensor
from services.policy.server import KINDS, PolicyConfig, PolicyServicer

EMB = PRESETS["piper_dual"]
MODES = ["in-process", "unary raw", "stream raw", "unary jpeg"]


def scene(seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Camera-like frames (smooth gradients, a few blocks, mild sensor noise) and a state vector."""
    rng = np.random.default_rng(seed)
    h, w = EMB.image_height, EMB.image_width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    views = {}
    for i, v in enumerate(EMB.views):
        img = np.stack([xx * (0.6 + 0.1 * c) + yy * (0.3 + 0.2 * i) for c in range(3)], axis=-1)
        for _ in range(6):
            y, x, s = rng.integers(0, h - 40), rng.integers(0, w - 40), rng.integers(10, 40)
            img[y:y + s, x:x + s] = rng.uniform(0, 255, 3)
        views[v] = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    return views, rng.normal(0, 0.5, EMB.state_dim).astype(np.float32)


def make_request(views, state, encoding: str) -> policy_pb2.ActRequest:
    obs = common_pb2.Observation(views={v: to_tensor(a, encoding) for v, a in views.items()},
                                 state=to_tensor(state), task="fold the towel", timestamp_ns=time.time_ns())
    return policy_pb2.ActRequest(observation=obs, advantage_bin=10)


def chunk_of(reply: policy_pb2.ActResponse) -> np.ndarray:
    chunk = from_tensor(reply.chunk.actions, "chunk", "float32", (EMB.chunk_length, EMB.action_dim))
    assert np.isfinite(chunk).all()
    return chunk


async def bench(iterations: int, warmup: int, console: Console) -> dict:
    logging.getLogger("rise.serving").setLevel(logging.WARNING)
    logging.getLogger("rise.model_host").setLevel(logging.ERROR)  # "candidate not in registry" is expected
    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(tmp)
        manifest = publish_baseline(registry, "policy", EMB)
        registry.set_alias("policy", "stable", manifest.version)
        config = PolicyConfig(registry_root=tmp, embodiment="piper_dual", server=ServerConfig(port=0, log_json=False))
        running, host = await start_model_service("policy", config, load_by_kind(KINDS, "policy"), PolicyServicer,
                                                  policy_pb2_grpc.add_PolicyServiceServicer_to_server)
        local = PolicyServicer(host)
        views, state = scene(0)
        try:
            parts = components(views, state, host.get("stable").model, iterations)
            async with open_channel(running.address) as channel:
                stub = policy_pb2_grpc.PolicyServiceStub(channel)
                stream = stub.StreamAct()

                async def stream_act(request):
                    await stream.write(request)
                    return await stream.read()

                calls = {
                    "in-process": lambda: local.Act(make_request(views, state, "raw"), None),
                    "unary raw": lambda: stub.Act(make_request(views, state, "raw")),
                    "stream raw": lambda: stream_act(make_request(views, state, "raw")),
                    "unary jpeg": lambda: stub.Act(make_request(views, state, "jpeg")),
                }
                reference = chunk_of(await calls["in-process"]())
                for mode in MODES:  # warm-up; every mode must give the in-process answer (jpeg: close to it)
                    for _ in range(warmup):
                        got = chunk_of(await calls[mode]())
                    assert np.allclose(got, reference, atol=1e-2), mode
                times: dict[str, list[float]] = {m: [] for m in MODES}
                order, rng = list(MODES), random.Random(0)
                with Progress(console=console, transient=True) as progress:
                    task = progress.add_task("interleaved rounds", total=iterations)
                    for _ in range(iterations):
                        rng.shuffle(order)
                        for mode in order:
                            t = time.perf_counter()
                            chunk_of(await calls[mode]())
                            times[mode].append((time.perf_counter() - t) * 1e3)
                        progress.advance(task)
                await stream.done_writing()
        finally:
            await running.stop(1.0)
    sizes = {m: make_request(views, state, "jpeg" if "jpeg" in m else "raw").ByteSize() for m in MODES}
    return {"modes": summarise(times, sizes), "components_p50_ms": parts}


def components(views, state, model, n: int) -> dict[str, float]:
    """p50 of the pieces the modes are made of, each timed alone (no network, no event loop)."""
    raw, jpeg = make_request(views, state, "raw"), make_request(views, state, "jpeg")
    batch = {v: a[None] for v, a in views.items()}
    pieces = {
        "build request, raw views": lambda: make_request(views, state, "raw"),
        "build request, jpeg views (encode)": lambda: make_request(views, state, "jpeg"),
        "serialize + parse raw request": lambda: policy_pb2.ActRequest.FromString(raw.SerializeToString()),
        "decode raw views (server)": lambda: decode_views(raw.observation.views, EMB, "o"),
        "decode jpeg views (server)": lambda: decode_views(jpeg.observation.views, EMB, "o"),
        "linear policy act (model only)": lambda: model.act(batch, state[None], [""], np.array([10])),
    }
    return {name: float(np.percentile([timed(fn) for _ in range(n)], 50)) for name, fn in pieces.items()}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def summarise(times: dict[str, list[float]], sizes: dict[str, int]) -> dict:
    base = float(np.percentile(times["in-process"], 50))
    rows = {}
    for mode, ms in times.items():
        a = np.asarray(ms)
        p50, p90, p99 = (float(np.percentile(a, q)) for q in (50, 90, 99))
        rows[mode] = {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "calls_per_s": 1000.0 / float(a.mean()),
                      "p50_ratio_vs_in_process": p50 / base, "request_bytes": sizes[mode], "n": len(a)}
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300, help="timed calls per mode (after warm-up)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed calls per mode first")
    parser.add_argument("--out", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    console = Console()
    result = asyncio.run(bench(args.iterations, args.warmup, console))
    rows = result["modes"]
    table = Table("mode", "request", "p50 ms", "p90 ms", "p99 ms", "calls/s", "p50 / in-process",
                  title=f"piper_dual Act, 3x224x224 views, {args.iterations} calls per mode, interleaved")
    for mode, r in rows.items():
        table.add_row(mode, f"{r['request_bytes'] / 1024:.0f} KiB", f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                      f"{r['p99_ms']:.2f}", f"{r['calls_per_s']:.0f}", f"{r['p50_ratio_vs_in_process']:.2f}x")
    console.print(table)
    parts = Table("component (timed alone)", "p50 ms", title="where the time goes")
    for name, ms in result["components_p50_ms"].items():
        parts.add_row(name, f"{ms:.2f}")
    console.print(parts)
    if args.out:
        args.out.write_text(json.dumps({"iterations": args.iterations, "warmup": args.warmup, **result}, indent=2))
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
