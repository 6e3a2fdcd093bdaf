"""The model registry: a filesystem store of immutable, verified model versions and aliases.

Layout::

    <root>/<model>/<version>/manifest.json    written last; lists the sha256 of every file
    <root>/<model>/<version>/...              weight and config files
    <root>/<model>/aliases.json               {"stable": "v0002", "candidate": "v0003", ...}

Publishing writes into a hidden temporary folder and renames it into place, so a reader sees
a whole version or none. Opening a version re-checks every file against the manifest: a
corrupted or half-written version is refused (`CorruptVersion`), never served. `latest` is
moved by every publish; other aliases move only when someone says so.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from rise.config import StrictModel
from rise.errors import CorruptVersion, InvalidArgument, NotFound

MANIFEST = "manifest.json"
ALIASES = "aliases.json"
STANDARD_ALIASES = ("stable", "candidate", "latest")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_VERSION = re.compile(r"^v(\d{4,})$")


class Manifest(StrictModel):
    model: str
    version: str
    # Model implementation the service uses to load the files, e.g. "linear".
    kind: str
    # The embodiment the version was trained for (full spec, compared field by field on load).
    embodiment: dict[str, Any]
    created_unix_ms: int
    parent: str = ""
    # The model's own config (architecture sizes, normalisation, ...).
    config: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    # Relative file path -> sha256 hex digest.
    files: dict[str, str] = Field(default_factory=dict)


@dataclass(frozen=True)
class VerifiedVersion:
    """A version whose files matched its manifest when opened."""

    path: Path
    manifest: Manifest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise InvalidArgument(f"{kind} {name!r} is not a valid name: use lowercase letters, digits, '_' or '-', starting with a letter")


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- writing -------------------------------------------------------------------------
    def publish(
        self,
        model: str,
        source: str | Path,
        *,
        kind: str,
        embodiment: dict[str, Any],
        config: dict[str, Any] | None = None,
        parent: str = "",
        metrics: dict[str, float] | None = None,
        version: str | None = None,
    ) -> Manifest:
        """Copy the files under `source` (a folder) into a new version; returns its manifest."""
        _check_name("model", model)
        source = Path(source)
        if not source.is_dir():
            raise InvalidArgument(f"publish needs a folder of model files, {source} is not one")
        model_dir = self.root / model
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=".publishing-"))
        try:
            files: dict[str, str] = {}
            for src in sorted(p for p in source.rglob("*") if p.is_file()):
                rel = src.relative_to(source).as_posix()
                if rel == MANIFEST:
                    continue
                dst = staging / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                files[rel] = sha256_file(dst)
            # The version number is taken at rename time; retry if another publisher wins.
            for _ in range(100):
                name = version or self._next_version(model)
                manifest = Manifest(
                    model=model, version=name, kind=kind, embodiment=embodiment,
                    created_unix_ms=int(time.time() * 1000), parent=parent,
                    config=config or {}, metrics=metrics or {}, files=files,
                )
                _write_atomic(staging / MANIFEST, manifest.model_dump_json(indent=2))
                try:
                    os.rename(staging, model_dir / name)  # atomic; fails if the name exists
                except OSError:
                    if version:
                        raise InvalidArgument(f"version {model}/{version} already exists") from None
                    continue
                self._update_aliases(model, {"latest": name})
                return manifest
            raise RuntimeError(f"could not allocate a version number for {model}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def set_alias(self, model: str, alias: str, ref: str) -> str:
        """Point `alias` at the version `ref` names; returns the previous target ('' if none)."""
        _check_name("alias", alias)
        version = self.resolve(model, ref)
        self.manifest(model, version)  # must exist with a manifest
        previous = self.aliases(model).get(alias, "")
        self._update_aliases(model, {alias: version})
        return previous

    def remove_alias(self, model: str, alias: str) -> None:
        self._update_aliases(model, {alias: None})

    def _update_aliases(self, model: str, changes: dict[str, str | None]) -> None:
        # Read-modify-write under an exclusive lock: publishers and admins may race.
        (self.root / model).mkdir(parents=True, exist_ok=True)
        with open(self.root / model / ".aliases.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            aliases = self.aliases(model)
            for alias, version in changes.items():
                if version is None:
                    aliases.pop(alias, None)
                else:
                    aliases[alias] = version
            _write_atomic(self.root / model / ALIASES, json.dumps(aliases, indent=2, sort_keys=True))

    def _next_version(self, model: str) -> str:
        numbers = [int(m.group(1)) for p in (self.root / model).iterdir() if (m := _VERSION.match(p.name))]
        return f"v{max(numbers, default=0) + 1:04d}"

    # ---- reading -------------------------------------------------------------------------
    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name))

    def versions(self, model: str) -> list[str]:
        """Published version ids (folders with a manifest), oldest first."""
        model_dir = self.root / model
        if not model_dir.is_dir():
            return []
        found = [p.name for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()]
        return sorted(found, key=lambda v: (int(m.group(1)) if (m := _VERSION.match(v)) else -1, v))

    def aliases(self, model: str) -> dict[str, str]:
        path = self.root / model / ALIASES
        return json.loads(path.read_text()) if path.is_file() else {}

    def resolve(self, model: str, ref: str) -> str:
        """Alias or version id -> version id."""
        if not ref:
            raise InvalidArgument("empty version reference: name a version id or an alias")
        aliases = self.aliases(model)
        if ref in aliases:
            return aliases[ref]
        if (self.root / model / ref).is_dir():
            return ref
        known = ", ".join(self.versions(model)) or "none"
        raise NotFound(f"{model}: no version or alias {ref!r} (versions: {known}; aliases: {aliases or 'none'})")

    def manifest(self, model: str, version: str) -> Manifest:
        path = self.root / model / version / MANIFEST
        if not path.is_file():
            if (self.root / model / version).is_dir():
                raise CorruptVersion(f"{model}/{version} has no {MANIFEST}: half-written or not published through the registry")
            raise NotFound(f"{model}: no version {version!r}")
        try:
            return Manifest.model_validate_json(path.read_text())
        except ValueError as exc:
            raise CorruptVersion(f"{model}/{version}: unreadable manifest: {exc}") from None

    def open(self, model: str, ref: str) -> VerifiedVersion:
        """Resolve and verify a version: every file must exist and match its sha256."""
        version = self.resolve(model, ref)
        manifest = self.manifest(model, version)
        folder = self.root / model / version
        if manifest.model != model or manifest.version != version:
            raise CorruptVersion(f"{model}/{version}: manifest names {manifest.model}/{manifest.version}")
        for rel, want in manifest.files.items():
            path = folder / rel
            if not path.is_file():
                raise CorruptVersion(f"{model}/{version}: file {rel} listed in the manifest is missing")
            got = sha256_file(path)
            if got != want:
                raise CorruptVersion(f"{model}/{version}: {rel} has sha256 {got[:12]}..., manifest says {want[:12]}...; refusing to serve it")
        return VerifiedVersion(folder, manifest)
