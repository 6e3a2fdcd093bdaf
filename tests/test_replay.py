"""The Redis replay stream against a real Redis (DB 13, a fresh key per test)."""

from __future__ import annotations

import logging
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid

import numpy as np
import pytest
import redis

from rise.errors import InvalidArgument
from rise.proto.v1.replay_pb2 import ReplaySample
from services.trainer.replay import MalformedSample, ReplayConfig, ReplayQueue, decode_sample, encode_sample

URL = "redis://127.0.0.1:6379/13"


@pytest.fixture(scope="module", autouse=True)
def redis_up():
    try:
        redis.Redis.from_url(URL, socket_connect_timeout=1).ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"these tests need a Redis at {URL} (make test and .ci/run start one): {exc}")


@pytest.fixture
def make_queue():
    """make_queue(**config) -> a queue on a key of its own; every queue of one test shares that key."""
    key, made = f"test:replay:{uuid.uuid4().hex}", []

    def make(**overrides) -> ReplayQueue:
        queue = ReplayQueue(ReplayConfig(url=URL, **overrides), key)
        queue.ensure_group()
        made.append(queue)
        return queue

    yield make
    if made:
        made[0].delete()


def sample_args(seed: int = 0, version: str = "v0001", size: int = 16) -> dict:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)  # smooth: JPEG keeps it close
    image = np.stack([ramp[None, :] + 0 * ramp[:, None], ramp[:, None] + 0 * ramp[None, :],
                      np.full((size, size), 40.0 * seed % 256)], axis=-1).astype(np.uint8)
    return dict(views={"head": image, "wrist": image[::-1].copy()}, state=rng.normal(size=7).astype(np.float32),
                task="push the puck", actions=rng.normal(size=(5, 4)).astype(np.float32), advantage=0.25,
                advantage_bin=7, policy_version=version, dynamics_version="v0002", value_version="v0003",
                chain_index=1, value_current=-0.5, value_imagined=[0.1, 0.2], timing_ms={"policy": 1.5},
                run_id="run-a")


def payload(seed: int = 0, version: str = "v0001", size: int = 16) -> bytes:
    return encode_sample(**sample_args(seed, version, size), frame_encoding="raw")


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_roundtrip(encoding):
    args = sample_args(3)
    item = decode_sample(encode_sample(**args, frame_encoding=encoding, jpeg_quality=95))
    for view, image in args["views"].items():
        got = item.views[view]
        assert got.dtype == np.uint8 and got.shape == image.shape
        if encoding == "raw":
            np.testing.assert_array_equal(got, image)
        else:
            assert np.abs(got.astype(int) - image).mean() < 3
    np.testing.assert_array_equal(item.state, args["state"])
    np.testing.assert_array_equal(item.actions, args["actions"])
    np.testing.assert_allclose(item.value_imagined, [0.1, 0.2], rtol=1e-6)
    assert (item.task, item.advantage_bin, item.policy_version, item.chain_index) == ("push the puck", 7, "v0001", 1)
    assert (item.advantage, item.value_current, item.timing_ms, item.run_id) == (0.25, -0.5, {"policy": 1.5}, "run-a")
    assert item.created_unix_ms > 0


def without(field: str, **changes) -> bytes:
    msg = ReplaySample.FromString(payload())
    msg.ClearField(field)
    for name, value in changes.items():
        setattr(msg, name, value)
    return msg.SerializeToString()


def test_decode_says_what_is_wrong():
    float_view = ReplaySample.FromString(payload())
    float_view.observation.views["head"].dtype = 5  # float32 header over uint8 bytes
    cases = {
        b"\xff\xffgarbage": "not a serialized ReplaySample",
        without("actions"): "no actions",
        without("observation"): "no observation views",
        without("advantage_bin"): "advantage_bin 0",
        without("policy_version", policy_version="stable"): "'stable' is not a registry version",
        float_view.SerializeToString(): "views['head']: expected uint8",
    }
    for data, message in cases.items():
        with pytest.raises(MalformedSample, match=re.escape(message)) as info:
            decode_sample(data)
        assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidArgument, match="registry version"):
        encode_sample(**{**sample_args(), "policy_version": "latest"})


