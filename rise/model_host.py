"""The model host: several versions of one model in memory, routed by version or alias.

Every model service holds one. Loading happens off the event loop and never touches the
routing table until the new version is ready; the table is then replaced in one assignment,
so a swap fails no request (calls in flight keep the object they already resolved). The
`ModelAdmin` servicer at the bottom exposes it over gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from rise.config import StrictModel
from rise.embodiment import Embodiment
from rise.errors import FailedPrecondition, NotFound, RiseError
from rise.proto.v1 import common_pb2, model_admin_pb2, model_admin_pb2_grpc
from rise.registry import Manifest, Registry, VerifiedVersion
from rise.serving import RunningServer, ServerConfig, served_version

log = logging.getLogger("rise.model_host")

Loader = Callable[[VerifiedVersion, Embodiment], Any]


class ModelServiceConfig(StrictModel):
    """What every model service needs; services extend it with their own sections."""

    server: ServerConfig = ServerConfig()
    # Root of the model registry (a shared volume in containers).
    registry_root: Path = Path("model_store")
    # The model's name in the registry ("policy", "value", "dynamics").
    model_name: str
    # Embodiment preset name or YAML path; versions for another embodiment are refused.
    embodiment: str = "metaworld"
    # Alias used when a request names no version.
    default_alias: str = "stable"
    # Aliases whose versions are loaded (and routed) at start; missing ones are skipped.
    preload: list[str] = ["stable", "candidate", "latest"]
    # Aliases this server routes to a given version (or registry alias, resolved at start) whatever
    # the registry says, loaded at start: {stable: v0003} serves v0003 by default. The registry is
    # not written, so Deployments sharing one store can pin different versions (MODEL_VERSION in
    # the images sets it). ModelAdmin.SetAlias still moves the route while the server runs.
    pin: dict[str, str] = {}
    # torch intra-op threads for learned models (None: torch's default, one per core). On a small
    # shared CPU, 1 avoids OpenMP oversubscription (measured here: 42 ms vs seconds under load).
    torch_threads: int | None = None


@dataclass(frozen=True)
class LoadedModel:
    version: str
    manifest: Manifest
    model: Any
    load_seconds: float


class ModelHost:
    def __init__(self, registry: Registry, model_name: str, embodiment: Embodiment, loader: Loader,
                 default_alias: str = "stable"):
        self.registry = registry
        self.model_name = model_name
        self.embodiment = embodiment
        self.loader = loader
        self.default_alias = default_alias
        # Both tables are replaced, never mutated, so readers need no lock.
        self._loaded: dict[str, LoadedModel] = {}
        self._aliases: dict[str, str] = {}
        self._admin = asyncio.Lock()  # serialises loads and alias changes, never requests

    # ---- the request path ------------------------------------------------------------------
    def get(self, ref: str = "") -> LoadedModel:
        """The loaded model a request names (version id or alias; empty = default alias)."""
        ref = ref or self.default_alias
        version = self._aliases.get(ref, ref)
        loaded = self._loaded.get(version)
        if loaded is None:
            self._raise_unavailable(ref, version)
        served_version.set(loaded.version)
        return loaded

    def _raise_unavailable(self, ref: str, version: str) -> None:
        here = ", ".join(sorted(self._loaded)) or "none"
        routes = ", ".join(f"{a}->{v}" for a, v in sorted(self._aliases.items())) or "none"
        if version in self.registry.versions(self.model_name) or ref in self.registry.aliases(self.model_name):
            raise FailedPrecondition(
                f"{self.model_name}: {ref!r} is in the registry but not loaded here (loaded: {here}; aliases: {routes}); "
                "load it with ModelAdmin.LoadVersion or SetAlias")
        raise NotFound(f"{self.model_name}: no version or alias {ref!r} (loaded: {here}; aliases: {routes})")

    # ---- administration ----------------------------------------------------------------------
    async def load(self, ref: str) -> LoadedModel:
        async with self._admin:
            return await self._load(ref)

    async def _load(self, ref: str) -> LoadedModel:
        version = self._aliases.get(ref) or self.registry.resolve(self.model_name, ref)
        if version in self._loaded:
            return self._loaded[version]
        start = time.perf_counter()
        verified = await asyncio.to_thread(self.registry.open, self.model_name, version)
        self._check_embodiment(verified.manifest)
        model = await asyncio.to_thread(self.loader, verified, self.embodiment)
        loaded = LoadedModel(version, verified.manifest, model, time.perf_counter() - start)
        self._loaded = {**self._loaded, version: loaded}
        log.info("loaded", extra={"fields": {"model": self.model_name, "version": version, "seconds": round(loaded.load_seconds, 3)}})
        return loaded

    def _check_embodiment(self, manifest: Manifest) -> None:
        try:
            theirs = Embodiment.model_validate(manifest.embodiment)
        except ValidationError as exc:
            raise FailedPrecondition(f"{manifest.model}/{manifest.version}: manifest embodiment is invalid: {exc}") from None
        diff = self.embodiment.differences(theirs)
        if diff:
            raise FailedPrecondition(
                f"{manifest.model}/{manifest.version} was made for embodiment {theirs.name!r}, this service serves "
                f"{self.embodiment.name!r}; differences (version != service): {'; '.join(diff)}")

    async def set_alias(self, alias: str, ref: str) -> tuple[str, str]:
        """Load `ref` if needed, persist the alias in the registry, then route it. Returns (previous, new)."""
        async with self._admin:
            loaded = await self._load(ref)
            self.registry.set_alias(self.model_name, alias, loaded.version)
            previous = self._aliases.get(alias, "")
            self._aliases = {**self._aliases, alias: loaded.version}
            log.info("alias", extra={"fields": {"model": self.model_name, "alias": alias, "version": loaded.version, "previous": previous}})
            return previous, loaded.version

    async def unload(self, version: str) -> None:
        async with self._admin:
            version = self._aliases.get(version, version)
            if version not in self._loaded:
                raise NotFound(f"{self.model_name}: version {version!r} is not loaded (loaded: {', '.join(sorted(self._loaded)) or 'none'})")
            pointing = sorted(a for a, v in self._aliases.items() if v == version)
            if pointing:
                raise FailedPrecondition(f"{self.model_name}/{version} is routed by alias(es) {pointing}; point them elsewhere first")
            self._loaded = {v: m for v, m in self._loaded.items() if v != version}

    async def start(self, preload: list[str], pin: dict[str, str] | None = None) -> None:
        """Load and route the registry's aliases named in `preload` (missing ones are skipped), and
        the `pin`ned aliases to their versions (a pin that does not resolve fails the start)."""
        pin = pin or {}
        registry_aliases = self.registry.aliases(self.model_name)
        stored = {**registry_aliases, **{alias: self.registry.resolve(self.model_name, ref) for alias, ref in pin.items()}}
        for alias in dict.fromkeys([*preload, *pin]):
            if alias not in stored:
                log.warning("alias not in registry, not preloaded", extra={"fields": {"model": self.model_name, "alias": alias}})
                continue
            async with self._admin:
                try:
                    loaded = await self._load(stored[alias])
                except RiseError as exc:  # a broken version is never served, the others still are
                    if alias in pin:
                        raise  # the operator asked for exactly this version: do not serve another
                    log.error("alias not loaded", extra={"fields": {"model": self.model_name, "alias": alias, "error": str(exc)}})
                    continue
                self._aliases = {**self._aliases, alias: loaded.version}
            if alias in pin:
                log.info("alias pinned", extra={"fields": {"model": self.model_name, "alias": alias, "version": loaded.version,
                                                           "registry": registry_aliases.get(alias, "")}})

    def loaded_versions(self) -> dict[str, LoadedModel]:
        return self._loaded

    def routes(self) -> dict[str, str]:
        return self._aliases


def response_meta(loaded: LoadedModel, start: float, compute_ms: float, queue_ms: float = 0.0) -> common_pb2.ResponseMeta:
    """The metadata every model response carries; `start` is the handler's perf_counter()."""
    timing = common_pb2.ServerTiming(queue_ms=queue_ms, compute_ms=compute_ms, total_ms=(time.perf_counter() - start) * 1000)
    return common_pb2.ResponseMeta(model=loaded.manifest.model, version=loaded.version, timing=timing)


