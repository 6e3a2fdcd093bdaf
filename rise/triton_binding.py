"""Serve registry model versions through NVIDIA Triton, with the model code the gRPC services run.

Two hosts, one adapter:
- here and on any single machine, `serve_triton` starts a real Triton server through
  `nvidia-pytriton` (Triton 2.51 inside); the model runs in this process, loaded by the same
  `ModelHost` and kind loaders as `rise serve <model>` (`rise serve-triton <model>` on the CLI);
- on a cluster's own Triton server, `PythonBackendModel` is the `model.py` of a Python-backend
  model repository (see `triton/model_repository/README.md`); `model_config_pbtxt` writes its
  `config.pbtxt` from the same tensor declarations.
A `TritonAdapter` (one per service, e.g. `services/dynamics/triton.py`) declares the named
tensors and turns a list of Triton requests into model calls; `rise.transport` is its client.

Names and versions (what a Triton client asks for; `rise.transport` maps version refs onto it):
- Triton model `<model>` (e.g. `dynamics`) serves the service's default alias (`stable`);
- Triton model `<model>-<alias>` serves another alias (`dynamics-candidate`), one per alias that
  the service would preload;
- the Triton version number is the registry's (v0003 -> 3), so a client can pin one. Triton has no
  aliases: they are resolved once, when the server starts (restart to follow an alias), and
  pytriton serves one version per Triton model name (a cluster repository can hold several
  numbered versions under one name).

Tensors: the first dimension of every input and output is the item batch (a request of B items
sends [B, ...]; Triton's dynamic batcher merges requests along it). Besides the adapter's own
outputs, every response carries `version` (BYTES [1] per item: the registry version id that
answered, as gRPC's ResponseMeta.version) and `error` (BYTES [1] per item: empty, or
"<ErrorClass>: message"). Errors travel as an output because pytriton can only fail a whole merged
batch: this way a bad request fails alone, as it does over gRPC.

This machine (measured 2026-11-26): the Triton Python-backend stub in pytriton 0.7.0 (a separate
process running pytriton's proxy) is built against numpy 1.x; under numpy 2 its tensors arrive as
zeros and leave empty, silently. The model process itself runs fine on numpy 2.2, so the stub runs
in a small venv of its own (numpy 1.26 + pyzmq; `make triton` creates `.venv/triton-stub`), chosen
through the PATH the Triton server gets. The stub also links `libpython3.12.so`: this Python's
LIBDIR goes on the server's LD_LIBRARY_PATH.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, List, Mapping, Optional, Sequence

import numpy as np
from pydantic import Field

from rise.config import StrictModel
from rise.errors import FailedPrecondition, InvalidArgument, RiseError

if TYPE_CHECKING:
    import typer

    from rise.embodiment import Embodiment
    from rise.batching import BatchingConfig
    from rise.model_host import LoadedModel, ModelHost

log = logging.getLogger("rise.triton")

# Outputs every adapter's responses carry (see the module docstring).
VERSION_OUTPUT = "version"
ERROR_OUTPUT = "error"

# Service name -> "module:adapter class". The value and policy services add theirs here.
ADAPTERS = {
    "dynamics": "services.dynamics.triton:DynamicsTriton",
    "value": "services.value.triton:ValueTriton",
    "policy": "services.policy.triton:PolicyTriton",
}

_REGISTRY_VERSION = re.compile(r"^v(\d+)$")


class TritonUnavailable(RiseError):
    """Triton cannot run here (missing install, platform, Python build); the message says what to do."""

    code = FailedPrecondition.code


# ---- tensors -----------------------------------------------------------------------------
# numpy dtype -> (Triton wire datatype, config.pbtxt data_type)
_DTYPES = {
    np.dtype(np.uint8): ("UINT8", "TYPE_UINT8"),
    np.dtype(np.int32): ("INT32", "TYPE_INT32"),
    np.dtype(np.int64): ("INT64", "TYPE_INT64"),
    np.dtype(np.float16): ("FP16", "TYPE_FP16"),
    np.dtype(np.float32): ("FP32", "TYPE_FP32"),
    np.dtype(np.float64): ("FP64", "TYPE_FP64"),
    np.dtype(np.bool_): ("BOOL", "TYPE_BOOL"),
    np.dtype(np.object_): ("BYTES", "TYPE_STRING"),
}


@dataclass(frozen=True)
class TensorSpec:
    """A named model input or output; `dims` exclude the item batch dimension, -1 = any size."""

    name: str
    dtype: np.dtype  # np.dtype(object) for BYTES (strings)
    dims: tuple[int, ...]
    optional: bool = False
    doc: str = ""

    @property
    def datatype(self) -> str:
        return _DTYPES[np.dtype(self.dtype)][0]

    def empty(self, batch: int) -> np.ndarray:
        """A placeholder of `batch` items (where `error` is set): zeros, size 1 along variable dims
        (pytriton cannot send zero-size arrays), b"" for strings."""
        shape = (batch, *(1 if d == -1 else d for d in self.dims))
        if np.dtype(self.dtype) == np.dtype(object):
            return np.full(shape, b"", dtype=object)
        return np.zeros(shape, dtype=self.dtype)


BYTES = np.dtype(object)


@dataclass
class TritonRequest:
    """One Triton request, host-neutral: inputs with the item batch first, request parameters."""

    inputs: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def int_parameter(self, name: str, default: int = 0, low: int = 0, high: int = 2**64 - 1) -> int:
        """An integer request parameter (int64, or a decimal string for values past int64)."""
        value = self.parameters.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise InvalidArgument(f"parameter {name!r} must be an integer, got {value!r}")
        try:
            number = int(value)
        except ValueError:
            raise InvalidArgument(f"parameter {name!r} must be an integer, got {value!r}") from None
        if not low <= number <= high:
            raise InvalidArgument(f"parameter {name!r} must be in [{low}, {high}], got {number}")
        return number

    def float_parameter(self, name: str, default: float = 0.0) -> float:
        """A finite number request parameter (double, int64, or a decimal string)."""
        value = self.parameters.get(name, default)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if isinstance(value, bool) or not np.isfinite(number):
            raise InvalidArgument(f"parameter {name!r} must be a finite number, got {value!r}")
        return number


def decode_strings(array: np.ndarray) -> list[str]:
    """A BYTES tensor [B, 1] -> B texts."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(array).reshape(len(array), -1)[:, 0]]


