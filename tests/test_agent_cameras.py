"""Cameras: pyrealsense2 software devices (the only double: no RealSense here) through the agent's
real reader threads, letterboxing, timestamp matching and stall detection."""

from __future__ import annotations

import time

import numpy as np
import pytest

from robot_agent.cameras import CameraRig, CameraStalled
from robot_agent.config import CameraConfig, CamerasConfig
from robot_agent.sim import SimCameras

VIEWS = ["head", "left_wrist", "right_wrist"]


@pytest.fixture
def rig():
    sim = SimCameras(VIEWS, 320, 240, 30)
    config = CamerasConfig(devices=[CameraConfig(view=v, serial=f"sim-{v}", width=320, height=240, fps=30) for v in VIEWS],
                           stall_frames=3)
    sim.start()
    rig = CameraRig(config, {v: sim.source(v) for v in VIEWS}, 224, 224)
    rig.start()
    rig.wait_ready()
    yield sim, rig
    rig.stop()
    sim.stop()


def test_views_are_letterboxed_and_matched_by_timestamp(rig):
    sim, rig = rig
    time.sleep(0.3)
    snapshot = rig.snapshot()
    assert set(snapshot.images) == set(VIEWS)
    for view, image in snapshot.images.items():
        # 320x240 -> 224x168 centred on black: 28 rows of bars above and below.
        assert image.shape == (224, 224, 3) and image.dtype == np.uint8
        assert image[:27].max() == 0 and image[-27:].max() == 0 and image[30:-30].mean() > 30
    # One push of the simulator stamps every view alike: the matched set has (next to) no skew.
    assert snapshot.skew_ms < 1000 / 30
    assert snapshot.newest_ns == max(snapshot.timestamps_ns.values())
    assert rig.cameras["head"].count >= 3


def test_a_stalled_camera_is_detected_within_a_few_frames(rig):
    sim, rig = rig
    assert rig.stalled() == []
    sim.stalled.add("left_wrist")
    stopped = time.monotonic()
    while "left_wrist" not in rig.stalled():
        assert time.monotonic() - stopped < 2.0
        time.sleep(0.005)
    detected = time.monotonic() - stopped
    # stall_frames = 3 at 30 fps: 100 ms after the last frame, plus scheduling on a busy machine
    # (this test's own thread included).
    assert detected < 0.1 + 0.9, detected
    # The others keep delivering. On a starved machine the simulated cameras' own thread can miss
    # a beat too, so they may look stalled for a moment: they must recover, left_wrist must not.
    deadline = time.monotonic() + 2
    while rig.stalled() != ["left_wrist"]:
        assert "left_wrist" in rig.stalled() and time.monotonic() < deadline, rig.stalled()
        time.sleep(0.01)
    with pytest.raises(CameraStalled, match="left_wrist"):
        rig.snapshot()
    sim.stalled.clear()
    deadline = time.monotonic() + 2
    while rig.stalled():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    rig.snapshot()
