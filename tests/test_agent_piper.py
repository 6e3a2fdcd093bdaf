"""The Piper CAN driver against AgileX's piper_sdk (the oracle), and the safety layer under fuzzing.

Frames are captured on python-can's `virtual` bus, exactly as they would leave on a real one.
"""

from __future__ import annotations

import itertools
import math

import can
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from piper_sdk import C_PiperInterface_V2
from piper_sdk.piper_msgs.msg_v2 import PiperMessage
from piper_sdk.protocol.protocol_v2 import C_PiperParserV2

from robot_agent import piper
from robot_agent.config import JOINTS, ArmConfig, PiperConfig, SafetyConfig
from robot_agent.executor import ChunkPlan
from robot_agent.safety import ArmLimits, interpolate
from robot_agent.sim import SimPiperArm

_channels = itertools.count()
INT32 = st.integers(-2**31, 2**31 - 1)


def channel() -> str:
    return f"test_piper_{next(_channels)}"


def drain(bus: can.BusABC) -> list[tuple[int, bytes]]:
    frames = []
    while (message := bus.recv(0)) is not None:  # virtual bus: delivery is synchronous
        assert not message.is_extended_id and message.dlc == 8
        frames.append((message.arbitration_id, bytes(message.data)))
    return frames


@pytest.fixture(scope="module")
def sdk():
    """piper_sdk's V2 interface on a virtual bus, and a listener that sees what it sends."""
    name = channel()
    interface = C_PiperInterface_V2(name, judge_flag=False, can_auto_init=False)
    interface.CreateCanBus(name, bustype="virtual", judge_flag=False)
    listener = can.Bus(channel=name, interface="virtual")
    yield interface, listener
    listener.shutdown()


def sent_by_sdk(sdk, call) -> list[tuple[int, bytes]]:
    interface, listener = sdk
    drain(listener)
    call(interface)
    return drain(listener)


def test_enable_disable_mode_estop_bytes_equal_sdk(sdk):
    assert [piper.enable_frame(True)] == sent_by_sdk(sdk, lambda s: s.EnableArm(7))
    assert [piper.enable_frame(False)] == sent_by_sdk(sdk, lambda s: s.DisableArm(7))
    for motor in (1, 6):
        assert [piper.enable_frame(True, motor)] == sent_by_sdk(sdk, lambda s: s.EnableArm(motor))
    for speed in (0, 30, 100):
        assert [piper.mode_frame(speed)] == sent_by_sdk(sdk, lambda s: s.MotionCtrl_2(0x01, 0x01, speed, 0x00))
        assert [piper.mode_frame(speed)] == sent_by_sdk(sdk, lambda s: s.ModeCtrl(0x01, 0x01, speed, 0x00))
    assert [piper.estop_frame(True)] == sent_by_sdk(sdk, lambda s: s.EmergencyStop(0x01))
    assert [piper.estop_frame(False)] == sent_by_sdk(sdk, lambda s: s.EmergencyStop(0x02))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(joints=st.lists(INT32, min_size=6, max_size=6), travel=INT32, effort=st.integers(0, 5000),  # the SDK refuses more than 5 N*m
       code=st.sampled_from([0x00, 0x01, 0x02, 0x03]), set_zero=st.sampled_from([0x00, 0xAE]))
def test_joint_and_gripper_targets_bytes_equal_sdk(sdk, joints, travel, effort, code, set_zero):
    assert piper.joint_frames(joints) == sent_by_sdk(sdk, lambda s: s.JointCtrl(*joints))
    assert [piper.gripper_frame(travel, effort, code, set_zero)] == sent_by_sdk(
        sdk, lambda s: s.GripperCtrl(travel, effort, code, set_zero))


@settings(max_examples=60, deadline=None)
@given(joints=st.lists(INT32, min_size=6, max_size=6), travel=INT32, effort=st.integers(-32768, 32767),
       gripper_status=st.integers(0, 255), err=st.integers(0, 65535), trajectory=st.integers(0, 255),
       # The SDK maps the status bytes onto enums; fuzz within the values it defines.
       modes=st.tuples(st.integers(0, 7), st.integers(0, 15), st.integers(0, 5), st.integers(0, 7), st.integers(0, 1)))
def test_feedback_frames_parse_like_sdk(joints, travel, effort, gripper_status, err, trajectory, modes):
    """Our feedback encoder (the simulated arm's) and parser agree with the SDK's parser."""
    parser, ours = C_PiperParserV2(), piper.Feedback()
    arm_status = piper.ArmStatus(*modes, trajectory, err)
    frames = [*piper.joint_feedback_frames(joints), piper.gripper_feedback_frame(travel, effort, gripper_status),
              piper.status_frame(arm_status)]
    sdk_joints, sdk = [None] * 6, {}
    for frame in frames:
        message = piper.to_message(frame)
        msg = PiperMessage()
        assert parser.DecodeMessage(message, msg)
        assert piper.parse_feedback(message, ours)
        if frame[0] in piper.JOINT_FEEDBACK_IDS:
            for j in range(6):
                value = getattr(msg.arm_joint_feedback, f"joint_{j + 1}")
                if value != 0 or sdk_joints[j] is None:
                    sdk_joints[j] = value
        elif frame[0] == piper.GRIPPER_FEEDBACK_ID:
            sdk["gripper"] = (msg.gripper_feedback.grippers_angle, msg.gripper_feedback.grippers_effort,
                              msg.gripper_feedback.status_code)
        else:
            s = msg.arm_status_msgs
            sdk["status"] = piper.ArmStatus(s.ctrl_mode, s.arm_status, s.mode_feed, s.teach_status, s.motion_status,
                                            s.trajectory_num, s.err_code)
    assert sdk_joints == joints == ours.joints
    assert sdk["gripper"] == (travel, effort, gripper_status) == (ours.gripper, ours.gripper_effort, ours.gripper_status)
    assert sdk["status"] == arm_status == ours.status