def encode_strings(texts: Sequence[str]) -> np.ndarray:
    """B texts -> a BYTES tensor [B, 1]."""
    out = np.empty((len(texts), 1), dtype=object)
    out[:, 0] = [t.encode("utf-8") for t in texts]
    return out


def error_text(exc: BaseException) -> str:
    """How an error travels in the `error` output; `rise.transport` maps the class name back."""
    return f"{type(exc).__name__}: {exc}"


# ---- adapters ----------------------------------------------------------------------------
class TritonAdapter(abc.ABC):
    """What a model service declares to be Triton-served: tensors, parameters, and the model calls.

    `infer` gets the requests Triton delivered together (already merged by its dynamic batcher)
    and returns, per request, a dict of its outputs (item batch first) or the exception that
    request alone fails with. The binding adds `version` and `error` to every response.
    """

    service: ClassVar[str]  # registry model name and default Triton model name, e.g. "dynamics"
    # Request parameters the adapter reads: name -> meaning (documentation and config.pbtxt).
    parameters: ClassVar[dict[str, str]] = {}

    def __init__(self, embodiment: Embodiment, batching: BatchingConfig):
        self.embodiment = embodiment
        self.batching = batching

    @classmethod
    @abc.abstractmethod
    def kinds(cls) -> dict[str, Any]:
        """The service's kind -> loader table (the dict object itself: kinds added later are seen)."""

    @classmethod
    @abc.abstractmethod
    def config_class(cls) -> type:
        """The config `rise serve-triton <service>` loads: the service's config + a `triton` section."""

    @abc.abstractmethod
    def inputs(self) -> list[TensorSpec]: ...

    @abc.abstractmethod
    def outputs(self) -> list[TensorSpec]:
        """The adapter's own outputs (without `version` and `error`)."""

    @abc.abstractmethod
    def infer(self, loaded: LoadedModel, requests: list[TritonRequest]) -> list[dict[str, np.ndarray] | BaseException]: ...

    # ---- shared by both hosts ------------------------------------------------------------------
    def all_outputs(self) -> list[TensorSpec]:
        return [*self.outputs(),
                TensorSpec(VERSION_OUTPUT, BYTES, (1,), doc="registry version id that answered"),
                TensorSpec(ERROR_OUTPUT, BYTES, (1,), doc='empty, or "<ErrorClass>: message" (the request failed)')]

    def respond(self, loaded: LoadedModel, requests: list[TritonRequest], limit: threading.Semaphore | None = None) -> list[dict[str, np.ndarray]]:
        """Run `infer` and complete every response (never raises: failures become `error` outputs)."""
        try:
            if limit is None:
                results = self.infer(loaded, requests)
            else:
                with limit:
                    results = self.infer(loaded, requests)
            if len(results) != len(requests):
                raise RuntimeError(f"{type(self).__name__}.infer returned {len(results)} responses for {len(requests)} requests")
        except Exception as exc:  # noqa: BLE001  (every request of the call fails with it, nothing else)
            log.exception("triton infer failed", extra={"fields": {"service": self.service, "version": loaded.version}})
            results = [exc] * len(requests)
        responses = []
        for request, result in zip(requests, results):
            batch = request.batch
            if isinstance(result, BaseException):
                if not isinstance(result, RiseError):
                    log.error("triton request failed", extra={"fields": {"version": loaded.version, "error": error_text(result)}})
                response = {spec.name: spec.empty(batch) for spec in self.outputs()}
                response[ERROR_OUTPUT] = encode_strings([error_text(result)] * batch)
            else:
                response = dict(result)
                response[ERROR_OUTPUT] = encode_strings([""] * batch)
            response[VERSION_OUTPUT] = encode_strings([loaded.version] * batch)
            responses.append(response)
        return responses


