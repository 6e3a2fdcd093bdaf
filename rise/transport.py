"""Client transports: one Python API whether a model is served over our gRPC API or by Triton.

    async with connect_policy("grpc://127.0.0.1:50051") as policy:          # rise serve policy
        chunks = await policy.act(views, states, tasks, [10], version="candidate")
    async with connect_dynamics("triton://127.0.0.1:8001") as dynamics:     # rise serve-triton dynamics
        out = await dynamics.imagine(history, chunks.actions, num_steps=4, seed=7)
    async with connect_value("grpc://127.0.0.1:50052") as value:            # rise serve value
        scores = await value.score(frames, tasks)
    async with connect_admin("grpc://127.0.0.1:50051") as admin:            # any model service
        await admin.set_alias("candidate", "v0004")

Both transports return the same results (`Chunks`, `Imagination`, `Scores`: numpy arrays, equal
for equal inputs and seed) and raise the same `rise.errors` classes (`InvalidArgument`,
`NotFound`, `FailedPrecondition`, ...; other failures: `RemoteError` with the status code).
`call_with_retries` retries the transient ones (a service restarting).

URLs: `grpc://host:port` (a bare `host:port` too; TLS and tokens through `client=ClientConfig`);
replicas of one service: a gRPC target, `dns:///dynamics-headless:50053` (every address the name
resolves to) or `ipv4:10.0.0.1:50053,10.0.0.2:50053`: calls go round robin over the replicas that
report SERVING, and pure calls (`IDEMPOTENT_METHODS`) that fail UNAVAILABLE are sent again to the
next one (per-replica dynamic batching stays in each server);
`triton://host:port[/model]` (Triton's gRPC port, 8001 by default; `/model` picks the Triton
model name, default the service's: `policy`, `value`, `dynamics`). Model administration is gRPC
only: Triton binds its versions when it starts.

Version refs (`version=`), as `rise.triton_binding` names things:
- gRPC: any version id or alias the service has loaded; "" = the service's default alias.
- Triton: "" -> Triton model `<model>`, its served version (the default alias at server start);
  "v0003" or "3" -> `<model>` version 3 (Triton refuses if it serves another: a pin, not a switch);
  an alias -> Triton model `<model>-<alias>` (bound at server start for the preload aliases).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import re
from typing import Awaitable, Callable, Mapping, NamedTuple, Self, Sequence, TypeVar
from urllib.parse import urlsplit

import grpc
import numpy as np

from rise.errors import CorruptVersion, FailedPrecondition, InvalidArgument, NotFound, RiseError
from rise.serving import ClientConfig

DEFAULT_PORTS = {"grpc": 50051, "triton": 8001}
_ERRORS: dict[str, type[RiseError]] = {cls.__name__: cls for cls in (InvalidArgument, NotFound, FailedPrecondition, CorruptVersion)}
_NUMBERED = re.compile(r"^v?(\d+)$")
# Failures worth a retry: the service is restarting, overloaded or slow (a Triton server that
# refuses connections reports UNAVAILABLE too). CANCELLED as a status comes from the other side: a
# server that stops cancels the calls it had not yet handed to a handler (grpc/grpc#41785); a call
# this process cancels itself raises asyncio.CancelledError instead, which is never retried.
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                             grpc.StatusCode.CANCELLED})

# Calls that may run twice, on any replica, without harm: pure functions of the request (the model
# version is resolved per call). Only these are retried by the channel (on another replica) and by
# `call_with_retries`.
IDEMPOTENT_METHODS = ("rise.v1.PolicyService/Act", "rise.v1.PolicyService/ActBatch", "rise.v1.DynamicsService/Imagine",
                      "rise.v1.ValueService/Score", "rise.v1.ModelAdmin/ListVersions")
# Calls with side effects on one replica's state: sent once, to one named replica (`connect_admins`);
# a failure is followed by reading the state back (`ensure_alias`), never by sending the call again blindly.
SIDE_EFFECT_METHODS = ("rise.v1.ModelAdmin/LoadVersion", "rise.v1.ModelAdmin/SetAlias", "rise.v1.ModelAdmin/UnloadVersion")
_TARGET_SCHEMES = ("dns:/", "ipv4:", "ipv6:")  # gRPC resolver targets, passed through as they are

logger = logging.getLogger("rise.transport")
T = TypeVar("T")


class RemoteError(RiseError):
    """A failure other than the mapped `rise.errors` classes; `code` is the gRPC status code."""

    def __init__(self, message: str, code=None):
        super().__init__(message)
        if code is not None:
            self.code = code


# ---- results -------------------------------------------------------------------------------
class Imagination(NamedTuple):
    frames: dict[str, np.ndarray]  # view -> uint8 [B, F, H, W, 3]
    sim_states: list[np.ndarray | None]  # per item: float64 [n] state after the chunk (oracle), else None
    version: str  # registry version id that answered, e.g. "v0003"
    # per item: float32 [state_dim] robot state after the chunk where the model imagines it (the oracle), else None
    states: list[np.ndarray | None] | None = None


class Chunks(NamedTuple):
    actions: np.ndarray  # float32 [B, chunk, A], unnormalised
    version: str  # registry version id that answered


class Scores(NamedTuple):
    values: np.ndarray  # float32 [B, F] in [-1, 1]: estimated task progress per frame
    version: str  # registry version id that answered


class VersionInfo(NamedTuple):
    version: str  # e.g. "v0003"
    loaded: bool  # in the service's memory, answering now
    aliases: list[str]  # aliases the service routes to it
    kind: str  # model implementation, e.g. "linear"
    embodiment: str
    parent: str  # version it was trained from ("" for none)
    created_unix_ms: int
    metrics: dict[str, float]


class ModelVersions(NamedTuple):
    model: str  # registry model name, e.g. "policy"
    versions: list[VersionInfo]  # oldest first
    aliases: dict[str, str]  # alias -> version id, as the service routes them
    default_alias: str  # what a request naming no version gets


# ---- addresses -----------------------------------------------------------------------------
class Endpoint(NamedTuple):
    scheme: str  # "grpc" | "triton"
    address: str  # host:port
    model: str  # Triton model name ("" for gRPC)


def parse_url(url: str, default_model: str = "") -> Endpoint:
    """`grpc://h:p`, `h:p` (gRPC), a gRPC target for replicas (`dns:///svc:p`, `ipv4:h1:p,h2:p`) or
    `triton://h:p[/model]` -> Endpoint."""
    if url.startswith(_TARGET_SCHEMES):
        return Endpoint("grpc", url, "")
    if "://" not in url:
        url = f"grpc://{url}"
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise InvalidArgument(f"{url!r}: unknown scheme {parts.scheme!r}; use grpc://host:port or triton://host:port[/model]")
    if not parts.hostname:
        raise InvalidArgument(f"{url!r} names no host")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    address = f"{host}:{parts.port or DEFAULT_PORTS[scheme]}"
    model = parts.path.strip("/")
    if scheme == "grpc" and model:
        raise InvalidArgument(f"{url!r}: a gRPC URL names no model (the service knows its model); drop {parts.path!r}")
    return Endpoint(scheme, address, model or (default_model if scheme == "triton" else ""))


def triton_target(model: str, version: str) -> tuple[str, str]:
    """Version ref -> (Triton model name, Triton version string) per the naming convention."""
    if not version:
        return model, ""
    match = _NUMBERED.match(version)
    if match:
        return model, str(int(match.group(1)))
    from rise.triton_binding import alias_model_name

    return alias_model_name(model, version), ""


def _connect(url: str, client: ClientConfig | None, default_model: str) -> tuple[Endpoint, ClientConfig]:
    """The URL's endpoint, and `client` (TLS files, token, default timeout) with the URL's address."""
    endpoint = parse_url(url, default_model=default_model)
    config = (client.model_copy(update={"address": endpoint.address}) if client is not None
              else ClientConfig(address=endpoint.address))
    return endpoint, config


# ---- what every client shares ---------------------------------------------------------------
class _Client(abc.ABC):
    """Use as `async with`, or call `close()`."""

    url: str

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class _GrpcClient(_Client):
    """One channel to a service (or to its replicas); every call gets the default deadline and the error mapping."""

    def __init__(self, config: ClientConfig):
        from rise.serving import is_replicated, open_channel

        self.config = config
        self.url = config.address if is_replicated(config.address) else f"grpc://{config.address}"
        self._channel = open_channel(config, retry_methods=IDEMPOTENT_METHODS)

    async def _call(self, method, request, timeout_s: float | None):
        try:
            return await method(request, timeout=timeout_s or self.config.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _from_grpc(exc) from None

    async def close(self) -> None:
        await self._channel.close()


class _TritonClient(_Client):
    """Triton's gRPC client for one model name; `_infer` runs one request of B items."""

    def __init__(self, address: str, model: str, config: ClientConfig | None = None):
        from tritonclient.grpc.aio import InferenceServerClient

        self.address, self.model = address, model
        self.url = f"triton://{address}/{model}"
        self.config = config or ClientConfig(address=address)
        token = self.config.bearer_token()
        self._headers = {"authorization": f"Bearer {token}"} if token else None
        tls = self.config.tls_ca_file is not None
        self._client = InferenceServerClient(
            url=address, ssl=tls,
            root_certificates=str(self.config.tls_ca_file) if tls else None,
            private_key=str(self.config.tls_key_file) if self.config.tls_key_file else None,
            certificate_chain=str(self.config.tls_cert_file) if self.config.tls_cert_file else None)

    async def _infer(self, inputs: list, outputs: list[str], version: str, timeout_s: float | None,
                     parameters: dict | None = None):
        """-> (tritonclient InferResult, the version that answered). An item's `error` output
        raises the error the gRPC service would have raised."""
        from tritonclient.grpc import InferRequestedOutput
        from tritonclient.utils import InferenceServerException

        from rise.triton_binding import ERROR_OUTPUT, VERSION_OUTPUT, decode_strings

        model, model_version = triton_target(self.model, version)
        requested = [InferRequestedOutput(n) for n in [*outputs, VERSION_OUTPUT, ERROR_OUTPUT]]
        try:
            result = await self._client.infer(model, inputs, model_version=model_version, outputs=requested, parameters=parameters,
                                              client_timeout=timeout_s or self.config.timeout_s, headers=self._headers)
        except InferenceServerException as exc:
            raise _from_triton(exc, model, model_version) from None
        errors = [e for e in decode_strings(result.as_numpy(ERROR_OUTPUT)) if e]
        if errors:
            raise _from_text(errors[0])
        return result, decode_strings(result.as_numpy(VERSION_OUTPUT))[0]

    async def close(self) -> None:
        await self._client.close()