def test_units_match_agilex_scale():
    for rad in (0.0, 1.0, -2.617, math.pi / 2):
        assert abs(piper.joint_units(rad) - rad * 57295.7795) <= 0.5 + 1e-6
        assert abs(piper.joint_radians(piper.joint_units(rad)) - rad) < 1e-5
    assert piper.gripper_units(0.08) == 80_000


# ---- safety under fuzzing: every frame that leaves, decoded, is inside the limits ---------------
SAFETY = SafetyConfig()
HZ = 30.0
LIMITS = ArmLimits.from_config(SAFETY, HZ)
UNIT_LOW = [piper.joint_units(v) for v in LIMITS.low[:JOINTS]] + [piper.gripper_units(LIMITS.low[JOINTS])]
UNIT_HIGH = [piper.joint_units(v) for v in LIMITS.high[:JOINTS]] + [piper.gripper_units(LIMITS.high[JOINTS])]
UNIT_STEP = [piper.joint_units(v) for v in LIMITS.max_step[:JOINTS]] + [piper.gripper_units(LIMITS.max_step[JOINTS])]

wild = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-10, 10), st.just(float("nan")),
                 st.sampled_from([1e30, -1e30, 1e308, -0.0, 5e-324]))
chunks = st.lists(st.lists(wild, min_size=2 * (JOINTS + 1), max_size=2 * (JOINTS + 1)), min_size=1, max_size=12)


@pytest.fixture(scope="module")
def arm_pair():
    """A real driver and a simulated arm on one virtual bus, plus a listener recording the bus."""
    name = channel()
    sim = SimPiperArm(name, start=np.radians([5, 20, -30, 10, -5, 40]).tolist() + [0.02], joint_speed=math.radians(180),
                      gripper_speed=0.2, feedback_hz=200)
    sim.start()
    arm = piper.PiperArm(ArmConfig(name="left", channel=name, interface="virtual"), PiperConfig(), LIMITS)
    listener = can.Bus(channel=name, interface="virtual")
    arm.start()
    yield arm, listener
    listener.shutdown()
    arm.close()
    sim.stop()


# What the simulated arm reports back on the shared bus (at 200 Hz, so any drain may catch some).
SIM_FEEDBACK_IDS = (piper.STATUS_FEEDBACK_ID, *piper.PiperArm.FEEDBACK_IDS)


def sent_by_driver(frames: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    return [frame for frame in frames if frame[0] not in SIM_FEEDBACK_IDS]


def decoded_targets(frames: list[tuple[int, bytes]]) -> list[list[int]]:
    """Joint + gripper frames the driver sent -> one [7] target in protocol units per command."""
    targets, current = [], {}
    for can_id, data in frames:
        if can_id in piper.JOINT_IDS:
            current[can_id] = piper.struct.unpack(">ii", data)
        elif can_id == piper.GRIPPER_ID:
            travel = piper.struct.unpack(">i", data[:4])[0]
            targets.append([v for i in piper.JOINT_IDS for v in current.pop(i)] + [travel])
        else:  # the simulated arm's feedback shares the bus
            assert can_id in (piper.MODE_ID, *SIM_FEEDBACK_IDS), f"unexpected id {can_id:#x}"
    return targets


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk_list=st.lists(chunks, min_size=1, max_size=3), consumed=st.integers(0, 3))
def test_safety_never_lets_a_frame_out_of_limits(arm_pair, chunk_list, consumed):
    """Fuzzed chunks (NaN, inf, 1e308, anything) through the executor's cross-fade and the driver:
    every target on the bus is inside the joint/gripper limits and within the per-tick step."""
    arm, listener = arm_pair
    drain(listener)
    before = arm.previous
    plan, tick, sent = ChunkPlan(), 0, 0
    for chunk in chunk_list:
        actions = np.array(chunk, np.float64)[:, : JOINTS + 1]
        plan.merge(actions, first_tick=tick - consumed, next_tick=tick, max_dropped=5, crossfade_max=None)
        for _ in range(len(actions)):
            action = plan.action_at(tick)
            if action is not None:
                arm.command(action)
                sent += 1
            tick += 1
    targets = decoded_targets(drain(listener))
    assert len(targets) == sent
    previous = [piper.joint_units(v) for v in before[:JOINTS]] + [piper.gripper_units(before[JOINTS])]
    for target in targets:
        for i, value in enumerate(target):
            assert UNIT_LOW[i] <= value <= UNIT_HIGH[i], (i, value)
            assert abs(value - previous[i]) <= UNIT_STEP[i] + 1, (i, value, previous[i])  # +1: rounding
        previous = target


def test_home_move_is_slow_and_ends_home():
    start = np.append(np.radians([40, 60, -90, 20, 30, -60]), 0.05)
    path = interpolate(start, LIMITS.home, LIMITS.home_speed, HZ)
    assert np.allclose(path[-1], LIMITS.home)
    steps = np.abs(np.diff(np.vstack([start, path]), axis=0))
    assert (steps <= LIMITS.home_speed / HZ + 1e-12).all()
    # The slowest joint sets the pace: 90 deg at 15 deg/s, stretched 1.5x by the smooth profile.
    assert len(path) == math.ceil(1.5 * 90 / SAFETY.home_speed_deg_s * HZ)


def test_estop_is_latched_and_sent(arm_pair):
    arm, listener = arm_pair
    drain(listener)
    arm.estop()
    arm.command(LIMITS.home)
    assert sent_by_driver(drain(listener)) == [piper.estop_frame(True)]
    arm.estopped = False  # the module's other tests share this arm
