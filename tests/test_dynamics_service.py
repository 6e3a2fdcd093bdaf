"""The dynamics service over real gRPC with the oracle (simulator-backed) model, and dynamic batching.

The oracle is checked against the simulator itself: an expert episode is recorded here with
MetaWorldSim, and imagining from its state at step t with its actions t..t+chunk-1 must give
its own frames t+1..t+chunk, bit for bit.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from conftest import EMB, served
from rise.baselines import publish_baseline, publish_oracle_dynamics
from rise.batching import Batcher, BatchingConfig
from rise.errors import InvalidArgument
from rise.proto.v1 import common_pb2, dynamics_pb2, dynamics_pb2_grpc
from rise.registry import Registry
from rise.serving import ServerConfig
from rise.sim.metaworld_sim import MetaWorldSim, expert_policy, task_text
from rise.tensors import from_tensor, to_tensor
from services.dynamics.oracle import OracleDynamics
from services.dynamics.server import DynamicsConfig, start

CHUNK = EMB.chunk_length
T0 = 2  # first imagined start: a couple of steps in, the arm already moving
WAIT_MS = 200  # long batching window, so concurrent test requests surely meet


@pytest.fixture(scope="module")
def episode():
    """An expert 'push' episode: frames[t] {view: [H, W, 3]}, sim_states[t], actions[t] (float32, as sent)."""
    sim = MetaWorldSim("push", EMB)
    expert = expert_policy("push")
    frame = sim.reset(seed=3)
    frames, states, robot, actions = [frame.views], [frame.sim_state], [frame.state], []
    for _ in range(T0 + 2 * CHUNK):
        action = np.clip(expert.get_action(frame.raw_obs), -1, 1).astype(np.float32)  # float32: what the wire carries
        frame = sim.step(action)
        frames.append(frame.views)
        states.append(frame.sim_state)
        robot.append(frame.state)
        actions.append(action)
    sim.close()
    return {"frames": frames, "sim_states": states, "states": robot, "actions": np.stack(actions)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Dynamics server in its own thread and loop. Store: v0001 persistence (stable), v0002 oracle ("oracle")."""
    registry = Registry(tmp_path_factory.mktemp("dynamics") / "store")
    registry.set_alias("dynamics", "stable", publish_baseline(registry, "dynamics", EMB).version)
    registry.set_alias("dynamics", "oracle", publish_oracle_dynamics(registry, EMB).version)
    config = DynamicsConfig(registry_root=registry.root, preload=["stable", "oracle"],
                            batching=BatchingConfig(max_batch_size=8, max_wait_ms=WAIT_MS),
                            server=ServerConfig(port=0, log_json=False))
    with served(start, config) as running:
        yield running


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield dynamics_pb2_grpc.DynamicsServiceStub(channel)


def item(episode, t: int, sim_state: np.ndarray | None = None, task: str = task_text("push"), actions=None) -> dynamics_pb2.ImagineItem:
    """Imagine from step t (history: the frame at t) with the recorded actions t..t+chunk-1."""
    msg = dynamics_pb2.ImagineItem(
        history={v: to_tensor(episode["frames"][t][v][None]) for v in EMB.views},
        actions=to_tensor(episode["actions"][t:t + CHUNK] if actions is None else actions), task=task)
    state = episode["sim_states"][t] if sim_state is None else sim_state
    if state is not False:
        msg.sim_state.CopyFrom(to_tensor(state))
    return msg


def request(*items, version: str = "oracle", seed: int = 0) -> dynamics_pb2.ImagineRequest:
    return dynamics_pb2.ImagineRequest(items=items, model=common_pb2.ModelRef(version=version), seed=seed)