def _triton_input(name: str, array: np.ndarray):
    """A named Triton input holding `array` (object arrays travel as BYTES)."""
    from tritonclient.grpc import InferInput
    from tritonclient.utils import np_to_triton_dtype

    array = np.ascontiguousarray(array)
    datatype = "BYTES" if array.dtype == object else np_to_triton_dtype(array.dtype)
    if datatype is None:
        raise InvalidArgument(f"{name}: dtype {array.dtype} has no Triton type")
    entry = InferInput(name, list(array.shape), datatype)
    entry.set_data_from_numpy(array)
    return entry


def _frames_input(view: str) -> str:
    """The Triton input name of one view, as the policy and value adapters declare it."""
    return f"frames_{view}"


def _sampling(num_steps: int, seed: int) -> dict:
    """Request parameters of the sampling models (policy, dynamics): num_steps and a uint64 seed."""
    if not 0 <= seed < 2**64 or not 0 <= num_steps < 2**32:
        raise InvalidArgument(f"seed must be in [0, 2^64) and num_steps in [0, 2^32), got {seed}, {num_steps}")
    # Triton parameters are int64: larger seeds travel as decimal text (the adapters read both).
    return {"num_steps": int(num_steps), "seed": int(seed) if seed < 2**63 else str(seed)}


