"""`rise-agent --sim`: test doubles at the hardware edge only, so the rest of the agent is the real one.

- `SimPiperArm`: a Piper on python-can's `virtual` bus that speaks the real protocol: it obeys
  0x471 enable/disable, 0x151 mode, 0x150 e-stop, follows 0x155-0x157 / 0x159 targets at a rate
  limit once enabled in CAN joint mode, and sends 0x2A5-0x2A8 and 0x2A1 feedback.
- `SimCameras`: one pyrealsense2 software device per view, pushing RGB frames stamped on the host
  clock into the frame queue the agent's `Camera` reads, as a RealSense pipeline would. The
  pictures move with the simulated arms (a bar per joint 1), so frames differ as the robot moves.
"""

from __future__ import annotations

import math
import threading
import time

import can
import numpy as np
import pyrealsense2 as rs

from robot_agent import piper
from robot_agent.cameras import QueueSource
from robot_agent.config import JOINTS
from robot_agent.executor import now_ns


class SimPiperArm:
    def __init__(self, channel: str, start: list[float], joint_speed: float, gripper_speed: float, feedback_hz: float):
        """start: 6 joints (rad) + gripper (m); speeds in rad/s and m/s."""
        self.channel = channel
        self.bus = can.Bus(channel=channel, interface="virtual")
        self._position = np.array(start, np.float64)
        self._target: np.ndarray | None = None
        self._speed = np.append(np.full(JOINTS, joint_speed), gripper_speed)
        self._period = 1.0 / feedback_hz
        self.enabled = False
        self.ctrl_mode = 0x00
        self.move_mode = 0x00
        self.estopped = False
        self.received = 0  # frames handled
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sim-piper-{channel}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def position(self) -> np.ndarray:
        with self._lock:
            return self._position.copy()

    def _handle(self, message: can.Message) -> None:
        can_id, data = message.arbitration_id, bytes(message.data)
        self.received += 1
        if can_id == piper.ENABLE_ID and data[0] in (piper.ALL_MOTORS, 0xFF):
            self.enabled = data[1] == piper.ENABLE
            if not self.enabled:
                self._target = None
        elif can_id == piper.MODE_ID:
            self.ctrl_mode, self.move_mode = data[0], data[1]
        elif can_id == piper.ESTOP_ID:
            if data[0] == piper.ESTOP_STOP:
                self.estopped = True
            elif data[0] == piper.ESTOP_RESUME:  # a real Piper cuts power here: motors off
                self.estopped, self.enabled, self._target = False, False, None
        elif can_id in piper.JOINT_IDS:
            pair = piper.JOINT_IDS.index(can_id)
            units = piper.struct.unpack(">ii", data)
            target = self._position.copy() if self._target is None else self._target
            target[2 * pair:2 * pair + 2] = [piper.joint_radians(u) for u in units]
            self._target = target
        elif can_id == piper.GRIPPER_ID:
            travel, _effort, code, _zero = piper.struct.unpack(">iHBB", data)
            target = self._position.copy() if self._target is None else self._target
            if code & piper.GRIPPER_ENABLE:
                target[JOINTS] = travel / 1_000_000
            self._target = target

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            while (message := self.bus.recv(0)) is not None:
                with self._lock:
                    self._handle(message)
            with self._lock:
                following = (self.enabled and not self.estopped and self.ctrl_mode == piper.CTRL_MODE_CAN
                             and self.move_mode == piper.MOVE_MODE_JOINT and self._target is not None)
                moving = False
                if following:
                    step = np.clip(self._target - self._position, -self._speed * self._period, self._speed * self._period)
                    self._position += step
                    moving = bool(np.any(np.abs(step) > 1e-9))
                units = [piper.joint_units(v) for v in self._position[:JOINTS]]
                gripper = piper.gripper_units(self._position[JOINTS])
                status = piper.ArmStatus(ctrl_mode=self.ctrl_mode, arm_status=0x01 if self.estopped else 0x00,
                                         mode_feed=self.move_mode, motion_status=int(moving))
            for frame in (*piper.joint_feedback_frames(units), piper.gripper_feedback_frame(gripper, 0),
                          piper.status_frame(status)):
                self.bus.send(piper.to_message(frame))
            next_t += self._period
            self._stop.wait(max(0.0, next_t - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.bus.shutdown()


# Base colour of each simulated view (RGB): the head view is mostly red, the wrists green and blue.
_VIEW_COLOURS = [(200, 60, 40), (40, 170, 60), (40, 70, 190)]


class SimCameras:
    """Software-device cameras, one per view; `scene()` -> the joint-1 angle (rad) each view shows."""

    def __init__(self, views: list[str], width: int, height: int, fps: int, scene=None):
        self.views, self.width, self.height, self.fps = views, width, height, fps
        self.scene = scene or (lambda: [0.0] * len(views))
        self.stalled: set[str] = set()  # views that stop delivering (tests)
        self._devices = []
        self.queues: dict[str, rs.frame_queue] = {}
        for uid, view in enumerate(views):
            device = rs.software_device()
            device.register_info(rs.camera_info.name, f"rise sim camera {view}")
            device.register_info(rs.camera_info.serial_number, f"sim-{view}")
            sensor = device.add_sensor("RGB Camera")
            stream = rs.video_stream()
            stream.type, stream.index, stream.uid = rs.stream.color, 0, uid
            stream.width, stream.height, stream.fps, stream.bpp, stream.fmt = width, height, fps, 3, rs.format.rgb8
            intrinsics = rs.intrinsics()
            intrinsics.width, intrinsics.height = width, height
            intrinsics.fx = intrinsics.fy = float(width)
            intrinsics.ppx, intrinsics.ppy = width / 2, height / 2
            intrinsics.model, intrinsics.coeffs = rs.distortion.none, [0.0] * 5
            stream.intrinsics = intrinsics
            profile = sensor.add_video_stream(stream).as_video_stream_profile()
            queue = rs.frame_queue(4)
            sensor.open(profile)
            sensor.start(queue)
            self._devices.append((view, device, sensor, profile))
            self.queues[view] = queue
        self._base = [np.empty((height, width, 3), np.uint8) for _ in views]
        for base, colour in zip(self._base, _VIEW_COLOURS * len(views)):
            base[:] = colour
            base[:, :, :] = base + np.linspace(0, 40, height, dtype=np.uint8)[:, None, None]  # a soft vertical gradient
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="sim-cameras", daemon=True)

    def source(self, view: str) -> QueueSource:
        return QueueSource(self.queues[view])

    def start(self) -> None:
        self._thread.start()

    def _pump(self) -> None:
        period, number = 1.0 / self.fps, 0
        next_t = time.monotonic()
        bar = max(2, self.width // 20)
        while not self._stop.is_set():
            number += 1
            angles = self.scene()
            stamp_ms = now_ns() / 1e6
            for i, (view, _device, sensor, profile) in enumerate(self._devices):
                if view in self.stalled:
                    continue
                pixels = self._base[i].copy()
                x = int((math.sin(angles[i]) * 0.5 + 0.5) * (self.width - bar))
                pixels[:, x:x + bar] = 255
                frame = rs.software_video_frame()
                frame.pixels, frame.stride, frame.bpp = pixels, self.width * 3, 3
                frame.timestamp, frame.domain, frame.frame_number = stamp_ms, rs.timestamp_domain.system_time, number
                frame.profile = profile
                sensor.on_video_frame(frame)
            next_t += period
            self._stop.wait(max(0.0, next_t - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for _view, _device, sensor, _profile in self._devices:
            sensor.stop()
            sensor.close()
