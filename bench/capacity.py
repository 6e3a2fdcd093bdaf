"""Capacity planning: replicas of each service for a target imagined samples/s and learner steps/s.

    .venv/bin/python bench/capacity.py                                    # the plans for the tiers below
    .venv/bin/python bench/capacity.py --learner-steps-per-s 2 --imagined-per-s 0   # another target

The arithmetic (one imagined sample = one policy chunk, one imagined chunk, 1 + F scored frames):

    imagined/s needed   = max(target imagined/s, learner steps/s x batch x (1 - offline ratio) / samples-per-insert)
    replicas(service)   = ceil(imagined/s x work per sample / (one replica's rate x scaling efficiency))
    learner processes   = ceil(learner steps/s x batch / (one process's samples/s x scaling efficiency))

A replica's rate is what it sustains kept busy with the trainer's batches (`--workers` items per
call); the efficiency covers what replicas lose to each other (network, uneven batches).

Where the rates come from:
- `small` tier, one CPU core per replica: measured here. Per-replica model time per round from
  bench/trainer_throughput.json (8 items per call, dynamics 4 denoising steps, the services mode),
  the learner's samples/s per process from bench/scale_out.json. What is missing is measured by
  `bench/scale_out.py` (this script only reads).
- `paper` tier (the reference sizes, RISE_REFERENCE.md) on H100s: NOT measured here (no GPU on
  this machine; bench/dynamics_paper.py has not run). The rates are assumptions, printed with the
  plan and each settable by a flag: dynamics 0.354 s per imagined chunk on one H100 (plain
  diffusers LTX modules at paper size, bf16, eager, batch 16 chunks, 25 steps: the reference
  timing quoted in the dynamics issue; the service batches concurrent requests, so the batched
  rate is the one a replica sustains; at batch 1 it was 1.52 s, and GE-Sim reports 2.3 s per
  25-frame rollout), policy 10 chunks/s per H100
  (pi0.5-class, 10 Euler steps), value 200 frames/s per H100 (pi0.5 backbone + head), learner 16
  samples/s per H100 (pi0.5-class update); scaling efficiency 0.9.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Rates:
    """What one replica / learner process sustains, per second."""

    tier: str
    unit: str  # what one replica is: "1 CPU core", "1 H100"
    policy_chunks: float
    dynamics_chunks: float
    value_frames: float
    learner_samples: float
    frames_per_sample: int  # scored per imagined sample: the current frame + the imagined ones
    batch: int  # learner global batch
    offline_ratio: float
    efficiency: float
    source: str


def measured_small(throughput: Path, scale: Path, efficiency: float) -> Rates:
    """The small tier on this CPU, from the benchmarks' JSON files."""
    t = json.loads(throughput.read_text())
    services = t["summary"]["services"]
    workers = t["settings"]["workers"]
    frames = 1 + int(t.get("future_frames") or _future_frames(t))
    if not scale.exists():
        sys.exit(f"{scale} is missing: run `.venv/bin/python bench/scale_out.py` first (it measures the learner)")
    s = json.loads(scale.read_text())
    learner = s["learner_processes"]["best"]["1"]
    return Rates("small", "1 CPU core (1 torch thread)", policy_chunks=workers / (services["policy_ms_mean"] / 1e3),
                 dynamics_chunks=workers / (services["dynamics_ms_mean"] / 1e3),
                 value_frames=workers * frames / (services["value_ms_mean"] / 1e3), learner_samples=learner["samples_per_s"],
                 frames_per_sample=frames, batch=32, offline_ratio=0.6, efficiency=efficiency,
                 source=f"{throughput.name} ({t['machine']['date_utc']}), {scale.name} ({s['machine']['date_utc']})")


