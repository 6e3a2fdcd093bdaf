"""Client transports: one Python API whether a model is served over our gRPC API or by Triton.

    async with connect_dynamics("grpc://127.0.0.1:50053") as dynamics:      # rise serve dynamics
        out = await dynamics.imagine(history, actions, num_steps=4, seed=7, version="candidate")
    async with connect_dynamics("triton://127.0.0.1:8001") as dynamics:     # rise serve-triton dynamics
        out = await dynamics.imagine(history, actions, num_steps=4, seed=7, version="candidate")

Both return the same `Imagination` (numpy arrays, equal for equal inputs and seed) and raise the
same `rise.errors` classes (`InvalidArgument`, `NotFound`, `FailedPrecondition`, ...; other
failures: `RemoteError` with the status code).

URLs: `grpc://host:port` (a bare `host:port` too; TLS and tokens through `client=ClientConfig`),
`triton://host:port[/model]` (Triton's gRPC port, 8001 by default; `/model` picks the Triton
model name, default `dynamics`).

Version refs (`version=`), as `rise.triton_binding` names things:
- gRPC: any version id or alias the service has loaded; "" = the service's default alias.
- Triton: "" -> Triton model `<model>`, its served version (the default alias at server start);
  "v0003" or "3" -> `<model>` version 3 (Triton refuses if it serves another: a pin, not a switch);
  an alias -> Triton model `<model>-<alias>` (bound at server start for the preload aliases).
"""

from __future__ import annotations

import abc
import re
from typing import Mapping, NamedTuple, Sequence
from urllib.parse import urlsplit

import numpy as np

from rise.errors import CorruptVersion, FailedPrecondition, InvalidArgument, NotFound, RiseError
from rise.serving import ClientConfig

DEFAULT_PORTS = {"grpc": 50051, "triton": 8001}
_ERRORS: dict[str, type[RiseError]] = {cls.__name__: cls for cls in (InvalidArgument, NotFound, FailedPrecondition, CorruptVersion)}
_NUMBERED = re.compile(r"^v?(\d+)$")


class RemoteError(RiseError):
    """A failure other than the mapped `rise.errors` classes; `code` is the gRPC status code."""

    def __init__(self, message: str, code=None):
        super().__init__(message)
        if code is not None:
            self.code = code


class Imagination(NamedTuple):
    frames: dict[str, np.ndarray]  # view -> uint8 [B, F, H, W, 3]
    sim_states: list[np.ndarray | None]  # per item: float64 [n] state after the chunk (oracle), else None
    version: str  # registry version id that answered, e.g. "v0003"


class Endpoint(NamedTuple):
    scheme: str  # "grpc" | "triton"
    address: str  # host:port
    model: str  # Triton model name ("" for gRPC)


def parse_url(url: str, default_model: str = "") -> Endpoint:
    """`grpc://h:p`, `h:p` (gRPC) or `triton://h:p[/model]` -> Endpoint."""
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


