"""`rise serve policy`: PolicyService (Act, ActBatch, StreamAct) + ModelAdmin."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from rise.errors import InvalidArgument
from rise.model_host import ModelHost, ModelServiceConfig, load_by_kind, response_meta, start_model_service
from rise.observations import check_advantage_bins, decode_state, decode_views, stack_views
from rise.proto.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from rise.serving import RunningServer
from rise.tensors import from_tensor, to_tensor
from services.policy import linear, scripted_expert

KINDS = {linear.KIND: linear.load, scripted_expert.KIND: scripted_expert.load}


class PolicyConfig(ModelServiceConfig):
    model_name: str = "policy"


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, host: ModelHost):
        self.host = host
        self.embodiment = host.embodiment

    async def _act(self, observations, model_ref: str, bins, num_steps: int, seed: int, where: str):
        start = time.perf_counter()
        if not observations:
            raise InvalidArgument(f"{where}: no observations")
        loaded = self.host.get(model_ref)
        # Only privileged models (the scripted expert) get the simulator state; learned ones must not.
        privileged = getattr(loaded.model, "needs_sim_state", False)
        views, states, sim_states = [], [], []
        for i, obs in enumerate(observations):
            at = f"{where}[{i}]" if len(observations) > 1 else where
            views.append(decode_views(obs.views, self.embodiment, at))
            states.append(decode_state(obs.state, self.embodiment, at))
            if privileged:
                sim_states.append(from_tensor(obs.sim_state, f"{at}.sim_state", "float64", (None,))
                                  if obs.HasField("sim_state") else None)
        bins = check_advantage_bins(bins, len(observations), where)
        compute_start = time.perf_counter()
        actions = await asyncio.to_thread(
            loaded.model.act, stack_views(views, self.embodiment), np.stack(states),
            [o.task for o in observations], bins, num_steps, seed, **({"sim_states": sim_states} if privileged else {}))
        want = (len(observations), self.embodiment.chunk_length, self.embodiment.action_dim)
        if actions.shape != want:
            raise RuntimeError(f"model {loaded.version} returned actions {list(actions.shape)}, expected {list(want)}")
        chunks = [
            common_pb2.ActionChunk(actions=to_tensor(a.astype(np.float32)), control_hz=self.embodiment.control_hz,
                                   observation_timestamp_ns=obs.timestamp_ns)
            for a, obs in zip(actions, observations)
        ]
        return chunks, response_meta(loaded, start, (time.perf_counter() - compute_start) * 1000)

    async def Act(self, request, context):
        chunks, meta = await self._act([request.observation], request.model.version, [request.advantage_bin],
                                       request.num_steps, request.seed, "observation")
        return policy_pb2.ActResponse(chunk=chunks[0], meta=meta, request_id=request.request_id)

    async def ActBatch(self, request, context):
        chunks, meta = await self._act(list(request.observations), request.model.version, request.advantage_bins,
                                       request.num_steps, request.seed, "observations")
        return policy_pb2.ActBatchResponse(chunks=chunks, meta=meta)

    async def StreamAct(self, request_iterator, context):
        async for request in request_iterator:
            chunks, meta = await self._act([request.observation], request.model.version, [request.advantage_bin],
                                           request.num_steps, request.seed, "observation")
            yield policy_pb2.ActResponse(chunk=chunks[0], meta=meta, request_id=request.request_id)


async def start(config: PolicyConfig) -> RunningServer:
    running, _ = await start_model_service("policy", config, load_by_kind(KINDS, "policy"), PolicyServicer,
                                           policy_pb2_grpc.add_PolicyServiceServicer_to_server)
    return running