def adapter_class(service: str) -> type[TritonAdapter]:
    if service not in ADAPTERS:
        raise InvalidArgument(f"no Triton adapter for {service!r}; Triton-served: {sorted(ADAPTERS)} "
                              f"(add one to rise.triton_binding.ADAPTERS)")
    import importlib

    module_name, class_name = ADAPTERS[service].split(":")
    return getattr(importlib.import_module(module_name), class_name)


# ---- versions and names ------------------------------------------------------------------
def triton_version(version: str) -> int:
    """Registry version id -> Triton version number (v0003 -> 3)."""
    match = _REGISTRY_VERSION.match(version)
    if not match or int(match.group(1)) < 1:
        raise FailedPrecondition(f"registry version {version!r} has no number; Triton versions are numbers >= 1 "
                                 "(publish through the registry, which names versions v0001, v0002, ...)")
    return int(match.group(1))


def alias_model_name(base: str, alias: str) -> str:
    """The Triton model name that serves an alias: `dynamics` + `candidate` -> `dynamics-candidate`."""
    return f"{base}-{alias}"


def default_binds(config: Any, base: str | None = None) -> dict[str, str]:
    """Triton model name -> version ref: the base name for the default alias, one per preload alias."""
    from rise.registry import Registry

    base = base or config.model_name
    stored = Registry(config.registry_root).aliases(config.model_name)
    binds = {base: config.default_alias}
    for alias in config.preload:
        if alias in stored and alias != config.default_alias:
            binds[alias_model_name(base, alias)] = alias
    return binds


# ---- configuration ----------------------------------------------------------------------
class TritonSettings(StrictModel):
    """The `triton:` section of `rise serve-triton <service>` configs."""

    host: str = "127.0.0.1"
    # Triton's standard ports; 0 picks a free one (tests).
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    http_port: int = Field(default=8000, ge=0, le=65535)
    metrics_port: int = Field(default=8002, ge=0, le=65535)
    # Triton model name -> registry version id or alias. Empty: `<model>` for the default alias
    # and `<model>-<alias>` for every other preload alias present in the registry.
    binds: dict[str, str] = {}
    # Largest request Triton accepts, in items (its max_batch_size). Merged batches are packed
    # into model calls of at most `batching.max_batch_size` items, never splitting a request.
    max_request_items: int = Field(default=64, ge=1)
    # pytriton's working folder (model store, sockets); default: a fresh temporary folder.
    workspace: Path | None = None
    # venv of Triton's Python-backend stub: numpy < 2 and pyzmq, same Python minor version.
    # Default: $RISE_TRITON_STUB_ENV, else <this venv>/triton-stub (`make triton`); not needed
    # when this process itself runs numpy < 2.
    stub_env: Path | None = None
    # Print Triton's own log lines (they are kept either way and shown when startup fails).
    print_server_log: bool = True
    log_verbose: int = Field(default=0, ge=0)
    # Seconds Triton waits for requests in flight when stopped.
    exit_timeout_s: int = Field(default=10, ge=0)


# ---- can Triton run here? ------------------------------------------------------------------
def _numpy_major() -> int:
    return int(np.__version__.split(".")[0])