class DynamicsClient(abc.ABC):
    """Imagination over a transport; use as `async with`, or call `close()`."""

    url: str

    @abc.abstractmethod
    async def imagine(self, history: Mapping[str, np.ndarray], actions: np.ndarray, num_steps: int = 0, seed: int = 0, *,
                      version: str = "", tasks: Sequence[str] | None = None,
                      sim_states: Sequence[np.ndarray | None] | None = None, timeout_s: float | None = None) -> Imagination:
        """history {view: uint8 [B, T, H, W, 3]}, actions float32 [B, chunk, A] -> Imagination.

        `tasks` (B texts) and `sim_states` (B float64 arrays or None) matter to privileged models
        (the oracle) only. `seed` 0 = nondeterministic; a seed gives the same frames over both
        transports. Errors: `rise.errors` classes, or `RemoteError`.
        """

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> "DynamicsClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class GrpcDynamics(DynamicsClient):
    def __init__(self, config: ClientConfig):
        from rise.proto.v1 import dynamics_pb2_grpc
        from rise.serving import open_channel

        self.config = config
        self.url = f"grpc://{config.address}"
        self._channel = open_channel(config)
        self._stub = dynamics_pb2_grpc.DynamicsServiceStub(self._channel)

    async def imagine(self, history, actions, num_steps=0, seed=0, *, version="", tasks=None, sim_states=None, timeout_s=None):
        import grpc

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
        try:
            reply = await self._stub.Imagine(request, timeout=timeout_s or self.config.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _from_grpc(exc) from None
        views = [v for v in history if all(v in f.frames for f in reply.futures)]  # the caller's view order
        frames = {v: np.stack([from_tensor(f.frames[v], f"frames[{v!r}]") for f in reply.futures]) for v in views}
        states = [from_tensor(f.sim_state, "sim_state") if f.HasField("sim_state") else None for f in reply.futures]
        return Imagination(frames, states, reply.meta.version)

    async def close(self) -> None:
        await self._channel.close()


class TritonDynamics(DynamicsClient):
    def __init__(self, address: str, model: str = "dynamics", config: ClientConfig | None = None):
        from tritonclient.grpc.aio import InferenceServerClient

        self.address, self.model = address, model
        self.url = f"triton://{address}/{model}"
        self.config = config or ClientConfig(address=address)
        token = self.config.token or (self.config.token_file.read_text().strip() if self.config.token_file else "")
        self._headers = {"authorization": f"Bearer {token}"} if token else None
        tls = self.config.tls_ca_file is not None
        self._client = InferenceServerClient(
            url=address, ssl=tls,
            root_certificates=str(self.config.tls_ca_file) if tls else None,
            private_key=str(self.config.tls_key_file) if self.config.tls_key_file else None,
            certificate_chain=str(self.config.tls_cert_file) if self.config.tls_cert_file else None)

    async def imagine(self, history, actions, num_steps=0, seed=0, *, version="", tasks=None, sim_states=None, timeout_s=None):
        from tritonclient.grpc import InferInput, InferRequestedOutput
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        from rise.triton_binding import ERROR_OUTPUT, VERSION_OUTPUT, encode_strings
        from services.dynamics.triton import frames_output, history_input

        batch = _check_batch(history, actions, tasks, sim_states)
        if not 0 <= seed < 2**64 or not 0 <= num_steps < 2**32:
            raise InvalidArgument(f"seed must be in [0, 2^64) and num_steps in [0, 2^32), got {seed}, {num_steps}")

        def tensor(name: str, array: np.ndarray) -> InferInput:
            array = np.ascontiguousarray(array)
            datatype = "BYTES" if array.dtype == object else np_to_triton_dtype(array.dtype)
            if datatype is None:
                raise InvalidArgument(f"{name}: dtype {array.dtype} has no Triton type")
            entry = InferInput(name, list(array.shape), datatype)
            entry.set_data_from_numpy(array)
            return entry

        inputs = [tensor(history_input(v), h) for v, h in history.items()]
        inputs.append(tensor("actions", np.asarray(actions)))
        if tasks is not None:
            inputs.append(tensor("task", encode_strings(list(tasks))))
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
            inputs.append(tensor("sim_state", padded))
            inputs.append(tensor("sim_state_size", np.array([[-1 if s is None else len(s)] for s in states], np.int64)))
        views = list(history)
        outputs = [InferRequestedOutput(n) for n in
                   [*(frames_output(v) for v in views), "next_sim_state", "next_sim_state_size", VERSION_OUTPUT, ERROR_OUTPUT]]
        model, model_version = triton_target(self.model, version)
        parameters = {"num_steps": int(num_steps), "seed": int(seed) if seed < 2**63 else str(seed)}
        try:
            result = await self._client.infer(model, inputs, model_version=model_version, outputs=outputs, parameters=parameters,
                                              client_timeout=timeout_s or self.config.timeout_s, headers=self._headers)
        except InferenceServerException as exc:
            raise _from_triton(exc, model, model_version) from None
        errors = [e.decode() if isinstance(e, bytes) else str(e) for e in result.as_numpy(ERROR_OUTPUT).reshape(-1)]
        if any(errors):
            raise _from_text(next(e for e in errors if e))
        frames = {v: result.as_numpy(frames_output(v)) for v in views}
        sizes = result.as_numpy("next_sim_state_size").reshape(-1)
        padded = result.as_numpy("next_sim_state")
        states = [None if n < 0 else padded[b, :n] for b, n in enumerate(sizes)]
        answered = result.as_numpy(VERSION_OUTPUT).reshape(-1)[0]
        return Imagination(frames, states, answered.decode() if isinstance(answered, bytes) else str(answered))

    async def close(self) -> None:
        await self._client.close()


def connect_dynamics(url: str, client: ClientConfig | None = None) -> DynamicsClient:
    """A dynamics client for `grpc://host:port` or `triton://host:port[/model]`.

    `client` carries TLS files, token and default timeout; its address is replaced by the URL's.
    """
    endpoint = parse_url(url, default_model="dynamics")
    config = (client.model_copy(update={"address": endpoint.address}) if client is not None
              else ClientConfig(address=endpoint.address))
    if endpoint.scheme == "triton":
        return TritonDynamics(endpoint.address, endpoint.model, config)
    return GrpcDynamics(config)


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