def assert_real_frames(future: dynamics_pb2.ImaginedFuture, episode, t: int, stride: int = 1) -> None:
    """The future equals the episode's frames t+stride, t+2*stride, ..., t+chunk exactly."""
    for view in EMB.views:
        got = from_tensor(future.frames[view], view, "uint8", (CHUNK // stride, EMB.image_height, EMB.image_width, 3))
        want = np.stack([episode["frames"][t + k][view] for k in range(stride, CHUNK + 1, stride)])
        assert np.array_equal(got, want), f"{view}: {np.count_nonzero(got != want)} values differ"


def batch_counts() -> tuple[float, float]:
    """(model calls, items in them) made by dynamics batchers in this process so far."""
    labels = {"batcher": "dynamics"}
    return (REGISTRY.get_sample_value("rise_batch_items_count", labels) or 0.0,
            REGISTRY.get_sample_value("rise_batch_items_sum", labels) or 0.0)


def test_oracle_reproduces_the_simulator_and_chains(stub, episode):
    first = stub.Imagine(request(item(episode, T0)), timeout=60)
    assert first.meta.version == "v0002" and first.meta.model == "dynamics" and len(first.futures) == 1
    assert_real_frames(first.futures[0], episode, T0)
    state = from_tensor(first.futures[0].sim_state, "sim_state", "float64", (len(episode["sim_states"][0]),))
    # Frames and the returned state are bit-exact (set_state restores MuJoCo's warm start too).
    np.testing.assert_array_equal(state, episode["sim_states"][T0 + CHUNK])
    # So is the robot state the chunk ended in (hand xyz, gripper): what the policy reads next.
    robot = from_tensor(first.futures[0].state, "state", "float32", (EMB.state_dim,))
    np.testing.assert_array_equal(robot, episode["states"][T0 + CHUNK])
    assert not np.array_equal(robot, episode["states"][T0])  # (the arm moved: a stale state would show)
    # Chaining: the next chunk from the returned state, not from the recorded one.
    second = stub.Imagine(request(item(episode, T0 + CHUNK, sim_state=state)), timeout=60)
    assert_real_frames(second.futures[0], episode, T0 + CHUNK)
    # Several starts in one request, answered in order.
    both = stub.Imagine(request(item(episode, T0 + 1), item(episode, T0)), timeout=60)
    assert_real_frames(both.futures[0], episode, T0 + 1)
    assert_real_frames(both.futures[1], episode, T0)


def test_oracle_frame_stride(episode):
    model = OracleDynamics(EMB, frame_stride=2)
    try:
        t = T0
        history = {v: episode["frames"][t][v][None, None] for v in EMB.views}
        frames, states, robot = model.imagine(history, episode["actions"][None, t:t + CHUNK], tasks=["push"],
                                              sim_states=[episode["sim_states"][t]])
        np.testing.assert_array_equal(robot[0], episode["states"][t + CHUNK])
        for view in EMB.views:
            assert np.array_equal(frames[view][0], np.stack([episode["frames"][t + k][view] for k in (2, 4, 6, 8)]))
        np.testing.assert_array_equal(states[0], episode["sim_states"][t + CHUNK])
    finally:
        model.close()
    with pytest.raises(Exception, match="frame_stride 3 must divide chunk_length 8"):
        OracleDynamics(EMB, frame_stride=3)


@pytest.mark.parametrize("bad, message", [
    (dict(sim_state=False), "items[0].sim_state is missing; the oracle restores the simulator state: float64 ["),
    (dict(sim_state=np.zeros(10)), "items[0].sim_state for 'push' must be float64 [320], got [10]"),
    (dict(sim_state=np.zeros(320, np.float32)), "items[0].sim_state: expected float64 [*], got float32 [320]"),
    (dict(task="fold the laundry"), "items[0].task: 'fold the laundry' is not a MetaWorld task"),
    (dict(task=""), "items[0].task: '' is not a MetaWorld task"),
    (dict(actions=np.zeros((CHUNK, 3), np.float32)), "items[0].actions: expected float32 [8, 4], got float32 [8, 3]"),
])
def test_bad_inputs_are_invalid_argument(stub, episode, bad, message):
    with pytest.raises(grpc.RpcError) as err:
        stub.Imagine(request(item(episode, T0, **bad)), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_concurrent_requests_share_model_calls(server, episode):
    calls_before, items_before = batch_counts()
    starts = [T0, T0 + 1, T0 + 2, T0 + 3]
    with grpc.insecure_channel(server.address) as channel:
        stub = dynamics_pb2_grpc.DynamicsServiceStub(channel)
        oracle_calls = [stub.Imagine.future(request(item(episode, t)), timeout=60) for t in starts]
        # Persistence requests at the same time: another version, never in the oracle's batches.
        history = {v: to_tensor(episode["frames"][T0][v][None]) for v in EMB.views}
        plain = dynamics_pb2.ImagineItem(history=history, actions=to_tensor(episode["actions"][T0:T0 + CHUNK]))
        persistence_calls = [stub.Imagine.future(request(plain, version=""), timeout=60) for _ in range(2)]
        oracle_replies = [call.result() for call in oracle_calls]
        persistence_replies = [call.result() for call in persistence_calls]
    calls, items = (now - before for now, before in zip(batch_counts(), (calls_before, items_before)))
    assert items == len(starts) + 2
    assert 2 <= calls < len(starts) + 2, f"{calls} model calls for {len(starts) + 2} requests"
    for t, reply in zip(starts, oracle_replies):  # the same frames as unbatched: the simulator's own
        assert reply.meta.version == "v0002"
        assert_real_frames(reply.futures[0], episode, t)
    for reply in persistence_replies:
        assert reply.meta.version == "v0001"
        for view in EMB.views:
            got = from_tensor(reply.futures[0].frames[view], view, "uint8", (CHUNK, EMB.image_height, EMB.image_width, 3))
            assert (got == episode["frames"][T0][view]).all()
            assert not reply.futures[0].HasField("sim_state")
    queue = [r.meta.timing.queue_ms for r in oracle_replies + persistence_replies]
    assert all(q >= 0 for q in queue) and max(queue) > WAIT_MS / 2  # the first of a batch waits for company


# ---- the batcher alone ----------------------------------------------------------------------------
async def test_batcher_merges_by_key_and_isolates_failures():
    batcher = Batcher(BatchingConfig(max_batch_size=4, max_wait_ms=50), "test")
    calls: list[list] = []

    def run(items):
        calls.append(list(items))
        if "bad" in items:
            raise InvalidArgument("bad item")
        return [f"<{x}>" for x in items]

    outcomes = await asyncio.gather(
        batcher.submit("a", [1, 2], run), batcher.submit("a", [3], run),  # merged
        batcher.submit("b", ["bad"], run), batcher.submit("b", [4], run),  # merged, and fail together
        batcher.submit("c", [5], run),  # another key: its own call, unharmed
        batcher.submit(None, [6], run),  # key None (e.g. seeded): alone
        batcher.submit("a", [7, 8, 9, 10, 11], run),  # larger than max_batch_size: alone, whole
        return_exceptions=True)
    assert [o.results for o in outcomes[:2]] == [["<1>", "<2>"], ["<3>"]]
    assert outcomes[0].batch_items == 3 and outcomes[1].queue_ms >= 0
    assert all(isinstance(o, InvalidArgument) for o in outcomes[2:4])
    assert outcomes[4].results == ["<5>"] and outcomes[5].results == ["<6>"]
    assert outcomes[6].results == [f"<{x}>" for x in (7, 8, 9, 10, 11)] and outcomes[6].batch_items == 5
    assert sorted(map(sorted, map(lambda c: [str(x) for x in c], calls))) == sorted(
        [["1", "2", "3"], ["4", "bad"], ["5"], ["6"], ["10", "11", "7", "8", "9"]])
    assert (batcher.calls, batcher.items) == (5, 12)


async def test_batcher_splits_at_max_batch_size_and_fills_while_busy():
    batcher = Batcher(BatchingConfig(max_batch_size=3, max_wait_ms=0), "test")
    sizes = []

    def run(items):
        sizes.append(len(items))
        threading.Event().wait(0.1)  # a slow model
        return items

    first = asyncio.create_task(batcher.submit("k", [0], run))
    await asyncio.sleep(0.03)  # the first call is running now
    rest = await asyncio.gather(*(batcher.submit("k", [i], run) for i in range(1, 6)))
    assert (await first).results == [0] and [o.results for o in rest] == [[i] for i in range(1, 6)]
    # No waiting window, yet requests arriving while the model is busy pile up (at most 3 per call).
    assert sizes == [1, 3, 2]
