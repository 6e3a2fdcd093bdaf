import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from rise.errors import CorruptVersion, InvalidArgument, NotFound
from rise.registry import Registry


def _folder(tmp_path: Path, name: str, payload: bytes) -> Path:
    folder = tmp_path / name
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(payload)
    (folder / "sub" / "config.json").write_text("{}")
    return folder


def publish(registry: Registry, folder: Path, **kw):
    return registry.publish("policy", folder, kind="linear", embodiment={"name": "x"}, **kw)


def test_publish_numbers_versions_moves_latest_and_verifies(tmp_path):
    registry = Registry(tmp_path / "store")
    first = publish(registry, _folder(tmp_path, "a", b"one"), metrics={"success": 0.4})
    second = publish(registry, _folder(tmp_path, "b", b"two"), parent=first.version)
    assert (first.version, second.version) == ("v0001", "v0002")
    assert registry.aliases("policy") == {"latest": "v0002"}
    assert registry.versions("policy") == ["v0001", "v0002"]
    opened = registry.open("policy", "latest")
    assert opened.manifest.parent == "v0001" and set(opened.manifest.files) == {"weights.bin", "sub/config.json"}
    assert (opened.path / "weights.bin").read_bytes() == b"two"


def test_aliases_persist_and_report_previous(tmp_path):
    registry = Registry(tmp_path / "store")
    publish(registry, _folder(tmp_path, "a", b"1"))
    publish(registry, _folder(tmp_path, "b", b"2"))
    assert registry.set_alias("policy", "stable", "v0001") == ""
    assert registry.set_alias("policy", "stable", "latest") == "v0001"
    assert Registry(tmp_path / "store").resolve("policy", "stable") == "v0002"
    with pytest.raises(NotFound, match="no version or alias 'v0009'"):
        registry.set_alias("policy", "stable", "v0009")
    with pytest.raises(InvalidArgument, match="not a valid name"):
        registry.set_alias("policy", "Bad Alias", "v0001")


def test_wrong_sha256_is_refused(tmp_path):
    registry = Registry(tmp_path / "store")
    version = publish(registry, _folder(tmp_path, "a", b"weights")).version
    (registry.root / "policy" / version / "weights.bin").write_bytes(b"tampered")
    with pytest.raises(CorruptVersion, match="weights.bin has sha256 .* manifest says .*refusing to serve it"):
        registry.open("policy", version)


def test_manifest_with_wrong_sha256_is_refused(tmp_path):
    registry = Registry(tmp_path / "store")
    version = publish(registry, _folder(tmp_path, "a", b"weights")).version
    manifest_path = registry.root / "policy" / version / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["weights.bin"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptVersion, match="manifest says 000000000000"):
        registry.open("policy", version)


def test_missing_file_and_half_written_version_are_refused(tmp_path):
    registry = Registry(tmp_path / "store")
    version = publish(registry, _folder(tmp_path, "a", b"w")).version
    os.remove(registry.root / "policy" / version / "sub" / "config.json")
    with pytest.raises(CorruptVersion, match="sub/config.json listed in the manifest is missing"):
        registry.open("policy", version)
    (registry.root / "policy" / "v0007").mkdir()  # copied by hand, no manifest
    with pytest.raises(CorruptVersion, match="no manifest.json: half-written"):
        registry.open("policy", "v0007")
    assert "v0007" not in registry.versions("policy")


def test_staging_folders_are_invisible_and_cleaned(tmp_path):
    registry = Registry(tmp_path / "store")
    publish(registry, _folder(tmp_path, "a", b"w"))
    assert not [p for p in (registry.root / "policy").iterdir() if p.name.startswith(".publishing-")]


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    registry = Registry(tmp_path / "store")
    folders = [_folder(tmp_path, f"f{i}", np.full(1000, i, np.uint8).tobytes()) for i in range(8)]
    results = []
    threads = [threading.Thread(target=lambda f=f: results.append(publish(Registry(tmp_path / "store"), f))) for f in folders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    versions = sorted(m.version for m in results)
    assert versions == [f"v{i:04d}" for i in range(1, 9)]
    for manifest in results:  # every version holds exactly its own bytes
        registry.open("policy", manifest.version)
