"""The robot agent end to end: simulated Piper arms (python-can virtual bus) and cameras
(pyrealsense2 software devices) against a real policy service (`rise serve policy`, a tiny linear
model) on 127.0.0.1. The agent runs as `rise-agent --sim` in a child process in which torch,
lerobot and `services` cannot be imported.
"""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from rise.embodiment import PRESETS
from rise.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
EMB = PRESETS["piper_dual"]
GRIPPER_GAIN = 0.05  # the tiny policy's gripper target per unit of the head view's mean red
DRIFT = 0.002  # rad per action the tiny policy adds to the left arm's joint 1 along a chunk

# Makes torch, lerobot and our services unimportable in a child process.
BLOCKER = """
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "lerobot", "services"}:
            raise ImportError(f"{name} is blocked: the robot agent must run without it")
sys.meta_path.insert(0, _Blocked())
"""


def publish_tiny_policy(store: Path) -> str:
    """A linear policy that holds the state, drifts the left joint 1 along each chunk and sets both
    grippers from the head camera's mean red: camera pixels visibly steer the arms."""
    from services.policy.linear import KIND, LinearPolicy

    weight = LinearPolicy.initial_weight(EMB)
    a, s = EMB.action_dim, EMB.state_dim
    for t in range(EMB.chunk_length):
        weight[t * a + 0, -1] = DRIFT * t
        for gripper in (6, 13):
            weight[t * a + gripper, gripper] = 0.0
            weight[t * a + gripper, s + 0] = GRIPPER_GAIN  # feature s + 0: head view mean red in [0, 1]
    registry = Registry(store)
    with tempfile.TemporaryDirectory() as tmp:
        LinearPolicy.save(Path(tmp), weight)
        version = registry.publish("policy", Path(tmp), kind=KIND, embodiment=EMB.model_dump(), config={}).version
    registry.set_alias("policy", "stable", version)
    return version


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PolicyServer:
    """`rise serve policy` as a child process (so that a test can kill it for real)."""

    def __init__(self, store: Path, folder: Path):
        self.port = free_port()
        config = folder / f"policy-{self.port}.yaml"
        config.write_text(f"registry_root: {store}\nembodiment: piper_dual\nserver:\n  port: {self.port}\n  log_json: false\n")
        self.log = folder / f"policy-{self.port}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "rise.cli", "serve", "policy", "--config", str(config)],
                                         cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180  # a busy shared machine can take a minute to start Python
        while "serving policy on" not in self.log.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> int:
        """SIGKILL; -> the kill time (ns since the epoch)."""
        killed = time.time_ns()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        return killed

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("agent_store")
    publish_tiny_policy(store)
    return store


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    server = PolicyServer(store, tmp_path_factory.mktemp("agent_server"))
    yield server
    server.stop()


# The machine these tests share runs other heavy jobs (load averages of 20 on 2 cores were seen):
# a starved simulator thread must not trip the watchdog's deadline and stall triggers in tests
# that are about something else. Safety limits are never loosened.
PATIENT = ("--set", "policy.client.timeout_s=5", "--set", "cameras.stall_frames=15",
           "--set", "safety.watchdog.feedback_timeout_s=1", "--set", "safety.watchdog.chunk_timeout_s=3")


def start_agent(run_dir: Path, address: str, seconds: float, *extra: str) -> subprocess.Popen:
    code = BLOCKER + "from robot_agent.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, "--sim", "--policy", address, "--seconds", str(seconds),
                             "--run-dir", str(run_dir), "--no-keyboard", *PATIENT, *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "commands.jsonl").read_text().splitlines() if line]


