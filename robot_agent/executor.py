"""Action chunks on the control grid.

Ticks are numbered from the start of the policy phase: tick k is due at t0 + k / control_hz. A
chunk answers an observation taken at `observation_timestamp_ns`, and its action i is meant for
that time + i / control_hz (common.proto), so it lands on the grid at first_tick = the tick
nearest its observation. By the time it arrives, the ticks before `next_tick` are gone: the
actions meant for them are dropped (latency consumed them). What is left is cross-faded with the
rest of the chunk being executed: over their overlap, weights move linearly from the old chunk
to the new one, so a new chunk never makes the targets jump.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

# One clock for the whole agent: nanoseconds since the Unix epoch (as Observation.timestamp_ns and
# RealSense's system/global time domains are), advanced by the monotonic clock so that a wall
# clock step during a run never moves the control grid.
_EPOCH_OFFSET_NS = time.time_ns() - time.monotonic_ns()


def now_ns() -> int:
    return time.monotonic_ns() + _EPOCH_OFFSET_NS


@dataclass(frozen=True)
class Merge:
    accepted: bool
    dropped: int  # actions latency consumed (skipped)
    overlap: int  # actions cross-faded with the previous chunk
    first_tick: int  # the tick the chunk's action 0 was meant for


class ChunkPlan:
    """The targets still to execute, one per tick from `first_tick` on. Not thread-safe by itself
    (`Executor` locks around it)."""

    def __init__(self):
        self.first_tick = 0
        self.actions = np.zeros((0, 0))

    def end_tick(self) -> int:
        """One past the last tick the plan covers."""
        return self.first_tick + len(self.actions)

    def remaining(self, next_tick: int) -> int:
        return max(0, self.end_tick() - max(next_tick, self.first_tick))

    def action_at(self, tick: int) -> np.ndarray | None:
        index = tick - self.first_tick
        return self.actions[index] if 0 <= index < len(self.actions) else None

    def clear(self) -> None:
        self.actions = self.actions[:0]

    def merge(self, actions: np.ndarray, first_tick: int, next_tick: int, max_dropped: int,
              crossfade_max: int | None) -> Merge:
        """Take a new chunk whose action 0 belongs to `first_tick`; `next_tick` is the first tick
        not yet executed."""
        actions = np.asarray(actions, np.float64)
        dropped = max(0, next_tick - first_tick)
        if dropped > max_dropped or dropped >= len(actions):
            return Merge(False, dropped, 0, first_tick)
        start = max(next_tick, first_tick)
        new = actions[start - first_tick:]
        old_from = start - self.first_tick
        old = self.actions[old_from:] if 0 <= old_from < len(self.actions) else self.actions[:0]
        overlap = min(len(old), len(new), len(new) if crossfade_max is None else crossfade_max)
        if overlap:
            new = new.copy()
            weight = (np.arange(1, overlap + 1) / (overlap + 1))[:, None]
            blended = (1 - weight) * old[:overlap] + weight * new[:overlap]
            # Where the old chunk had no number, take the new one (NaN stays NaN only if both are,
            # and the safety layer then holds that entry).
            new[:overlap] = np.where(np.isfinite(old[:overlap]), blended, new[:overlap])
        if start > next_tick:  # observation stamped ahead of the grid (clock skew): hold the first action until then
            new = np.vstack([np.repeat(new[:1], start - next_tick, axis=0), new])
            start = next_tick
        self.first_tick, self.actions = start, new
        return Merge(True, dropped, overlap, first_tick)


class Executor:
    """The plan shared by the inference thread (`offer`) and the control loop (`take`)."""

    def __init__(self, control_hz: float, chunk_length: int, max_dropped: int, crossfade_max: int | None):
        self.period_ns = round(1e9 / control_hz)
        self.chunk_length = chunk_length
        self.max_dropped = max_dropped
        self.crossfade_max = crossfade_max
        self.t0_ns = 0
        self._plan = ChunkPlan()
        self._next_tick = 0
        self._lock = threading.Lock()
        self.chunk_id = 0  # of the chunk now in the plan
        self.chunk_obs_ns = 0  # its observation's timestamp
        self.last_chunk_ns = 0  # when the newest accepted chunk arrived (now_ns)

    def start(self, t0_ns: int) -> None:
        with self._lock:
            self.t0_ns = t0_ns
            self._next_tick = 0

    def tick_time_ns(self, tick: int) -> int:
        return self.t0_ns + tick * self.period_ns

    def offer(self, actions: np.ndarray, observation_ns: int, chunk_id: int) -> Merge:
        first_tick = round((observation_ns - self.t0_ns) / self.period_ns)
        with self._lock:
            merge = self._plan.merge(actions, first_tick, self._next_tick, self.max_dropped, self.crossfade_max)
            if merge.accepted:
                self.chunk_id, self.chunk_obs_ns, self.last_chunk_ns = chunk_id, observation_ns, now_ns()
        return merge

    def take(self, tick: int) -> tuple[np.ndarray | None, int, int]:
        """The action for `tick` (None: nothing planned) and the id and observation time of its
        chunk; marks every tick up to `tick` as executed."""
        with self._lock:
            self._next_tick = tick + 1
            return self._plan.action_at(tick), self.chunk_id, self.chunk_obs_ns

    def share_left(self, next_tick: int) -> float:
        with self._lock:
            return self._plan.remaining(next_tick) / self.chunk_length

    def clear(self) -> None:
        """Forget the plan (the watchdog holds): a later chunk starts afresh, without cross-fade."""
        with self._lock:
            self._plan.clear()