def python_libdir() -> Path:
    """The folder holding this Python's shared libpython, which the stub links."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise TritonUnavailable(
            f"this Python ({sys.executable}) is built without a shared libpython; Triton's Python-backend stub links "
            f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so. Use a shared build "
            "(pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install ...; Debian's python3 is one).")
    libdir = Path(sysconfig.get_config_var("LIBDIR"))
    name = sysconfig.get_config_var("LDLIBRARY") or f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so"
    if not (libdir / name).exists():
        raise TritonUnavailable(f"{libdir / name} is missing; Triton's Python-backend stub links it")
    return libdir


def stub_env(settings: TritonSettings) -> Path | None:
    """The venv Triton's Python-backend stub runs in; None: this process's own environment."""
    configured = settings.stub_env or (Path(os.environ["RISE_TRITON_STUB_ENV"]) if os.environ.get("RISE_TRITON_STUB_ENV") else None)
    if configured is None and _numpy_major() < 2:
        return None
    path = configured or Path(sys.prefix) / "triton-stub"
    python = path / "bin" / "python3"
    if not python.exists():
        raise TritonUnavailable(
            f"Triton's Python-backend stub needs numpy < 2 and this process runs numpy {np.__version__}; its venv "
            f"{path} is missing. Create it with `make triton` (or point RISE_TRITON_STUB_ENV / triton.stub_env at a "
            f"Python {sys.version_info[0]}.{sys.version_info[1]} venv holding numpy<2 and pyzmq).")
    probe = subprocess.run([str(python), "-c", "import sys, numpy, zmq; print(sys.version_info[0], sys.version_info[1], numpy.__version__)"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        raise TritonUnavailable(f"the Triton stub venv {path} is unusable (needs numpy<2 and pyzmq; `make triton` "
                                f"recreates it): {probe.stderr.strip().splitlines()[-1:]}")
    major, minor, numpy_version = probe.stdout.split()
    if (int(major), int(minor)) != sys.version_info[:2] or int(numpy_version.split(".")[0]) >= 2:
        raise TritonUnavailable(f"the Triton stub venv {path} runs Python {major}.{minor} with numpy {numpy_version}; "
                                f"it needs Python {sys.version_info[0]}.{sys.version_info[1]} and numpy < 2 "
                                "(`make triton` recreates it)")
    return path


def triton_unavailable_reason() -> str | None:
    """Why the Triton server binary cannot run on this machine, or None when it can.

    Only platform facts count here (OS, CPU, the binary failing to execute). A missing
    `make triton` is not such a reason: `serve_triton` raises `TritonUnavailable` for it.
    """
    import platform

    if sys.platform != "linux":
        return f"the Triton server binary (nvidia-pytriton) exists for Linux only, this is {sys.platform}"
    if platform.machine() not in ("x86_64", "aarch64"):
        return f"the Triton server binary (nvidia-pytriton) exists for x86_64 and aarch64, this is {platform.machine()}"
    try:
        from pytriton.utils.distribution import get_libs_path, get_root_module_path
    except ImportError:
        return None  # not installed: an install problem, reported by serve_triton
    binary = get_root_module_path() / "tritonserver" / "bin" / "tritonserver"
    env = {**os.environ, "LD_LIBRARY_PATH": f"{get_libs_path()}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    try:
        run = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60, env=env)
    except OSError as exc:
        return f"the Triton server binary {binary} cannot execute here: {exc}"
    text = run.stdout + run.stderr
    if "error while loading shared libraries" in text or "GLIBC" in text or "Usage" not in text and "usage" not in text:
        return f"the Triton server binary {binary} cannot run here (exit {run.returncode}): {text.strip()[-400:]}"
    return None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _run_coroutine(coro):
    """Run a coroutine to completion from sync code, also when this thread runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


# ---- the pytriton host ---------------------------------------------------------------------
@dataclass
class BoundModel:
    triton_name: str
    triton_version: int
    ref: str  # what was asked for (alias or id)
    loaded: LoadedModel = field(repr=False)


