"""`rise serve value`: ValueService.Score + ModelAdmin.

Concurrent Score requests for the same version are merged into one model call
(`rise.batching`); each request gets its own values back. Validation happens per request
before it joins a batch, so a bad request fails alone with INVALID_ARGUMENT.

Model interface: `score(views {view: uint8 [N, H, W, 3]}, tasks list[str]) -> float32 [N] in [-1, 1]`.
Privileged models (`needs_sim_state = True`, the simulator-backed oracle) are also asked
`check_items(tasks, frame counts, sim_states)` before their items join a batch and get
`sim_states=` float64 [N, n] (ScoreItem.sim_states, one per frame); others never see them.
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
from rise.observations import decode_views
from rise.tensors import from_tensor
from rise.proto.v1 import value_pb2, value_pb2_grpc
from rise.serving import RunningServer, ServerConfig
from services.value import linear, model, oracle

KINDS = {linear.KIND: linear.load, model.KIND: model.load, oracle.KIND: oracle.load}


class ValueConfig(ModelServiceConfig):
    model_name: str = "value"
    server: ServerConfig = ServerConfig(port=50052)  # policy 50051, value 50052, dynamics 50053, trainer 50054
    # Merging of concurrent Score requests into one model call.
    batching: BatchingConfig = BatchingConfig()


class _Item(NamedTuple):
    frames: dict[str, np.ndarray]  # view -> uint8 [F, H, W, 3]
    task: str
    sim_states: np.ndarray | None  # float64 [F, n], privileged models only


class ValueServicer(value_pb2_grpc.ValueServiceServicer):
    def __init__(self, host: ModelHost, batching: BatchingConfig = BatchingConfig()):
        self.host = host
        self.embodiment = host.embodiment
        self.batcher = Batcher(batching, "value")

    async def Score(self, request, context):
        start = time.perf_counter()
        if not request.items:
            raise InvalidArgument("items: no items to score")
        loaded = self.host.get(request.model.version)
        privileged = getattr(loaded.model, "needs_sim_state", False)
        items = []
        for i, item in enumerate(request.items):
            views = decode_views(item.frames, self.embodiment, f"items[{i}]", lead=("F",))
            if not len(next(iter(views.values()))):
                raise InvalidArgument(f"items[{i}]: no frames to score")
            sim_states = (from_tensor(item.sim_states, f"items[{i}].sim_states", "float64", (None, None))
                          if privileged and item.HasField("sim_states") else None)
            items.append(_Item(views, item.task, sim_states))
        if privileged:
            await asyncio.to_thread(loaded.model.check_items, [it.task for it in items],
                                    [len(next(iter(it.frames.values()))) for it in items], [it.sim_states for it in items])
        done = await self.batcher.submit(loaded.version, items, functools.partial(self._score, loaded))
        results = [value_pb2.ScoreResult(values=values.tolist()) for values in done.results]
        return value_pb2.ScoreResponse(results=results, meta=response_meta(loaded, start, done.compute_ms, done.queue_ms))

    def _score(self, loaded: LoadedModel, items: list[_Item]) -> list[np.ndarray]:
        """One model call for a (merged) batch, in a worker thread -> per item its values [F]."""
        counts = [len(it.frames[self.embodiment.views[0]]) for it in items]
        batch = {v: np.concatenate([it.frames[v] for it in items]) for v in self.embodiment.views}
        tasks = [it.task for it, n in zip(items, counts) for _ in range(n)]
        if getattr(loaded.model, "needs_sim_state", False):
            states = np.concatenate([it.sim_states for it in items])
            values = np.asarray(loaded.model.score(batch, tasks, sim_states=states), np.float32)
        else:
            values = np.asarray(loaded.model.score(batch, tasks), np.float32)
        if values.shape != (len(tasks),):
            raise RuntimeError(f"model {loaded.version} returned values {list(values.shape)}, expected [{len(tasks)}]")
        bounds = np.cumsum([0, *counts])
        return [values[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


async def start(config: ValueConfig) -> RunningServer:
    running, _ = await start_model_service("value", config, load_by_kind(KINDS, "value"),
                                           lambda host: ValueServicer(host, config.batching),
                                           value_pb2_grpc.add_ValueServiceServicer_to_server)
    return running
