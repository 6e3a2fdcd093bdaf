"""The replay stream: imagined samples from rollout workers to the learner through a Redis Stream.

    rollout: encode_sample(...) -> push([bytes])        XADD field "sample", MAXLEN ~ max_length
    learner: read(consumer, n) -> ReplayBatch           own pending, then reclaimed, then new
             ... train, checkpoint ... ack(ids)          XACK + XDEL: the stream is a queue

Delivery is at-least-once: an entry leaves the stream only when acknowledged, so a learner that
dies gets its pending entries back under the same consumer name, and a different consumer
reclaims them once they have been idle for `reclaim_idle_ms`.

Counters live in one Redis hash beside the stream, so that several rollout processes and a
restarted learner share them: inserted (pushed), sampled (learner slots admitted by the
rate limiter), consumed (acknowledged), malformed and stale (dropped by `read`).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import redis
from google.protobuf.message import DecodeError
from pydantic import Field
from redis.backoff import NoBackoff
from redis.retry import Retry

from rise.config import StrictModel
from rise.errors import InvalidArgument
from rise.proto.v1 import common_pb2
from rise.proto.v1.replay_pb2 import ReplaySample
from rise.tensors import from_tensor, to_tensor

log = logging.getLogger("rise.replay")

FIELD = b"sample"
_POLL_S = 0.05  # limiter waits poll the counters this often
# A silent (not closed) connection fails after this long; blocking reads are kept below it.
_SOCKET_TIMEOUT_S = 30.0
_MAX_BLOCK_MS = 25_000


class ReplayConfig(StrictModel):
    url: str = "redis://127.0.0.1:6379/0"
    # Key prefix: the trainer gives a run the stream f"{stream}:{run_id}" (counters: f"{...}:counters").
    stream: str = "rise:replay"
    group: str = "learner"
    # Approximate bound on the stream length (XADD MAXLEN ~): trimming drops the oldest entries.
    max_length: int = Field(50_000, ge=1)
    # Drop samples whose policy version is more than this many versions behind the learner's.
    staleness_versions: int = Field(4, ge=0)
    # Rate limiter (Reverb-style): learner sample slots per inserted sample, the number of
    # inserts before the learner starts, and the slack either side may run ahead by.
    # Each sample is trained on once (the stream is a queue), so 1.0 keeps rollouts and learner
    # in step; above 1 the learner asks for more than imagination makes and both sides wait.
    samples_per_insert: float = Field(1.0, gt=0)
    min_size_to_sample: int = Field(64, ge=0)
    error_buffer: float = Field(256.0, ge=0)
    # Pending entries idle this long belong to a dead consumer and are handed to another.
    reclaim_idle_ms: int = Field(30_000, ge=0)
    frame_encoding: Literal["jpeg", "raw"] = "jpeg"
    jpeg_quality: int = Field(90, ge=1, le=100)
    # Reconnecting while Redis is down: 0.1, 0.2, ... 2, 2, ... s, about 60 s in all.
    retry_attempts: int = Field(34, ge=0)
    retry_backoff_s: float = Field(0.1, ge=0)
    retry_backoff_max_s: float = Field(2.0, ge=0)


class MalformedSample(InvalidArgument, ValueError):
    """A stream entry that is not a usable ReplaySample; the message says what is wrong."""


def version_number(version: str) -> int:
    """'v0003' -> 3: registry versions compare by their number."""
    match = re.fullmatch(r"v(\d+)", version)
    if match is None:
        raise InvalidArgument(f"version {version!r} is not a registry version like 'v0003'")
    return int(match[1])


# ---- codec -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplayItem:
    """A decoded sample. Raw-encoded arrays are read-only views of the message bytes."""

    views: dict[str, np.ndarray]  # uint8 [H, W, 3] per view
    state: np.ndarray  # float32 [state_dim]
    task: str
    actions: np.ndarray  # float32 [chunk_length, action_dim]
    advantage: float
    advantage_bin: int
    policy_version: str
    dynamics_version: str
    value_version: str
    chain_index: int
    value_current: float
    value_imagined: np.ndarray  # float32 [frames]: the chunk's imagined frames, then any lookahead chunks'
    timing_ms: dict[str, float]
    run_id: str
    created_unix_ms: int


def encode_sample(*, views: dict[str, np.ndarray], state: np.ndarray, task: str, actions: np.ndarray,
                  advantage: float, advantage_bin: int, policy_version: str, dynamics_version: str = "",
                  value_version: str = "", chain_index: int = 0, value_current: float = 0.0,
                  value_imagined=(), timing_ms: dict[str, float] | None = None, run_id: str = "",
                  frame_encoding: str = "jpeg", jpeg_quality: int = 90) -> bytes:
    """One imagined step as the serialized ReplaySample bytes that `push` takes."""
    version_number(policy_version)  # the staleness bound needs it: fail at the producer, not later
    observation = common_pb2.Observation(
        views={v: to_tensor(np.asarray(x), frame_encoding, jpeg_quality) for v, x in views.items()},
        state=to_tensor(np.asarray(state, np.float32)), task=task)
    return ReplaySample(
        observation=observation, actions=to_tensor(np.asarray(actions, np.float32)), advantage=advantage,
        advantage_bin=advantage_bin, policy_version=policy_version, dynamics_version=dynamics_version,
        value_version=value_version, chain_index=chain_index, value_current=value_current,
        value_imagined=list(value_imagined), timing_ms=timing_ms or {}, run_id=run_id,
        created_unix_ms=time.time_ns() // 1_000_000).SerializeToString()


def decode_sample(payload: bytes) -> ReplayItem:
    """Bytes from the stream -> ReplayItem; anything unusable raises MalformedSample."""
    try:
        msg = ReplaySample.FromString(payload)
    except (DecodeError, TypeError) as exc:  # TypeError: not bytes at all
        raise MalformedSample(f"not a serialized ReplaySample ({type(exc).__name__}: {exc})") from None
    obs = msg.observation
    if not obs.views:
        raise MalformedSample("sample has no observation views")
    for name, present in (("observation.state", obs.HasField("state")), ("actions", msg.HasField("actions"))):
        if not present:
            raise MalformedSample(f"sample has no {name}")
    if not 1 <= msg.advantage_bin <= 10:
        raise MalformedSample(f"advantage_bin {msg.advantage_bin} is outside 1..10")
    try:
        version_number(msg.policy_version)
        dims: dict[str, int] = {}  # every view has the same H, W
        views = {v: from_tensor(t, f"views[{v!r}]", "uint8", ["H", "W", 3], dims) for v, t in sorted(obs.views.items())}
        state = from_tensor(obs.state, "observation.state", "float32", [None])
        actions = from_tensor(msg.actions, "actions", "float32", [None, None])
    except InvalidArgument as exc:
        raise MalformedSample(str(exc)) from None
    return ReplayItem(
        views=views, state=state, task=obs.task, actions=actions, advantage=msg.advantage,
        advantage_bin=msg.advantage_bin, policy_version=msg.policy_version, dynamics_version=msg.dynamics_version,
        value_version=msg.value_version, chain_index=msg.chain_index, value_current=msg.value_current,
        value_imagined=np.asarray(msg.value_imagined, np.float32), timing_ms=dict(msg.timing_ms),
        run_id=msg.run_id, created_unix_ms=msg.created_unix_ms)


# ---- the queue -------------------------------------------------------------------------------
@dataclass
class ReplayBatch:
    ids: list[str] = field(default_factory=list)
    items: list[ReplayItem] = field(default_factory=list)
    malformed: int = 0  # dropped (acknowledged and deleted) because they did not decode
    stale: int = 0  # dropped because their policy version was too old


class ReplayQueue:
    """One run's stream. Thread-safe for distinct consumers (redis-py pools connections)."""

    def __init__(self, config: ReplayConfig, key: str):
        self.config, self.key, self.counters = config, key, f"{key}:counters"
        # Our loop owns retries (with logging and group re-creation), so redis-py's are off.
        self._redis = redis.Redis.from_url(config.url, socket_connect_timeout=2.0, socket_timeout=_SOCKET_TIMEOUT_S,
                                           retry=Retry(NoBackoff(), 0))
        # Per consumer: where this process is in taking back entries pending from an earlier life
        # ("0" = not started, None = done), and the ids handed out and not acknowledged yet.
        self._history: dict[str, str | None] = {}
        self._in_flight: dict[str, set[str]] = {}
        self._claim_from = "0-0"  # XAUTOCLAIM scans the pending list in pages, across reads

    # ---- plumbing ----
    def _do(self, op: Callable[[redis.Redis], object]):
        """Run `op`, riding out Redis restarts: reconnect with backoff, re-create a vanished group."""
        delay, attempt, need_group = self.config.retry_backoff_s, 0, False
        while True:
            try:
                if need_group:
                    self.ensure_group()
                return op(self._redis)
            except redis.exceptions.ResponseError as exc:
                if not str(exc).startswith("NOGROUP") or need_group:
                    raise
                # Redis restarted without persistence, or the stream was deleted: the group went too.
                log.warning("replay %s: consumer group %r is gone; re-creating it", self.key, self.config.group)
                need_group = True
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                attempt += 1
                if attempt > self.config.retry_attempts:
                    raise
                log.warning("replay %s: Redis unreachable (%s); retry %d/%d in %.2f s", self.key, exc,
                            attempt, self.config.retry_attempts, delay)
                time.sleep(delay)
                delay = min(2 * delay, self.config.retry_backoff_max_s)

    def ensure_group(self) -> None:
        """Create the stream and its consumer group if missing (idempotent)."""
        try:
            # From id 0, not $: entries pushed before the group (re)appeared must still be read.
            self._redis.xgroup_create(self.key, self.config.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    def _counts(self) -> dict[str, int]:
        raw = self._do(lambda r: r.hgetall(self.counters))
        counts = {k.decode(): int(v) for k, v in raw.items()}
        return {k: counts.get(k, 0) for k in ("inserted", "sampled", "consumed", "malformed", "stale")}

    # ---- producer ----
    def push(self, payloads: list[bytes]) -> list[str]:
        """Append encoded samples; returns their entry ids."""
        if not payloads:
            return []

        def op(r: redis.Redis):
            # MULTI/EXEC: the counter moves with the entries. A retry after a reply lost in a
            # disconnect may add them twice, which at-least-once delivery tolerates.
            pipe = r.pipeline()
            for payload in payloads:
                pipe.xadd(self.key, {FIELD: payload}, maxlen=self.config.max_length, approximate=True)
            pipe.hincrby(self.counters, "inserted", len(payloads))
            return pipe.execute()[:-1]

        return [i.decode() for i in self._do(op)]

    # ---- consumer ----
    def _xreadgroup(self, consumer: str, start: str, count: int, block_ms: int | None = None) -> list:
        got = self._do(lambda r: r.xreadgroup(self.config.group, consumer, {self.key: start}, count=count,
                                              block=block_ms))
        return got[0][1] if got else []

    def _reclaim(self, consumer: str, count: int) -> list:
        """Entries idle past `reclaim_idle_ms` in anyone's pending list, now ours."""
        def op(r: redis.Redis):
            return r.xautoclaim(self.key, self.config.group, consumer, self.config.reclaim_idle_ms,
                                self._claim_from, count=count)

        self._claim_from, claimed, *_ = self._do(op)
        # Our own in-flight entries are held on purpose (the learner acks at checkpoints), not lost.
        return [(i, f) for i, f in claimed if i.decode() not in self._in_flight.get(consumer, ())]

    def read(self, consumer: str, count: int, block_ms: int = 0, current_version: str = "") -> ReplayBatch:
        """Up to `count` samples for `consumer`; waits up to `block_ms` (0: not at all) for new ones.

        Order: entries pending for this consumer name from an earlier process (a restarted
        learner), then entries reclaimed from dead consumers, then new entries. Malformed entries
        and, when `current_version` is given, stale ones are dropped and counted.
        """
        if count <= 0:
            return ReplayBatch()
        current = version_number(current_version) if current_version else None
        entries = []
        cursor = self._history.get(consumer, "0")
        if cursor is not None:
            entries = self._xreadgroup(consumer, cursor, count)
            # Done once a page comes back short: only then do we read new entries, which must
            # not be mistaken for old pending ones on the next call.
            self._history[consumer] = entries[-1][0].decode() if len(entries) == count else None
        if len(entries) < count:
            entries += self._reclaim(consumer, count - len(entries))
        if len(entries) < count:
            block = min(block_ms, _MAX_BLOCK_MS) if block_ms > 0 and not entries else None
            entries += self._xreadgroup(consumer, ">", count - len(entries), block)

        batch, drop = ReplayBatch(), {"malformed": [], "stale": [], None: []}
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            if not fields:  # deleted (e.g. trimmed by MAXLEN) while pending: nothing to read
                drop[None].append(entry_id)
                continue
            try:
                if FIELD not in fields:
                    raise MalformedSample(f"entry has no field 'sample' (fields: {sorted(k.decode() for k in fields)})")
                item = decode_sample(fields[FIELD])
            except MalformedSample as exc:
                log.warning("replay %s: dropping malformed entry %s: %s", self.key, entry_id, exc)
                drop["malformed"].append(entry_id)
                continue
            if current is not None and current - version_number(item.policy_version) > self.config.staleness_versions:
                drop["stale"].append(entry_id)
                continue
            batch.ids.append(entry_id)
            batch.items.append(item)
        for counter, ids in drop.items():
            self._ack(ids, counter)
        batch.malformed, batch.stale = len(drop["malformed"]), len(drop["stale"])
        self._in_flight.setdefault(consumer, set()).update(batch.ids)
        return batch

    def _ack(self, ids: list[str], counter: str | None) -> int:
        if not ids:
            return 0

        def op(r: redis.Redis):
            pipe = r.pipeline()
            pipe.xack(self.key, self.config.group, *ids)
            pipe.xdel(self.key, *ids)
            return pipe.execute()[0]

        acked = self._do(op)  # only what was still pending: a twice-handed-out entry counts once
        if counter and acked:
            self._do(lambda r: r.hincrby(self.counters, counter, acked))
        for in_flight in list(self._in_flight.values()):  # a copy: other consumers' threads may add
            in_flight.difference_update(ids)
        return acked

    def ack(self, ids: list[str]) -> int:
        """Acknowledge and delete used entries; returns how many were still pending."""
        return self._ack(list(ids), "consumed")

    def stats(self) -> dict[str, int]:
        """depth (entries in the stream), pending (read, not acknowledged), and the counters."""
        def op(r: redis.Redis):
            pipe = r.pipeline(transaction=False)
            pipe.xlen(self.key)
            pipe.xpending(self.key, self.config.group)
            return pipe.execute()

        depth, pending = self._do(op)
        return {"depth": int(depth), "pending": int(pending["pending"]), **self._counts()}

    def delete(self) -> None:
        """Remove the stream (with its group) and the counters."""
        self._do(lambda r: r.delete(self.key, self.counters))

    # ---- rate limiter ----
    # Counted in learner sample *slots*, not acknowledged entries: each entry is read once, so with
    # samples_per_insert > 1 a bound on acknowledgements could never be met and rollouts would stop.
    def learner_may_sample(self, n: int) -> bool:
        """Admit the learner to use n samples if the rate allows, counting them (a try-acquire).

        One Lua script checks and counts, so learner ranks sharing the run's counters never
        admit more between them than the bound allows."""
        cfg = self.config
        admitted = self._do(lambda r: r.eval(_TRY_SAMPLE, 1, self.counters, n, cfg.samples_per_insert,
                                             cfg.min_size_to_sample, cfg.error_buffer))
        return bool(admitted)

    def inserter_may_insert(self, n: int) -> bool:
        """Whether n more inserts keep the rollouts within reach of the learner (counts nothing)."""
        c, cfg = self._counts(), self.config
        # min_size_to_sample is in the bound so the first inserts are never blocked before the
        # learner may even start.
        limit = cfg.samples_per_insert * cfg.min_size_to_sample + cfg.error_buffer
        lead = cfg.samples_per_insert * c["inserted"] - c["sampled"]
        # A push bigger than the bound itself still goes once the learner has caught up.
        return lead + cfg.samples_per_insert * n <= limit or lead <= 0

    def wait_learner(self, n: int, timeout_s: float, stop: Callable[[], bool] | None = None) -> bool:
        """`learner_may_sample` until it admits (True), `timeout_s` passes or `stop()` (False)."""
        return _wait(lambda: self.learner_may_sample(n), timeout_s, stop)

    def wait_inserter(self, n: int, timeout_s: float, stop: Callable[[], bool] | None = None) -> bool:
        """`inserter_may_insert` until it allows (True), `timeout_s` passes or `stop()` (False)."""
        return _wait(lambda: self.inserter_may_insert(n), timeout_s, stop)


# KEYS[1] the counters hash; ARGV n, samples_per_insert, min_size_to_sample, error_buffer.
_TRY_SAMPLE = """
local inserted = tonumber(redis.call('HGET', KEYS[1], 'inserted') or '0')
local sampled = tonumber(redis.call('HGET', KEYS[1], 'sampled') or '0')
local n = tonumber(ARGV[1])
if inserted < tonumber(ARGV[3]) or sampled + n - tonumber(ARGV[2]) * inserted > tonumber(ARGV[4]) then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'sampled', n)
return 1
"""


def _wait(ready: Callable[[], bool], timeout_s: float, stop: Callable[[], bool] | None) -> bool:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if (stop is not None and stop()) or time.monotonic() >= deadline:
            return False
        time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))
    return True