@dataclass
class RunningTriton:
    """A started Triton server; `stop()` (or leaving the `with` block) shuts it down."""

    service: str
    host: str
    grpc_port: int
    http_port: int
    metrics_port: int
    models: list[BoundModel]
    model_host: ModelHost
    startup_s: float
    _triton: Any = field(repr=False)
    _cleanup: Path | None = field(default=None, repr=False)

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def url(self) -> str:
        """What `rise.transport` connects to."""
        return f"triton://{self.grpc_address}"

    def is_alive(self) -> bool:
        return bool(self._triton.is_alive())

    def server_log(self) -> str:
        server = getattr(self._triton, "_triton_server", None)
        return getattr(server, "_tritonserver_logs", "") if server is not None else ""

    def stop(self) -> None:
        try:
            self._triton.stop()
        finally:
            models = {id(b.loaded.model): b.loaded.model for b in self.models}  # each model once
            for model in models.values():
                close = getattr(model, "close", None)
                if callable(close):
                    try:
                        close()
                    except Exception:  # noqa: BLE001
                        log.exception("model close failed")
            if self._cleanup is not None:
                shutil.rmtree(self._cleanup, ignore_errors=True)

    def __enter__(self) -> "RunningTriton":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _triton_class():
    """pytriton's `Triton`, with the stub environment fixed for this process (see module docstring).

    Only the server process this instance starts gets the changed environment: PATH leads to the
    stub venv (the stub's embedded Python takes its site-packages from the `python3` it finds on
    PATH) and LD_LIBRARY_PATH holds libpython. Checked against nvidia-pytriton 0.7.0.
    """
    from pytriton.triton import Triton

    class RiseTriton(Triton):
        def __init__(self, *, stub_env: Path | None, libdir: Path, print_log: bool, **kwargs):
            self._rise_stub_env = stub_env
            self._rise_libdir = libdir
            self._rise_print_log = print_log
            super().__init__(**kwargs)

        def _initialize_server(self) -> None:
            super()._initialize_server()
            server = self._triton_server
            if not hasattr(server, "_get_env") or not hasattr(server, "_verbose"):
                raise TritonUnavailable("this nvidia-pytriton version is not the one rise.triton_binding was written for "
                                        "(0.7.0): TritonServer._get_env is gone; pin nvidia-pytriton==0.7.0")
            server._verbose = self._rise_print_log
            base_env = server._get_env
            stub, libdir = self._rise_stub_env, self._rise_libdir

            def get_env() -> dict:
                env = base_env()
                env["LD_LIBRARY_PATH"] = f"{libdir}:{env.get('LD_LIBRARY_PATH', '')}".rstrip(":")
                if stub is not None:
                    env["PATH"] = f"{stub / 'bin'}:{env['PATH']}"
                return env

            server._get_env = get_env

    return RiseTriton


def serve_triton(service: str | type[TritonAdapter], config: Any, binds: Mapping[str, str] | None = None) -> RunningTriton:
    """Load the versions `binds` names (Triton model name -> version id or alias) and serve them.

    `config` is the service's Triton config (`adapter.config_class()`): registry, embodiment,
    batching, and its `triton` section. Returns once Triton reports every model ready.
    """
    adapter_cls = adapter_class(service) if isinstance(service, str) else service
    settings: TritonSettings = config.triton
    started = time.perf_counter()
    if reason := triton_unavailable_reason():
        raise TritonUnavailable(reason)
    try:
        import pytriton  # noqa: F401
    except ImportError:
        raise TritonUnavailable("nvidia-pytriton is not installed in this environment: run `make triton` "
                                "(it installs nvidia-pytriton 0.7.0 without its numpy<2 pin, and the stub venv)") from None
    libdir = python_libdir()
    stub = stub_env(settings)

    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import TritonConfig

    from rise.embodiment import load_embodiment
    from rise.model_host import ModelHost, load_by_kind
    from rise.registry import Registry

    embodiment = load_embodiment(config.embodiment)
    host = ModelHost(Registry(config.registry_root), config.model_name, embodiment,
                     load_by_kind(adapter_cls.kinds(), adapter_cls.service), config.default_alias)
    binds = dict(binds or settings.binds or default_binds(config, adapter_cls.service))
    bound: list[BoundModel] = []
    for name, ref in binds.items():
        loaded = _run_coroutine(host.load(ref))
        bound.append(BoundModel(name, triton_version(loaded.version), ref, loaded))
    adapter = adapter_cls(embodiment, config.batching)
    limits = {b.loaded.version: threading.Semaphore(config.batching.max_concurrent_batches) for b in bound}

    ports = {p: getattr(settings, p) or _free_port(settings.host) for p in ("grpc_port", "http_port", "metrics_port")}
    cleanup = None
    if settings.workspace is None:
        cleanup = Path(tempfile.mkdtemp(prefix="rise-triton-"))
        workspace = cleanup / "workspace"  # pytriton creates it and refuses an existing one
    else:
        workspace = settings.workspace
    triton_config = TritonConfig(
        http_address=settings.host, http_port=ports["http_port"], grpc_address=settings.host, grpc_port=ports["grpc_port"],
        metrics_address=settings.host, metrics_port=ports["metrics_port"], log_verbose=settings.log_verbose,
        exit_timeout_secs=settings.exit_timeout_s)
    triton = _triton_class()(stub_env=stub, libdir=libdir, print_log=settings.print_server_log,
                             config=triton_config, workspace=workspace)
    batcher = DynamicBatcher(max_queue_delay_microseconds=int(config.batching.max_wait_ms * 1000),
                             preferred_batch_size=[min(config.batching.max_batch_size, settings.max_request_items)])
    model_config = ModelConfig(batching=True, max_batch_size=settings.max_request_items, batcher=batcher)
    inputs = [Tensor(name=s.name, dtype=s.dtype if s.dtype != BYTES else np.bytes_, shape=s.dims, optional=s.optional)
              for s in adapter.inputs()]
    outputs = [Tensor(name=s.name, dtype=s.dtype if s.dtype != BYTES else np.bytes_, shape=s.dims) for s in adapter.all_outputs()]

    def infer_fn(loaded: LoadedModel):
        limit = limits[loaded.version]

        def infer(requests) -> list[dict[str, np.ndarray]]:
            converted = [TritonRequest({k: np.asarray(v) for k, v in r.data.items()}, dict(r.parameters or {})) for r in requests]
            return adapter.respond(loaded, converted, limit)

        return infer

    try:
        for b in bound:
            triton.bind(model_name=b.triton_name, infer_func=infer_fn(b.loaded), inputs=inputs, outputs=outputs,
                        model_version=b.triton_version, config=model_config)
        triton.run()  # returns when every model is ready (pytriton's own timeouts)
    except BaseException as exc:
        server = getattr(triton, "_triton_server", None)
        logs = getattr(server, "_tritonserver_logs", "") if server is not None else ""
        try:
            triton.stop()
        except Exception:  # noqa: BLE001
            pass
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        if isinstance(exc, RiseError):
            raise
        tail = "\n".join(logs.strip().splitlines()[-25:])
        raise TritonUnavailable(f"Triton failed to start: {type(exc).__name__}: {exc}\n--- Triton log (last lines) ---\n{tail}") from exc
    running = RunningTriton(adapter_cls.service, settings.host, ports["grpc_port"], ports["http_port"], ports["metrics_port"],
                            bound, host, time.perf_counter() - started, triton, cleanup)
    log.info("triton serving", extra={"fields": {
        "service": adapter_cls.service, "grpc": running.grpc_address, "startup_s": round(running.startup_s, 2),
        "models": {b.triton_name: f"{b.loaded.version} (triton version {b.triton_version}, from {b.ref!r})" for b in bound}}})
    return running