class ModelAdminServicer(model_admin_pb2_grpc.ModelAdminServicer):
    def __init__(self, host: ModelHost):
        self.host = host

    def _info(self, version: str) -> model_admin_pb2.VersionInfo:
        host = self.host
        loaded = host.loaded_versions().get(version)
        manifest = loaded.manifest if loaded else host.registry.manifest(host.model_name, version)
        return model_admin_pb2.VersionInfo(
            version=version,
            loaded=loaded is not None,
            aliases=sorted(a for a, v in host.routes().items() if v == version),
            created_unix_ms=manifest.created_unix_ms,
            parent=manifest.parent,
            kind=manifest.kind,
            embodiment=str(manifest.embodiment.get("name", "")),
            metrics=manifest.metrics,
        )

    async def ListVersions(self, request, context):
        host = self.host
        versions = sorted(set(host.registry.versions(host.model_name)) | set(host.loaded_versions()))
        infos = []
        for version in versions:
            try:
                infos.append(self._info(version))
            except Exception as exc:  # one broken folder must not hide the others
                log.warning("unreadable version", extra={"fields": {"version": version, "error": str(exc)}})
        return model_admin_pb2.ListVersionsResponse(
            model=host.model_name, versions=infos, aliases=host.routes(), default_alias=host.default_alias)

    async def LoadVersion(self, request, context):
        if request.alias:
            await self.host.set_alias(request.alias, request.version)
        loaded = await self.host.load(request.version)
        return model_admin_pb2.LoadVersionResponse(info=self._info(loaded.version), load_seconds=loaded.load_seconds)

    async def SetAlias(self, request, context):
        previous, version = await self.host.set_alias(request.alias, request.version)
        return model_admin_pb2.SetAliasResponse(previous_version=previous, version=version)

    async def UnloadVersion(self, request, context):
        await self.host.unload(request.version)
        return model_admin_pb2.UnloadVersionResponse()


