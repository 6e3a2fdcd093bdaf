"""The agent's one typed config: a YAML file (robot_agent/configs/piper_dual.yaml), then
`RISE_AGENT_*` environment overrides, validated on load. Every limit lives here, none in code.

Units: joints in degrees (as the Piper manual and its limits are written), grippers in metres of
opening (as the embodiment's state and actions are), times in seconds.
"""

from __future__ import annotations

from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from rise.config import StrictModel, load_config
from rise.embodiment import Embodiment, load_embodiment
from rise.serving import ClientConfig

JOINTS = 6  # per Piper arm; the 7th entry of an arm's state/action is its gripper
DEFAULT_CONFIG = "piper_dual.yaml"


class PolicyConfig(StrictModel):
    # Address, TLS files, token, message size limit; `timeout_s` is the deadline of each
    # request on the stream (observation sent -> chunk back).
    client: ClientConfig = ClientConfig(address="127.0.0.1:50051", timeout_s=1.0)
    # Version id ("v0003") or alias ("stable", "candidate"); "" = the service's default alias.
    version: str = "stable"
    # Advantage bin to prompt with: 10 = best (RISE deploys the improved policy prompted so); 0 = none.
    advantage_bin: int = Field(default=10, ge=0, le=10)
    num_steps: int = Field(default=0, ge=0)
    # Ask for the next chunk once this share of the current one (or less) is left to execute.
    request_when_left: float = Field(default=0.5, gt=0, le=1)
    # Views on the wire: raw uint8 or JPEG (about 15x smaller; costs ~1 ms per view each side).
    wire_encoding: Literal["raw", "jpeg"] = "raw"
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    # Reconnect: wait backoff_s after a failure, doubling up to max_backoff_s.
    backoff_s: float = Field(default=0.05, gt=0)
    max_backoff_s: float = Field(default=2.0, gt=0)


class CameraConfig(StrictModel):
    view: str  # the embodiment's view name, e.g. "head"
    serial: str  # RealSense serial number (rs-enumerate-devices)
    width: int = Field(default=640, gt=0)
    height: int = Field(default=480, gt=0)
    fps: int = Field(default=30, gt=0)


class CamerasConfig(StrictModel):
    devices: list[CameraConfig] = Field(min_length=1)
    # A camera whose newest frame is older than this many frame periods is stalled: the agent holds.
    stall_frames: int = Field(default=3, ge=1)
    # Frames kept per camera to pick the best-matching set by timestamp.
    buffer_frames: int = Field(default=4, ge=1)
    # Observations whose views are further apart than this are counted (and logged) as skewed.
    max_skew_ms: float = Field(default=20.0, gt=0)
    # Time to wait for every camera's first frame at start.
    start_timeout_s: float = Field(default=5.0, gt=0)


class ArmConfig(StrictModel):
    # Prefix of this arm's entries in the embodiment's state/action names ("left" -> left_joint1..left_gripper).
    name: str
    channel: str  # SocketCAN interface, e.g. "can_left" (one bus per arm)
    interface: str = "socketcan"
    bitrate: int = 1_000_000


class PiperConfig(StrictModel):
    # 0x151 speed percentage the arm's own planner uses toward each target.
    move_speed_percent: int = Field(default=100, ge=0, le=100)
    # Gripper effort sent with every gripper target (0x159), in N*m.
    gripper_effort_nm: float = Field(default=1.0, ge=0, le=5.0)  # the SDK and firmware cap it at 5 N*m
    # Wait this long for the first complete feedback (joints + gripper) before refusing to start.
    feedback_timeout_s: float = Field(default=2.0, gt=0)


class WatchdogConfig(StrictModel):
    # Hold position when the newest chunk is older than this (or the service is unreachable, a
    # camera stalls, the arms stop reporting).
    chunk_timeout_s: float = Field(default=1.0, gt=0)
    # After holding this long, motion is disabled for the episode: move home slowly, disable motors.
    halt_after_s: float = Field(default=2.0, ge=0)
    # Arm feedback older than this counts as arms unreachable.
    feedback_timeout_s: float = Field(default=0.2, gt=0)


class SafetyConfig(StrictModel):
    # Joint position limits, J1..J6, degrees (AgileX's Piper manual).
    joint_min_deg: list[float] = Field(default=[-150, 0, -170, -100, -70, -120], min_length=JOINTS, max_length=JOINTS)
    joint_max_deg: list[float] = Field(default=[150, 180, 0, 100, 70, 120], min_length=JOINTS, max_length=JOINTS)
    # Per-joint speed caps, degrees per second; the per-tick cap is this / control rate.
    max_joint_speed_deg_s: list[float] = Field(default=[90.0] * JOINTS, min_length=JOINTS, max_length=JOINTS)
    gripper_min_m: float = Field(default=0.0, ge=0)
    gripper_max_m: float = Field(default=0.08, gt=0)
    max_gripper_speed_m_s: float = Field(default=0.1, gt=0)
    # An arm measured further outside the limits than this at start is refused (move it by hand).
    start_tolerance_deg: float = Field(default=2.0, ge=0)
    # Home pose, reached by a slow interpolated move at start and end.
    home_deg: list[float] = Field(default=[0.0] * JOINTS, min_length=JOINTS, max_length=JOINTS)
    home_gripper_m: float = Field(default=0.0, ge=0)
    home_speed_deg_s: float = Field(default=15.0, gt=0)
    home_gripper_speed_m_s: float = Field(default=0.02, gt=0)
    watchdog: WatchdogConfig = WatchdogConfig()

    @model_validator(mode="after")
    def _check(self) -> "SafetyConfig":
        for j, (lo, hi, home) in enumerate(zip(self.joint_min_deg, self.joint_max_deg, self.home_deg), 1):
            if not lo < hi:
                raise ValueError(f"joint {j}: joint_min_deg {lo} must be below joint_max_deg {hi}")
            if not lo <= home <= hi:
                raise ValueError(f"joint {j}: home_deg {home} is outside [{lo}, {hi}]")
        if any(s <= 0 for s in self.max_joint_speed_deg_s):
            raise ValueError(f"max_joint_speed_deg_s must be positive, got {self.max_joint_speed_deg_s}")
        if not self.gripper_min_m < self.gripper_max_m:
            raise ValueError(f"gripper_min_m {self.gripper_min_m} must be below gripper_max_m {self.gripper_max_m}")
        if not self.gripper_min_m <= self.home_gripper_m <= self.gripper_max_m:
            raise ValueError(f"home_gripper_m {self.home_gripper_m} is outside [{self.gripper_min_m}, {self.gripper_max_m}]")
        return self


