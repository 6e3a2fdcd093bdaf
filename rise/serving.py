"""One way to build a gRPC server, and one way to open a channel to one.

Every service gets the same: `grpc.aio`, the standard health and reflection services, message
size limits from config (gRPC's 4 MB default breaks multi-view batches), graceful drain on
SIGTERM, Prometheus metrics per method and model version, optional TLS / mutual TLS, optional
bearer tokens, structured (JSON) access logs, and OpenTelemetry tracing (off by default).
Handlers raise `rise.errors.RiseError`s; the interceptor here turns them into status codes.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import importlib
import inspect
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram, start_http_server
from pydantic import Field

from rise.config import StrictModel
from rise.errors import RiseError

log = logging.getLogger("rise.serving")

# Set by whoever resolves a model version for the current request (the model host), read by
# the interceptor to label metrics and logs. Context variables follow the awaited handler.
served_version: contextvars.ContextVar[str] = contextvars.ContextVar("served_version", default="")

# Health checks and reflection stay open without a token: probes and grpcurl must work.
_OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")

REQUESTS = Counter("rise_grpc_requests_total", "Finished RPCs", ["server", "method", "version", "code"])
LATENCY = Histogram(
    "rise_grpc_request_seconds", "RPC latency in the handler", ["server", "method", "version"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


class TLSConfig(StrictModel):
    # PEM certificate chain and private key of this server.
    cert_file: Path
    key_file: Path
    # PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS).
    client_ca_file: Path | None = None


class TracingConfig(StrictModel):
    enabled: bool = False
    # "otlp" sends spans to an OpenTelemetry collector at `endpoint`; "console" prints them;
    # "global" uses a tracer provider the process already installed (tests, embedding apps).
    exporter: Literal["otlp", "console", "global"] = "otlp"
    endpoint: str = "http://127.0.0.1:4317"


class ServerConfig(StrictModel):
    host: str = "127.0.0.1"
    # 0 picks a free port (tests).
    port: int = Field(default=50051, ge=0, le=65535)
    # Largest message received or sent, in MiB.
    max_message_mb: float = Field(default=64, gt=0)
    # Calls handled at once; more wait in gRPC's queue (protects memory under bursts).
    max_concurrent_rpcs: int | None = Field(default=256, gt=0)
    # On SIGTERM: report NOT_SERVING for `drain_seconds` (load balancers move away), then give
    # calls in flight up to `grace_seconds` to finish.
    drain_seconds: float = Field(default=0.0, ge=0)
    grace_seconds: float = Field(default=10.0, ge=0)
    # Close each client connection after this many seconds (gRPC GOAWAY; calls in flight get
    # `grace_seconds`), so that clients re-resolve their target and spread over replicas that
    # joined since (a headless Service gains pods under an HPA). None = connections live on.
    max_connection_age_s: float | None = Field(default=None, gt=0)
    # Prometheus /metrics HTTP port; None = not exposed.
    metrics_port: int | None = None
    tls: TLSConfig | None = None
    # Accepted bearer tokens (`authorization: Bearer <token>`); none = no authentication.
    auth_tokens: list[str] = []
    # File with one accepted token per line (a mounted Kubernetes Secret), added to auth_tokens.
    auth_token_file: Path | None = None
    log_json: bool = True
    tracing: TracingConfig = TracingConfig()

    def tokens(self) -> list[str]:
        tokens = list(self.auth_tokens)
        if self.auth_token_file is not None:
            tokens += [t.strip() for t in self.auth_token_file.read_text().splitlines() if t.strip()]
        return tokens


class ClientConfig(StrictModel):
    # host:port, or any gRPC target (dns:///name:port for several replicas).
    address: str
    max_message_mb: float = Field(default=64, gt=0)
    # PEM CA that signed the server certificate; set = TLS.
    tls_ca_file: Path | None = None
    # Client certificate and key for mutual TLS.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Expected server name in its certificate when it differs from the address host.
    tls_server_name: str | None = None
    token: str = ""
    # A file holding the token (a mounted Secret); the first non-empty line is sent, so the
    # servers' `auth_token_file` (one accepted token per line) can serve as the clients' too.
    token_file: Path | None = None
    # Default deadline for calls made through `rise` clients, in seconds.
    timeout_s: float = Field(default=30.0, gt=0)
    # How calls spread over the servers behind `address`. "auto": a target that can name several
    # replicas (a resolver scheme, `dns:///svc:port` or `ipv4:a:p,b:p`, see `is_replicated`) is
    # balanced round robin over the replicas whose standard health service says SERVING (a
    # draining replica drops out before it stops); a plain host:port keeps gRPC's default
    # (pick_first: one connection).
    load_balancing: Literal["auto", "round_robin", "pick_first"] = "auto"

    def bearer_token(self) -> str:
        """The token to send ("" = none): `token`, else the first non-empty line of `token_file`."""
        if self.token or self.token_file is None:
            return self.token
        return next((line.strip() for line in self.token_file.read_text().splitlines() if line.strip()), "")


def _size_options(max_message_mb: float) -> list[tuple[str, int]]:
    limit = int(max_message_mb * 1024 * 1024)
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def _age_options(config: ServerConfig) -> list[tuple[str, int]]:
    if config.max_connection_age_s is None:
        return []
    return [("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.grace_seconds * 1000))]


# ---- logs and traces ------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(json_logs: bool = True, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def setup_tracing(config: TracingConfig, service_name: str) -> None:
    """Install a global tracer provider once per process (unless the exporter is 'global')."""
    if not config.enabled or config.exporter == "global":
        return
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if config.exporter == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=config.endpoint, insecure=config.endpoint.startswith("http://"))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


# ---- the interceptor --------------------------------------------------------------------
class _ServerInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, error mapping, metrics and access logs for every call."""

    def __init__(self, server_name: str, tokens: list[str]):
        self.server_name = server_name
        self.tokens = [t.encode() for t in tokens]
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # per method: wrap once, not per call

    async def intercept_service(self, continuation, details):
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:
                return None
            wrapped = self._wrapped[details.method] = self._wrap(details.method, handler)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        needs_auth = bool(self.tokens) and not method.startswith(_OPEN_METHODS)
        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            async def unary_response(request, context):
                return await self._run(method, needs_auth, context, lambda: inner(request, context))

            make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
            return make(unary_response, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
        inner_stream = handler.unary_stream or handler.stream_stream

        async def stream_response(request, context):
            state = _CallState(method, time.perf_counter())
            try:
                self._authenticate(needs_auth, context)
                responses = inner_stream(request, context)
                if inspect.isawaitable(responses):
                    # A handler that writes with `context.write` (grpc_health's Health.Watch, which
                    # clients' health checking calls) instead of yielding: run it to its end.
                    await responses
                    return
                async for response in responses:
                    yield response
            except BaseException as exc:
                await self._fail(state, context, exc)
            finally:
                self._record(state, context)

        make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        return make(stream_response, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    def _authenticate(self, needs_auth: bool, context) -> None:
        if not needs_auth:
            return
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                given = value[len("Bearer "):].encode()
                if any(hmac.compare_digest(given, t) for t in self.tokens):
                    return
                raise _Unauthenticated("invalid bearer token")
        raise _Unauthenticated("missing 'authorization: Bearer <token>' metadata")

    async def _run(self, method, needs_auth, context, call):
        state = _CallState(method, time.perf_counter())
        try:
            self._authenticate(needs_auth, context)
            return await call()
        except BaseException as exc:
            await self._fail(state, context, exc)
        finally:
            self._record(state, context)

    async def _fail(self, state: "_CallState", context, exc: BaseException) -> None:
        if isinstance(exc, _Unauthenticated):
            state.code = grpc.StatusCode.UNAUTHENTICATED
            await context.abort(state.code, str(exc))
        if isinstance(exc, RiseError):
            state.code = exc.code
            await context.abort(exc.code, str(exc))
        if isinstance(exc, grpc.aio.AbortError):  # the handler aborted on its own
            state.code = context.code() or grpc.StatusCode.UNKNOWN
            raise exc
        if isinstance(exc, asyncio.CancelledError):
            state.code = grpc.StatusCode.CANCELLED
            raise exc
        state.code = grpc.StatusCode.INTERNAL
        log.exception("unhandled error in %s", state.method, extra={"fields": {"method": state.method}})
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {state.method}: {type(exc).__name__}: {exc}")

    def _record(self, state: "_CallState", context) -> None:
        seconds = time.perf_counter() - state.start
        version = served_version.get()
        code = state.code.name
        REQUESTS.labels(self.server_name, state.method, version, code).inc()
        LATENCY.labels(self.server_name, state.method, version).observe(seconds)
        log.info("rpc", extra={"fields": {
            "server": self.server_name, "method": state.method, "code": code,
            "ms": round(seconds * 1000, 3), "version": version, "peer": context.peer(),
        }})


@dataclass
class _CallState:
    method: str
    start: float
    code: grpc.StatusCode = grpc.StatusCode.OK


class _Unauthenticated(Exception):
    pass


# ---- building and running a server ----------------------------------------------------------
AddFn = Callable[[Any, grpc.aio.Server], None]


def _service_full_name(add_fn: AddFn) -> str:
    """`add_PolicyServiceServicer_to_server` from rise.proto.v1.policy_pb2_grpc -> 'rise.v1.PolicyService'."""
    short = add_fn.__name__.removeprefix("add_").removesuffix("Servicer_to_server")
    pb2 = importlib.import_module(add_fn.__module__.removesuffix("_grpc"))
    return pb2.DESCRIPTOR.services_by_name[short].full_name


@dataclass
class RunningServer:
    name: str
    config: ServerConfig
    server: grpc.aio.Server
    port: int
    health: Any
    service_names: list[str]
    _metrics_http: Any = field(default=None, repr=False)

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::", "[::]") else self.config.host
        return f"{host}:{self.port}"

    async def drain(self) -> None:
        """Stop taking new work: NOT_SERVING, a pause for load balancers, then a graceful stop."""
        await self.health.enter_graceful_shutdown()
        if self.config.drain_seconds:
            await asyncio.sleep(self.config.drain_seconds)
        await self.stop(self.config.grace_seconds)

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http = None


async def start_server(name: str, config: ServerConfig, services: list[tuple[AddFn, Any]]) -> RunningServer:
    """Start a server with the given (add_fn, servicer) pairs plus health and reflection."""
    setup_tracing(config.tracing, name)
    interceptors: list[Any] = []
    if config.tracing.enabled:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        interceptors.append(aio_server_interceptor())
    interceptors.append(_ServerInterceptor(name, config.tokens()))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=_size_options(config.max_message_mb) + _age_options(config),
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    names = []
    for add_fn, servicer in services:
        add_fn(servicer, server)
        names.append(_service_full_name(add_fn))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)

    address = f"{config.host}:{config.port}"
    if config.tls is None:
        port = server.add_insecure_port(address)
    else:
        tls = config.tls
        credentials = grpc.ssl_server_credentials(
            [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
            root_certificates=tls.client_ca_file.read_bytes() if tls.client_ca_file else None,
            require_client_auth=tls.client_ca_file is not None,
        )
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise RuntimeError(f"{name}: could not bind {address}")
    await server.start()
    for service in ["", *names]:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    metrics_http = None
    if config.metrics_port is not None:
        metrics_http, _ = start_http_server(config.metrics_port, addr=config.host)
    log.info("serving", extra={"fields": {"server": name, "address": f"{config.host}:{port}",
                                          "services": names, "tls": config.tls is not None,
                                          "auth": bool(config.tokens()), "metrics_port": config.metrics_port}})
    return RunningServer(name, config, server, port, health_servicer, names, metrics_http)


async def serve_until_signal(running: RunningServer) -> None:
    """Block until SIGTERM/SIGINT, then drain gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining", extra={"fields": {"server": running.name}})
    await running.drain()


# ---- clients ------------------------------------------------------------------------------
class _TokenDetails:
    """Adds `authorization: Bearer <token>` to every call (works on plaintext channels too)."""

    def __init__(self, token: str):
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self.header)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


# grpc.aio files each interceptor under the first call type it implements, so one class per type.
class _TokenUnaryUnary(_TokenDetails, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _TokenUnaryStream(_TokenDetails, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _TokenStreamUnary(_TokenDetails, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _TokenStreamStream(_TokenDetails, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


# gRPC's name-resolver schemes: a target with one may stand for several servers.
_RESOLVER_SCHEMES = ("dns:", "ipv4:", "ipv6:")


def is_replicated(target: str) -> bool:
    """Whether a gRPC target may name several replicas: `dns:///svc:port` (every address the name
    resolves to, e.g. a Kubernetes headless Service) or `ipv4:h1:p1,h2:p2` / `ipv6:[..]:p,...`."""
    return target.startswith(_RESOLVER_SCHEMES) or "," in target


def _service_config(retry_methods: tuple[str, ...]) -> str:
    """round_robin over healthy replicas (gRPC client health checking, gRFC A17: each replica's
    `grpc.health.v1.Health/Watch` for the server as a whole, service name ""), and a retry on
    another replica for the listed methods ("package.Service/Method") when one fails UNAVAILABLE."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
    if retry_methods:
        names = [dict(zip(("service", "method"), m.split("/", 1))) for m in retry_methods]
        config["methodConfig"] = [{"name": names, "retryPolicy": {
            "maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "1s", "backoffMultiplier": 2,
            # UNAVAILABLE only: the replica went away or refused; the call's deadline still bounds the whole.
            "retryableStatusCodes": ["UNAVAILABLE"]}}]
    return json.dumps(config)


def open_channel(config: ClientConfig | str, tracing: bool = False, retry_methods: tuple[str, ...] = ()) -> grpc.aio.Channel:
    """An aio channel with the configured size limits, TLS and token.

    With round-robin balancing (`ClientConfig.load_balancing`), calls to `retry_methods`
    ("package.Service/Method": pure calls only, the caller's promise) that fail UNAVAILABLE are
    retried by the channel, on the next healthy replica. Every other method is sent once.
    """
    if isinstance(config, str):
        config = ClientConfig(address=config)
    options = _size_options(config.max_message_mb)
    balanced = config.load_balancing == "round_robin" or (config.load_balancing == "auto" and is_replicated(config.address))
    if balanced:
        limit = int(config.max_message_mb * 1024 * 1024)
        options += [("grpc.service_config", _service_config(tuple(retry_methods))),
                    # A retried call is replayed from a buffer; a request bigger than it is never retried.
                    ("grpc.per_rpc_retry_buffer_size", limit), ("grpc.retry_buffer_size", 4 * limit)]
    interceptors: list[Any] = []
    if tracing:
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        interceptors += aio_client_interceptors()
    token = config.bearer_token()
    if token:
        interceptors += [cls(token) for cls in (_TokenUnaryUnary, _TokenUnaryStream, _TokenStreamUnary, _TokenStreamStream)]
    if config.tls_ca_file is None:
        return grpc.aio.insecure_channel(config.address, options=options, interceptors=interceptors or None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=config.tls_ca_file.read_bytes(),
        private_key=config.tls_key_file.read_bytes() if config.tls_key_file else None,
        certificate_chain=config.tls_cert_file.read_bytes() if config.tls_cert_file else None,
    )
    if config.tls_server_name:
        options.append(("grpc.ssl_target_name_override", config.tls_server_name))
    return grpc.aio.secure_channel(config.address, credentials, options=options, interceptors=interceptors or None)
