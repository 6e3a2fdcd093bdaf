"""`rise serve dynamics`: DynamicsService.Imagine + ModelAdmin."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from rise.errors import InvalidArgument
from rise.model_host import ModelHost, ModelServiceConfig, load_by_kind, response_meta, start_model_service
from rise.observations import decode_actions, decode_views, stack_views
from rise.proto.v1 import dynamics_pb2, dynamics_pb2_grpc
from rise.serving import RunningServer
from rise.tensors import to_tensor
from services.dynamics import persistence

KINDS = {persistence.KIND: persistence.load}


class DynamicsConfig(ModelServiceConfig):
    model_name: str = "dynamics"


class DynamicsServicer(dynamics_pb2_grpc.DynamicsServiceServicer):
    def __init__(self, host: ModelHost):
        self.host = host
        self.embodiment = host.embodiment

    async def Imagine(self, request, context):
        start = time.perf_counter()
        if not request.items:
            raise InvalidArgument("items: nothing to imagine")
        loaded = self.host.get(request.model.version)
        dims: dict[str, int] = {}  # one history length "T" for the whole batch
        histories, actions = [], []
        for i, item in enumerate(request.items):
            histories.append(decode_views(item.history, self.embodiment, f"items[{i}].history", lead=("T",), dims=dims))
            actions.append(decode_actions(item.actions, self.embodiment, f"items[{i}]"))
        compute_start = time.perf_counter()
        futures = await asyncio.to_thread(loaded.model.imagine, stack_views(histories, self.embodiment),
                                          np.stack(actions), request.num_steps, request.seed)
        out = [dynamics_pb2.ImaginedFuture(frames={v: to_tensor(futures[v][b]) for v in self.embodiment.views})
               for b in range(len(request.items))]
        return dynamics_pb2.ImagineResponse(futures=out, meta=response_meta(loaded, start, (time.perf_counter() - compute_start) * 1000))


async def start(config: DynamicsConfig) -> RunningServer:
    running, _ = await start_model_service("dynamics", config, load_by_kind(KINDS, "dynamics"), DynamicsServicer,
                                           dynamics_pb2_grpc.add_DynamicsServiceServicer_to_server)
    return running
