"""The agent: start safely, run the policy at the control rate, stop safely.

    start     cameras deliver; each arm reports, is inside its limits, is enabled in CAN joint mode
    home      slow interpolated move to the home pose
    policy    every tick (30 Hz): watchdog -> the chunk's action for this tick (or hold) -> safety
              clamp inside the driver -> CAN; the next chunk is requested asynchronously
    home      slow move home again, then motors disabled
    (e-stop)  at any moment, from a key, SIGUSR1 or a second Ctrl-C: 0x150 stop on every arm,
              latched; nothing else is sent and the agent exits without moving

The watchdog holds the last command (the arm stays where it was sent) the first tick on which the
policy service is unreachable, the newest chunk is older than `chunk_timeout_s`, the plan ran
out, a camera stalled or an arm stopped reporting; a hold that lasts `halt_after_s` ends the
episode (motion disabled: home, motors off). A fresh chunk ends a shorter hold.

Every command that leaves is logged with its timing (commands.jsonl in the run folder), and the
run's summary (tick lateness, missed ticks, observation-to-command latency) goes to summary.json.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from rise.config import dump_config
from rise.proto.v1 import common_pb2
from rise.tensors import to_tensor
from robot_agent.cameras import CameraRig, CameraStalled, Snapshot
from robot_agent.config import JOINTS, AgentConfig
from robot_agent.executor import Executor, now_ns
from robot_agent.piper import PiperArm
from robot_agent.policy import ObservationUnavailable, PolicyStream, Reply
from robot_agent.recording import EpisodeRecorder
from robot_agent.safety import SafetyError, interpolate

log = logging.getLogger("robot_agent")


class CommandLog:
    """JSON lines written by a background thread: the control loop only enqueues."""

    def __init__(self, path: Path):
        self.path = path
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="command-log", daemon=True)
        self._thread.start()

    def add(self, record: dict) -> None:
        self._queue.put(record)

    def _write(self) -> None:
        with open(self.path, "w", buffering=1) as out:  # line-buffered: readable while the agent runs
            while (record := self._queue.get()) is not None:
                out.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)


def make_observation(snapshot: Snapshot, state: np.ndarray, config: AgentConfig) -> common_pb2.Observation:
    """An Observation of synchronised views (raw or JPEG on the wire) and the measured state,
    stamped with the newest view's capture time (a chunk's action 0 is meant for that instant)."""
    encoding, quality = config.policy.wire_encoding, config.policy.jpeg_quality
    return common_pb2.Observation(
        views={v: to_tensor(image, encoding, quality) for v, image in snapshot.images.items()},
        state=to_tensor(np.asarray(state, np.float32)), task=config.task, timestamp_ns=snapshot.newest_ns,
        view_timestamps_ns=snapshot.timestamps_ns)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    array = np.asarray(values, np.float64)
    return {"n": len(values), "p50": round(float(np.percentile(array, 50)), 3),
            "p99": round(float(np.percentile(array, 99)), 3), "max": round(float(array.max()), 3)}


class Agent:
    def __init__(self, config: AgentConfig, arms: list[PiperArm], cameras: CameraRig, run_dir: Path,
                 record: bool = False, say: Callable[[str], object] = print):
        self.config = config
        self.embodiment = config.embodiment_spec
        self.arms = arms
        self.cameras = cameras
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.say = say
        self.hz = config.control_hz
        self.period_ns = round(1e9 / self.hz)
        self.executor = Executor(self.hz, self.embodiment.chunk_length, config.executor.max_dropped_actions,
                                 config.executor.crossfade_max)
        self.policy = PolicyStream(config.policy, (self.embodiment.chunk_length, self.embodiment.action_dim),
                                   self._observe, self._on_chunk)
        self.recorder = EpisodeRecorder(self.embodiment) if record else None
        self.log = CommandLog(self.run_dir / "commands.jsonl")
        self.estopped: str | None = None
        self.stop_reason: str | None = None
        self.halt_reason: str | None = None
        self.success = False
        # Measurements for the summary.
        self.lateness_ms: list[float] = []
        self.missed_ticks = 0
        self.obs_to_command_ms: list[float] = []
        self.skews_ms: list[float] = []
        self.chunks = {"accepted": 0, "refused_stale": 0, "dropped_actions": [], "round_trip_ms": [], "server_ms": []}
        self.holds = 0
        self.safety_flags = 0
        self.ticks = {"home_start": 0, "policy": 0, "home_end": 0}
        self._last_logged_chunk = 0
        (self.run_dir / "config.yaml").write_text(dump_config(config))

    # ---- operator inputs (any thread; signal handlers run in the main thread) ----
    def estop(self, reason: str) -> None:
        if self.estopped:
            return
        for arm in self.arms:
            arm.estop()
        self.estopped = reason
        self.log.add({"kind": "event", "event": "estop", "reason": reason, "t_ns": now_ns()})
        self.say(f"EMERGENCY STOP ({reason}): 0x150 sent to every arm; clear it at the robot")

    def stop(self, reason: str) -> None:
        """End the episode normally (home, motors off); a second call is an emergency stop."""
        if self.stop_reason is not None:
            self.estop(f"{reason} (second time)")
            return
        self.stop_reason = reason

    # ---- the policy thread's callbacks ----
    def _state(self) -> tuple[np.ndarray, float]:
        """-> (float64 [14] measured state in the embodiment's order, age of the oldest arm's feedback)."""
        parts, ages = zip(*(arm.state() for arm in self.arms))
        return np.concatenate(parts), max(ages)

    def _observe(self) -> tuple[common_pb2.Observation, float]:
        try:
            snapshot = self.cameras.snapshot()
        except CameraStalled as exc:
            raise ObservationUnavailable(str(exc)) from None
        state, _ = self._state()
        return make_observation(snapshot, state, self.config), snapshot.skew_ms

    def _on_chunk(self, reply: Reply) -> None:
        merge = self.executor.offer(reply.actions, reply.observation_ns, reply.chunk_id)
        self.skews_ms.append(reply.skew_ms)
        self.chunks["round_trip_ms"].append((reply.received_ns - reply.sent_ns) / 1e6)
        self.chunks["server_ms"].append(reply.server_ms)
        if merge.accepted:
            self.chunks["accepted"] += 1
            self.chunks["dropped_actions"].append(merge.dropped)
        else:
            self.chunks["refused_stale"] += 1
        self.log.add({"kind": "chunk", "chunk": reply.chunk_id, "version": reply.version, "accepted": merge.accepted,
                      "dropped": merge.dropped, "overlap": merge.overlap, "obs_ns": reply.observation_ns,
                      "sent_ns": reply.sent_ns, "received_ns": reply.received_ns, "server_ms": round(reply.server_ms, 3),
                      "skew_ms": round(reply.skew_ms, 3)})

    # ---- the control loop ----
    def _sleep_until(self, due_ns: int) -> None:
        # Sleep most of the way, then yield in short slices: time.sleep alone overshoots by up to
        # a scheduler quantum on a busy machine.
        while (remaining := due_ns - now_ns()) > 0:
            time.sleep(remaining / 1e9 - 0.001 if remaining > 2_000_000 else 0)

    def _send(self, target: np.ndarray) -> np.ndarray:
        sent = []
        for i, arm in enumerate(self.arms):
            command, flags = arm.command(target[i * (JOINTS + 1):(i + 1) * (JOINTS + 1)])
            self.safety_flags |= flags
            sent.append(command)
        return np.concatenate(sent)

    def _ticks(self, phase: str, step: Callable[[int, int], bool]) -> None:
        """Call step(tick, due_ns) on the control grid until it returns False. A tick found more
        than a period late is counted missed and skipped (never replayed in a burst)."""
        priority = self.config.executor.realtime_priority
        if priority is not None:  # only this thread, only while it runs the grid (threads started later stay normal)
            previous = os.sched_getscheduler(0), os.sched_getparam(0)
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        try:
            self._run_grid(phase, step)
        finally:
            if priority is not None:
                os.sched_setscheduler(0, previous[0], previous[1])

    def _run_grid(self, phase: str, step: Callable[[int, int], bool]) -> None:
        t0 = now_ns() + self.period_ns
        if phase == "policy":
            self.executor.start(t0)
        tick = 0
        while not self.estopped:
            due = t0 + tick * self.period_ns
            self._sleep_until(due)
            late = now_ns() - due
            if late >= self.period_ns:
                skipped = late // self.period_ns
                if phase == "policy":
                    self.missed_ticks += skipped
                tick += skipped
                due += skipped * self.period_ns
                late -= skipped * self.period_ns
            if phase == "policy":
                self.lateness_ms.append(late / 1e6)
            self.ticks[phase] += 1
            if not step(tick, due):
                return
            tick += 1

    def _log_command(self, phase: str, tick: int, due: int, mode: str, command: np.ndarray, **extra) -> None:
        sent = now_ns()
        self.log.add({"kind": "command", "phase": phase, "tick": tick, "mode": mode, "due_ns": due, "sent_ns": sent,
                      "late_ms": round((sent - due) / 1e6, 3), "command": [round(float(v), 6) for v in command], **extra})

    def _move_home(self, phase: str) -> None:
        start = np.concatenate([arm.previous for arm in self.arms])
        limits = self.arms[0].limits
        goal = np.tile(limits.home, len(self.arms))
        path = interpolate(start, goal, np.tile(limits.home_speed, len(self.arms)), self.hz)
        self.say(f"{phase}: moving home over {len(path) / self.hz:.1f} s")

        def step(tick: int, due: int) -> bool:
            if tick >= len(path):
                return False
            self._log_command(phase, tick, due, "home", self._send(path[tick]))
            return self.stop_reason is None or phase == "home_end"

        self._ticks(phase, step)

    def _policy_phase(self, seconds: float) -> None:
        watchdog = self.config.safety.watchdog
        request_when_left = self.config.policy.request_when_left
        end_ns = now_ns() + round(seconds * 1e9)
        hold_since: int | None = None

        def step(tick: int, due: int) -> bool:
            nonlocal hold_since
            now = now_ns()
            if self.stop_reason or now >= end_ns:
                self.stop_reason = self.stop_reason or f"episode of {seconds:g} s done"
                return False
            state, feedback_age = self._state()
            reason = None
            if self.policy.fatal:
                reason = self.policy.fatal
            elif self.policy.unreachable:
                reason = f"policy service unreachable ({self.policy.unreachable})"
            elif feedback_age > watchdog.feedback_timeout_s:
                reason = f"arm feedback {feedback_age * 1000:.0f} ms old"
            elif stalled := self.cameras.stalled(now):
                reason = f"camera(s) {stalled} stalled"
            elif self.executor.last_chunk_ns and now - self.executor.last_chunk_ns > watchdog.chunk_timeout_s * 1e9:
                reason = f"no fresh chunk for {(now - self.executor.last_chunk_ns) / 1e9:.2f} s"
            action, chunk_id, obs_ns = self.executor.take(tick)
            if reason is None and action is None:
                reason = "waiting for the first chunk" if not self.executor.last_chunk_ns else "the chunk ran out"
            if reason is not None:
                self.executor.clear()
                if hold_since is None:
                    hold_since = now
                    self.holds += 1
                    self.log.add({"kind": "event", "event": "hold", "reason": reason, "t_ns": now})
                elif now - hold_since >= watchdog.halt_after_s * 1e9:
                    self.halt_reason = reason
                    self.log.add({"kind": "event", "event": "halt", "reason": reason, "t_ns": now})
                    self.say(f"watchdog: held for {watchdog.halt_after_s} s ({reason}); motion disabled for this episode")
                    return False
                command = self._send(np.concatenate([arm.previous for arm in self.arms]))
                self._log_command("policy", tick, due, "hold", command, reason=reason)
            else:
                hold_since = None
                command = self._send(action)
                self._log_command("policy", tick, due, "run", command, chunk=chunk_id, obs_ns=obs_ns)
                if chunk_id != self._last_logged_chunk:  # the first command built from this chunk
                    self._last_logged_chunk = chunk_id
                    self.obs_to_command_ms.append((now_ns() - obs_ns) / 1e6)
            if self.recorder is not None:
                self.recorder.add(self.cameras.latest(), state, command)
            if not self.policy.busy and self.executor.share_left(tick + 1) <= request_when_left:
                self.policy.request()
            return True

        self.policy.start()
        try:
            self._ticks("policy", step)
        finally:
            self.policy.stop()

    # ---- the whole run ----
    def run(self, seconds: float | None = None) -> dict:
        seconds = self.config.episode_s if seconds is None else seconds
        previous_interval = sys.getswitchinterval()
        sys.setswitchinterval(self.config.executor.gil_switch_interval_ms / 1000)
        started = now_ns()
        error = None
        try:
            self.cameras.start()
            self.cameras.wait_ready()
            for arm in self.arms:
                arm.start()
            self.say(f"arms {[a.name for a in self.arms]} enabled in CAN joint mode")
            self._move_home("home_start")
            if not self.estopped and self.stop_reason is None:
                self.say(f"policy: {self.config.policy.version or 'default alias'} at {self.config.policy.client.address}, "
                         f"{self.hz:g} Hz, task {self.config.task!r}")
                self._policy_phase(seconds)
            if not self.estopped:
                self._move_home("home_end")
                for arm in self.arms:
                    arm.disable()
                self.say("home; motors disabled")
        except (SafetyError, CameraStalled) as exc:
            error = str(exc)
            self.say(f"refusing to run: {exc}")
        except BaseException as exc:  # anything unexpected while the arms may move: stop them first
            error = f"{type(exc).__name__}: {exc}"
            self.estop(f"agent error: {error}")
            raise
        finally:
            sys.setswitchinterval(previous_interval)
            self.policy.stop()
            self.cameras.stop()
            summary = self.summary(started, error)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.log.close()
        return summary

    def save_recording(self, root: Path) -> Path | None:
        if self.recorder is None or not len(self.recorder):
            return None
        return self.recorder.save(root, self.config.task, self.success)

    def summary(self, started_ns: int, error: str | None) -> dict:
        return {
            "seconds": round((now_ns() - started_ns) / 1e9, 3),
            "control_hz": self.hz,
            "ticks": dict(self.ticks),
            "missed_ticks": int(self.missed_ticks),
            "tick_lateness_ms": _percentiles(self.lateness_ms),
            "observation_to_command_ms": _percentiles(self.obs_to_command_ms),
            "round_trip_ms": _percentiles(self.chunks["round_trip_ms"]),
            "server_ms": _percentiles(self.chunks["server_ms"]),
            "view_skew_ms": _percentiles(self.skews_ms),
            "skewed_observations": sum(s > self.config.cameras.max_skew_ms for s in self.skews_ms),
            "chunks_accepted": self.chunks["accepted"],
            "chunks_refused_stale": self.chunks["refused_stale"],
            "dropped_actions": _percentiles([float(d) for d in self.chunks["dropped_actions"]]),
            "policy_versions": dict(self.policy.versions),
            "policy_failures": self.policy.failures,
            "holds": self.holds,
            "safety_clamped": {"non_finite": bool(self.safety_flags & 1), "position": bool(self.safety_flags & 2),
                               "step": bool(self.safety_flags & 4)},
            "halt_reason": self.halt_reason,
            "stop_reason": self.stop_reason,
            "estop": self.estopped,
            "error": error,
            "recorded_frames": len(self.recorder) if self.recorder is not None else 0,
        }