class ExecutorConfig(StrictModel):
    # Control rate; None = the embodiment's (30 Hz for piper_dual).
    control_hz: float | None = Field(default=None, gt=0)
    # A chunk whose first N actions latency already consumed is used from action N on; when more
    # than this many are consumed it is refused as stale.
    max_dropped_actions: int = Field(default=15, ge=0)
    # Cross-fade old -> new chunk over at most this many actions of their overlap; None = all of it.
    crossfade_max: int | None = Field(default=None, ge=0)
    # Python's GIL switch interval while the agent runs: the control thread waits at most this long
    # for the interpreter when the camera and gRPC threads are busy (Python's default is 5 ms).
    gil_switch_interval_ms: float = Field(default=1.0, gt=0)
    # SCHED_FIFO priority (1-99) of the control loop's thread, as robot controllers run; None = the
    # normal scheduler. Needs CAP_SYS_NICE (root or `setcap`); other agent threads stay normal.
    realtime_priority: int | None = Field(default=None, ge=1, le=99)


class SimConfig(StrictModel):
    # Simulated Piper: follows targets at these rates once enabled in CAN joint mode.
    joint_speed_deg_s: float = Field(default=180.0, gt=0)
    gripper_speed_m_s: float = Field(default=0.2, gt=0)
    feedback_hz: float = Field(default=100.0, gt=0)
    # Where the simulated arms rest before the agent starts (degrees, metres).
    start_deg: list[float] = Field(default=[3.0, 8.0, -8.0, 0.0, 4.0, 0.0], min_length=JOINTS, max_length=JOINTS)
    start_gripper_m: float = Field(default=0.01, ge=0)
    # Simulated cameras (pyrealsense2 software devices): frame size and rate.
    camera_width: int = Field(default=320, gt=0)
    camera_height: int = Field(default=240, gt=0)
    camera_fps: int = Field(default=30, gt=0)


class AgentConfig(StrictModel):
    embodiment: str = "piper_dual"
    task: str = "fold the towel"
    # Length of one episode under the policy, seconds (the operator can end it earlier).
    episode_s: float = Field(default=60.0, gt=0)
    policy: PolicyConfig = PolicyConfig()
    cameras: CamerasConfig
    arms: list[ArmConfig] = Field(min_length=1)
    piper: PiperConfig = PiperConfig()
    safety: SafetyConfig = SafetyConfig()
    executor: ExecutorConfig = ExecutorConfig()
    sim: SimConfig = SimConfig()

    @cached_property
    def embodiment_spec(self) -> Embodiment:
        return load_embodiment(self.embodiment)

    @property
    def control_hz(self) -> float:
        return self.executor.control_hz or self.embodiment_spec.control_hz

    @model_validator(mode="after")
    def _check(self) -> "AgentConfig":
        emb = self.embodiment_spec
        views = [c.view for c in self.cameras.devices]
        if sorted(views) != sorted(emb.views):
            raise ValueError(f"cameras map views {views}; embodiment {emb.name!r} needs exactly {emb.views}")
        serials = [c.serial for c in self.cameras.devices]
        if len(set(serials)) != len(serials):
            raise ValueError(f"camera serials must be unique: {serials}")
        channels = [a.channel for a in self.arms]
        if len(set(channels)) != len(channels):
            raise ValueError(f"one CAN bus per arm: channels {channels} repeat")
        if len(self.arms) * (JOINTS + 1) != emb.state_dim or emb.state_dim != emb.action_dim:
            raise ValueError(f"{len(self.arms)} Piper arms give {len(self.arms) * (JOINTS + 1)} state/action entries; "
                             f"embodiment {emb.name!r} has state_dim {emb.state_dim}, action_dim {emb.action_dim}")
        if emb.state_names:
            for i, arm in enumerate(self.arms):
                want = [f"{arm.name}_joint{j}" for j in range(1, JOINTS + 1)] + [f"{arm.name}_gripper"]
                got = emb.state_names[i * (JOINTS + 1):(i + 1) * (JOINTS + 1)]
                if got != want:
                    raise ValueError(f"arm {i} {arm.name!r} expects state names {want}, embodiment has {got}")
        if self.executor.max_dropped_actions >= emb.chunk_length:
            raise ValueError(f"executor.max_dropped_actions {self.executor.max_dropped_actions} must be below "
                             f"the chunk length {emb.chunk_length}")
        return self


def load_agent_config(path: str | Path | None = None, overrides: dict | None = None) -> AgentConfig:
    """The YAML at `path` (default: the packaged piper_dual.yaml), `RISE_AGENT_*` env overrides
    (`RISE_AGENT_POLICY__VERSION=candidate`), then dotted `overrides`."""
    if path is None:
        path = resources.files("robot_agent") / "configs" / DEFAULT_CONFIG
    return load_config(AgentConfig, Path(str(path)), env_prefix="RISE_AGENT_", overrides=overrides)
