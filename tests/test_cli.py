"""The `rise` CLI: registry commands in-process, and `rise serve` as a real process with SIGTERM drain."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from conftest import observation
from rise.cli import app
from rise.proto.v1 import policy_pb2, policy_pb2_grpc

runner = CliRunner()


def test_models_commands(tmp_path):
    store = ["--store", str(tmp_path / "store")]
    result = runner.invoke(app, ["models", "baseline", "policy", *store])
    assert result.exit_code == 0, result.output
    assert "published policy/v0001 (linear); aliases: stable" in result.output
    runner.invoke(app, ["models", "baseline", "policy", "--alias", "candidate", *store])
    result = runner.invoke(app, ["models", "alias", "policy", "stable", "v0002", *store])
    assert result.exit_code == 0 and "stable -> v0002 (was v0001)" in result.output
    listing = runner.invoke(app, ["models", "list", *store], env={"COLUMNS": "200"})
    assert listing.exit_code == 0 and "v0002" in listing.output and "candidate" in listing.output
    bad = runner.invoke(app, ["models", "alias", "policy", "stable", "v0009", *store])
    assert bad.exit_code != 0 and "no version or alias 'v0009'" in str(bad.exception)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_then_drains_on_sigterm(tmp_path):
    store = tmp_path / "store"
    assert runner.invoke(app, ["models", "baseline", "policy", "--store", str(store)]).exit_code == 0
    port = _free_port()
    env = {**os.environ, "RISE_REGISTRY_ROOT": str(store), "RISE_SERVER__GRACE_SECONDS": "5"}
    process = subprocess.Popen([sys.executable, "-m", "rise.cli", "serve", "policy", "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            reply = policy_pb2_grpc.PolicyServiceStub(channel).Act(policy_pb2.ActRequest(observation=observation()), timeout=10)
            assert reply.meta.version == "v0001"
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        assert time.monotonic() - start < 10
        assert '"msg": "draining"' in output and '"code": "OK"' in output  # JSON access log of the call
    finally:
        if process.poll() is None:
            process.kill()