# ---- cluster Triton: config.pbtxt and the Python-backend model ----------------------------------
def model_config_pbtxt(adapter: TritonAdapter, name: str, *, max_batch_size: int = 64, max_queue_delay_us: int = 2000,
                       preferred_batch_size: int = 8, instance_count: int = 1, parameters: Mapping[str, str] | None = None,
                       version_policy: str = "latest { num_versions: 1 }") -> str:
    """The config.pbtxt of a Python-backend model repository entry serving `adapter`'s tensors."""

    def tensor(spec: TensorSpec, optional: bool) -> str:
        dims = ", ".join(str(d) for d in spec.dims)
        extra = "\n    optional: true" if optional and spec.optional else ""
        note = f"  # {spec.doc}" if spec.doc else ""
        return (f"  {{{note}\n    name: \"{spec.name}\"\n    data_type: {_DTYPES[np.dtype(spec.dtype)][1]}\n"
                f"    dims: [ {dims} ]{extra}\n  }}")

    lines = [
        f"# Generated by rise.triton_binding.model_config_pbtxt from the {adapter.service!r} adapter",
        f"# ({ADAPTERS.get(adapter.service, type(adapter).__name__)}), embodiment {adapter.embodiment.name!r}.",
        "# Request parameters read: " + (", ".join(f"{k} ({v})" for k, v in adapter.parameters.items()) or "none"),
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {max_batch_size}",
        f"version_policy: {{ {version_policy} }}",
        "input [",
        ",\n".join(tensor(s, True) for s in adapter.inputs()),
        "]",
        "output [",
        ",\n".join(tensor(s, False) for s in adapter.all_outputs()),
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {preferred_batch_size} ]",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        f"instance_group [ {{ count: {instance_count}\n    kind: KIND_CPU }} ]",
    ]
    for key, value in (parameters or {}).items():
        lines.append(f'parameters {{ key: "{key}"\n  value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


class PythonBackendModel:
    """The `TritonPythonModel` of a cluster's Python-backend repository (`triton/model_repository`).

    A subclass sets `service`; config.pbtxt parameters (each overridable by an environment
    variable of the same name in upper case, e.g. RISE_REGISTRY_ROOT): `rise_registry_root`,
    `rise_model` (registry model name, default: the service), `rise_embodiment`, and
    `rise_max_batch_items` (items per model call). The version folder's number picks the registry
    version (folder 3 -> v0003), loaded through the service's kinds like `rise serve` does.
    """

    service: ClassVar[str] = ""

    def initialize(self, args: dict) -> None:
        from rise.batching import BatchingConfig
        from rise.embodiment import load_embodiment
        from rise.model_host import ModelHost, load_by_kind
        from rise.registry import Registry

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}

        def param(key: str, default: str) -> str:
            return os.environ.get(key.upper()) or params.get(key) or default

        adapter_cls = adapter_class(self.service)
        embodiment = load_embodiment(param("rise_embodiment", "metaworld"))
        host = ModelHost(Registry(param("rise_registry_root", "/models/registry")), param("rise_model", adapter_cls.service),
                         embodiment, load_by_kind(adapter_cls.kinds(), adapter_cls.service))
        self.loaded = _run_coroutine(host.load(f"v{int(args['model_version']):04d}"))
        self.adapter = adapter_cls(embodiment, BatchingConfig(max_batch_size=int(param("rise_max_batch_items", "8"))))
        self.input_names = [s.name for s in self.adapter.inputs()]

    def execute(self, requests) -> list:
        import triton_python_backend_utils as pb_utils  # only inside Triton's Python backend

        converted = []
        for request in requests:
            inputs = {}
            for name in self.input_names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            converted.append(TritonRequest(inputs, json.loads(request.parameters() or "{}")))
        responses = self.adapter.respond(self.loaded, converted)
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, value) for name, value in response.items()])
                for response in responses]

    def finalize(self) -> None:
        close = getattr(getattr(self, "loaded", None), "model", None)
        if callable(getattr(close, "close", None)):
            close.close()