# ---- dynamics ------------------------------------------------------------------------------
def _check_batch(history: Mapping[str, np.ndarray], actions: np.ndarray, tasks, sim_states) -> int:
    if not history:
        raise InvalidArgument("history: no views")
    batch = len(actions)
    for view, frames in history.items():
        if np.ndim(frames) != 5 or len(frames) != batch:
            raise InvalidArgument(f"history[{view!r}] must be [B={batch}, T, H, W, 3], got {list(np.shape(frames))}")
    if np.ndim(actions) != 3:
        raise InvalidArgument(f"actions must be [B, chunk, A], got {list(np.shape(actions))}")
    for name, values in (("tasks", tasks), ("sim_states", sim_states)):
        if values is not None and len(values) != batch:
            raise InvalidArgument(f"{name}: {len(values)} entries for {batch} items")
    return batch


class DynamicsClient(_Client):
    """Imagination over a transport; use as `async with`, or call `close()`."""

    @abc.abstractmethod
    async def imagine(self, history: Mapping[str, np.ndarray], actions: np.ndarray, num_steps: int = 0, seed: int = 0, *,
                      version: str = "", tasks: Sequence[str] | None = None,
                      sim_states: Sequence[np.ndarray | None] | None = None, timeout_s: float | None = None) -> Imagination:
        """history {view: uint8 [B, T, H, W, 3]}, actions float32 [B, chunk, A] -> Imagination.

        `tasks` (B texts) and `sim_states` (B float64 arrays or None) matter to privileged models
        (the oracle) only. `seed` 0 = nondeterministic; a seed gives the same frames over both
        transports. Errors: `rise.errors` classes, or `RemoteError`.
        """


