"""Value and dynamics services over real gRPC: answers, batching and validation."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from conftest import EMB
from rise.proto.v1 import dynamics_pb2, dynamics_pb2_grpc, value_pb2, value_pb2_grpc
from rise.serving import ServerConfig, open_channel
from rise.tensors import from_tensor, to_tensor
from services.dynamics.server import DynamicsConfig
from services.dynamics.server import start as start_dynamics
from services.value.server import ValueConfig
from services.value.server import start as start_value


def frames(n: int, seed: int = 0, size: int = 64) -> dict:
    rng = np.random.default_rng(seed)
    return {v: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) for v in EMB.views}


@pytest.fixture
async def value_server(registry):
    running = await start_value(ValueConfig(registry_root=registry.root, server=ServerConfig(port=0, log_json=False)))
    yield running
    await running.stop(0)


@pytest.fixture
async def dynamics_server(registry):
    running = await start_dynamics(DynamicsConfig(registry_root=registry.root, server=ServerConfig(port=0, log_json=False)))
    yield running
    await running.stop(0)


async def test_value_scores_each_frame_in_range(value_server):
    async with open_channel(value_server.address) as channel:
        stub = value_pb2_grpc.ValueServiceStub(channel)
        items = [value_pb2.ScoreItem(frames={v: to_tensor(f, "png") for v, f in frames(n, seed=n).items()}, task="t")
                 for n in (3, 1, 5)]
        reply = await stub.Score(value_pb2.ScoreRequest(items=items), timeout=10)
        assert [len(r.values) for r in reply.results] == [3, 1, 5]
        assert all(-1 <= v <= 1 for r in reply.results for v in r.values)
        alone = await stub.Score(value_pb2.ScoreRequest(items=[items[2]]), timeout=10)
        np.testing.assert_allclose(alone.results[0].values, reply.results[2].values, rtol=1e-5)
        assert reply.meta.version == "v0001"

        mixed = frames(3)
        mixed["gripperPOV"] = mixed["gripperPOV"][:2]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Score(value_pb2.ScoreRequest(items=[value_pb2.ScoreItem(frames={v: to_tensor(f) for v, f in mixed.items()})]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "items[0].views['gripperPOV']: expected uint8 [3, 64, 64, 3] as [F, 64, 64, 3], got uint8 [2, 64, 64, 3]" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError, match="no items"):
            await stub.Score(value_pb2.ScoreRequest())


async def test_dynamics_imagines_a_batch(dynamics_server):
    async with open_channel(dynamics_server.address) as channel:
        stub = dynamics_pb2_grpc.DynamicsServiceStub(channel)
        actions = to_tensor(np.zeros((EMB.chunk_length, EMB.action_dim), np.float32))
        histories = [frames(4, seed=s) for s in range(3)]
        items = [dynamics_pb2.ImagineItem(history={v: to_tensor(f) for v, f in h.items()}, actions=actions) for h in histories]
        reply = await stub.Imagine(dynamics_pb2.ImagineRequest(items=items, num_steps=4, seed=7), timeout=10)
        assert len(reply.futures) == 3 and reply.meta.version == "v0001"
        for history, future in zip(histories, reply.futures):
            for view in EMB.views:
                got = from_tensor(future.frames[view], "f", "uint8", (EMB.chunk_length, 64, 64, 3))
                assert np.array_equal(got[0], history[view][-1])  # persistence: the last frame, held

        short = dynamics_pb2.ImagineItem(history={v: to_tensor(f) for v, f in frames(2).items()}, actions=actions)
        with pytest.raises(grpc.aio.AioRpcError) as err:  # one history length per batch
            await stub.Imagine(dynamics_pb2.ImagineRequest(items=[items[0], short]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "items[1].history.views['corner']: expected uint8 [4, 64, 64, 3]" in err.value.details()
        wrong_actions = dynamics_pb2.ImagineItem(history=items[0].history, actions=to_tensor(np.zeros((8, 14), np.float32)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Imagine(dynamics_pb2.ImagineRequest(items=[wrong_actions]), timeout=10)
        assert "items[0].actions: expected float32 [8, 4], got float32 [8, 14]" in err.value.details()
