"""AgileX Piper over CAN: the protocol (byte for byte what AgileX's piper_sdk sends and parses;
tests/test_agent_piper.py holds the SDK as the oracle) and one driver per arm on python-can.

Standard 11-bit ids, 8 data bytes, multi-byte fields big-endian:

    0x471 enable/disable   [motor (7 = all), 0x02 enable / 0x01 disable, 0 x 6]
    0x151 control mode     [ctrl mode 0x01 CAN, move mode 0x01 joint, speed %, 0x00 position-velocity,
                            residence time, installation position, 0, 0]
    0x150 emergency stop   [0x01 stop / 0x02 resume, track ctrl, teach ctrl, 0 x 5]
    0x155-0x157 joints     J1+J2, J3+J4, J5+J6 targets: int32 each, 0.001 degree
    0x159 gripper          int32 travel 0.001 mm, uint16 effort 0.001 N*m, code (0x01 enable), set-zero
    0x2A5-0x2A7 feedback   joints as 0x155-0x157
    0x2A8 feedback         gripper: int32 travel, int16 effort, uint8 status
    0x2A1 feedback         arm status: ctrl mode, arm status, mode feed, teach, motion, trajectory, uint16 error bits

Resume (0x150 0x02) cuts the motors' power on a real Piper (the SDK names it `ResetPiper`: the arm
falls), so the agent never sends it; an emergency stop is cleared by a person at the robot.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import time
from dataclasses import dataclass, field

import can
import numpy as np

from robot_agent.config import JOINTS, ArmConfig, PiperConfig
from robot_agent.safety import ArmLimits, SafetyError

log = logging.getLogger("robot_agent.piper")

ENABLE_ID = 0x471
MODE_ID = 0x151
ESTOP_ID = 0x150
JOINT_IDS = (0x155, 0x156, 0x157)
GRIPPER_ID = 0x159
STATUS_FEEDBACK_ID = 0x2A1
JOINT_FEEDBACK_IDS = (0x2A5, 0x2A6, 0x2A7)
GRIPPER_FEEDBACK_ID = 0x2A8

ALL_MOTORS = 7
ENABLE, DISABLE = 0x02, 0x01
ESTOP_STOP, ESTOP_RESUME = 0x01, 0x02
CTRL_MODE_CAN, MOVE_MODE_JOINT, POSITION_VELOCITY = 0x01, 0x01, 0x00
GRIPPER_ENABLE = 0x01


# ---- units ----------------------------------------------------------------------------------
def joint_units(radians: float) -> int:
    """Radians -> protocol units (0.001 degree), as AgileX's examples round them (x 57295.78)."""
    return round(math.degrees(radians) * 1000)


def joint_radians(units: int) -> float:
    return math.radians(units / 1000)


def gripper_units(metres: float) -> int:
    """Metres of opening -> protocol units (0.001 mm)."""
    return round(metres * 1_000_000)


# ---- encoding ---------------------------------------------------------------------------------
def enable_frame(enable: bool, motor: int = ALL_MOTORS) -> tuple[int, bytes]:
    return ENABLE_ID, bytes([motor, ENABLE if enable else DISABLE, 0, 0, 0, 0, 0, 0])


def mode_frame(speed_percent: int, ctrl_mode: int = CTRL_MODE_CAN, move_mode: int = MOVE_MODE_JOINT,
               mit_mode: int = POSITION_VELOCITY) -> tuple[int, bytes]:
    return MODE_ID, bytes([ctrl_mode, move_mode, speed_percent, mit_mode, 0, 0, 0, 0])


def estop_frame(stop: bool = True) -> tuple[int, bytes]:
    return ESTOP_ID, bytes([ESTOP_STOP if stop else ESTOP_RESUME, 0, 0, 0, 0, 0, 0, 0])


def joint_frames(units: list[int]) -> list[tuple[int, bytes]]:
    """6 joint targets in 0.001 degree -> the three frames 0x155, 0x156, 0x157."""
    return [(can_id, struct.pack(">ii", units[2 * i], units[2 * i + 1])) for i, can_id in enumerate(JOINT_IDS)]