def test_agent_imports_without_torch_or_services():
    code = BLOCKER + ("import robot_agent, robot_agent.cli, robot_agent.agent, robot_agent.sim, robot_agent.recording\n"
                      "assert not {'torch', 'lerobot', 'services'} & {m.split('.')[0] for m in sys.modules}\n"
                      "try:\n    import torch\nexcept ImportError:\n    print('blocked')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "blocked", out.stderr


def test_camera_frames_reach_the_policy_service(server):
    """Software-device frames -> rig snapshot (letterboxed, JPEG on the wire) -> StreamAct: the
    chunk's gripper targets are what the tiny policy computes from the head frame we sent."""
    from robot_agent.agent import make_observation
    from robot_agent.cameras import CameraRig
    from robot_agent.config import load_agent_config
    from robot_agent.policy import PolicyStream
    from robot_agent.sim import SimCameras

    # A generous stall limit: this test is about the frames' path, not stalls (test_agent_cameras.py).
    config = load_agent_config(overrides={"policy.client.address": server.address, "policy.wire_encoding": "jpeg",
                                          "cameras.stall_frames": 30, "policy.client.timeout_s": 10})
    views = EMB.views
    sim = SimCameras(views, 320, 240, 30)
    sim.start()
    rig = CameraRig(config.cameras, {v: sim.source(v) for v in views}, EMB.image_height, EMB.image_width)
    rig.start()
    sent, replies = [], []
    try:
        rig.wait_ready()

        def observe():  # as the agent observes, with the arms at zero
            snapshot = rig.snapshot()
            sent.append((make_observation(snapshot, np.zeros(EMB.state_dim), config), snapshot))
            return sent[-1][0], snapshot.skew_ms

        stream = PolicyStream(config.policy, (EMB.chunk_length, EMB.action_dim), observe, replies.append)
        stream.start()
        deadline = time.monotonic() + 60
        while not replies and time.monotonic() < deadline:
            stream.request()  # again after a failure (the stream reconnects)
            time.sleep(0.02)
        stream.stop()
    finally:
        rig.stop()
        sim.stop()
    assert replies, f"no chunk: {stream.unreachable}"
    reply, (observation, snapshot) = replies[0], sent[0]
    from rise.tensors import from_tensor

    head = from_tensor(observation.views["head"], "head", "uint8", (EMB.image_height, EMB.image_width, 3))
    assert observation.views["head"].images  # JPEG on the wire
    assert head[:20].max() <= 8 and head[-20:].max() <= 8  # 320x240 letterboxed into 224x224: black bars
    assert head[112, :, 0].mean() > 150  # the simulated head view is red
    expected = GRIPPER_GAIN * head[..., 0].mean() / 255
    np.testing.assert_allclose(reply.actions[:, 6], expected, rtol=1e-3)
    assert reply.version == "v0001" and reply.observation_ns == observation.timestamp_ns
    assert set(observation.view_timestamps_ns) == set(views) and snapshot.skew_ms < 40


def test_sim_agent_runs_at_30hz_against_the_policy_service(server, tmp_path):
    seconds = 4.0
    proc = start_agent(tmp_path / "run", server.address, seconds, "--set", "safety.watchdog.halt_after_s=10")
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    log = read_log(tmp_path / "run")
    policy = [r for r in log if r["kind"] == "command" and r["phase"] == "policy"]
    run = [r for r in policy if r["mode"] == "run"]
    chunks = [r for r in log if r["kind"] == "chunk"]
    # 30 Hz: ticks on the 33.3 ms grid for the whole episode (missed ones are counted, not replayed).
    assert abs(len(policy) + summary["missed_ticks"] - seconds * 30) <= 3
    assert all(b["tick"] > a["tick"] and (b["due_ns"] - a["due_ns"]) % round(1e9 / 30) == 0 for a, b in zip(policy, policy[1:]))
    assert len(run) >= 0.5 * len(policy), summary  # the rest: holds (first chunk, or a starved box)
    assert summary["chunks_accepted"] >= 3 and summary["policy_versions"] == {"v0001": len(chunks)}
    assert summary["estop"] is None and summary["error"] is None and summary["halt_reason"] is None
    assert summary["observation_to_command_ms"]["n"] >= 3
    # Latency consumed the first actions of each chunk; the executor dropped them by timestamp. It
    # counts the ticks the control loop has reached: a starved loop behind the clock (up to a tick
    # late, or more, and then those ticks end up missed) drops fewer than the wall-clock latency, never more.
    accepted = [c for c in chunks if c["accepted"]]
    for c in accepted:
        latency_ticks = (c["received_ns"] - c["obs_ns"]) / (1e9 / 30)
        behind = 1 + summary["missed_ticks"]
        assert latency_ticks - behind - 1.5 <= c["dropped"] <= latency_ticks + 1.5, (c, summary["missed_ticks"])
    assert any(c["overlap"] > 0 for c in accepted)  # cross-faded into the chunk being executed
    # Camera pixels steered the grippers: target = 0.05 * mean red of the (red) head view.
    grippers = np.array([[r["command"][6], r["command"][13]] for r in run[-10:]])
    assert ((grippers > 0.03) & (grippers < GRIPPER_GAIN)).all(), grippers
    # The left joint 1 followed the policy's drift; every command stayed inside the limits.
    assert run[-1]["command"][0] > run[0]["command"][0]
    commands = np.array([r["command"] for r in log if r["kind"] == "command"])
    low = np.tile(np.append(np.radians([-150, 0, -170, -100, -70, -120]), 0.0), 2)
    high = np.tile(np.append(np.radians([150, 180, 0, 100, 70, 120]), 0.08), 2)
    assert ((commands >= low - 1e-9) & (commands <= high + 1e-9)).all()
    # Slow home moves at both ends, and the last command is home.
    phases = [r["phase"] for r in log if r["kind"] == "command"]
    assert phases[0] == "home_start" and phases[-1] == "home_end"
    np.testing.assert_allclose(commands[-1], 0.0, atol=1e-9)


def test_watchdog_holds_within_a_tick_when_the_policy_service_is_killed(store, tmp_path):
    server = PolicyServer(store, tmp_path)
    run_dir = tmp_path / "run"
    proc = start_agent(run_dir, server.address, 10.0, "--set", "safety.watchdog.halt_after_s=1.0")
    try:
        deadline = time.monotonic() + 60
        while True:  # until the policy drives the arms
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else ""
            log = read_log(run_dir) if (run_dir / "commands.jsonl").exists() else []
            if sum(r["kind"] == "command" and r["mode"] == "run" for r in log) >= 20:
                break
            time.sleep(0.05)
        killed_ns = server.kill()
        out, _ = proc.communicate(timeout=60)
    finally:
        server.stop()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    log = read_log(run_dir)
    period = 1e9 / 30
    after = [r for r in log if r["kind"] == "command" and r["phase"] == "policy" and r["sent_ns"] > killed_ns]
    first_hold = next(r for r in after if r["mode"] == "hold")
    hold_event = next(r for r in log if r["kind"] == "event" and r["event"] == "hold" and r["t_ns"] > killed_ns)
    holds = [r for r in after if r["mode"] == "hold"]
    # The service's death is noticed at once (the stream ends) and the next tick holds. On a starved
    # CPU the plan can run out a tick before the stream's thread reports the death: then the hold
    # begins as "the chunk ran out" and its commands say "unreachable" a few ticks later.
    assert "unreachable" in hold_event["reason"] or hold_event["reason"] == "the chunk ran out", hold_event
    first_unreachable = next(h for h in holds if "unreachable" in h["reason"])
    assert first_unreachable["due_ns"] - killed_ns <= 0.5e9, (first_unreachable["due_ns"] - killed_ns) / 1e6
    runs_after = [r for r in after if r["mode"] == "run"]
    assert len(runs_after) <= 1, runs_after
    assert first_hold["due_ns"] - killed_ns <= period + 30e6, (first_hold["due_ns"] - killed_ns) / 1e6
    # Holding = the same command again: nothing moves.
    assert all(h["command"] == holds[0]["command"] for h in holds)
    # Then motion is disabled: halt after 1 s of holding, home, motors off.
    halt = next(r for r in log if r["kind"] == "event" and r["event"] == "halt")
    # (Not later than a second more: a starved control thread can miss ticks on a busy machine.)
    assert 1.0 <= (halt["t_ns"] - hold_event["t_ns"]) / 1e9 < 2.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "unreachable" in summary["halt_reason"] and summary["estop"] is None
    assert [r for r in log if r["kind"] == "command"][-1]["phase"] == "home_end"


def test_sim_episode_is_recorded_as_a_lerobot_dataset(server, tmp_path):
    """In process (recording needs LeRobot): a short episode saved through rise.data.dataset."""
    from rise.data.dataset import open_dataset
    from robot_agent.agent import Agent
    from robot_agent.cameras import CameraRig
    from robot_agent.config import load_agent_config
    from robot_agent.piper import PiperArm
    from robot_agent.safety import ArmLimits
    from robot_agent.sim import SimCameras, SimPiperArm

    config = load_agent_config(overrides={"policy.client.address": server.address, "task": "stack the cups",
                                          **dict(kv.split("=") for kv in PATIENT[1::2]), "safety.watchdog.halt_after_s": 10})
    arms_config = [a.model_copy(update={"interface": "virtual", "channel": f"rec-{a.channel}"}) for a in config.arms]
    start = [math.radians(d) for d in config.sim.start_deg] + [config.sim.start_gripper_m]
    sims = [SimPiperArm(a.channel, start, math.radians(180), 0.2, 100) for a in arms_config]
    cams = SimCameras(EMB.views, 160, 120, 30)
    for s in sims:
        s.start()
    cams.start()
    limits = ArmLimits.from_config(config.safety, config.control_hz)
    arms = [PiperArm(a, config.piper, limits) for a in arms_config]
    rig = CameraRig(config.cameras, {v: cams.source(v) for v in EMB.views}, EMB.image_height, EMB.image_width)
    agent = Agent(config, arms, rig, tmp_path / "run", record=True, say=lambda *_: None)
    try:
        summary = agent.run(seconds=0.7)  # short: LeRobot encodes AV1 video, slow on a busy 2-core machine
    finally:
        for arm in arms:
            arm.close()
        cams.stop()
        for s in sims:
            s.stop()
    agent.success = True
    root = agent.save_recording(tmp_path / "dataset")
    dataset = open_dataset(root, EMB)
    commands = [r for r in read_log(tmp_path / "run") if r["kind"] == "command" and r["phase"] == "policy"]
    assert dataset.num_episodes == 1 and dataset.num_frames == summary["recorded_frames"] == len(commands)
    item = dataset[dataset.num_frames - 1]
    assert item["task"] == "stack the cups" and bool(item["success"])
    assert tuple(item["observation.images.head"].shape) == (3, EMB.image_height, EMB.image_width)
    np.testing.assert_allclose(item["action"].numpy(), commands[-1]["command"], atol=1e-6)
