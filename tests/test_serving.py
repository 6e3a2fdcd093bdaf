"""The server builder and the policy service, against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import EMB, observation
from rise.proto.v1 import common_pb2, model_admin_pb2, model_admin_pb2_grpc, policy_pb2, policy_pb2_grpc
from rise.serving import REQUESTS, ClientConfig, ServerConfig, TLSConfig, open_channel
from rise.tensors import from_tensor, to_tensor
from services.policy.server import PolicyConfig, start


@pytest.fixture
async def policy_server(registry):
    servers = []

    async def make(**server):
        server.setdefault("port", 0)
        server.setdefault("log_json", False)
        running = await start(PolicyConfig(registry_root=registry.root, server=ServerConfig(**server)))
        servers.append(running)
        return running

    yield make
    for running in servers:
        await running.stop(0)


async def act(channel, obs=None, **kw):
    return await policy_pb2_grpc.PolicyServiceStub(channel).Act(policy_pb2.ActRequest(observation=obs or observation(), **kw), timeout=10)


async def test_health_reflection_and_a_call(policy_server):
    server = await policy_server()
    async with open_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rise.v1.PolicyService", "rise.v1.ModelAdmin"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name async for r in call for s in r.list_services_response.service}
        assert {"rise.v1.PolicyService", "rise.v1.ModelAdmin", "grpc.health.v1.Health"} <= names
        reply = await act(channel, advantage_bin=10, request_id="r1")
        assert from_tensor(reply.chunk.actions, "a", "float32", (EMB.chunk_length, EMB.action_dim)).shape == (8, 4)
        assert (reply.meta.model, reply.meta.version, reply.request_id) == ("policy", "v0001", "r1")
        assert reply.chunk.observation_timestamp_ns == 123 and reply.chunk.control_hz == EMB.control_hz
        assert reply.meta.timing.total_ms >= reply.meta.timing.compute_ms > 0


def _bad(obs_change=None, **request):
    obs = observation()
    if obs_change:
        obs_change(obs)
    return policy_pb2.ActRequest(observation=obs, **request)


BAD_INPUTS = [
    ("wrong dtype", _bad(lambda o: o.views["corner"].CopyFrom(to_tensor(np.zeros((64, 64, 3), np.float32)))),
     "observation.views['corner']: expected uint8 [64, 64, 3], got float32 [64, 64, 3]"),
    ("wrong image size", _bad(lambda o: o.views["gripperPOV"].CopyFrom(to_tensor(np.zeros((48, 64, 3), np.uint8)))),
     "observation.views['gripperPOV']: expected uint8 [64, 64, 3], got uint8 [48, 64, 3]"),
    ("unknown view", _bad(lambda o: o.views["left_wrist"].CopyFrom(to_tensor(np.zeros((64, 64, 3), np.uint8)))),
     "unknown view(s) ['left_wrist']; embodiment 'metaworld' has views ['corner', 'behindGripper', 'gripperPOV']"),
    ("missing view", _bad(lambda o: o.views.pop("behindGripper")), "missing view(s) ['behindGripper']"),
    ("wrong state dim", _bad(lambda o: o.state.CopyFrom(to_tensor(np.zeros(14, np.float32)))),
     "observation.state: expected float32 [4], got float32 [14]"),
    ("truncated bytes", _bad(lambda o: setattr(o.state, "data", b"\0" * 3)), "needs 16 bytes of data, got 3"),
    ("bad bin", _bad(advantage_bin=11), "advantage bin must be 0 (null) or 1..10, got 11"),
]


@pytest.mark.parametrize("name, request_, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input_is_invalid_argument_and_server_keeps_serving(policy_server, name, request_, message):
    server = await policy_server()
    async with open_channel(server.address) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Act(request_, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()
        assert (await act(channel)).meta.version == "v0001"  # still serving
    assert REQUESTS.labels("policy", "/rise.v1.PolicyService/Act", "v0001", "INVALID_ARGUMENT")._value.get() >= 1


async def test_unknown_and_unloaded_versions(policy_server, registry):
    server = await policy_server()
    async with open_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await act(channel, model=common_pb2.ModelRef(version="v0042"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "v0042" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:  # v0002 exists (it is latest) but candidate is unset
            await act(channel, model=common_pb2.ModelRef(version="candidate"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert (await act(channel, model=common_pb2.ModelRef(version="latest"))).meta.version == "v0002"


async def test_batch_and_stream(policy_server):
    server = await policy_server()
    async with open_channel(server.address) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        batch = await stub.ActBatch(policy_pb2.ActBatchRequest(observations=[observation(seed=s) for s in range(5)],
                                                               advantage_bins=[10]), timeout=10)
        assert len(batch.chunks) == 5
        single = await act(channel, observation(seed=3))
        np.testing.assert_allclose(from_tensor(batch.chunks[3].actions), from_tensor(single.chunk.actions), rtol=1e-5, atol=1e-7)  # float32: batched matmuls may sum in another order (per CPU)
        with pytest.raises(grpc.aio.AioRpcError, match="expected 1 or 5 advantage bins"):
            await stub.ActBatch(policy_pb2.ActBatchRequest(observations=[observation(seed=s) for s in range(5)],
                                                           advantage_bins=[1, 2]), timeout=10)

        requests = [policy_pb2.ActRequest(observation=observation(seed=i, encoding="jpeg"), request_id=f"s{i}") for i in range(4)]
        replies = [r async for r in stub.StreamAct(iter(requests), timeout=10)]
        assert [r.request_id for r in replies] == ["s0", "s1", "s2", "s3"]
        bad = requests[:2] + [_bad(advantage_bin=-1)]
        call = stub.StreamAct(iter(bad), timeout=10)
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for reply in call:
                got.append(reply.request_id)
        assert got == ["s0", "s1"] and err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _big_batch(n: int) -> policy_pb2.ActBatchRequest:
    return policy_pb2.ActBatchRequest(observations=[observation(seed=i) for i in range(n)])


async def test_message_size_limit_comes_from_config(policy_server):
    request = _big_batch(150)
    assert request.ByteSize() > 4 * 1024 * 1024
    large = await policy_server(max_message_mb=16)
    async with open_channel(ClientConfig(address=large.address, max_message_mb=16)) as channel:
        reply = await policy_pb2_grpc.PolicyServiceStub(channel).ActBatch(request, timeout=30)
        assert len(reply.chunks) == 150
    small = await policy_server(max_message_mb=4)
    async with open_channel(ClientConfig(address=small.address, max_message_mb=16)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await policy_pb2_grpc.PolicyServiceStub(channel).ActBatch(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len((await policy_pb2_grpc.PolicyServiceStub(channel).ActBatch(_big_batch(10), timeout=10)).chunks) == 10


async def test_token_auth(policy_server):
    server = await policy_server(auth_tokens=["s3cret"])
    for token, code in (("", grpc.StatusCode.UNAUTHENTICATED), ("wrong", grpc.StatusCode.UNAUTHENTICATED)):
        async with open_channel(ClientConfig(address=server.address, token=token)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await act(channel)
            assert err.value.code() == code
            # health stays open for probes
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with open_channel(ClientConfig(address=server.address, token="s3cret")) as channel:
        assert (await act(channel)).meta.version == "v0001"
        replies = [r async for r in policy_pb2_grpc.PolicyServiceStub(channel).StreamAct(
            iter([policy_pb2.ActRequest(observation=observation())]), timeout=10)]
        assert len(replies) == 1


async def test_tls_and_mutual_tls(policy_server, tls_material):
    t = tls_material
    tls = await policy_server(tls=TLSConfig(cert_file=t["server.pem"], key_file=t["server.key"]))
    async with open_channel(tls.address) as plaintext:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await act(plaintext)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    async with open_channel(ClientConfig(address=tls.address, tls_ca_file=t["ca.pem"])) as channel:
        assert (await act(channel)).meta.version == "v0001"

    mtls = await policy_server(tls=TLSConfig(cert_file=t["server.pem"], key_file=t["server.key"], client_ca_file=t["ca.pem"]))
    async with open_channel(ClientConfig(address=mtls.address, tls_ca_file=t["ca.pem"])) as no_cert:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await act(no_cert)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    client = ClientConfig(address=mtls.address, tls_ca_file=t["ca.pem"], tls_cert_file=t["client.pem"], tls_key_file=t["client.key"])
    async with open_channel(client) as channel:
        assert (await act(channel)).meta.version == "v0001"


async def test_metrics_endpoint(policy_server):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = await policy_server(metrics_port=port)
    async with open_channel(server.address) as channel:
        await act(channel)
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    assert 'rise_grpc_requests_total{code="OK",method="/rise.v1.PolicyService/Act",server="policy",version="v0001"}' in text
    assert "rise_grpc_request_seconds_bucket" in text


async def test_tracing_follows_the_request(policy_server):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = await policy_server(tracing={"enabled": True, "exporter": "global"})
    with trace.get_tracer("test").start_as_current_span("robot-step") as root:
        async with open_channel(server.address, tracing=True) as channel:
            await act(channel)
    spans = exporter.get_finished_spans()
    server_spans = [s for s in spans if s.kind == trace.SpanKind.SERVER and s.name.endswith("PolicyService/Act")]
    assert server_spans and server_spans[0].context.trace_id == root.get_span_context().trace_id


async def test_admin_embodiment_mismatch_and_corruption(policy_server, registry, tmp_path):
    from rise.baselines import publish_baseline
    from rise.embodiment import PRESETS

    other = publish_baseline(registry, "policy", PRESETS["piper_dual"]).version  # v0003, another robot
    broken = publish_baseline(registry, "policy", EMB).version  # v0004, corrupted below
    (registry.root / "policy" / broken / "weights.npz").write_bytes(b"garbage")
    server = await policy_server()
    async with open_channel(server.address) as channel:
        admin = model_admin_pb2_grpc.ModelAdminStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.LoadVersion(model_admin_pb2.LoadVersionRequest(version=other))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "'piper_dual'" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.SetAlias(model_admin_pb2.SetAliasRequest(alias="stable", version=broken))
        assert err.value.code() == grpc.StatusCode.DATA_LOSS and "sha256" in err.value.details()
        assert (await act(channel)).meta.version == "v0001"  # nothing changed
        listing = await admin.ListVersions(model_admin_pb2.ListVersionsRequest())
        assert [v.version for v in listing.versions] == ["v0001", "v0002", "v0003", "v0004"]
        assert [v.loaded for v in listing.versions] == [True, False, False, False]  # latest (v0004) refused at start
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await act(channel, model=common_pb2.ModelRef(version="latest"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not loaded here" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.UnloadVersion(model_admin_pb2.UnloadVersionRequest(version="v0001"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "stable" in err.value.details()


async def test_version_swap_under_load_fails_no_request(policy_server, registry):
    """8 clients call for 5 s while the stable alias flips between versions: zero failures."""
    from rise.baselines import publish_baseline

    publish_baseline(registry, "policy", EMB, seed=2)  # latest -> v0003, so v0002 can be unloaded
    server = await policy_server()
    seen: dict[str, int] = {}
    failures: list[str] = []
    stop = asyncio.Event()

    async def client(i: int) -> None:
        async with open_channel(server.address) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            request = policy_pb2.ActRequest(observation=observation(seed=i))
            while not stop.is_set():
                try:
                    reply = await stub.Act(request, timeout=10)
                    seen[reply.meta.version] = seen.get(reply.meta.version, 0) + 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")

    async def swapper() -> int:
        swaps = 0
        async with open_channel(server.address) as channel:
            admin = model_admin_pb2_grpc.ModelAdminStub(channel)
            while not stop.is_set():
                for version in ("v0002", "v0001"):
                    await admin.SetAlias(model_admin_pb2.SetAliasRequest(alias="stable", version=version))
                    swaps += 1
                    await asyncio.sleep(0.05)
                await admin.UnloadVersion(model_admin_pb2.UnloadVersionRequest(version="v0002"))  # and load again next round
        return swaps

    tasks = [asyncio.create_task(client(i)) for i in range(8)]
    swap_task = asyncio.create_task(swapper())
    await asyncio.sleep(5)
    stop.set()
    await asyncio.gather(*tasks)
    swaps = await swap_task
    assert failures == []
    assert swaps >= 10 and seen.get("v0001", 0) > 50 and seen.get("v0002", 0) > 50
    assert registry.aliases("policy")["stable"] == "v0001"  # persisted


async def test_the_trainer_reaches_services_that_require_tls_and_a_token(policy_server, tls_material, tmp_path):
    """The trainer's `services` section carries the credentials to its rollout clients and to the
    ModelAdmin calls that move aliases; without them the same calls are refused."""
    from rise.errors import RiseError
    from rise.transport import connect_admins
    from services.trainer.config import ServicesConfig
    from services.trainer.rollout import open_clients

    t = tls_material
    tokens = tmp_path / "tokens"
    tokens.write_text("\ntrainer-token\nanother-accepted-token\n")  # one Secret: servers accept every line, clients send the first
    server = await policy_server(tls=TLSConfig(cert_file=t["server.pem"], key_file=t["server.key"]), auth_token_file=tokens)
    url = f"grpc://{server.address}"
    views = {v: np.zeros((2, EMB.image_height, EMB.image_width, 3), np.uint8) for v in EMB.views}
    states = np.zeros((2, EMB.state_dim), np.float32)

    services = ServicesConfig(policy=url, tls_ca_file=t["ca.pem"], token_file=tokens, timeout_s=10)
    policy, dynamics, value = await open_clients(services)
    async with policy, dynamics, value:
        chunks = await policy.act(views, states, ["push", "push"], [10])
        assert chunks.actions.shape == (2, EMB.chunk_length, EMB.action_dim) and chunks.version == "v0001"
    [admin] = connect_admins(url, services.client())
    async with admin:
        assert (await admin.list_versions()).aliases["stable"] == "v0001"

    for missing in ({"token_file": None}, {"tls_ca_file": None}):
        policy, dynamics, value = await open_clients(services.model_copy(update=missing))
        async with policy, dynamics, value:
            with pytest.raises(RiseError):
                await policy.act(views, states, ["push", "push"], [10], timeout_s=5)


async def test_a_pinned_alias_serves_its_version_without_rewriting_the_registry(registry):
    from rise.errors import NotFound

    config = PolicyConfig(registry_root=registry.root, server=ServerConfig(port=0, log_json=False),
                          preload=["candidate"], pin={"stable": "v0002"})
    running = await start(config)
    try:
        async with open_channel(running.address) as channel:
            assert (await act(channel)).meta.version == "v0002"  # the default alias, pinned here
            listed = await model_admin_pb2_grpc.ModelAdminStub(channel).ListVersions(model_admin_pb2.ListVersionsRequest(), timeout=10)
            assert listed.aliases["stable"] == "v0002"
    finally:
        await running.stop(0)
    assert registry.aliases("policy")["stable"] == "v0001"  # other servers sharing the store are unaffected

    with pytest.raises(NotFound, match="v0009"):  # a pin names exactly one version: never serve another instead
        await start(config.model_copy(update={"pin": {"stable": "v0009"}}))


async def test_connections_are_recycled_after_their_max_age_without_failing_a_call(policy_server, caplog):
    """max_connection_age_s: the client reconnects (and so re-resolves its target: new replicas get
    traffic) while every call still succeeds."""
    import logging

    server = await policy_server(max_connection_age_s=0.5, grace_seconds=1)
    caplog.set_level(logging.INFO, logger="rise.serving")
    async with open_channel(server.address) as channel:
        for _ in range(30):
            assert (await act(channel)).meta.version == "v0001"
            await asyncio.sleep(0.1)
    peers = {r.fields["peer"] for r in caplog.records if r.getMessage() == "rpc" and hasattr(r, "fields")}
    assert len(peers) >= 2, peers  # one client, several connections (its local port changed)
