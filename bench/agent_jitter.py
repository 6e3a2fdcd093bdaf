"""Robot agent control-loop jitter (issue 8): `rise-agent --sim` against the policy service on loopback.

The policy service (`rise serve policy`, a tiny linear piper_dual policy that holds the state,
drifts the left joint 1 and sets the grippers from the head camera) and the agent run as two
child processes, as on a robot PC talking to a nearby server. The agent's own command log gives:

- tick lateness: how late each policy-phase tick started after its due time on the 30 Hz grid
  (p50 / p99 / max), and missed ticks (found more than one period late: skipped, not replayed);
- observation-to-command latency: from the capture time of the observation's newest view to the
  first command built from the chunk that answered it;
- the share of ticks that held (watchdog) and why.

The machine's load average is sampled every 5 s during the run and reported with the numbers.

    .venv/bin/python bench/agent_jitter.py --seconds 300 --out bench/agent_jitter.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def percentiles(values) -> dict:
    values = np.asarray(values, np.float64)
    if not len(values):
        return {"n": 0}
    return {"n": int(len(values)), "p50": round(float(np.percentile(values, 50)), 3),
            "p90": round(float(np.percentile(values, 90)), 3), "p99": round(float(np.percentile(values, 99)), 3),
            "max": round(float(values.max()), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "agent_jitter.json")
    parser.add_argument("--encoding", choices=["raw", "jpeg"], default="raw")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="agent config override passed to rise-agent, e.g. executor.realtime_priority=50")
    args = parser.parse_args()

    from test_agent_sim import PolicyServer, publish_tiny_policy  # the tests' tiny policy and server runner

    work = Path(tempfile.mkdtemp(prefix="agent_jitter_"))
    publish_tiny_policy(work / "store")
    server = PolicyServer(work / "store", work)
    loads, stop = [], threading.Event()

    def sample() -> None:
        while not stop.wait(5):
            loads.append(os.getloadavg()[0])

    threading.Thread(target=sample, daemon=True).start()
    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    run_dir = work / "run"
    try:
        out = subprocess.run([sys.executable, "-m", "robot_agent.cli", "--sim", "--policy", server.address,
                              "--seconds", str(args.seconds), "--run-dir", str(run_dir), "--no-keyboard",
                              "--set", f"policy.wire_encoding={args.encoding}", *(x for kv in args.set for x in ("--set", kv))],
                             cwd=ROOT, capture_output=True, text=True, timeout=args.seconds + 300)
    finally:
        stop.set()
        server.stop()
    if out.returncode != 0:
        raise SystemExit(f"rise-agent failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    log = [json.loads(line) for line in (run_dir / "commands.jsonl").read_text().splitlines()]
    policy = [r for r in log if r["kind"] == "command" and r["phase"] == "policy"]
    chunks = [r for r in log if r["kind"] == "chunk"]
    holds = Counter(r["reason"].split(" (")[0].split(":")[0] for r in log if r["kind"] == "event" and r["event"] == "hold")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {
        "command": f".venv/bin/python bench/agent_jitter.py --seconds {args.seconds:g} --encoding {args.encoding}"
                   + "".join(f" --set {kv}" for kv in args.set) + f" --out {args.out}",
        "machine": {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(), "date_utc": started,
                    "commit": commit, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "loadavg_1min_during": percentiles(loads)},
        "seconds": args.seconds,
        "control_hz": summary["control_hz"],
        "policy_ticks": len(policy),
        "missed_ticks": summary["missed_ticks"],
        "tick_lateness_ms": percentiles([r["late_ms"] for r in policy]),
        "tick_lateness_ms_agent_view": summary["tick_lateness_ms"],
        "observation_to_command_ms": summary["observation_to_command_ms"],
        "round_trip_ms": percentiles([(c["received_ns"] - c["sent_ns"]) / 1e6 for c in chunks]),
        "server_ms": percentiles([c["server_ms"] for c in chunks]),
        "dropped_actions": percentiles([c["dropped"] for c in chunks if c["accepted"]]),
        "chunks": len(chunks), "chunks_accepted": summary["chunks_accepted"],
        "hold_ticks": sum(r["mode"] == "hold" for r in policy), "hold_events_by_reason": dict(holds),
        "halt_reason": summary["halt_reason"], "view_skew_ms": summary["view_skew_ms"],
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