class GrpcDynamics(_GrpcClient, DynamicsClient):
    def __init__(self, config: ClientConfig):
        from rise.proto.v1 import dynamics_pb2_grpc

        super().__init__(config)
        self._stub = dynamics_pb2_grpc.DynamicsServiceStub(self._channel)

    async def imagine(self, history, actions, num_steps=0, seed=0, *, version="", tasks=None, sim_states=None, timeout_s=None):
        from rise.proto.v1 import common_pb2, dynamics_pb2
        from rise.tensors import from_tensor, to_tensor

        batch = _check_batch(history, actions, tasks, sim_states)
        items = []
        for b in range(batch):
            item = dynamics_pb2.ImagineItem(history={v: to_tensor(h[b]) for v, h in history.items()}, actions=to_tensor(actions[b]),
                                            task=tasks[b] if tasks is not None else "")
            if sim_states is not None and sim_states[b] is not None:
                item.sim_state.CopyFrom(to_tensor(np.asarray(sim_states[b])))
            items.append(item)
        request = dynamics_pb2.ImagineRequest(items=items, model=common_pb2.ModelRef(version=version), num_steps=num_steps, seed=seed)
        reply = await self._call(self._stub.Imagine, request, timeout_s)
        views = [v for v in history if all(v in f.frames for f in reply.futures)]  # the caller's view order
        frames = {v: np.stack([from_tensor(f.frames[v], f"frames[{v!r}]") for f in reply.futures]) for v in views}
        sim_states = [from_tensor(f.sim_state, "sim_state") if f.HasField("sim_state") else None for f in reply.futures]
        states = [from_tensor(f.state, "state") if f.HasField("state") else None for f in reply.futures]
        return Imagination(frames, sim_states, reply.meta.version, states)


class TritonDynamics(_TritonClient, DynamicsClient):
    def __init__(self, address: str, model: str = "dynamics", config: ClientConfig | None = None):
        super().__init__(address, model, config)

    async def imagine(self, history, actions, num_steps=0, seed=0, *, version="", tasks=None, sim_states=None, timeout_s=None):
        from rise.triton_binding import encode_strings
        from services.dynamics.triton import frames_output, history_input

        batch = _check_batch(history, actions, tasks, sim_states)
        parameters = _sampling(num_steps, seed)
        inputs = [_triton_input(history_input(v), h) for v, h in history.items()]
        inputs.append(_triton_input("actions", np.asarray(actions)))
        if tasks is not None:
            inputs.append(_triton_input("task", encode_strings(list(tasks))))
        if sim_states is not None:
            states = [None if s is None else np.asarray(s) for s in sim_states]
            if any(s is not None and (s.dtype != np.float64 or s.ndim != 1) for s in states):
                got = next(f"{s.dtype} {list(s.shape)}" for s in states if s is not None and (s.dtype != np.float64 or s.ndim != 1))
                raise InvalidArgument(f"sim_state: expected float64 [*], got {got}")
            width = max((len(s) for s in states if s is not None), default=1)
            padded = np.full((batch, max(width, 1)), np.nan)
            for b, s in enumerate(states):
                if s is not None:
                    padded[b, :len(s)] = s
            inputs.append(_triton_input("sim_state", padded))
            inputs.append(_triton_input("sim_state_size", np.array([[-1 if s is None else len(s)] for s in states], np.int64)))
        views = list(history)
        outputs = [*(frames_output(v) for v in views), "next_sim_state", "next_sim_state_size", "next_state"]
        result, answered = await self._infer(inputs, outputs, version, timeout_s, parameters)
        frames = {v: result.as_numpy(frames_output(v)) for v in views}
        sizes = result.as_numpy("next_sim_state_size").reshape(-1)
        padded = result.as_numpy("next_sim_state")
        sim_states = [None if n < 0 else padded[b, :n] for b, n in enumerate(sizes)]
        states = [None if np.isnan(s).any() else s for s in result.as_numpy("next_state")]
        return Imagination(frames, sim_states, answered, states)


