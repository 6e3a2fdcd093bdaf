"""The policy client: `PolicyService.StreamAct` in a background thread with its own asyncio loop.

Asynchronous inference: the control loop calls `request()` once the chunk it executes has
`request_when_left` of its length (or less) left; this thread then takes an observation, sends
it and hands the chunk to `on_chunk` while the arms keep moving. One request is in flight at a
time (a stream answers in order).

Failures: every request has a deadline (`client.timeout_s`). A missed deadline or a broken
stream (the service went away: the call ends the moment its connection drops, even between
requests) marks the service unreachable at once, so the control loop holds on its next tick; the
stream is then reopened after a backoff that doubles up to `max_backoff_s`, and the first chunk
that arrives clears the mark. Status codes that a retry cannot fix (unknown version, bad token,
an embodiment mismatch) are fatal: the agent holds, then halts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np

from rise.errors import InvalidArgument
from rise.proto.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from rise.serving import open_channel
from rise.tensors import from_tensor
from robot_agent.config import PolicyConfig
from robot_agent.executor import now_ns

log = logging.getLogger("robot_agent.policy")

# Retrying cannot fix these: the config (version, token, TLS, embodiment) is wrong.
FATAL_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED,
                         grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED})


@dataclass(frozen=True)
class Reply:
    chunk_id: int
    actions: np.ndarray  # float32 [chunk_length, action_dim]
    observation_ns: int  # timestamp of the observation it answers
    sent_ns: int
    received_ns: int
    version: str  # the version that answered (never an alias)
    server_ms: float
    skew_ms: float  # of the observation's views


class ObservationUnavailable(RuntimeError):
    """Raised by the observe callback when no observation can be taken (a stalled camera)."""


class _StreamBroken(Exception):
    pass


class PolicyStream:
    def __init__(self, config: PolicyConfig, chunk_shape: tuple[int, int],
                 observe: Callable[[], tuple[common_pb2.Observation, float]], on_chunk: Callable[[Reply], None]):
        """observe() -> (Observation, skew_ms), called in this client's thread."""
        self.config = config
        self.chunk_shape = chunk_shape
        self.observe = observe
        self.on_chunk = on_chunk
        self.unreachable: str | None = None
        self.unreachable_since_ns = now_ns()
        self.fatal: str | None = None
        self.busy = False  # a request is wanted or in flight
        self.versions: dict[str, int] = {}  # version -> chunks it answered
        self.failures = 0
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="policy-client", daemon=True)

    # -- called from other threads --
    def start(self) -> None:
        self._thread.start()
        self._ready.wait(5)

    def request(self) -> None:
        """Ask for the next chunk (ignored while one is wanted or in flight)."""
        if self.busy or self._loop is None or self.fatal:
            return
        self.busy = True
        self._loop.call_soon_threadsafe(self._wake.set)

    def stop(self) -> None:
        self._stopping = True
        if self._thread.is_alive() and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the loop just closed on its own
                pass
            self._thread.join(timeout=5)

    # -- the client thread --
    def _mark(self, reason: str) -> None:
        if self._stopping:
            return
        if self.unreachable is None:
            self.unreachable_since_ns = now_ns()
            log.warning("policy service unreachable: %s", reason)
        self.unreachable = reason

    async def _main(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        backoff = self.config.backoff_s
        request_id = 0
        async with open_channel(self.config.client) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            while not self._stopping:
                call = stub.StreamAct()
                ended = asyncio.Event()

                def on_done(done_call, ended=ended):
                    # The stream ended without us: the connection dropped (a killed service ends
                    # the call at once, even while no request is in flight).
                    ended.set()
                    if not done_call.cancelled():
                        self._mark(f"stream ended: {done_call.code().name}")
                call.add_done_callback(on_done)
                try:
                    while not self._stopping:
                        if not await self._wait_for_request(ended):
                            break
                        self._wake.clear()
                        try:
                            observation, skew_ms = self.observe()
                        except Exception as exc:  # ObservationUnavailable: a stalled camera (the agent's
                            # watchdog sees the stall itself); the control loop asks again next tick
                            log.warning("no observation: %s", exc)
                            self.busy = False
                            continue
                        request_id += 1
                        request = policy_pb2.ActRequest(
                            observation=observation, model=common_pb2.ModelRef(version=self.config.version),
                            advantage_bin=self.config.advantage_bin, num_steps=self.config.num_steps,
                            request_id=str(request_id))
                        sent = now_ns()
                        reply = await asyncio.wait_for(self._round_trip(call, request), self.config.client.timeout_s)
                        actions = from_tensor(reply.chunk.actions, "chunk.actions", "float32", self.chunk_shape)
                        received = now_ns()
                        self.versions[reply.meta.version] = self.versions.get(reply.meta.version, 0) + 1
                        self.unreachable, backoff = None, self.config.backoff_s
                        self.on_chunk(Reply(request_id, actions, observation.timestamp_ns, sent, received,
                                            reply.meta.version, reply.meta.timing.total_ms, skew_ms))
                        self.busy = False
                except asyncio.TimeoutError:
                    self._mark(f"no chunk within the {self.config.client.timeout_s} s deadline")
                except _StreamBroken as exc:
                    self._mark(str(exc))
                except grpc.aio.AioRpcError as exc:
                    self._mark(f"{exc.code().name}: {exc.details()}")
                    if exc.code() in FATAL_CODES:
                        self.fatal = f"policy service refused the request ({exc.code().name}): {exc.details()}"
                except InvalidArgument as exc:
                    self.fatal = f"policy service answered a chunk this robot cannot execute: {exc}"
                    self._mark(self.fatal)
                finally:
                    call.cancel()
                if self.fatal:
                    log.error("%s", self.fatal)
                if self.fatal or self._stopping:
                    break
                self.failures += 1
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, self.config.max_backoff_s)
                self.busy = False

    async def _wait_for_request(self, ended: asyncio.Event) -> bool:
        """Until a request is wanted (True), or the stream ended / the client stops (False)."""
        if self._wake.is_set():
            return not self._stopping
        waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(ended.wait())]
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if ended.is_set() and not self._stopping:
            raise _StreamBroken("the stream ended between requests")
        return not self._stopping

    @staticmethod
    async def _round_trip(call, request):
        await call.write(request)
        reply = await call.read()
        if reply is grpc.aio.EOF:
            raise _StreamBroken("the service closed the stream")
        return reply