@dataclass
class RepositoryServer:
    """A `tritonserver` process serving a model repository (see `start_repository_server`)."""

    process: subprocess.Popen
    host: str
    grpc_port: int
    http_port: int
    log_file: Path
    _cleanup: Path = field(repr=False)

    @property
    def url(self) -> str:
        return f"triton://{self.host}:{self.grpc_port}"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self, timeout_s: float = 30) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self._cleanup, ignore_errors=True)

    def __enter__(self) -> "RepositoryServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def repository_python_env(folder: Path, settings: TritonSettings | None = None) -> Path:
    """A venv for the stub of a *repository* model (its model.py imports rise-serve): an overlay
    whose sys.path is the stub venv's numpy<2 first, then this environment's packages, then this
    project. Local checks only; a cluster's Triton image brings its own Python environment."""
    base = stub_env(settings or TritonSettings())
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, capture_output=True)
    site = folder / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    project = Path(__file__).resolve().parents[1]
    numpy_first = [str(p) for p in sorted((base / "lib").glob("python*/site-packages"))] if base else []
    paths = [*numpy_first, *(p for p in sys.path if p.endswith("site-packages")), str(project)]
    (site / "rise_overlay.pth").write_text("\n".join(dict.fromkeys(paths)) + "\n")
    return folder