def connect_dynamics(url: str, client: ClientConfig | None = None) -> DynamicsClient:
    """A dynamics client for `grpc://host:port` or `triton://host:port[/model]`.

    `client` carries TLS files, token and default timeout; its address is replaced by the URL's.
    """
    endpoint, config = _connect(url, client, "dynamics")
    if endpoint.scheme == "triton":
        return TritonDynamics(endpoint.address, endpoint.model, config)
    return GrpcDynamics(config)


# ---- policy --------------------------------------------------------------------------------
def _check_act(views: Mapping[str, np.ndarray], states: np.ndarray, tasks: Sequence[str],
               advantage_bins: Sequence[int]) -> np.ndarray:
    """-> one advantage bin per item (a single bin applies to the whole batch)."""
    from rise.observations import check_advantage_bins

    if not views:
        raise InvalidArgument("views: no views")
    if np.ndim(states) != 2:
        raise InvalidArgument(f"states must be float32 [B, S], got {list(np.shape(states))}")
    batch = len(states)
    for view, images in views.items():
        if np.ndim(images) != 4 or len(images) != batch:
            raise InvalidArgument(f"views[{view!r}] must be uint8 [B={batch}, H, W, 3], got {list(np.shape(images))}")
    if len(tasks) != batch:
        raise InvalidArgument(f"tasks: {len(tasks)} entries for {batch} items")
    return check_advantage_bins(advantage_bins, batch, "advantage_bins")


class PolicyClient(_Client):
    """Action chunks over a transport; use as `async with`, or call `close()`."""

    @abc.abstractmethod
    async def act(self, views: Mapping[str, np.ndarray], states: np.ndarray, tasks: Sequence[str], advantage_bins: Sequence[int],
                  num_steps: int = 0, seed: int = 0, *, version: str = "", timeout_s: float | None = None) -> Chunks:
        """views {view: uint8 [B, H, W, 3]}, states float32 [B, S], B tasks -> Chunks (float32 [B, chunk, A]).

        `advantage_bins`: one bin for the batch or one per item; 0 = null (unconditioned),
        1..10 = the advantage bin to condition on (10 = best). `num_steps` 0 = the model's
        default; `seed` 0 = nondeterministic. One model version answers the whole batch.
        """


class GrpcPolicy(_GrpcClient, PolicyClient):
    """`PolicyService.ActBatch`: one RPC per batch."""

    def __init__(self, config: ClientConfig):
        from rise.proto.v1 import policy_pb2_grpc

        super().__init__(config)
        self._stub = policy_pb2_grpc.PolicyServiceStub(self._channel)

    async def act(self, views, states, tasks, advantage_bins, num_steps=0, seed=0, *, version="", timeout_s=None):
        from rise.proto.v1 import common_pb2, policy_pb2
        from rise.tensors import from_tensor, to_tensor

        bins = _check_act(views, states, tasks, advantage_bins)
        observations = [common_pb2.Observation(views={v: to_tensor(images[b]) for v, images in views.items()},
                                               state=to_tensor(states[b]), task=tasks[b]) for b in range(len(states))]
        request = policy_pb2.ActBatchRequest(observations=observations, model=common_pb2.ModelRef(version=version),
                                             advantage_bins=bins.tolist(), num_steps=num_steps, seed=seed)
        reply = await self._call(self._stub.ActBatch, request, timeout_s)
        actions = np.stack([from_tensor(c.actions, f"chunks[{i}].actions") for i, c in enumerate(reply.chunks)])
        return Chunks(actions, reply.meta.version)


class TritonPolicy(_TritonClient, PolicyClient):
    """The policy Triton adapter's tensors (services/policy/triton.py): one request per batch."""

    def __init__(self, address: str, model: str = "policy", config: ClientConfig | None = None):
        super().__init__(address, model, config)

    async def act(self, views, states, tasks, advantage_bins, num_steps=0, seed=0, *, version="", timeout_s=None):
        from rise.triton_binding import encode_strings

        bins = _check_act(views, states, tasks, advantage_bins)
        parameters = _sampling(num_steps, seed)
        inputs = [_triton_input(_frames_input(v), images) for v, images in views.items()]
        inputs += [_triton_input("state", np.asarray(states)), _triton_input("task", encode_strings(list(tasks))),
                   _triton_input("advantage_bin", bins.reshape(-1, 1))]
        result, answered = await self._infer(inputs, ["actions"], version, timeout_s, parameters)
        return Chunks(result.as_numpy("actions"), answered)


