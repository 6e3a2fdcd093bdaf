"""RealSense colour cameras by serial number -> the embodiment's views, synchronised by timestamp.

Each camera has a reader thread that letterboxes every frame to the policy's input size (the same
`resize_with_padding` the HDF5 converter uses, so a model sees one geometry in training and on
the robot) and keeps the last few. An observation takes, from every camera, the frame closest in
time to the slowest camera's newest one and reports the spread (skew). A camera whose newest
frame is older than `stall_frames` frame periods is stalled.

Frame times come from the camera when it stamps them on the host clock (global time, enabled at
start, or system time); otherwise (a hardware clock: not comparable across cameras) the arrival
time is used.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyrealsense2 as rs

from rise.data.convert import resize_with_padding
from robot_agent.config import CameraConfig, CamerasConfig
from robot_agent.executor import now_ns

log = logging.getLogger("robot_agent.cameras")
_HOST_DOMAINS = (rs.timestamp_domain.system_time, rs.timestamp_domain.global_time)


class CameraStalled(RuntimeError):
    pass


class FrameSource(Protocol):
    """Where a camera's colour frames come from: `wait` -> an rs.video_frame (RGB8) or None on timeout."""

    def wait(self, timeout_ms: int): ...

    def stop(self) -> None: ...


class RealSenseSource:
    """One physical camera: a pipeline bound to its serial number, colour stream only."""

    def __init__(self, camera: CameraConfig, context: rs.context | None = None):
        self.pipeline = rs.pipeline(context) if context is not None else rs.pipeline()
        config = rs.config()
        config.enable_device(camera.serial)
        config.enable_stream(rs.stream.color, camera.width, camera.height, rs.format.rgb8, camera.fps)
        try:
            profile = self.pipeline.start(config)
        except RuntimeError as exc:
            raise RuntimeError(f"camera {camera.view!r}: no RealSense with serial {camera.serial} streaming colour "
                               f"{camera.width}x{camera.height}@{camera.fps} ({exc}); list cameras with rs-enumerate-devices") from None
        sensor = profile.get_device().first_color_sensor()
        # Stamp frames on the host clock, so that views of different cameras (and the arm state) compare.
        if sensor.supports(rs.option.global_time_enabled):
            sensor.set_option(rs.option.global_time_enabled, 1)

    def wait(self, timeout_ms: int):
        ok, frames = self.pipeline.try_wait_for_frames(timeout_ms)
        return frames.get_color_frame() if ok else None

    def stop(self) -> None:
        self.pipeline.stop()


class QueueSource:
    """A sensor started into a frame queue (the simulated cameras' software devices)."""

    def __init__(self, queue: rs.frame_queue, on_stop=None):
        self.queue = queue
        self._on_stop = on_stop

    def wait(self, timeout_ms: int):
        ok, frame = self.queue.try_wait_for_frame(timeout_ms)
        return frame.as_video_frame() if ok else None

    def stop(self) -> None:
        if self._on_stop is not None:
            self._on_stop()


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # uint8 [H, W, 3] at the policy's input size
    timestamp_ns: int  # capture time on the host clock
    number: int
    arrival_ns: int


@dataclass(frozen=True)
class Snapshot:
    images: dict[str, np.ndarray]
    timestamps_ns: dict[str, int]
    skew_ms: float  # newest minus oldest chosen frame

    @property
    def newest_ns(self) -> int:
        return max(self.timestamps_ns.values())


class Camera:
    def __init__(self, camera: CameraConfig, source: FrameSource, height: int, width: int, buffer_frames: int):
        self.config = camera
        self.source = source
        self.height, self.width = height, width
        self.frames: deque[Frame] = deque(maxlen=buffer_frames)
        self.count = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"camera-{camera.view}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _read(self) -> None:
        timeout_ms = max(50, round(2000 / self.config.fps))
        while not self._stop.is_set():
            frame = self.source.wait(timeout_ms)
            if frame is None:
                continue
            arrival = now_ns()
            domain = frame.get_frame_timestamp_domain()
            stamp = round(frame.get_timestamp() * 1e6) if domain in _HOST_DOMAINS else arrival
            raw = np.asanyarray(frame.get_data())
            image = resize_with_padding(raw, self.height, self.width)
            if image is raw:  # already the policy's size: copy out of librealsense's frame pool
                image = raw.copy()
            with self._lock:
                self.frames.append(Frame(image, stamp, frame.get_frame_number(), arrival))
                self.count += 1

    def newest(self) -> Frame | None:
        with self._lock:
            return self.frames[-1] if self.frames else None

    def buffered(self) -> list[Frame]:
        with self._lock:
            return list(self.frames)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.source.stop()


class CameraRig:
    """The embodiment's views from several cameras."""

    def __init__(self, config: CamerasConfig, sources: dict[str, FrameSource], height: int, width: int):
        self.config = config
        self.cameras = {c.view: Camera(c, sources[c.view], height, width, config.buffer_frames) for c in config.devices}

    def start(self) -> None:
        for camera in self.cameras.values():
            camera.start()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        deadline = now_ns() + (timeout_s or self.config.start_timeout_s) * 1e9
        while now_ns() < deadline:
            if all(c.newest() is not None for c in self.cameras.values()):
                return
            threading.Event().wait(0.01)
        missing = [f"{v} (serial {c.config.serial})" for v, c in self.cameras.items() if c.newest() is None]
        raise CameraStalled(f"no frames from camera(s) {missing} within {timeout_s or self.config.start_timeout_s} s")

    def stalled(self, at_ns: int | None = None) -> list[str]:
        """Views whose newest frame arrived more than `stall_frames` frame periods ago."""
        at_ns = now_ns() if at_ns is None else at_ns
        out = []
        for view, camera in self.cameras.items():
            newest = camera.newest()
            limit_ns = self.config.stall_frames * 1e9 / camera.config.fps
            if newest is None or at_ns - newest.arrival_ns > limit_ns:
                out.append(view)
        return out

    def latest(self) -> dict[str, np.ndarray]:
        """The newest image of every view (for recording at the control rate)."""
        return {view: camera.newest().image for view, camera in self.cameras.items()}

    def snapshot(self) -> Snapshot:
        """One frame per view, matched by timestamp: the slowest camera's newest frame sets the time."""
        stalled = self.stalled()
        if stalled:
            raise CameraStalled(f"camera(s) {stalled} delivered no frame for more than {self.config.stall_frames} frame periods")
        buffers = {view: camera.buffered() for view, camera in self.cameras.items()}
        reference = min(frames[-1].timestamp_ns for frames in buffers.values())
        chosen = {view: min(frames, key=lambda f: abs(f.timestamp_ns - reference)) for view, frames in buffers.items()}
        stamps = {view: f.timestamp_ns for view, f in chosen.items()}
        return Snapshot({v: f.image for v, f in chosen.items()}, stamps, (max(stamps.values()) - min(stamps.values())) / 1e6)

    def stop(self) -> None:
        for camera in self.cameras.values():
            camera.stop()