def test_push_read_ack(make_queue):
    queue = make_queue()
    pushed = queue.push([payload(i) for i in range(5)])
    first = queue.read("learner-0", 3)
    second = queue.read("learner-0", 3)
    assert first.ids == pushed[:3] and second.ids == pushed[3:]  # in-flight entries are not handed out twice
    assert [it.state.tolist() for it in first.items] == [sample_args(i)["state"].tolist() for i in range(3)]
    assert queue.stats() == {"depth": 5, "pending": 5, "inserted": 5, "sampled": 0, "consumed": 0,
                             "malformed": 0, "stale": 0}
    assert queue.ack(first.ids + second.ids) == 5
    assert queue.ack(first.ids) == 0  # already acknowledged: not counted again
    stats = queue.stats()
    assert (stats["depth"], stats["pending"], stats["consumed"]) == (0, 0, 5)
    assert queue.read("learner-0", 3, block_ms=50).ids == []


def test_stream_length_stays_bounded(make_queue):
    queue = make_queue(max_length=200)
    data = payload(size=4)
    for _ in range(10):
        queue.push([data] * 100)
    stats = queue.stats()
    assert stats["inserted"] == 1000
    assert 200 <= stats["depth"] <= 400  # MAXLEN ~ trims whole nodes: approximate, but bounded


def test_dead_consumers_entries_are_reclaimed(make_queue):
    dead, alive = make_queue(reclaim_idle_ms=200), make_queue(reclaim_idle_ms=200)
    pushed = dead.push([payload(i) for i in range(3)])
    assert dead.read("learner-dead", 3).ids == pushed  # ... and never acknowledged
    assert alive.read("learner-b", 3).ids == []  # not idle long enough yet
    time.sleep(0.3)
    got = alive.read("learner-b", 3)
    assert got.ids == pushed and len(got.items) == 3
    alive.ack(got.ids)
    assert alive.stats()["pending"] == 0


def test_own_in_flight_entries_are_not_reclaimed(make_queue):
    queue = make_queue(reclaim_idle_ms=100)
    pushed = queue.push([payload(i) for i in range(4)])
    assert queue.read("learner-0", 2).ids == pushed[:2]
    time.sleep(0.2)  # idle past reclaim_idle_ms, but held by this live process until its checkpoint
    assert queue.read("learner-0", 4).ids == pushed[2:]


def test_restarted_consumer_gets_its_pending_entries_back(make_queue):
    before = make_queue()
    pushed = before.push([payload(i) for i in range(5)])
    assert before.read("learner-0", 2).ids == pushed[:2]
    assert before.read("learner-0", 1).ids == pushed[2:3]  # killed now, nothing acknowledged
    after = make_queue()  # same consumer name, new process
    assert after.read("learner-0", 2).ids == pushed[:2]
    assert after.read("learner-0", 2).ids == pushed[2:4]  # the last pending one, then a new one
    assert after.read("learner-0", 2).ids == pushed[4:]


def test_malformed_entries_are_dropped_and_counted(make_queue):
    queue = make_queue()
    good = queue.push([payload(0)])
    queue.push([b"not a protobuf \xff\xff", without("actions")])
    redis.Redis.from_url(URL).xadd(queue.key, {"other": b"x"})
    good += queue.push([payload(1)])
    batch = queue.read("learner-0", 10)
    assert batch.ids == good and batch.malformed == 3
    stats = queue.stats()
    assert (stats["malformed"], stats["depth"], stats["pending"]) == (3, 2, 2)


