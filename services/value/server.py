"""`rise serve value`: ValueService.Score + ModelAdmin."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from rise.errors import InvalidArgument
from rise.model_host import ModelHost, ModelServiceConfig, load_by_kind, response_meta, start_model_service
from rise.observations import decode_views
from rise.proto.v1 import value_pb2, value_pb2_grpc
from rise.serving import RunningServer
from services.value import linear

KINDS = {linear.KIND: linear.load}


class ValueConfig(ModelServiceConfig):
    model_name: str = "value"


class ValueServicer(value_pb2_grpc.ValueServiceServicer):
    def __init__(self, host: ModelHost):
        self.host = host
        self.embodiment = host.embodiment

    async def Score(self, request, context):
        start = time.perf_counter()
        if not request.items:
            raise InvalidArgument("items: no items to score")
        loaded = self.host.get(request.model.version)
        frames, tasks, counts = [], [], []
        for i, item in enumerate(request.items):
            views = decode_views(item.frames, self.embodiment, f"items[{i}]", lead=("F",))
            count = len(next(iter(views.values())))
            frames.append(views)
            tasks += [item.task] * count
            counts.append(count)
        batch = {v: np.concatenate([f[v] for f in frames]) for v in self.embodiment.views}
        compute_start = time.perf_counter()
        values = await asyncio.to_thread(loaded.model.score, batch, tasks)
        if values.shape != (len(tasks),):
            raise RuntimeError(f"model {loaded.version} returned values {list(values.shape)}, expected [{len(tasks)}]")
        bounds = np.cumsum([0, *counts])
        results = [value_pb2.ScoreResult(values=values[a:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]
        return value_pb2.ScoreResponse(results=results, meta=response_meta(loaded, start, (time.perf_counter() - compute_start) * 1000))


async def start(config: ValueConfig) -> RunningServer:
    running, _ = await start_model_service("value", config, load_by_kind(KINDS, "value"), ValueServicer,
                                           value_pb2_grpc.add_ValueServiceServicer_to_server)
    return running