def start_repository_server(repository: Path, *, host: str = "127.0.0.1", grpc_port: int = 0, http_port: int = 0,
                            metrics_port: int = 0, env: Mapping[str, str] | None = None, python_env: Path | None = None,
                            ready_timeout_s: float = 120) -> RepositoryServer:
    """Run pytriton's bundled `tritonserver` on a model repository (e.g. triton/model_repository).

    The cluster path, on this machine: Triton's own model loading (config.pbtxt, numbered version
    folders, Python backend running each version's model.py). `python_env` is the venv whose
    `python3` the backend stub takes its packages from (default: `repository_python_env`); `env`
    adds variables (e.g. RISE_REGISTRY_ROOT) for the server and its stubs.
    """
    if reason := triton_unavailable_reason():
        raise TritonUnavailable(reason)
    try:
        from pytriton.utils.distribution import get_libs_path, get_root_module_path, get_stub_path
    except ImportError:
        raise TritonUnavailable("nvidia-pytriton is not installed in this environment: run `make triton`") from None
    libdir = python_libdir()
    work = Path(tempfile.mkdtemp(prefix="rise-triton-repo-"))
    try:
        server_dir = work / "tritonserver"
        shutil.copytree(get_root_module_path() / "tritonserver", server_dir, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
        shutil.copy(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"), server_dir / "backends" / "python" / "triton_python_backend_stub")
        python_env = python_env or repository_python_env(work / "python")
        ports = {name: port or _free_port(host) for name, port in (("grpc", grpc_port), ("http", http_port), ("metrics", metrics_port))}
        server_env = {**os.environ, **(env or {})}
        server_env["LD_LIBRARY_PATH"] = f"{libdir}:{get_libs_path()}:{server_env.get('LD_LIBRARY_PATH', '')}".rstrip(":")
        server_env["PATH"] = f"{python_env / 'bin'}:{server_env['PATH']}"
        log_file = work / "tritonserver.log"
        command = [str(server_dir / "bin" / "tritonserver"), f"--model-repository={Path(repository).resolve()}",
                   f"--backend-directory={server_dir / 'backends'}", f"--cache-directory={server_dir / 'caches'}",
                   f"--grpc-address={host}", f"--grpc-port={ports['grpc']}", f"--http-address={host}",
                   f"--http-port={ports['http']}", f"--metrics-address={host}", f"--metrics-port={ports['metrics']}",
                   "--allow-gpu-metrics=false", "--exit-timeout-secs=10"]
        with open(log_file, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=server_env, cwd=work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    server = RepositoryServer(process, host, ports["grpc"], ports["http"], log_file, work)
    import tritonclient.grpc

    client = tritonclient.grpc.InferenceServerClient(f"{host}:{ports['grpc']}")
    deadline = time.monotonic() + ready_timeout_s
    try:
        while True:
            if process.poll() is not None:
                raise TritonUnavailable(f"tritonserver exited ({process.returncode}):\n{server.log()[-3000:]}")
            try:
                if client.is_server_ready():
                    break
            except Exception:  # noqa: BLE001  (not listening yet)
                pass
            if time.monotonic() > deadline:
                raise TritonUnavailable(f"tritonserver not ready within {ready_timeout_s} s:\n{server.log()[-3000:]}")
            time.sleep(0.2)
    except BaseException:
        server.stop()
        raise
    finally:
        client.close()
    return server


# ---- `rise serve-triton <service>` -------------------------------------------------------------
def register(app: "typer.Typer") -> None:
    """Add `rise serve-triton` to the CLI (rise/cli.py: `triton_binding.register(app)`)."""
    import typer

    @app.command("serve-triton")
    def serve_triton_command(
        service: str = typer.Argument(..., help="dynamics (the services with a Triton adapter)"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML: the service's config plus a `triton:` section; "
                                                                              "RISE_* env vars override it."),
        bind: List[str] = typer.Option([], "--bind", help="TRITON_NAME=VERSION_OR_ALIAS, repeatable (default: <model> for the "
                                                             "default alias, <model>-<alias> for each preload alias)."),
        grpc_port: Optional[int] = typer.Option(None, help="Override triton.grpc_port (0 = free port)."),
        http_port: Optional[int] = typer.Option(None, help="Override triton.http_port."),
        metrics_port: Optional[int] = typer.Option(None, help="Override triton.metrics_port."),
        store: Optional[Path] = typer.Option(None, "--store", help="Override registry_root."),
    ) -> None:
        """Serve a model service's versions through NVIDIA Triton (pytriton) until SIGTERM/SIGINT."""
        from rich.console import Console

        from rise.config import load_config
        from rise.serving import setup_logging

        console = Console(stderr=True)
        adapter_cls = adapter_class(service)
        overrides = {f"triton.{k}": v for k, v in (("grpc_port", grpc_port), ("http_port", http_port),
                                                   ("metrics_port", metrics_port)) if v is not None}
        if store is not None:
            overrides["registry_root"] = store
        cfg = load_config(adapter_cls.config_class(), config, overrides=overrides or None)
        binds = {}
        for item in bind:
            name, sep, ref = item.partition("=")
            if not sep or not name or not ref:
                raise typer.BadParameter(f"--bind wants TRITON_NAME=VERSION_OR_ALIAS, got {item!r}")
            binds[name] = ref
        setup_logging(cfg.server.log_json)
        running = serve_triton(adapter_cls, cfg, binds or None)
        for b in running.models:
            console.print(f"[green]{b.triton_name}[/green] version {b.triton_version} = {cfg.model_name}/{b.loaded.version} "
                          f"({b.loaded.manifest.kind}, from {b.ref!r})")
        console.print(f"[green]Triton serving {service} on {running.url} (HTTP {running.host}:{running.http_port}, "
                      f"metrics :{running.metrics_port}); started in {running.startup_s:.1f} s[/green]")
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            if not running.is_alive():
                console.print("[red]Triton exited[/red]")
                running.stop()
                raise typer.Exit(1)
        running.stop()