def test_stale_samples_are_dropped_and_counted(make_queue):
    queue = make_queue(staleness_versions=4)
    ids = queue.push([payload(0, "v0001"), payload(1, "v0002"), payload(2, "v0006")])
    batch = queue.read("learner-0", 10, current_version="v0006")
    assert batch.ids == ids[1:] and batch.stale == 1
    assert [it.policy_version for it in batch.items] == ["v0002", "v0006"]
    assert queue.stats()["stale"] == 1


def test_rate_limiter(make_queue):
    queue = make_queue(min_size_to_sample=4, samples_per_insert=1.0, error_buffer=2)
    queue.push([payload()] * 3)
    assert not queue.learner_may_sample(1)  # fewer than min_size_to_sample inserted
    t0 = time.monotonic()
    assert not queue.wait_learner(1, timeout_s=0.2)
    assert 0.2 <= time.monotonic() - t0 < 1.0
    queue.push([payload()])
    assert queue.learner_may_sample(4)  # admitted: 4 slots of 4 * 1.0 + 2
    assert not queue.learner_may_sample(3)  # 7 would be too far ahead of the inserts
    assert queue.wait_learner(2, timeout_s=0.2) and queue.stats()["sampled"] == 6
    assert not queue.wait_learner(1, timeout_s=5, stop=lambda: True)

    # Inserts may lead the learner's slots by min_size * spi + error_buffer = 6.
    assert queue.inserter_may_insert(8)
    queue.push([payload()] * 8)
    assert not queue.inserter_may_insert(1)
    assert not queue.wait_inserter(1, timeout_s=0.2)
    assert queue.learner_may_sample(1)
    assert queue.wait_inserter(1, timeout_s=0.2)
    # A push bigger than the bound waits until the learner has caught up, then goes.
    assert not queue.inserter_may_insert(20)
    assert queue.learner_may_sample(5)
    assert queue.inserter_may_insert(20)


def test_learners_racing_for_samples_never_pass_the_bound_together(make_queue):
    """Several learner ranks try-acquire at once: the check and the count are one Redis script."""
    from concurrent.futures import ThreadPoolExecutor

    queues = [make_queue(min_size_to_sample=4, samples_per_insert=1.0, error_buffer=2) for _ in range(8)]
    queues[0].push([payload()] * 40)

    def grab(queue) -> int:
        taken = 0
        while queue.learner_may_sample(3):
            taken += 3
        return taken

    with ThreadPoolExecutor(8) as pool:
        taken = sum(pool.map(grab, queues))
    assert taken == queues[0].stats()["sampled"] == 42 - 42 % 3  # 40 inserted * 1.0 + 2, in steps of 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    for _ in range(100):
        try:
            client.ping()
            return proc
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not start on port {port}")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH for a private Redis")
def test_survives_a_redis_restart(caplog):
    port = free_port()
    servers = [start_redis(port)]
    try:
        config = ReplayConfig(url=f"redis://127.0.0.1:{port}/0", retry_attempts=100, retry_backoff_s=0.05,
                              retry_backoff_max_s=0.2)
        queue = ReplayQueue(config, "rise:replay:restart")
        queue.ensure_group()
        queue.push([payload(0)])
        assert len(queue.read("learner-0", 10).ids) == 1
        servers[0].kill()
        servers[0].wait()
        restart = threading.Timer(1.0, lambda: servers.append(start_redis(port)))
        restart.start()
        with caplog.at_level(logging.WARNING, logger="rise.replay"):
            t0 = time.monotonic()
            ids = queue.push([payload(1)])  # retries until the new server answers
            assert time.monotonic() - t0 >= 0.9
            batch = queue.read("learner-0", 10)  # the group went with the data: re-created
        restart.join()
        assert batch.ids == ids and batch.items[0].state.tolist() == sample_args(1)["state"].tolist()
        messages = [r.getMessage() for r in caplog.records]
        assert any("Redis unreachable" in m for m in messages)
        assert any("re-creating" in m for m in messages)
        assert queue.stats()["inserted"] == 1  # no persistence: the counters restarted too
    finally:
        for server in servers:
            server.kill()
            server.wait()