def connect_policy(url: str, client: ClientConfig | None = None) -> PolicyClient:
    """A policy client for `grpc://host:port` or `triton://host:port[/model]` (see `connect_dynamics`)."""
    endpoint, config = _connect(url, client, "policy")
    if endpoint.scheme == "triton":
        return TritonPolicy(endpoint.address, endpoint.model, config)
    return GrpcPolicy(config)


# ---- value ---------------------------------------------------------------------------------
def _check_score(frames: Mapping[str, np.ndarray], tasks: Sequence[str]) -> tuple[int, int]:
    """-> (B items, F frames per item): every view uint8 [B, F, H, W, 3] with the same B and F."""
    if not frames:
        raise InvalidArgument("frames: no views")
    batch, first = len(tasks), np.shape(next(iter(frames.values())))
    count = first[1] if len(first) == 5 else 0
    for view, images in frames.items():
        if np.ndim(images) != 5 or np.shape(images)[:2] != (batch, count):
            raise InvalidArgument(f"frames[{view!r}] must be uint8 [B={batch}, F, H, W, 3] with one F for every view, "
                                  f"got {list(np.shape(images))}")
    if batch < 1 or count < 1:
        raise InvalidArgument(f"nothing to score: {batch} items of {count} frames")
    return batch, count


class ValueClient(_Client):
    """Progress values over a transport; use as `async with`, or call `close()`."""

    @abc.abstractmethod
    async def score(self, frames: Mapping[str, np.ndarray], tasks: Sequence[str], *, version: str = "",
                    sim_states: np.ndarray | None = None, timeout_s: float | None = None) -> Scores:
        """frames {view: uint8 [B, F, H, W, 3]}, B tasks -> Scores (float32 [B, F] in [-1, 1]).

        `sim_states` float64 [B, F, n]: the simulator state at every frame, which only a privileged
        (oracle) value model reads, and needs."""


class GrpcValue(_GrpcClient, ValueClient):
    """`ValueService.Score`: one RPC, one item per sequence."""

    def __init__(self, config: ClientConfig):
        from rise.proto.v1 import value_pb2_grpc

        super().__init__(config)
        self._stub = value_pb2_grpc.ValueServiceStub(self._channel)

    async def score(self, frames, tasks, *, version="", sim_states=None, timeout_s=None):
        from rise.proto.v1 import common_pb2, value_pb2
        from rise.tensors import to_tensor

        batch, count = _check_score(frames, tasks)
        if sim_states is not None and (np.ndim(sim_states) != 3 or np.shape(sim_states)[:2] != (batch, count)):
            raise InvalidArgument(f"sim_states must be float64 [B={batch}, F={count}, n], got {list(np.shape(sim_states))}")
        items = [value_pb2.ScoreItem(frames={v: to_tensor(f[b]) for v, f in frames.items()}, task=tasks[b]) for b in range(batch)]
        if sim_states is not None:
            for item, states in zip(items, sim_states):
                item.sim_states.CopyFrom(to_tensor(np.asarray(states, np.float64)))
        reply = await self._call(self._stub.Score, value_pb2.ScoreRequest(items=items, model=common_pb2.ModelRef(version=version)),
                                 timeout_s)
        return Scores(np.array([list(r.values) for r in reply.results], np.float32), reply.meta.version)


class TritonValue(_TritonClient, ValueClient):
    """The value Triton adapter's tensors (services/value/triton.py), where one item is one frame:
    the B x F frames travel flat in one request (at most the server's `triton.max_request_items`)."""

    def __init__(self, address: str, model: str = "value", config: ClientConfig | None = None):
        super().__init__(address, model, config)

    async def score(self, frames, tasks, *, version="", sim_states=None, timeout_s=None):
        from rise.triton_binding import encode_strings

        batch, count = _check_score(frames, tasks)
        if sim_states is not None:
            raise InvalidArgument("sim_states: the Triton value adapter serves learned models only; the oracle value "
                                  "(which reads simulator states) is served over gRPC")
        inputs = [_triton_input(_frames_input(v), np.reshape(f, (batch * count, *np.shape(f)[2:]))) for v, f in frames.items()]
        inputs.append(_triton_input("task", encode_strings([t for t in tasks for _ in range(count)])))
        result, answered = await self._infer(inputs, ["value"], version, timeout_s)
        return Scores(result.as_numpy("value").reshape(batch, count), answered)


