"""Limits every Piper command passes before its CAN frames are built (the driver calls `clamp`).

The order matters: non-finite entries hold the previous command, then position limits, then the
per-tick step cap around the previous command. Since the previous command is itself inside the
limits (the driver refuses to start an arm measured outside them), the step stays inside too: the
limits are an interval, and a step toward any point of it from inside it stays inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from robot_agent.config import JOINTS, SafetyConfig


@dataclass(frozen=True)
class ArmLimits:
    """One arm's limits in command units: radians for the 6 joints, metres for the gripper (index 6)."""

    low: np.ndarray  # float64 [7]
    high: np.ndarray  # float64 [7]
    max_step: np.ndarray  # float64 [7]: largest change per control tick
    home: np.ndarray  # float64 [7]
    home_speed: np.ndarray  # float64 [7]: per second, for the slow home move
    start_tolerance: np.ndarray  # float64 [7]

    @classmethod
    def from_config(cls, safety: SafetyConfig, control_hz: float) -> "ArmLimits":
        rad = np.radians
        low = np.append(rad(safety.joint_min_deg), safety.gripper_min_m)
        high = np.append(rad(safety.joint_max_deg), safety.gripper_max_m)
        speed = np.append(rad(safety.max_joint_speed_deg_s), safety.max_gripper_speed_m_s)
        home = np.append(rad(safety.home_deg), safety.home_gripper_m)
        home_speed = np.append(np.full(JOINTS, rad(safety.home_speed_deg_s)), safety.home_gripper_speed_m_s)
        tolerance = np.append(np.full(JOINTS, rad(safety.start_tolerance_deg)), 0.005)
        return cls(low, high, speed / control_hz, home, np.minimum(home_speed, speed), tolerance)

    def clamp(self, target: np.ndarray, previous: np.ndarray) -> tuple[np.ndarray, int]:
        """-> (safe command, bit mask of what was changed: 1 non-finite, 2 position limit, 4 step cap)."""
        target = np.asarray(target, np.float64)
        flags = 0
        finite = np.isfinite(target)
        if not finite.all():
            flags |= 1
            target = np.where(finite, target, previous)
        limited = np.clip(target, self.low, self.high)
        if not np.array_equal(limited, target):
            flags |= 2
        step = limited - previous
        capped = np.clip(step, -self.max_step, self.max_step)
        if not np.array_equal(capped, step):
            flags |= 4
        return np.clip(previous + capped, self.low, self.high), flags

    def check_start(self, measured: np.ndarray, arm: str) -> np.ndarray:
        """The first `previous` for an arm measured at `measured`: inside the limits (clipped when
        within the start tolerance); raises when the arm is further out."""
        outside = (measured < self.low - self.start_tolerance) | (measured > self.high + self.start_tolerance)
        if outside.any() or not np.isfinite(measured).all():
            bad = [f"{'J' + str(i + 1) if i < JOINTS else 'gripper'}={_show(measured[i], i)} "
                   f"(limits {_show(self.low[i], i)}..{_show(self.high[i], i)})" for i in np.flatnonzero(outside | ~np.isfinite(measured))]
            raise SafetyError(f"arm {arm} is outside its configured limits: {', '.join(bad)}; move it inside by hand "
                              "or widen safety limits in the config")
        return np.clip(measured, self.low, self.high)


def _show(value: float, index: int) -> str:
    return f"{math.degrees(value):.1f} deg" if index < JOINTS else f"{value * 1000:.1f} mm"


class SafetyError(RuntimeError):
    """The agent refuses to move: an arm outside limits, no feedback, an emergency stop."""


def interpolate(start: np.ndarray, goal: np.ndarray, speed: np.ndarray, control_hz: float) -> np.ndarray:
    """A straight-line move start -> goal in joint space, every entry arriving together at the
    slowest entry's pace: [N, 7] targets, one per control tick, the last equal to goal."""
    distance = np.abs(goal - start)
    # Smoothstep (zero velocity at both ends, so the move starts and stops gently) peaks at 1.5x
    # its mean velocity: stretch the move so that the peak stays at `speed`.
    seconds = 1.5 * float(np.max(distance / speed)) if distance.any() else 0.0
    ticks = max(1, math.ceil(seconds * control_hz))
    fraction = np.arange(1, ticks + 1)[:, None] / ticks
    fraction = fraction * fraction * (3 - 2 * fraction)
    return start + (goal - start) * fraction
