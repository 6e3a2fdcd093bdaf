"""`make demo` for now: publish baseline versions, start the three model services on
127.0.0.1, call each once over gRPC, and show what answered. Later issues grow this into the
whole RISE loop."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from rise.baselines import publish_baseline
from rise.embodiment import PRESETS
from rise.proto.v1 import (common_pb2, dynamics_pb2, dynamics_pb2_grpc, model_admin_pb2, model_admin_pb2_grpc,
                           policy_pb2, policy_pb2_grpc, value_pb2, value_pb2_grpc)
from rise.registry import Registry
from rise.serving import ServerConfig, open_channel
from rise.services import service
from rise.tensors import from_tensor, to_tensor

EMBODIMENT = PRESETS["metaworld"]


def _scene(seed: int, frames: int) -> dict[str, np.ndarray]:
    """A deterministic synthetic frame stack per view (the simulator arrives with the data issue)."""
    rng = np.random.default_rng(seed)
    h, w = EMBODIMENT.image_height, EMBODIMENT.image_width
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    return {v: np.clip(ramp + rng.normal(0, 20, (frames, h, w, 3)), 0, 255).astype(np.uint8) for v in EMBODIMENT.views}


async def _demo(store: Path, console: Console) -> Table:
    servers = {}
    for name in ("policy", "value", "dynamics"):
        config_cls, start = service(name)
        config = config_cls(registry_root=store, server=ServerConfig(port=0, log_json=False))
        servers[name] = await start(config)
        console.print(f"started {name} service on {servers[name].address}")
    table = Table("service", "call", "version", "answer", "round trip ms", "server ms")
    try:
        state = np.zeros(EMBODIMENT.state_dim, np.float32)
        async with open_channel(servers["policy"].address) as channel:
            obs = common_pb2.Observation(views={v: to_tensor(f[0]) for v, f in _scene(0, 1).items()},
                                         state=to_tensor(state), task="pick up the puck", timestamp_ns=time.time_ns())
            t = time.perf_counter()
            reply = await policy_pb2_grpc.PolicyServiceStub(channel).Act(policy_pb2.ActRequest(observation=obs, advantage_bin=10))
            chunk = from_tensor(reply.chunk.actions)
            table.add_row("policy", "Act", reply.meta.version, f"chunk {list(chunk.shape)}",
                          f"{(time.perf_counter() - t) * 1e3:.1f}", f"{reply.meta.timing.total_ms:.1f}")
        async with open_channel(servers["dynamics"].address) as channel:
            item = dynamics_pb2.ImagineItem(history={v: to_tensor(f) for v, f in _scene(1, 4).items()}, actions=to_tensor(chunk))
            t = time.perf_counter()
            reply = await dynamics_pb2_grpc.DynamicsServiceStub(channel).Imagine(dynamics_pb2.ImagineRequest(items=[item]))
            future = {v: from_tensor(f) for v, f in reply.futures[0].frames.items()}
            first = future[EMBODIMENT.views[0]]
            table.add_row("dynamics", "Imagine", reply.meta.version, f"{len(future)} views x {list(first.shape)}",
                          f"{(time.perf_counter() - t) * 1e3:.1f}", f"{reply.meta.timing.total_ms:.1f}")
        async with open_channel(servers["value"].address) as channel:
            item = value_pb2.ScoreItem(frames={v: to_tensor(f) for v, f in future.items()}, task="pick up the puck")
            t = time.perf_counter()
            reply = await value_pb2_grpc.ValueServiceStub(channel).Score(value_pb2.ScoreRequest(items=[item]))
            values = reply.results[0].values
            table.add_row("value", "Score", reply.meta.version, f"{len(values)} values, mean {np.mean(values):+.3f}",
                          f"{(time.perf_counter() - t) * 1e3:.1f}", f"{reply.meta.timing.total_ms:.1f}")
            listing = await model_admin_pb2_grpc.ModelAdminStub(channel).ListVersions(model_admin_pb2.ListVersionsRequest())
            table.add_row("value", "ModelAdmin.ListVersions", "", f"{len(listing.versions)} version(s), aliases {dict(listing.aliases)}", "", "")
    finally:
        for running in servers.values():
            await running.stop(1.0)
    return table


def run_demo(workdir: Path, console: Console) -> int:
    store = workdir / "model_store"
    shutil.rmtree(store, ignore_errors=True)
    registry = Registry(store)
    for model in ("policy", "value", "dynamics"):
        manifest = publish_baseline(registry, model, EMBODIMENT)
        registry.set_alias(model, "stable", manifest.version)
        console.print(f"published baseline {model}/{manifest.version} ({manifest.kind}) as stable in {store}")
    table = asyncio.run(_demo(store, console))
    Console().print(table)
    console.print("[green]all three services answered over gRPC.[/green] The trained models and the imagination "
                  "loop arrive with the dynamics, value/policy and trainer issues.")
    return 0
