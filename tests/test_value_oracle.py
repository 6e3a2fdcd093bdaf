"""The value service over real gRPC with the oracle (MetaWorld's shaped reward) model.

The oracle is checked against the live simulator: an expert episode is recorded here with
MetaWorldSim, and scoring its frames with their recorded states must give the reward the
running simulator computed at each step (same gripper command), ending at 1 on success.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import numpy as np
import pytest

from conftest import EMB, served
from rise.baselines import publish_baseline, publish_oracle_value
from rise.errors import InvalidArgument
from rise.proto.v1 import common_pb2, value_pb2, value_pb2_grpc
from rise.registry import Registry
from rise.serving import ClientConfig, ServerConfig
from rise.sim.metaworld_sim import MetaWorldSim, expert_policy, task_text
from rise.tensors import to_tensor
from rise.transport import GrpcValue
from services.value.server import ValueConfig, start

TASK = "push"


@pytest.fixture(scope="module")
def episode():
    """An expert episode until success: frames[t] {view: [H, W, 3]}, sim_states[t], rewards[t] (the live simulator's)."""
    sim = MetaWorldSim(TASK, EMB)
    expert = expert_policy(TASK)
    frame = sim.reset(seed=3)
    frames, states, rewards = [], [], []
    for _ in range(150):
        frames.append(frame.views)
        states.append(frame.sim_state)
        rewards.append(10.0 if frame.success else sim.env.evaluate_state(frame.raw_obs, MetaWorldSim._REWARD_ACTION)[0])
        if frame.success:
            break
        frame = sim.step(np.clip(expert.get_action(frame.raw_obs), -1, 1))
    sim.close()
    assert frame.success, "the scripted expert should finish push within 150 steps"
    return {"frames": frames, "sim_states": np.stack(states), "rewards": np.array(rewards)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Value server in its own thread and loop. Store: v0001 linear (stable), v0002 oracle ("oracle")."""
    registry = Registry(tmp_path_factory.mktemp("value") / "store")
    registry.set_alias("value", "stable", publish_baseline(registry, "value", EMB).version)
    registry.set_alias("value", "oracle", publish_oracle_value(registry, EMB).version)
    config = ValueConfig(registry_root=registry.root, preload=["stable", "oracle"], server=ServerConfig(port=0, log_json=False))
    with served(start, config) as running:
        yield running


def item(episode, steps, sim_states=None, task: str = task_text(TASK)) -> value_pb2.ScoreItem:
    msg = value_pb2.ScoreItem(frames={v: to_tensor(np.stack([episode["frames"][t][v] for t in steps])) for v in EMB.views},
                              task=task)
    states = episode["sim_states"][list(steps)] if sim_states is None else sim_states
    if states is not False:
        msg.sim_states.CopyFrom(to_tensor(states))
    return msg


def test_oracle_value_is_the_simulators_reward(server, episode):
    steps = range(len(episode["frames"]))
    with grpc.insecure_channel(server.address) as channel:
        stub = value_pb2_grpc.ValueServiceStub(channel)
        reply = stub.Score(value_pb2.ScoreRequest(items=[item(episode, steps[:40]), item(episode, steps[40:])],
                                                  model=common_pb2.ModelRef(version="oracle")), timeout=60)
        # A learned (here linear) version ignores the states: the same request scores by the frames.
        linear = stub.Score(value_pb2.ScoreRequest(items=[item(episode, steps[:3])]), timeout=60)
    assert reply.meta.version == "v0002" and len(linear.results[0].values) == 3
    values = np.concatenate([list(r.values) for r in reply.results])
    np.testing.assert_allclose(values, episode["rewards"] / 10.0, atol=1e-6)
    assert values[-1] == 1.0 and values[0] < 0.5  # the expert makes progress the reward sees


async def test_client_sends_states_and_checks_their_shape(server, episode):
    frames = {v: np.stack([[episode["frames"][t][v] for t in (0, 20)]]) for v in EMB.views}
    async with GrpcValue(ClientConfig(address=server.address)) as client:
        scores = await client.score(frames, [task_text(TASK)], version="oracle",
                                    sim_states=episode["sim_states"][[0, 20]][None])
        with pytest.raises(InvalidArgument, match=r"sim_states must be float64 \[B=1, F=2, n\], got \[2, "):
            await client.score(frames, [task_text(TASK)], version="oracle", sim_states=episode["sim_states"][[0, 20]])
    np.testing.assert_allclose(scores.values[0], episode["rewards"][[0, 20]] / 10.0, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (dict(sim_states=False), "items[0].sim_states is missing; the oracle value scores simulator states: float64 [F=2, 320]"),
    (dict(sim_states=np.zeros((1, 320))), "items[0].sim_states for 'push' must be float64 [F=2, 320] (one state per frame), got [1, 320]"),
    (dict(sim_states=np.zeros((2, 320), np.float32)), "items[0].sim_states: expected float64 [*, *], got float32 [2, 320]"),
    (dict(task="fold the laundry"), "items[0].task: 'fold the laundry' is not a MetaWorld task"),
])
def test_bad_inputs_are_invalid_argument(server, episode, bad, message):
    with grpc.insecure_channel(server.address) as channel:
        stub = value_pb2_grpc.ValueServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(value_pb2.ScoreRequest(items=[item(episode, (0, 5), **bad)], model=common_pb2.ModelRef(version="oracle")),
                       timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_trainer_judges_each_chunk_by_the_reward_at_its_start_and_end(tmp_path):
    """Rollouts with the oracle dynamics and the oracle value: a chunk's value gain is the simulator's
    reward after the chunk minus before it (replayed here in a simulator of our own), and a chained
    chunk is proposed from the robot state the simulator reached (`rollout.chained_state`)."""
    from rise.baselines import publish_oracle_dynamics
    from rise.data.collect import collect
    from rise.data.loading import load_episodes_in_memory
    from services.trainer.config import RolloutConfig, ServicesConfig
    from services.trainer.replay import decode_sample
    from services.trainer.rollout import Rollouts, dynamics_shape, open_clients, start_states, value_reads_sim_state

    collect(TASK, 1, tmp_path / "data", noise=0.3, workers=1, max_steps=40, after_success=40, progress=False)
    registry = Registry(tmp_path / "store")
    registry.set_alias("policy", "stable", publish_baseline(registry, "policy", EMB).version)
    registry.set_alias("value", "stable", publish_baseline(registry, "value", EMB).version)
    oracle_value = publish_oracle_value(registry, EMB).version
    registry.set_alias("dynamics", "stable", publish_baseline(registry, "dynamics", EMB).version)
    oracle_dynamics = publish_oracle_dynamics(registry, EMB).version
    assert value_reads_sim_state(registry, oracle_value) and not value_reads_sim_state(registry, "")
    episodes = load_episodes_in_memory(tmp_path / "data", EMB)
    with pytest.raises(ValueError, match="the oracle value scores simulator states: it needs the oracle dynamics"):
        Rollouts(RolloutConfig(), ServicesConfig(), (None, None, None),
                 start_states(episodes, dynamics_shape(registry, "stable", EMB.chunk_length)), "t", value_reads_sim_state=True)

    from rise.services import service

    rollout = RolloutConfig(workers=4, group_size=2, max_chain=2, policy_version="stable",
                            dynamics_version=oracle_dynamics, value_version=oracle_value)
    starts = start_states(episodes, dynamics_shape(registry, oracle_dynamics, EMB.chunk_length))

    async def two_rounds(services: ServicesConfig, rollout: RolloutConfig = rollout):
        clients = await open_clients(services)
        try:
            rollouts = Rollouts(rollout, services, clients, starts, "oracle-judge", seed=1, value_reads_sim_state=True)
            out = []
            for _ in range(2):  # the second round chains from the first's end states
                begin = [w.sim_state.copy() for w in rollouts.workers]
                out.append((begin, [decode_sample(p) for p in await rollouts.round(frame_encoding="raw")]))
            return out
        finally:
            for client in clients:
                await client.close()

    with contextlib.ExitStack() as stack:
        urls = {}
        for name in ("policy", "value", "dynamics"):
            config_cls, start_service = service(name)
            config = config_cls(registry_root=registry.root, torch_threads=1, server=ServerConfig(port=0, log_json=False))
            urls[name] = f"grpc://{stack.enter_context(served(start_service, config)).address}"
        rounds = asyncio.run(two_rounds(ServicesConfig(**urls)))
        stale = asyncio.run(two_rounds(ServicesConfig(**urls), rollout.model_copy(update={"chained_state": "start"})))
    sim = MetaWorldSim(TASK, EMB, max_steps=1_000_000, render=False)
    try:
        for begin, samples in rounds:
            for state, sample in zip(begin, samples):
                frame = sim.set_state(state, render=False)
                np.testing.assert_array_equal(sample.state, frame.state)  # the policy saw where the hand was
                assert sample.value_current == pytest.approx(sim.shaped_reward(frame.raw_obs) / 10.0, abs=1e-6)
                for action in sample.actions:
                    frame = sim.step(action, render=False)
                assert len(sample.value_imagined) == 1  # the end of the chunk, not every imagined frame
                assert sample.value_imagined[0] == pytest.approx(sim.shaped_reward(frame.raw_obs) / 10.0, abs=1e-6)
    finally:
        sim.close()
    assert [s.chain_index for _, r in rounds for s in r] == [0] * 4 + [1] * 4
    # The old rule: a chained chunk read its real start's robot state, though the hand had moved.
    assert [s.chain_index for _, r in stale for s in r] == [0] * 4 + [1] * 4
    for first, chained, moved in zip(stale[0][1], stale[1][1], rounds[1][1]):
        np.testing.assert_array_equal(chained.state, first.state)
        assert not np.allclose(moved.state, first.state)