def connect_value(url: str, client: ClientConfig | None = None) -> ValueClient:
    """A value client for `grpc://host:port` or `triton://host:port[/model]` (see `connect_dynamics`)."""
    endpoint, config = _connect(url, client, "value")
    if endpoint.scheme == "triton":
        return TritonValue(endpoint.address, endpoint.model, config)
    return GrpcValue(config)


# ---- model administration -------------------------------------------------------------------
class AdminClient(_GrpcClient):
    """`ModelAdmin` of one model service (policy, value or dynamics: each serves one model)."""

    def __init__(self, config: ClientConfig):
        from rise.proto.v1 import model_admin_pb2_grpc

        super().__init__(config)
        self._stub = model_admin_pb2_grpc.ModelAdminStub(self._channel)

    async def list_versions(self, *, timeout_s: float | None = None) -> ModelVersions:
        """Every version in the registry or in memory, loaded or not, and the routed aliases."""
        from rise.proto.v1 import model_admin_pb2

        reply = await self._call(self._stub.ListVersions, model_admin_pb2.ListVersionsRequest(), timeout_s)
        return ModelVersions(reply.model, [_version_info(v) for v in reply.versions], dict(reply.aliases), reply.default_alias)

    async def load(self, version: str, *, alias: str = "", timeout_s: float | None = None) -> VersionInfo:
        """Verify and load a version (id or alias); with `alias`, point it there once loaded."""
        from rise.proto.v1 import model_admin_pb2

        reply = await self._call(self._stub.LoadVersion, model_admin_pb2.LoadVersionRequest(version=version, alias=alias), timeout_s)
        return _version_info(reply.info)

    async def set_alias(self, alias: str, version: str, *, timeout_s: float | None = None) -> tuple[str, str]:
        """Point `alias` at a version (loading it if needed) -> (previous version or "", version now)."""
        from rise.proto.v1 import model_admin_pb2

        reply = await self._call(self._stub.SetAlias, model_admin_pb2.SetAliasRequest(alias=alias, version=version), timeout_s)
        return reply.previous_version, reply.version

    async def unload(self, version: str, *, timeout_s: float | None = None) -> None:
        """Drop a version from memory (refused, FailedPrecondition, while an alias routes to it)."""
        from rise.proto.v1 import model_admin_pb2

        await self._call(self._stub.UnloadVersion, model_admin_pb2.UnloadVersionRequest(version=version), timeout_s)


def _version_info(info) -> VersionInfo:
    return VersionInfo(info.version, info.loaded, list(info.aliases), info.kind, info.embodiment, info.parent,
                       info.created_unix_ms, dict(info.metrics))


def connect_admin(url: str, client: ClientConfig | None = None) -> AdminClient:
    """The `ModelAdmin` of the model service at `grpc://host:port` (the service's own address)."""
    endpoint, config = _connect(url, client, "")
    if endpoint.scheme == "triton":
        raise InvalidArgument(f"{url!r}: model administration is gRPC only; Triton binds its versions when it starts "
                              "(restart `rise serve-triton` with other --bind values, or use the gRPC service's address)")
    if config.load_balancing != "pick_first" and is_replicated_url(url):
        raise InvalidArgument(f"{url!r} names several replicas: administer each one (connect_admins), since a "
                              "load-balanced LoadVersion/SetAlias would change one replica at random")
    return AdminClient(config)


def is_replicated_url(url: str) -> bool:
    """Whether a service URL may stand for several replicas (see `rise.serving.is_replicated`)."""
    from rise.serving import is_replicated

    return is_replicated(parse_url(url).address)


def replica_addresses(url: str) -> list[str]:
    """host:port of every replica a service URL names now: a comma list as written, a `dns:///name:port`
    resolved here (the addresses a round-robin channel would use), else the one address."""
    import socket

    target = parse_url(url).address
    if target.startswith(("ipv4:", "ipv6:")):
        return target.split(":", 1)[1].split(",")
    if target.startswith("dns:/"):
        hostport = target.split("/")[-1]  # dns:///name:port or dns://authority/name:port
        host, _, port = hostport.rpartition(":")
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        return sorted({f"[{a[4][0]}]:{port}" if a[0] == socket.AF_INET6 else f"{a[4][0]}:{port}" for a in infos})
    return [target]


