"""`rise serve dynamics`: DynamicsService.Imagine + ModelAdmin.

Concurrent Imagine requests for the same version, history length and number of steps are
merged into one model call (`rise.batching`); seeded requests run alone, so a seed gives the
same frames whatever else is in flight.

Model interface: `imagine(history {view: uint8 [B, T, H, W, 3]}, actions float32 [B, chunk, A],
num_steps, seed) -> {view: uint8 [B, F, H, W, 3]}`. Privileged models (`needs_sim_state = True`,
the simulator-backed oracle) also get `tasks=` (B texts) and `sim_states=` (B float64 arrays or
None), are asked `check_items(tasks, sim_states)` before their items join a batch (so a bad
request fails alone, with its own item indices), and return `(frames, sim_states, states)`: the
simulator state after each chunk, sent back as ImaginedFuture.sim_state for chaining, and the robot
state the chunk ended in (ImaginedFuture.state: what the policy reads at a chained step).
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import NamedTuple

import numpy as np

from rise.batching import Batcher, BatchingConfig
from rise.errors import InvalidArgument
from rise.model_host import LoadedModel, ModelHost, ModelServiceConfig, load_by_kind, response_meta, start_model_service
from rise.observations import decode_actions, decode_views, stack_views
from rise.proto.v1 import dynamics_pb2, dynamics_pb2_grpc
from rise.serving import RunningServer, ServerConfig
from rise.tensors import from_tensor, to_tensor
from services.dynamics import oracle, persistence, sampler

KINDS = {persistence.KIND: persistence.load, oracle.KIND: oracle.load, sampler.KIND: sampler.load}


class DynamicsConfig(ModelServiceConfig):
    model_name: str = "dynamics"
    server: ServerConfig = ServerConfig(port=50053)  # policy 50051, value 50052, dynamics 50053, trainer 50054
    # Merging of concurrent Imagine requests into one model call.
    batching: BatchingConfig = BatchingConfig()
    # torch.compile mode of learned world models' transformer: "reduce-overhead" (CUDA graphs) is
    # the GPU setting (paper tier, H100: 4.7x eager-diffusers speed at batch 1, bench/RESULTS.md).
    # Each version compiles its power-of-two batch sizes up to batching.max_batch_size while it
    # loads (about a minute per size at the paper tier), so requests never wait for a compiler.
    compile: sampler.CompileMode = "off"


class _Item(NamedTuple):
    history: dict[str, np.ndarray]  # view -> uint8 [T, H, W, 3]
    actions: np.ndarray  # float32 [chunk, A]
    task: str
    sim_state: np.ndarray | None  # float64 [n], privileged models only


class DynamicsServicer(dynamics_pb2_grpc.DynamicsServiceServicer):
    def __init__(self, host: ModelHost, batching: BatchingConfig = BatchingConfig()):
        self.host = host
        self.embodiment = host.embodiment
        self.batcher = Batcher(batching, "dynamics")

    async def Imagine(self, request, context):
        start = time.perf_counter()
        if not request.items:
            raise InvalidArgument("items: nothing to imagine")
        loaded = self.host.get(request.model.version)
        privileged = getattr(loaded.model, "needs_sim_state", False)
        dims: dict[str, int] = {}  # one history length "T" for the whole batch
        items = []
        for i, item in enumerate(request.items):
            sim_state = (from_tensor(item.sim_state, f"items[{i}].sim_state", "float64", (None,))
                         if privileged and item.HasField("sim_state") else None)
            items.append(_Item(decode_views(item.history, self.embodiment, f"items[{i}].history", lead=("T",), dims=dims),
                               decode_actions(item.actions, self.embodiment, f"items[{i}]"), item.task, sim_state))
        if privileged and hasattr(loaded.model, "check_items"):
            await asyncio.to_thread(loaded.model.check_items, [it.task for it in items], [it.sim_state for it in items])
        key = None if request.seed else (loaded.version, dims["T"], request.num_steps)
        done = await self.batcher.submit(key, items, functools.partial(self._imagine, loaded, request.num_steps, request.seed))
        out = []
        for frames, sim_state, state in done.results:
            future = dynamics_pb2.ImaginedFuture(frames={v: to_tensor(frames[v]) for v in self.embodiment.views})
            if sim_state is not None:
                future.sim_state.CopyFrom(to_tensor(np.asarray(sim_state, np.float64)))
            if state is not None:
                future.state.CopyFrom(to_tensor(state))
            out.append(future)
        return dynamics_pb2.ImagineResponse(futures=out, meta=response_meta(loaded, start, done.compute_ms, done.queue_ms))

    def _imagine(self, loaded: LoadedModel, num_steps: int, seed: int, items: list[_Item]
                 ) -> list[tuple[dict, np.ndarray | None, np.ndarray | None]]:
        """One model call for a (merged) batch, in a worker thread -> per item (frames, sim state or None,
        robot state or None)."""
        extra = {}
        if getattr(loaded.model, "needs_sim_state", False):
            extra = {"tasks": [it.task for it in items], "sim_states": [it.sim_state for it in items]}
        output = loaded.model.imagine(stack_views([it.history for it in items], self.embodiment),
                                      np.stack([it.actions for it in items]), num_steps, seed, **extra)
        frames, sim_states, states = model_output(output)
        emb, batch = self.embodiment, len(items)
        for v in emb.views:
            got = frames.get(v)
            shape = None if got is None else got.shape
            if got is None or got.dtype != np.uint8 or got.ndim != 5 or shape[0] != batch or shape[2:] != (emb.image_height, emb.image_width, 3):
                raise RuntimeError(f"model {loaded.version} returned {v!r} frames {shape} {getattr(got, 'dtype', '')}, "
                                   f"expected uint8 [{batch}, F, {emb.image_height}, {emb.image_width}, 3]")
        if sim_states is not None and len(sim_states) != batch:
            raise RuntimeError(f"model {loaded.version} returned {len(sim_states)} sim states for {batch} items")
        if states is not None:
            states = np.asarray(states, np.float32)
            if states.shape != (batch, emb.state_dim):
                raise RuntimeError(f"model {loaded.version} returned robot states {list(states.shape)}, "
                                   f"expected float32 [{batch}, {emb.state_dim}]")
        return [({v: frames[v][b] for v in emb.views}, None if sim_states is None else sim_states[b],
                 None if states is None else states[b]) for b in range(batch)]


def model_output(output) -> tuple[dict[str, np.ndarray], list | None, list | None]:
    """A model's `imagine` result -> (frames, simulator states or None, robot states or None): learned
    models return the frames alone, privileged ones (frames, sim_states, states)."""
    return output if isinstance(output, tuple) else (output, None, None)


async def start(config: DynamicsConfig) -> RunningServer:
    kinds = {**KINDS, sampler.KIND: functools.partial(sampler.load, compile_mode=config.compile,
                                                      warm_up_batch_size=config.batching.max_batch_size)}
    running, _ = await start_model_service("dynamics", config, load_by_kind(kinds, "dynamics"),
                                           lambda host: DynamicsServicer(host, config.batching),
                                           dynamics_pb2_grpc.add_DynamicsServiceServicer_to_server)
    return running