def _future_frames(t: dict) -> int:
    """Imagined frames per chunk of the benchmark's dynamics model (small tier: chunk / stride)."""
    stride = int(t.get("dynamics_stride") or 2)
    return max(1, 8 // stride)  # metaworld chunks are 8 steps


def assumed_paper(args) -> Rates:
    return Rates("paper", "1 H100", policy_chunks=args.paper_policy_chunks_per_s,
                 dynamics_chunks=1.0 / args.paper_dynamics_s_per_chunk, value_frames=args.paper_value_frames_per_s,
                 learner_samples=args.paper_learner_samples_per_s, frames_per_sample=1 + 25, batch=256, offline_ratio=0.6,
                 efficiency=args.efficiency, source="assumptions (flags --paper-*), not measured here")


def plan(r: Rates, learner_steps_per_s: float, imagined_per_s: float, samples_per_insert: float = 1.0) -> dict:
    needed = max(imagined_per_s, learner_steps_per_s * r.batch * (1 - r.offline_ratio) / samples_per_insert)
    per = lambda work, rate: math.ceil(needed * work / (rate * r.efficiency)) if needed else 0  # noqa: E731
    return {"tier": r.tier, "unit": r.unit, "learner_steps_per_s": learner_steps_per_s, "global_batch": r.batch,
            "imagined_per_s": needed, "policy": per(1, r.policy_chunks), "dynamics": per(1, r.dynamics_chunks),
            "value": per(r.frames_per_sample, r.value_frames),
            "learner": math.ceil(learner_steps_per_s * r.batch / (r.learner_samples * r.efficiency)),
            "rates": {"policy_chunks_per_s": r.policy_chunks, "dynamics_chunks_per_s": r.dynamics_chunks,
                      "value_frames_per_s": r.value_frames, "learner_samples_per_s": r.learner_samples,
                      "frames_scored_per_sample": r.frames_per_sample, "offline_ratio": r.offline_ratio,
                      "scaling_efficiency": r.efficiency},
            "source": r.source}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--learner-steps-per-s", type=float, action="append",
                        help="target learner steps/s (repeat for several plans; default: 0.5 and 2)")
    parser.add_argument("--imagined-per-s", type=float, default=0.0,
                        help="target imagined samples/s (0: what the learner target needs)")
    parser.add_argument("--efficiency", type=float, default=0.9, help="scaling efficiency of N replicas (0-1]")
    parser.add_argument("--throughput", type=Path, default=ROOT / "bench" / "trainer_throughput.json")
    parser.add_argument("--scale", type=Path, default=ROOT / "bench" / "scale_out.json")
    parser.add_argument("--paper-dynamics-s-per-chunk", type=float, default=0.354)
    parser.add_argument("--paper-policy-chunks-per-s", type=float, default=10.0)
    parser.add_argument("--paper-value-frames-per-s", type=float, default=200.0)
    parser.add_argument("--paper-learner-samples-per-s", type=float, default=16.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "capacity.json")
    args = parser.parse_args()
    targets = args.learner_steps_per_s or [0.5, 2.0]

    tiers = [measured_small(args.throughput, args.scale, args.efficiency), assumed_paper(args)]
    plans = [plan(r, steps, args.imagined_per_s) for r in tiers for steps in targets]
    header = f"{'tier':6} {'replica =':28} {'learner steps/s':>15} {'batch':>5} {'imagined/s':>10} {'policy':>6} " \
             f"{'dynamics':>8} {'value':>5} {'learner':>7}"
    print(header)
    print("-" * len(header))
    for p in plans:
        print(f"{p['tier']:6} {p['unit']:28} {p['learner_steps_per_s']:>15g} {p['global_batch']:>5} "
              f"{p['imagined_per_s']:>10.1f} {p['policy']:>6} {p['dynamics']:>8} {p['value']:>5} {p['learner']:>7}")
    print("\nper-replica rates used (per second):")
    for r in tiers:
        print(f"  {r.tier}: policy {r.policy_chunks:.1f} chunks, dynamics {r.dynamics_chunks:.2f} chunks, value "
              f"{r.value_frames:.0f} frames ({r.frames_per_sample} per sample), learner {r.learner_samples:.1f} samples; "
              f"offline ratio {r.offline_ratio}, efficiency {r.efficiency}; from {r.source}")
    args.out.write_text(json.dumps({"command": " ".join([".venv/bin/python", *sys.argv]), "plans": plans}, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