def connect_admins(url: str, client: ClientConfig | None = None) -> list[AdminClient]:
    """One `ModelAdmin` client per replica of the service at `url` (pinned: no balancing, no retries)."""
    pinned = (client or ClientConfig(address="-")).model_copy(update={"load_balancing": "pick_first"})
    return [connect_admin(f"grpc://{address}", pinned) for address in replica_addresses(url)]


async def ensure_alias(admin: AdminClient, alias: str, version: str, *, attempts: int, backoff_s: float,
                       max_backoff_s: float, log: Callable[[str], object] | None = None) -> None:
    """Make one replica route `alias` to `version` (loading it), without ever re-sending SetAlias blindly.

    SetAlias changes the replica's state, so after a transient failure (was it applied before the
    connection dropped?) the routing is read back (ListVersions, a pure call) and SetAlias is sent
    again only if the alias does not point at `version` yet.
    """
    delay = backoff_s
    for attempt in range(1, attempts + 1):
        try:
            if attempt > 1 and (await admin.list_versions()).aliases.get(alias) == version:
                return
            await admin.set_alias(alias, version)
            return
        except RemoteError as exc:
            if not is_transient(exc) or attempt == attempts:
                raise
            (log or logger.warning)(f"{admin.url} SetAlias {alias}={version}: {exc}; reading the routing back in {delay:.2f} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_backoff_s)


# ---- retries -------------------------------------------------------------------------------
def is_transient(exc: BaseException) -> bool:
    """Whether a retry may succeed: the service is restarting, overloaded or was too slow."""
    return isinstance(exc, RemoteError) and exc.code in TRANSIENT_CODES


async def call_with_retries(fn: Callable[[], Awaitable[T]], *, attempts: int, backoff_s: float, max_backoff_s: float,
                            what: str, log: Callable[[str], object] | None = None) -> T:
    """`await fn()`, called again after a transient failure, up to `attempts` calls in all.

    Only for calls that may run twice (`IDEMPOTENT_METHODS`: act, imagine, score, list versions);
    model administration that changes state goes through `ensure_alias`.

    Waits `backoff_s`, then twice as long each time, at most `max_backoff_s`; each retry is
    logged (through `log`, e.g. `print`, else the `rise.transport` logger). Other errors, and the
    last transient one, are raised. gRPC channels reconnect on their own once a restarted
    service listens again, so calling again through the same client is enough.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    delay = backoff_s
    for attempt in range(1, attempts):
        try:
            return await fn()
        except RemoteError as exc:
            if not is_transient(exc):
                raise
            (log or logger.warning)(f"{what}: {exc}; retry {attempt}/{attempts - 1} in {delay:.2f} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_backoff_s)
    return await fn()


# ---- errors -------------------------------------------------------------------------------
def _from_grpc(exc) -> RiseError:
    code, details = exc.code(), exc.details() or ""
    for cls in _ERRORS.values():
        if cls.code == code:
            return cls(details)
    return RemoteError(f"{code.name}: {details}", code)


def _from_text(text: str) -> RiseError:
    """`"<ErrorClass>: message"` from a Triton response's `error` output -> the matching error."""
    name, _, message = text.partition(": ")
    cls = _ERRORS.get(name)
    return cls(message) if cls else RemoteError(text)


def _from_triton(exc, model: str, model_version: str) -> RiseError:
    import grpc

    status = (exc.status() or "").replace("StatusCode.", "")
    message = exc.message() or str(exc)
    lowered = message.lower()
    if "unknown model" in lowered or "is not found" in lowered or "is not ready" in lowered:
        which = f"{model!r}" + (f" version {model_version}" if model_version else "")
        return NotFound(f"Triton serves no model {which}: {message}. Triton names: <model> for the default alias "
                        f"(pin its number with version='vNNNN'), <model>-<alias> for an alias bound at server start")
    code = getattr(grpc.StatusCode, status, None) if status else None
    for cls in _ERRORS.values():
        if code is not None and cls.code == code:
            return cls(message)
    return RemoteError(f"{status or 'TRITON'}: {message}", code)