def gripper_frame(travel: int, effort: int, code: int = GRIPPER_ENABLE, set_zero: int = 0) -> tuple[int, bytes]:
    return GRIPPER_ID, struct.pack(">iHBB", travel, effort, code, set_zero)


# Feedback frames (the simulated arm sends them; the driver parses them).
def joint_feedback_frames(units: list[int]) -> list[tuple[int, bytes]]:
    return [(can_id, struct.pack(">ii", units[2 * i], units[2 * i + 1])) for i, can_id in enumerate(JOINT_FEEDBACK_IDS)]


def gripper_feedback_frame(travel: int, effort: int, status: int = 0) -> tuple[int, bytes]:
    return GRIPPER_FEEDBACK_ID, struct.pack(">ihBx", travel, effort, status)


@dataclass(frozen=True)
class ArmStatus:
    ctrl_mode: int = 0  # 0x00 standby, 0x01 CAN command
    arm_status: int = 0  # 0x00 normal, 0x01 emergency stop, ...
    mode_feed: int = 0  # move mode echoed (0x01 joint)
    teach_status: int = 0
    motion_status: int = 0  # 0x00 reached target, 0x01 moving
    trajectory_num: int = 0
    err_code: int = 0  # bit field: joint limit / communication errors


def status_frame(status: ArmStatus) -> tuple[int, bytes]:
    return STATUS_FEEDBACK_ID, struct.pack(">BBBBBBH", status.ctrl_mode, status.arm_status, status.mode_feed,
                                           status.teach_status, status.motion_status, status.trajectory_num, status.err_code)


def to_message(frame: tuple[int, bytes]) -> can.Message:
    can_id, data = frame
    return can.Message(arbitration_id=can_id, data=data, dlc=8, is_extended_id=False)


# ---- feedback -------------------------------------------------------------------------------
@dataclass
class Feedback:
    """The newest feedback of one arm, in protocol units, with receive times (time.monotonic)."""

    joints: list[int] = field(default_factory=lambda: [0] * JOINTS)
    gripper: int = 0
    gripper_effort: int = 0
    gripper_status: int = 0
    status: ArmStatus = ArmStatus()
    # Receive time of each joint pair, of the gripper and of the status; None until first seen.
    seen: dict[int, float] = field(default_factory=dict)


def parse_feedback(message: can.Message, feedback: Feedback) -> bool:
    """Update `feedback` from one received frame; False for ids that are not Piper feedback."""
    can_id, data = message.arbitration_id, bytes(message.data)
    if can_id in JOINT_FEEDBACK_IDS:
        pair = JOINT_FEEDBACK_IDS.index(can_id)
        feedback.joints[2 * pair], feedback.joints[2 * pair + 1] = struct.unpack(">ii", data[:8])
    elif can_id == GRIPPER_FEEDBACK_ID:
        feedback.gripper, feedback.gripper_effort, feedback.gripper_status = struct.unpack(">ihB", data[:7])
    elif can_id == STATUS_FEEDBACK_ID:
        feedback.status = ArmStatus(*struct.unpack(">BBBBBBH", data[:8]))
    else:
        return False
    feedback.seen[can_id] = time.monotonic()
    return True