def load_by_kind(kinds: dict[str, Loader], service: str) -> Loader:
    """A loader that dispatches on the manifest's `kind`, refusing kinds this server lacks."""

    def load(verified: VerifiedVersion, embodiment: Embodiment) -> Any:
        kind = verified.manifest.kind
        if kind not in kinds:
            raise FailedPrecondition(f"{verified.manifest.model}/{verified.manifest.version} is a {kind!r} model; "
                                     f"the {service} service knows {sorted(kinds)}")
        return kinds[kind](verified, embodiment)

    return load


async def start_model_service(name: str, config: ModelServiceConfig, loader: Loader,
                              servicer: Callable[[ModelHost], Any], add_fn) -> tuple[RunningServer, ModelHost]:
    """Registry + host (with preloaded aliases) + the service and ModelAdmin on one server."""
    from rise.embodiment import load_embodiment
    from rise.serving import start_server

    if config.torch_threads is not None:
        import torch  # only services that ask for it pay for the import here

        torch.set_num_threads(config.torch_threads)
    host = ModelHost(Registry(config.registry_root), config.model_name, load_embodiment(config.embodiment),
                     loader, config.default_alias)
    await host.start(config.preload, config.pin)
    running = await start_server(name, config.server, [
        (add_fn, servicer(host)),
        (model_admin_pb2_grpc.add_ModelAdminServicer_to_server, ModelAdminServicer(host)),
    ])
    return running, host
