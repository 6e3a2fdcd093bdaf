"""Replicas of a model service behind one client (issue 10): round robin over the healthy ones.

Two `rise serve value` processes (the linear baseline: starts in seconds) on 127.0.0.1, one
client channel over both (`ipv4:127.0.0.1:p1,127.0.0.1:p2`). Requests per replica are read from
each process's own Prometheus counter. A replica that drains (SIGTERM: NOT_SERVING first, then
stop) stops getting calls before it goes; one killed outright costs no failed call, since the
channel retries the pure Score on the other replica.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import EMB
from rise.baselines import publish_baseline
from rise.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
SCORE = "/rise.v1.ValueService/Score"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Replica:
    """`rise serve value` as a child process with its own gRPC and /metrics ports."""

    def __init__(self, store: Path, folder: Path, name: str, drain_seconds: float = 0.0):
        self.port, self.metrics_port = _free_port(), _free_port()
        config = folder / f"{name}.yaml"
        config.write_text(f"registry_root: {store}\nserver:\n  port: {self.port}\n  metrics_port: {self.metrics_port}\n"
                          f"  log_json: false\n  drain_seconds: {drain_seconds}\n  grace_seconds: 1\n")
        self.log = open(folder / f"{name}.log", "w")
        self.process = subprocess.Popen([sys.executable, "-m", "rise.cli", "serve", "value", "--config", str(config)],
                                        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=self.log,
                                        stderr=subprocess.STDOUT)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def calls(self) -> int:
        """Finished Score RPCs, from this replica's /metrics (any code)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        pattern = rf'^rise_grpc_requests_total\{{[^}}]*method="{re.escape(SCORE)}"[^}}]*\}} ([0-9.e+]+)$'
        return int(sum(float(v) for v in re.findall(pattern, text, flags=re.M)))

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            assert self.process.poll() is None, (Path(self.log.name).read_text())[-2000:]
            try:
                self.calls()
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"replica on {self.address} not ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    registry = Registry(tmp_path_factory.mktemp("replicas") / "store")
    registry.set_alias("value", "stable", publish_baseline(registry, "value", EMB).version)
    return registry.root


@pytest.fixture
def replicas(store, tmp_path, request):
    drain = getattr(request, "param", 0.0)
    started = [Replica(store, tmp_path, f"value-{i}", drain_seconds=drain) for i in range(2)]
    try:
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        for replica in started:
            replica.stop()


def _frames(batch: int = 2):
    rng = np.random.default_rng(0)
    return {v: rng.integers(0, 256, (batch, 2, EMB.image_height, EMB.image_width, 3), dtype=np.uint8) for v in EMB.views}


@pytest.mark.parametrize("replicas", [3.0], indirect=True)  # a SIGTERMed replica reports NOT_SERVING for 3 s first
def test_calls_spread_over_two_replicas_and_avoid_one_that_drains(replicas):
    from rise.transport import connect_value

    a, b = replicas
    frames, tasks = _frames(), ["reach the goal"] * 2

    async def main():
        async with connect_value(f"ipv4:{a.address},{b.address}") as value:
            for _ in range(20):
                await value.score(frames, tasks)
            spread = (a.calls(), b.calls())
            b.process.send_signal(signal.SIGTERM)  # drain: NOT_SERVING now, still answering for 3 s
            await asyncio.sleep(0.5)  # the health watch reports it
            before = b.calls()
            for _ in range(10):
                await value.score(frames, tasks)
            during = (a.calls() - spread[0], b.calls() - before)
            b.process.wait(15)  # gone
            for _ in range(10):
                scores = await value.score(frames, tasks)
            return spread, during, scores

    spread, during, scores = asyncio.run(main())
    # round robin: every other call (the first ones go to whichever replica connected first)
    assert sum(spread) == 20 and min(spread) >= 8, spread
    assert during == (10, 0), during  # the draining replica is skipped while it still listens
    assert scores.values.shape == (2, 2) and a.calls() == spread[0] + 20


def test_a_replica_killed_under_load_costs_no_failed_call(replicas):
    """SIGKILL one of two replicas while 4 callers keep going: the channel retries Score on the other."""
    from rise.transport import connect_value

    a, b = replicas
    frames, tasks = _frames(), ["reach the goal"] * 2
    failures: list[BaseException] = []

    async def caller(value, stop: asyncio.Event, done: list[int]):
        while not stop.is_set():
            try:
                await value.score(frames, tasks, timeout_s=20)
                done[0] += 1
            except Exception as exc:  # noqa: BLE001  (counted, asserted below)
                failures.append(exc)

    async def main():
        async with connect_value(f"ipv4:{a.address},{b.address}") as value:
            stop, done = asyncio.Event(), [0]
            callers = [asyncio.create_task(caller(value, stop, done)) for _ in range(4)]
            await asyncio.sleep(1.0)
            b.process.kill()
            killed_at = done[0]
            await asyncio.sleep(2.0)
            stop.set()
            await asyncio.gather(*callers)
            return killed_at, done[0]

    killed_at, total = asyncio.run(main())
    assert not failures, failures[:3]
    assert killed_at > 0 and total > killed_at + 10  # kept answering after the kill, from the survivor
    assert a.calls() >= total - killed_at
