"""Triton and gRPC transports return the same frames for the same inputs and seed.

One real `rise serve dynamics` gRPC server and one real Triton server (nvidia-pytriton: the
tritonserver binary, its Python backend and stub) serve the same registry; `rise.transport`
clients call both with the same arrays. Versions: v0001 persistence (stable), v0002 the
simulator-backed oracle, v0003 a seeded-noise test model whose frames depend on the seed, the
steps and the batch layout (so a seeded request merged with another would show).

Skipped only when the Triton server binary cannot run on this machine (not Linux x86_64/aarch64,
or the binary fails to execute); a missing `make triton` is a failure that says so.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import EMB
from rise.baselines import publish_baseline, publish_oracle_dynamics
from rise.batching import BatchingConfig
from rise.errors import InvalidArgument, NotFound
from rise.registry import Registry
from rise.serving import ServerConfig
from rise.transport import Imagination, connect_dynamics, parse_url, triton_target
from rise.triton_binding import TritonSettings, serve_triton, start_repository_server, triton_unavailable_reason
from services.dynamics import server as dynamics_server
from services.dynamics.triton import DynamicsTritonConfig

CHUNK = EMB.chunk_length
H, W = EMB.image_height, EMB.image_width
WAIT_MS = 150  # batching window: concurrent test requests surely meet, on both servers
NOISE_KIND = "test-noise"
REPOSITORY = Path(__file__).resolve().parents[1] / "triton" / "model_repository"


class NoiseDynamics:
    """Frames drawn from one generator per model call: they depend on the seed, num_steps and
    the whole batch (like a diffusion sampler's noise), so batch composition is visible."""

    def imagine(self, history, actions, num_steps=0, seed=0):
        batch = len(actions)
        rng = np.random.default_rng(seed if seed else None)
        shift = np.uint8(num_steps % 256)
        return {v: rng.integers(0, 256, (batch, 2, *frames.shape[2:]), dtype=np.uint8) + shift for v, frames in history.items()}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    registry = Registry(tmp_path_factory.mktemp("triton") / "store")
    registry.set_alias("dynamics", "stable", publish_baseline(registry, "dynamics", EMB).version)
    registry.set_alias("dynamics", "oracle", publish_oracle_dynamics(registry, EMB).version)
    empty = tmp_path_factory.mktemp("noise-files")
    noise = registry.publish("dynamics", empty, kind=NOISE_KIND, embodiment=EMB.model_dump())
    registry.set_alias("dynamics", "noise", noise.version)
    return registry


@pytest.fixture(scope="module")
def kinds():
    """The test kind joins the dynamics KINDS table both servers load through."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(dynamics_server.KINDS, NOISE_KIND, lambda verified, embodiment: NoiseDynamics())
        yield


def _config(cls, registry, **extra):
    return cls(registry_root=registry.root, preload=["stable", "oracle", "noise"],
               batching=BatchingConfig(max_batch_size=8, max_wait_ms=WAIT_MS), **extra)


@pytest.fixture(scope="module")
def grpc_url(registry, kinds):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    config = _config(dynamics_server.DynamicsConfig, registry, server=ServerConfig(port=0, log_json=False))
    running = asyncio.run_coroutine_threadsafe(dynamics_server.start(config), loop).result(60)
    yield f"grpc://{running.address}"
    asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.fixture(scope="module")
def triton(registry, kinds):
    reason = triton_unavailable_reason()
    if reason:
        pytest.fail(f"Triton cannot run here, and it is part of the product: {reason}")
    config = _config(DynamicsTritonConfig, registry,
                     triton=TritonSettings(grpc_port=0, http_port=0, metrics_port=0, print_server_log=False))
    running = serve_triton("dynamics", config)  # default binds: dynamics, dynamics-oracle, dynamics-noise
    print(f"\nTriton startup {running.startup_s:.1f} s")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def episode():
    """An expert 'push' episode: frames[t] {view: [H, W, 3]}, sim_states[t], actions [t] (float32)."""
    from rise.sim.metaworld_sim import MetaWorldSim, expert_policy

    sim = MetaWorldSim("push", EMB)
    expert = expert_policy("push")
    frame = sim.reset(seed=3)
    frames, states, robot, actions = [frame.views], [frame.sim_state], [frame.state], []
    for _ in range(3 + CHUNK):
        action = np.clip(expert.get_action(frame.raw_obs), -1, 1).astype(np.float32)
        frame = sim.step(action)
        frames.append(frame.views)
        states.append(frame.sim_state)
        robot.append(frame.state)
        actions.append(action)
    sim.close()
    return {"frames": frames, "sim_states": states, "states": robot, "actions": np.stack(actions)}


def inputs(batch: int, history: int = 2, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    views = {v: rng.integers(0, 256, (batch, history, H, W, 3), dtype=np.uint8) for v in EMB.views}
    return views, rng.uniform(-1, 1, (batch, CHUNK, EMB.action_dim)).astype(np.float32)


def both(grpc_url: str, triton_url: str, *args, **kwargs) -> tuple[Imagination, Imagination]:
    """The same imagine call through both transports."""

    async def call(url):
        async with connect_dynamics(url) as client:
            return await client.imagine(*args, **kwargs)

    async def main():
        return await asyncio.gather(call(grpc_url), call(triton_url))

    return tuple(asyncio.run(main()))


def assert_same(a: Imagination, b: Imagination) -> None:
    assert a.version == b.version
    assert sorted(a.frames) == sorted(b.frames) == sorted(EMB.views)
    for view in EMB.views:
        assert a.frames[view].dtype == b.frames[view].dtype == np.uint8
        assert a.frames[view].shape == b.frames[view].shape
        assert np.array_equal(a.frames[view], b.frames[view]), f"{view}: {np.count_nonzero(a.frames[view] != b.frames[view])} values differ"
    assert len(a.sim_states) == len(b.sim_states)
    for x, y in [*zip(a.sim_states, b.sim_states), *zip(a.states, b.states)]:
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)


# ---- same frames ----------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
def test_persistence_same_frames(grpc_url, triton, batch):
    history, actions = inputs(batch)
    via_grpc, via_triton = both(grpc_url, triton.url, history, actions)
    assert_same(via_grpc, via_triton)
    assert via_grpc.version == "v0001" and via_grpc.sim_states == via_grpc.states == [None] * batch
    assert via_triton.frames["corner"].shape == (batch, CHUNK, H, W, 3)
    np.testing.assert_array_equal(via_triton.frames["corner"], np.repeat(history["corner"][:, -1:], CHUNK, axis=1))


def test_seeded_sampling_same_frames(grpc_url, triton):
    history, actions = inputs(4)
    first = both(grpc_url, triton.url, history, actions, num_steps=3, seed=11, version="noise")
    assert_same(*first)
    assert first[0].version == "v0003"
    again = both(grpc_url, triton.url, history, actions, num_steps=3, seed=11, version="noise")
    assert_same(first[0], again[1])
    other_seed = both(grpc_url, triton.url, history, actions, num_steps=3, seed=12, version="noise")
    assert_same(*other_seed)
    assert not np.array_equal(other_seed[1].frames["corner"], first[1].frames["corner"])
    other_steps = both(grpc_url, triton.url, history, actions, num_steps=4, seed=11, version="noise")
    assert_same(*other_steps)
    assert not np.array_equal(other_steps[1].frames["corner"], first[1].frames["corner"])
    # Seeds past int64 (the gRPC API's uint64) travel too.
    assert_same(*both(grpc_url, triton.url, history, actions, seed=2**64 - 5, version="noise"))


def test_seeded_request_runs_alone_under_load(grpc_url, triton):
    """While unseeded requests merge around it, a seeded one still gets its alone-frames."""
    history, actions = inputs(2)
    alone = both(grpc_url, triton.url, history, actions, seed=5, version="noise")

    async def crowd(url):
        async with connect_dynamics(url) as client:
            others = [client.imagine(*inputs(1, seed=s), version="noise") for s in range(4)]
            seeded, *_ = await asyncio.gather(client.imagine(history, actions, seed=5, version="noise"), *others)
            return seeded

    for url, reference in ((grpc_url, alone[0]), (triton.url, alone[1])):
        assert_same(asyncio.run(crowd(url)), reference)


def test_oracle_same_frames_and_states(grpc_url, triton, episode):
    t = 2
    history = {v: episode["frames"][t][v][None, None] for v in EMB.views}
    actions = episode["actions"][None, t:t + CHUNK]
    kwargs = dict(version="oracle", tasks=["push"], sim_states=[episode["sim_states"][t]])
    via_grpc, via_triton = both(grpc_url, triton.url, history, actions, **kwargs)
    assert_same(via_grpc, via_triton)
    assert via_triton.version == "v0002"
    for view in EMB.views:  # and both are the simulator's own frames
        want = np.stack([episode["frames"][t + k][view] for k in range(1, CHUNK + 1)])
        assert np.array_equal(via_triton.frames[view][0], want)
    np.testing.assert_array_equal(via_triton.sim_states[0], episode["sim_states"][t + CHUNK])
    np.testing.assert_array_equal(via_triton.states[0], episode["states"][t + CHUNK])  # the robot state it ended in
    # Two starts in one request, in order.
    history2 = {v: np.stack([episode["frames"][t + 1][v][None], episode["frames"][t][v][None]]) for v in EMB.views}
    actions2 = np.stack([episode["actions"][t + 1:t + 1 + CHUNK], episode["actions"][t:t + CHUNK]])
    pair = both(grpc_url, triton.url, history2, actions2, version="oracle", tasks=["push", "push"],
                sim_states=[episode["sim_states"][t + 1], episode["sim_states"][t]])
    assert_same(*pair)
    assert np.array_equal(pair[1].frames["corner"][1], via_triton.frames["corner"][0])


# ---- errors and versions --------------------------------------------------------------------
def test_bad_request_fails_alone_with_the_grpc_message(grpc_url, triton, episode):
    t = 2
    history = {v: episode["frames"][t][v][None, None] for v in EMB.views}
    actions = episode["actions"][None, t:t + CHUNK]
    state = [episode["sim_states"][t]]

    async def pair(url):
        async with connect_dynamics(url) as client:
            return await asyncio.gather(
                client.imagine(history, actions, version="oracle", tasks=["fold the laundry"], sim_states=state),
                client.imagine(history, actions, version="oracle", tasks=["push"], sim_states=state),
                return_exceptions=True)

    messages = []
    for url in (grpc_url, triton.url):
        bad, good = asyncio.run(pair(url))
        assert isinstance(bad, InvalidArgument), bad
        assert isinstance(good, Imagination), good
        messages.append(str(bad))
    assert messages[0] == messages[1]
    assert "items[0].task: 'fold the laundry' is not a MetaWorld task" in messages[0]


@pytest.mark.parametrize("bad, match", [
    (dict(actions=np.zeros((1, CHUNK, 4), np.float64)), "(?i)actions|FP64|float"),
    (dict(actions=np.zeros((1, CHUNK, 3), np.float32)), "(?i)actions|shape|dims"),
    (dict(version="oracle", tasks=["push"], sim_states=[np.zeros(10)]), r"items\[0\]\.sim_state for 'push' must be float64 \[320\]"),
])
def test_bad_inputs_are_invalid_argument_on_both(grpc_url, triton, bad, match):
    history, actions = inputs(1)
    args = {"version": "", **bad}
    actions = args.pop("actions", actions)
    for url in (grpc_url, triton.url):
        with pytest.raises(InvalidArgument, match=match):
            asyncio.run(_imagine(url, history, actions, **args))


async def _imagine(url, *args, **kwargs) -> Imagination:
    async with connect_dynamics(url) as client:
        return await client.imagine(*args, **kwargs)


def test_version_refs(grpc_url, triton):
    history, actions = inputs(1)
    assert asyncio.run(_imagine(triton.url, history, actions, version="v0001")).version == "v0001"  # pinned number
    assert asyncio.run(_imagine(triton.url, history, actions, version="1")).version == "v0001"
    assert asyncio.run(_imagine(f"{triton.url}/dynamics-noise", history, actions, seed=1)).version == "v0003"
    # Triton's `dynamics` serves v0001 only: a pin to another number is refused, not rerouted.
    with pytest.raises(NotFound, match="version 2"):
        asyncio.run(_imagine(triton.url, history, actions, version="v0002"))
    for url in (grpc_url, triton.url):
        with pytest.raises(NotFound):
            asyncio.run(_imagine(url, history, actions, version="nope"))
    assert {b.triton_name: (b.triton_version, b.loaded.version) for b in triton.models} == {
        "dynamics": (1, "v0001"), "dynamics-oracle": (2, "v0002"), "dynamics-noise": (3, "v0003")}


def test_urls_and_targets():
    assert parse_url("triton://10.0.0.5").address == "10.0.0.5:8001"
    assert parse_url("triton://h:9001/dynamics-candidate", "dynamics").model == "dynamics-candidate"
    assert parse_url("triton://h:9001", "dynamics").model == "dynamics"
    assert parse_url("127.0.0.1:5").scheme == "grpc"
    with pytest.raises(InvalidArgument, match="unknown scheme"):
        parse_url("http://h:1")
    assert triton_target("dynamics", "") == ("dynamics", "")
    assert triton_target("dynamics", "v0012") == ("dynamics", "12")
    assert triton_target("dynamics", "candidate") == ("dynamics-candidate", "")


def test_repository_config_matches_the_adapter():
    """The cluster example's config.pbtxt is what the adapter declares (if this fails, regenerate:
    `python -m services.dynamics.triton triton/model_repository`)."""
    from services.dynamics.triton import repository_config

    checked_in = (REPOSITORY / "dynamics" / "config.pbtxt").read_text()
    assert checked_in == repository_config(EMB)
    assert (REPOSITORY / "dynamics" / "1" / "model.py").is_file()


def test_cluster_repository_serves_the_same_frames(grpc_url, triton, registry):
    """triton/model_repository as a cluster runs it: Triton's own loader reads config.pbtxt and the
    numbered folder, the Python backend runs dynamics/1/model.py (registry v0001, via the same
    adapter); the answer equals the gRPC service's."""
    with start_repository_server(REPOSITORY, env={"RISE_REGISTRY_ROOT": str(registry.root)}) as server:
        history, actions = inputs(2, seed=9)
        via_grpc, via_repository = both(grpc_url, server.url, history, actions, seed=3)
        assert_same(via_grpc, via_repository)
        assert via_repository.version == "v0001"
