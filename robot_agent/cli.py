"""`rise-agent`: run the robot agent on the Piper (or, with --sim, on simulated arms and cameras).

    rise-agent --config robot_agent/configs/piper_dual.yaml --policy 10.0.0.5:50051 --version stable \\
               --task "fold the towel" --seconds 60 --record episodes/ep0001
    rise-agent --sim --policy 127.0.0.1:50051 --seconds 20

Keys while it runs (when stdin is a terminal): space or e = EMERGENCY STOP, q = end the episode
(home, motors off), s = mark the episode a success (recorded with it). Signals: SIGUSR1 =
emergency stop; SIGINT / SIGTERM = end the episode, a second one = emergency stop.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path

from rise.config import ConfigError, dump_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rise-agent", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config", "-c", type=Path, help="agent YAML (default: the packaged piper_dual.yaml); "
                        "RISE_AGENT_* env vars override it")
    parser.add_argument("--sim", action="store_true", help="simulated Piper arms (python-can virtual bus) and cameras "
                        "(pyrealsense2 software devices)")
    parser.add_argument("--policy", help="policy service address host:port (overrides policy.client.address)")
    parser.add_argument("--version", help="policy version id or alias (overrides policy.version)")
    parser.add_argument("--task", help="task instruction (overrides task)")
    parser.add_argument("--seconds", type=float, help="episode length (overrides episode_s)")
    parser.add_argument("--record", type=Path, help="save the executed episode as a new LeRobot dataset here")
    parser.add_argument("--run-dir", type=Path, help="command log, summary and config go here (default runs/agent-<time>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any config override, e.g. --set safety.watchdog.halt_after_s=1 (repeatable)")
    parser.add_argument("--no-keyboard", action="store_true", help="do not read keys from stdin")
    return parser.parse_args(argv)


def _overrides(args: argparse.Namespace) -> dict:
    overrides = dict(item.split("=", 1) for item in args.set)
    for key, value in (("policy.client.address", args.policy), ("policy.version", args.version),
                       ("task", args.task), ("episode_s", args.seconds)):
        if value is not None:
            overrides[key] = value if not isinstance(value, str) else json.dumps(value)
    return overrides


def _keyboard(agent, stop: threading.Event) -> None:
    """Single keys from a terminal (cbreak mode, restored at exit)."""
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        while not stop.is_set():
            if not select.select([fd], [], [], 0.1)[0]:
                continue
            key = os.read(fd, 1).decode(errors="ignore").lower()
            if key in (" ", "e"):
                agent.estop("key pressed")
            elif key == "q":
                agent.stop("q pressed")
            elif key == "s":
                agent.success = True
                print("episode marked a success", flush=True)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from robot_agent.config import load_agent_config

    try:
        config = load_agent_config(args.config, _overrides(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"rise-agent{' --sim' if args.sim else ''} with config:\n{dump_config(config)}", flush=True)
    run_dir = args.run_dir or Path("runs") / time.strftime("agent-%Y%m%d-%H%M%S")
    if args.record is not None and args.record.exists():
        print(f"--record {args.record} already exists; datasets are written once, choose a new path", file=sys.stderr)
        return 2

    from robot_agent.agent import Agent
    from robot_agent.cameras import CameraRig, RealSenseSource
    from robot_agent.piper import PiperArm
    from robot_agent.safety import ArmLimits

    emb = config.embodiment_spec
    limits = ArmLimits.from_config(config.safety, config.control_hz)
    sims, sim_cameras = [], None
    arm_configs = config.arms
    if args.sim:
        from robot_agent.sim import SimCameras, SimPiperArm

        # Each run gets its own virtual channels (python-can's virtual bus is per process).
        arm_configs = [a.model_copy(update={"interface": "virtual", "channel": f"sim-{os.getpid()}-{a.channel}"})
                       for a in config.arms]
        start = [math.radians(d) for d in config.sim.start_deg] + [config.sim.start_gripper_m]
        sims = [SimPiperArm(a.channel, start, math.radians(config.sim.joint_speed_deg_s), config.sim.gripper_speed_m_s,
                            config.sim.feedback_hz) for a in arm_configs]
        for sim in sims:
            sim.start()
        views = [c.view for c in config.cameras.devices]
        # The head and left wrist watch the left arm's joint 1, the right wrist the right arm's.
        scene = lambda: [sims[0 if "right" not in v else -1].position()[0] for v in views]  # noqa: E731
        sim_cameras = SimCameras(views, config.sim.camera_width, config.sim.camera_height, config.sim.camera_fps, scene)
        sim_cameras.start()
        sources = {v: sim_cameras.source(v) for v in views}
    else:
        sources = {c.view: RealSenseSource(c) for c in config.cameras.devices}
    arms = [PiperArm(a, config.piper, limits) for a in arm_configs]
    cameras = CameraRig(config.cameras, sources, emb.image_height, emb.image_width)
    agent = Agent(config, arms, cameras, run_dir, record=args.record is not None)

    signal.signal(signal.SIGUSR1, lambda *_: agent.estop("SIGUSR1"))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, _frame: agent.stop(signal.Signals(number).name))
    keys_stop = threading.Event()
    if not args.no_keyboard and sys.stdin.isatty():
        threading.Thread(target=_keyboard, args=(agent, keys_stop), daemon=True).start()
        print("keys: space/e = EMERGENCY STOP, q = end episode, s = mark success", flush=True)
    try:
        summary = agent.run()
    finally:
        keys_stop.set()
        for arm in arms:
            arm.close()
        if sim_cameras is not None:
            sim_cameras.stop()
        for sim in sims:
            sim.stop()
    if args.record is not None:
        saved = agent.save_recording(args.record)
        summary["recorded_to"] = str(saved) if saved else None
        (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2), flush=True)
    print(f"run folder: {run_dir}", flush=True)
    return 1 if summary["estop"] or summary["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