# ---- the driver -------------------------------------------------------------------------------
class PiperArm:
    """One Piper on its own CAN bus. Every motion command goes through `command`, which applies
    the arm's `ArmLimits` first; nothing else builds joint or gripper frames."""

    FEEDBACK_IDS = (*JOINT_FEEDBACK_IDS, GRIPPER_FEEDBACK_ID)

    def __init__(self, config: ArmConfig, piper: PiperConfig, limits: ArmLimits):
        self.name = config.name
        self.config = config
        self.piper = piper
        self.limits = limits
        self.bus = can.Bus(channel=config.channel, interface=config.interface, bitrate=config.bitrate)
        self._feedback = Feedback()
        self._lock = threading.Lock()  # feedback (notifier thread) and sends (control, e-stop threads)
        self._previous: np.ndarray | None = None  # last command sent: joints rad + gripper m
        self.estopped = False
        self.enabled = False
        self._notifier = can.Notifier(self.bus, [self._on_message], timeout=0.05)

    def _on_message(self, message: can.Message) -> None:
        with self._lock:
            parse_feedback(message, self._feedback)

    # -- feedback --
    def state(self) -> tuple[np.ndarray, float]:
        """-> (float64 [7]: joints in rad, gripper in m; age in seconds of the oldest part)."""
        with self._lock:
            fb = self._feedback
            if not all(i in fb.seen for i in self.FEEDBACK_IDS):
                return np.full(JOINTS + 1, np.nan), math.inf
            age = time.monotonic() - min(fb.seen[i] for i in self.FEEDBACK_IDS)
            joints, gripper = list(fb.joints), fb.gripper
        return np.array([joint_radians(u) for u in joints] + [gripper / 1_000_000]), age

    def status(self) -> ArmStatus:
        with self._lock:
            return self._feedback.status

    def wait_for_feedback(self, timeout_s: float) -> np.ndarray:
        deadline = time.monotonic() + timeout_s
        while True:
            state, age = self.state()
            if age < timeout_s:
                return state
            if time.monotonic() > deadline:
                raise SafetyError(f"arm {self.name}: no joint and gripper feedback on {self.config.interface} "
                                  f"{self.config.channel} within {timeout_s} s (powered? CAN up at 1 Mbit/s?)")
            time.sleep(0.01)

    # -- commands --
    def _send(self, frames: list[tuple[int, bytes]]) -> None:
        for frame in frames:
            self.bus.send(to_message(frame))

    def start(self) -> np.ndarray:
        """Wait for feedback, check the arm is inside its limits, enable motors, CAN joint mode.
        -> the measured pose (the first `previous` command)."""
        measured = self.wait_for_feedback(self.piper.feedback_timeout_s)
        start = self.limits.check_start(measured, self.name)
        with self._lock:
            if self.estopped:
                raise SafetyError(f"arm {self.name}: emergency stop is latched")
            self._previous = start
            self._send([enable_frame(True), mode_frame(self.piper.move_speed_percent)])
            self.enabled = True
        return start

    def command(self, target: np.ndarray) -> tuple[np.ndarray, int]:
        """Clamp `target` (joints rad + gripper m) to the limits and the per-tick step, then send
        0x151 + 0x155-0x157 + 0x159. -> (the command sent, safety flags). After an e-stop or
        before `start`, nothing is sent and the previous command is returned."""
        with self._lock:
            if self.estopped or not self.enabled or self._previous is None:
                held = self._previous if self._previous is not None else np.full(JOINTS + 1, np.nan)
                return held, 0
            safe, flags = self.limits.clamp(target, self._previous)
            units = [joint_units(v) for v in safe[:JOINTS]]
            self._send([mode_frame(self.piper.move_speed_percent), *joint_frames(units),
                        gripper_frame(gripper_units(safe[JOINTS]), round(self.piper.gripper_effort_nm * 1000))])
            self._previous = safe
            return safe, flags

    @property
    def previous(self) -> np.ndarray | None:
        with self._lock:
            return None if self._previous is None else self._previous.copy()

    def disable(self) -> None:
        with self._lock:
            self._send([enable_frame(False)])
            self.enabled = False

    def estop(self) -> None:
        """Emergency stop now, from any thread; latched: no motion frame leaves afterwards."""
        with self._lock:
            self.estopped = True
            try:
                self._send([estop_frame(True)])
            except can.CanError as exc:  # still latched: the control loop sends nothing more
                log.error("arm %s: e-stop frame not sent: %s", self.name, exc)

    def close(self) -> None:
        self._notifier.stop()
        self.bus.shutdown()
