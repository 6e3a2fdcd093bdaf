"""`rise serve policy`: PolicyService (Act, ActBatch, StreamAct) + ModelAdmin.

Concurrent requests (unary, batched and streamed alike) for the same version, number of
denoising steps and guidance scale are merged into one model call by the dynamic batcher
(`rise.batching`); each request still names its own version or alias, and its response the
version that served it. Requests with a non-zero seed run alone: a learned policy's noise
depends on the item's position in the call, and a seeded caller expects the chunk it would get
unbatched. Requests for a privileged model (the scripted expert, which fails per item on a bad
sim state) run alone too, so one caller's bad input never fails another's request.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import numpy as np

from rise.batching import Batcher, BatchingConfig
from rise.errors import InvalidArgument
from rise.model_host import LoadedModel, ModelHost, ModelServiceConfig, load_by_kind, response_meta, start_model_service
from rise.observations import check_advantage_bins, decode_state, decode_views, stack_views
from rise.proto.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from rise.serving import RunningServer
from rise.tensors import from_tensor, to_tensor
from services.policy import linear, model, scripted_expert

KINDS = {linear.KIND: linear.load, scripted_expert.KIND: scripted_expert.load, model.KIND: model.load}


class PolicyConfig(ModelServiceConfig):
    model_name: str = "policy"
    # Merging of concurrent Act / ActBatch / StreamAct requests into one model call.
    batching: BatchingConfig = BatchingConfig()


class _Item(NamedTuple):
    views: dict[str, np.ndarray]  # view -> uint8 [H, W, 3]
    state: np.ndarray  # float32 [S]
    task: str
    advantage_bin: int
    sim_state: np.ndarray | None  # float64 [n], privileged models only


def check_guidance(loaded: LoadedModel, guidance_scale: float, where: str) -> None:
    """A request's guidance scale: finite, >= 0 (0 = the version's default), and only for models that have it."""
    if not (np.isfinite(guidance_scale) and guidance_scale >= 0):
        raise InvalidArgument(f"{where}: guidance_scale must be >= 0 (0: the version's default), got {guidance_scale}")
    if guidance_scale and not getattr(loaded.model, "supports_guidance", False):
        raise InvalidArgument(f"{where}: version {loaded.version} ({loaded.manifest.kind}) has no classifier-free "
                              "guidance; send guidance_scale 0")


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, host: ModelHost, batching: BatchingConfig = BatchingConfig()):
        self.host = host
        self.embodiment = host.embodiment
        self.batcher = Batcher(batching, "policy")

    async def _act(self, observations, model_ref: str, bins, num_steps: int, seed: int, guidance_scale: float,
                   where: str):
        start = time.perf_counter()
        if not observations:
            raise InvalidArgument(f"{where}: no observations")
        loaded = self.host.get(model_ref)
        # Only privileged models (the scripted expert) get the simulator state; learned ones must not.
        privileged = getattr(loaded.model, "needs_sim_state", False)
        if num_steps < 0:
            raise InvalidArgument(f"{where}: num_steps must be >= 0 (0: the model's default), got {num_steps}")
        bins = check_advantage_bins(bins, len(observations), where)
        check_guidance(loaded, guidance_scale, where)
        items = []
        for i, obs in enumerate(observations):
            at = f"{where}[{i}]" if len(observations) > 1 else where
            sim_state = None
            if privileged and obs.HasField("sim_state"):
                sim_state = from_tensor(obs.sim_state, f"{at}.sim_state", "float64", (None,))
            items.append(_Item(decode_views(obs.views, self.embodiment, at), decode_state(obs.state, self.embodiment, at),
                               obs.task, int(bins[i]), sim_state))
        # Seeded requests and privileged models (per-item errors, no gain from merging) run alone.
        key = None if seed or privileged else (loaded.version, num_steps, guidance_scale)
        done = await self.batcher.submit(key, items, functools.partial(self._run, loaded, num_steps, seed, guidance_scale))
        chunks = [
            common_pb2.ActionChunk(actions=to_tensor(a), control_hz=self.embodiment.control_hz,
                                   observation_timestamp_ns=obs.timestamp_ns)
            for a, obs in zip(done.results, observations)
        ]
        return chunks, response_meta(loaded, start, done.compute_ms, done.queue_ms)

    def _run(self, loaded: LoadedModel, num_steps: int, seed: int, guidance_scale: float,
             items: list[_Item]) -> list[np.ndarray]:
        """One model call for a (merged) batch, in a worker thread -> one float32 [chunk, A] per item."""
        extra = {}
        if getattr(loaded.model, "needs_sim_state", False):
            extra = {"sim_states": [it.sim_state for it in items]}
        if guidance_scale:
            extra["guidance_scale"] = guidance_scale
        actions = loaded.model.act(stack_views([it.views for it in items], self.embodiment), np.stack([it.state for it in items]),
                                   [it.task for it in items], np.asarray([it.advantage_bin for it in items], np.int64),
                                   num_steps, seed, **extra)
        want = (len(items), self.embodiment.chunk_length, self.embodiment.action_dim)
        if np.shape(actions) != want:
            raise RuntimeError(f"model {loaded.version} returned actions {list(np.shape(actions))}, expected {list(want)}")
        return list(np.asarray(actions, np.float32))

    async def Act(self, request, context):
        chunks, meta = await self._act([request.observation], request.model.version, [request.advantage_bin],
                                       request.num_steps, request.seed, request.guidance_scale, "observation")
        return policy_pb2.ActResponse(chunk=chunks[0], meta=meta, request_id=request.request_id)

    async def ActBatch(self, request, context):
        chunks, meta = await self._act(list(request.observations), request.model.version, request.advantage_bins,
                                       request.num_steps, request.seed, request.guidance_scale, "observations")
        return policy_pb2.ActBatchResponse(chunks=chunks, meta=meta)

    async def StreamAct(self, request_iterator, context):
        async for request in request_iterator:
            chunks, meta = await self._act([request.observation], request.model.version, [request.advantage_bin],
                                           request.num_steps, request.seed, request.guidance_scale, "observation")
            yield policy_pb2.ActResponse(chunk=chunks[0], meta=meta, request_id=request.request_id)


async def start(config: PolicyConfig) -> RunningServer:
    running, _ = await start_model_service("policy", config, load_by_kind(KINDS, "policy"),
                                           lambda host: PolicyServicer(host, config.batching),
                                           policy_pb2_grpc.add_PolicyServiceServicer_to_server)
    return running
