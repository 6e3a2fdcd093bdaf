"""Policy, value and admin clients (rise.transport) against real servers, over gRPC and Triton.

The services run the linear baselines on 127.0.0.1; one Triton server per service (policy,
value) is started once for the module, since Triton's startup is the slow part. Also here:
retries across a policy server restarted on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time

import grpc
import numpy as np
import pytest

from conftest import EMB
from rise.baselines import publish_baseline
from rise.errors import FailedPrecondition, InvalidArgument, NotFound
from rise.registry import Registry
from rise.serving import ServerConfig
from rise.transport import (Chunks, RemoteError, Scores, _from_grpc, call_with_retries, connect_admin, connect_policy,
                            connect_value, is_transient)
from services.policy import server as policy_service
from services.value import server as value_service

H, W = EMB.image_height, EMB.image_width
TASKS = ["push the puck", "reach the goal", "open the drawer"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Registry:
    """policy and value: v0001 (stable) and v0002 (latest), linear baselines of seeds 0 and 1."""
    registry = Registry(tmp_path_factory.mktemp("transport") / "store")
    for model in ("policy", "value"):
        for seed in (0, 1):
            publish_baseline(registry, model, EMB, seed=seed)
        registry.set_alias(model, "stable", "v0001")
    return registry


@contextlib.asynccontextmanager
async def serving(service, registry: Registry, port: int = 0):
    """`rise serve policy|value` on 127.0.0.1, preloading `stable` only."""
    config_class = policy_service.PolicyConfig if service is policy_service else value_service.ValueConfig
    running = await service.start(config_class(registry_root=registry.root, preload=["stable"],
                                                server=ServerConfig(port=port, log_json=False)))
    try:
        yield running
    finally:
        await running.stop(0)


@pytest.fixture(scope="module")
def triton(store):
    """{"policy": RunningTriton, "value": RunningTriton}, each serving its `stable` as `<model>`."""
    from rise.triton_binding import TritonSettings, adapter_class, serve_triton, triton_unavailable_reason

    if reason := triton_unavailable_reason():
        pytest.fail(f"Triton cannot run here, and it is part of the product: {reason}")
    running = {}
    try:
        for service in ("policy", "value"):
            config = adapter_class(service).config_class()(
                registry_root=store.root, preload=["stable"],
                triton=TritonSettings(grpc_port=0, http_port=0, metrics_port=0, print_server_log=False))
            running[service] = serve_triton(service, config)
        yield running
    finally:
        for server in running.values():
            server.stop()


def observations(batch: int = 3, seed: int = 0, size: tuple[int, int] = (H, W)):
    rng = np.random.default_rng(seed)
    views = {v: rng.integers(0, 256, (batch, *size, 3), dtype=np.uint8) for v in EMB.views}
    return views, rng.normal(size=(batch, EMB.state_dim)).astype(np.float32), TASKS[:batch]


def sequences(batch: int = 3, count: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {v: rng.integers(0, 256, (batch, count, H, W, 3), dtype=np.uint8) for v in EMB.views}


# ---- policy and value: gRPC and Triton give the same answers ---------------------------------
async def test_policy_chunks_over_grpc_and_triton(store, triton):
    views, states, tasks = observations()
    async with serving(policy_service, store) as running:
        async with connect_policy(running.address) as policy:
            chunks = await policy.act(views, states, tasks, [10], seed=3)
            alone = await policy.act({v: a[1:2] for v, a in views.items()}, states[1:2], tasks[1:2], [10])
    async with connect_policy(triton["policy"].url) as policy:
        via_triton = await policy.act(views, states, tasks, [10, 0, 1], seed=3)

    assert isinstance(chunks, Chunks) and chunks.version == via_triton.version == "v0001"
    assert chunks.actions.dtype == via_triton.actions.dtype == np.float32
    assert chunks.actions.shape == via_triton.actions.shape == (3, EMB.chunk_length, EMB.action_dim)
    np.testing.assert_allclose(via_triton.actions, chunks.actions, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(alone.actions[0], chunks.actions[1], rtol=1e-6, atol=1e-6)  # items keep their order
    assert not np.allclose(chunks.actions[0], chunks.actions[1])


async def test_value_scores_over_grpc_and_triton(store, triton):
    frames = sequences()
    async with serving(value_service, store) as running:
        async with connect_value(f"grpc://{running.address}") as value:
            scores = await value.score(frames, TASKS)
    async with connect_value(triton["value"].url) as value:
        via_triton = await value.score(frames, TASKS)

    assert isinstance(scores, Scores) and scores.version == via_triton.version == "v0001"
    assert scores.values.dtype == via_triton.values.dtype == np.float32
    assert scores.values.shape == via_triton.values.shape == (3, 2)
    assert np.all(np.abs(scores.values) <= 1)
    np.testing.assert_allclose(via_triton.values, scores.values, rtol=1e-6, atol=1e-6)


async def test_bad_image_size_is_invalid_argument_naming_the_shape(store, triton):
    views, states, tasks = observations()
    views[EMB.views[0]] = views[EMB.views[0]][:, :32, :32]
    async with serving(policy_service, store) as running:
        urls, messages = [running.address, triton["policy"].url], []
        for url in urls:
            async with connect_policy(url) as policy:
                with pytest.raises(InvalidArgument) as err:
                    await policy.act(views, states, tasks, [10])
            messages.append(str(err.value))
    # gRPC: the service's own check; Triton: the server's check against the declared input dims.
    assert "observations[0].views['corner']: expected uint8 [64, 64, 3], got uint8 [32, 32, 3]" in messages[0], messages[0]
    assert re.search(r"'frames_corner'.*Expected \[-1,64,64,3\], got \[3,32,32,3\]", messages[1]), messages[1]
    frames = sequences(count=1)
    frames[EMB.views[0]] = frames[EMB.views[0]][:, :, :32]
    async with connect_value(triton["value"].url) as value:
        with pytest.raises(InvalidArgument, match=r"Expected \[-1,64,64,3\], got \[3,32,64,3\]"):
            await value.score(frames, TASKS)
    async with connect_policy(urls[0]) as policy:  # checked before sending
        with pytest.raises(InvalidArgument, match="tasks: 2 entries for 3 items"):
            await policy.act(*observations()[:2], TASKS[:2], [10])


# ---- administration --------------------------------------------------------------------------
async def test_admin_loads_a_version_and_moves_the_candidate_alias(registry):
    views, states, tasks = observations()
    async with serving(policy_service, registry) as running:
        async with connect_admin(running.address) as admin, connect_policy(running.address) as policy:
            listed = await admin.list_versions()
            assert listed.model == "policy" and listed.default_alias == "stable" and listed.aliases == {"stable": "v0001"}
            assert [(v.version, v.loaded, v.kind) for v in listed.versions] == [("v0001", True, "linear"), ("v0002", False, "linear")]
            with pytest.raises(NotFound, match="candidate"):
                await policy.act(views, states, tasks, [10], version="candidate")

            info = await admin.load("v0002")
            assert info.version == "v0002" and info.loaded and info.embodiment == EMB.name
            assert await admin.set_alias("candidate", "v0002") == ("", "v0002")
            stable = await policy.act(views, states, tasks, [10])
            candidate = await policy.act(views, states, tasks, [10], version="candidate")
            assert (stable.version, candidate.version) == ("v0001", "v0002")
            assert not np.allclose(stable.actions, candidate.actions)
            assert (await admin.list_versions()).aliases == {"stable": "v0001", "candidate": "v0002"}
            assert registry.aliases("policy")["candidate"] == "v0002"  # persisted

            with pytest.raises(FailedPrecondition, match="alias"):
                await admin.unload("v0002")
            assert await admin.set_alias("candidate", "v0001") == ("v0002", "v0001")
            await admin.unload("v0002")
            with pytest.raises(FailedPrecondition, match="not loaded"):
                await policy.act(views, states, tasks, [10], version="v0002")
    with pytest.raises(InvalidArgument, match="gRPC only"):
        connect_admin("triton://127.0.0.1:8001")


# ---- retries -----------------------------------------------------------------------------------
async def test_retries_survive_a_restart_on_the_same_port(store):
    views, states, tasks = observations()
    retries: list[str] = []

    def act(policy):
        return lambda: policy.act(views, states, tasks, [10])

    async with serving(policy_service, store) as first:
        port = first.port
        policy = connect_policy(first.address)
        before = await policy.act(views, states, tasks, [10])
    try:
        with pytest.raises(RemoteError) as err:  # the server is gone
            await policy.act(views, states, tasks, [10])
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and is_transient(err.value)

        async def restart_later():
            await asyncio.sleep(1.0)
            async with serving(policy_service, store, port=port):
                await done.wait()

        done = asyncio.Event()
        restarted = asyncio.create_task(restart_later())
        after = await call_with_retries(act(policy), attempts=8, backoff_s=0.2, max_backoff_s=1.0, what="policy.act",
                                        log=retries.append)
        assert after.version == before.version
        np.testing.assert_array_equal(after.actions, before.actions)
        assert retries and all(line.startswith("policy.act: UNAVAILABLE") for line in retries), retries

        calls = 0

        async def bad_request():
            nonlocal calls
            calls += 1
            return await policy.act({v: a[:, :32] for v, a in views.items()}, states, tasks, [10])

        with pytest.raises(InvalidArgument):
            await call_with_retries(bad_request, attempts=5, backoff_s=0.01, max_backoff_s=0.01, what="bad")
        assert calls == 1  # not retried
        done.set()
        await restarted
    finally:
        await policy.close()


async def test_retries_give_up_after_the_last_attempt():
    calls: list[int] = []
    lines: list[str] = []

    async def unavailable():
        calls.append(1)
        raise RemoteError("UNAVAILABLE: restarting", grpc.StatusCode.UNAVAILABLE)

    with pytest.raises(RemoteError, match="restarting"):
        await call_with_retries(unavailable, attempts=3, backoff_s=0.001, max_backoff_s=0.002, what="x", log=lines.append)
    assert len(calls) == 3 and len(lines) == 2 and "retry 2/2" in lines[-1]

    with socket.socket() as s:  # a Triton address nobody listens on: a transient failure too
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with connect_policy(f"triton://127.0.0.1:{port}") as policy:
        with pytest.raises(RemoteError) as err:
            await call_with_retries(lambda: policy.act(*observations(1), [0]), attempts=2, backoff_s=0.01, max_backoff_s=0.01,
                                    what="triton", log=lines.append)
    assert is_transient(err.value) and len(lines) == 3


async def test_calls_a_stopping_server_never_accepted_come_back_cancelled_and_are_retried():
    """grpc/grpc#41785: calls that wait, not yet accepted by a handler, when a server stops come back
    CANCELLED, not UNAVAILABLE (CI once lost a trainer run to it while a dynamics service restarted).
    They are retried like UNAVAILABLE. Our own cancellation is no RPC status at all:
    asyncio.CancelledError, never retried."""
    server_loop = asyncio.new_event_loop()
    threading.Thread(target=server_loop.run_forever, daemon=True).start()
    started = threading.Event()

    async def slow(request: bytes, context) -> bytes:
        started.set()
        time.sleep(0.5)  # holds the server's loop: calls arriving meanwhile wait unaccepted
        return request

    handler = grpc.method_handlers_generic_handler("test.Slow", {"Call": grpc.unary_unary_rpc_method_handler(slow)})

    async def start():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def on_server_loop(coro):
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, server_loop))

    try:
        server, port = await on_server_loop(start())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.Slow/Call")
            first = asyncio.ensure_future(call(b"x", timeout=20))
            while not started.is_set():
                await asyncio.sleep(0.01)
            waiting = [asyncio.ensure_future(call(b"x", timeout=20)) for _ in range(8)]
            await asyncio.sleep(0.1)
            await on_server_loop(server.stop(0))
            outcomes = await asyncio.gather(first, *waiting, return_exceptions=True)
        failures = [_from_grpc(o) for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert any(f.code == grpc.StatusCode.CANCELLED for f in failures), outcomes
        assert failures and all(is_transient(f) for f in failures), failures

        server, port = await on_server_loop(start())
        started.clear()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            mine = asyncio.ensure_future(channel.unary_unary("/test.Slow/Call")(b"x", timeout=20))
            while not started.is_set():
                await asyncio.sleep(0.01)
            mine.cancel()
            with pytest.raises(asyncio.CancelledError):
                await mine
        await on_server_loop(server.stop(0))
    finally:
        server_loop.call_soon_threadsafe(server_loop.stop)
