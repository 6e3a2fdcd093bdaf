"""Shared fixtures: a model store with real versions, servers on 127.0.0.1, TLS material."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import threading
from pathlib import Path

import numpy as np
import pytest

from rise.baselines import publish_baseline
from rise.embodiment import PRESETS, Embodiment
from rise.proto.v1 import common_pb2
from rise.registry import Registry
from rise.tensors import to_tensor

EMB: Embodiment = PRESETS["metaworld"]


@contextlib.contextmanager
def served(start, config):
    """A service (`start(config)`, e.g. services.value.server.start) on 127.0.0.1 in its own thread and
    event loop, so that sync test code (gRPC stubs, the CLI, asyncio.run) can call it; -> its RunningServer."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        running = asyncio.run_coroutine_threadsafe(start(config), loop).result(120)
        try:
            yield running
        finally:
            asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """A store with two baseline versions of each model; policy stable -> v0001."""
    registry = Registry(tmp_path / "store")
    for model in ("policy", "value", "dynamics"):
        for seed in (0, 1):
            publish_baseline(registry, model, EMB, seed=seed)
        registry.set_alias(model, "stable", "v0001")
    return registry


def observation(emb: Embodiment = EMB, seed: int = 0, encoding: str = "raw") -> common_pb2.Observation:
    rng = np.random.default_rng(seed)
    views = {v: to_tensor(rng.integers(0, 256, (emb.image_height, emb.image_width, 3), dtype=np.uint8), encoding)
             for v in emb.views}
    return common_pb2.Observation(views=views, state=to_tensor(rng.normal(size=emb.state_dim).astype(np.float32)),
                                  task="push the puck to the goal", timestamp_ns=123)


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all real X.509."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name: str, issuer_key=None, issuer_name=None, ca=False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
        return key, subject

    ca_key, ca_name = make("ca", ca=True)
    make("server", ca_key, ca_name, san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    make("client", ca_key, ca_name)
    return {n: folder / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
