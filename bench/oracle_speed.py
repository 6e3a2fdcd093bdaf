"""The oracle world model's imagined chunks per second at frame strides 1, 2 and 8, side by side.

The oracle (`services/dynamics/oracle.py`) restores a simulator state, runs the chunk's 8 control
ticks and renders the views at every `frame_stride`-th tick; rendering is most of a tick's cost.
`bench/paper_table.py` used stride 1 until 2026-11-29 and now uses the learned model's stride (2).
This measures what that costs: in-process, one task, the strides interleaved round by round (the
same start states and actions each round) so that a ratio is read from one run on a noisy machine.

    .venv/bin/python bench/oracle_speed.py --task peg-insert-side --rounds 5 --batch 8 --out bench/oracle_speed.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from rich.progress import track

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="peg-insert-side")
    parser.add_argument("--strides", default="1,2,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="chunks per imagine call (one start state each)")
    parser.add_argument("--out", default="bench/oracle_speed.json")
    args = parser.parse_args()

    from rise.embodiment import PRESETS
    from rise.sim.metaworld_sim import MetaWorldSim, task_text
    from services.dynamics.oracle import OracleDynamics

    emb = PRESETS["metaworld"]
    rng = np.random.default_rng(0)
    sim = MetaWorldSim(args.task, emb, render=False)
    states = []
    for b in range(args.batch):  # start states a few random ticks into distinct layouts
        sim.reset(seed=b, render=False)
        for _ in range(int(rng.integers(0, 20))):
            sim.step(rng.uniform(-1, 1, emb.action_dim).astype(np.float32), render=False)
        states.append(sim.get_state())
    sim.close()
    actions = rng.uniform(-1, 1, (args.batch, emb.chunk_length, emb.action_dim)).astype(np.float32)
    tasks = [task_text(args.task)] * args.batch

    strides = [int(s) for s in args.strides.split(",")]
    models = {s: OracleDynamics(emb, frame_stride=s) for s in strides}
    for model in models.values():  # warm-up: makes each stride's simulator and renderer
        model.imagine({}, actions, tasks=tasks, sim_states=states)
    seconds = {s: 0.0 for s in strides}
    for _ in track(range(args.rounds), description=f"{args.task}: strides {strides} interleaved"):
        for s, model in models.items():
            t0 = time.perf_counter()
            frames, _ = model.imagine({}, actions, tasks=tasks, sim_states=states)
            seconds[s] += time.perf_counter() - t0
            assert frames[emb.views[0]].shape[1] == emb.chunk_length // s
    for model in models.values():
        model.close()

    chunks = args.rounds * args.batch
    rate = {s: chunks / seconds[s] for s in strides}
    result = {
        "task": args.task, "rounds": args.rounds, "batch": args.batch, "chunks_per_stride": chunks,
        "chunks_per_s": {str(s): round(r, 2) for s, r in rate.items()},
        "ratio_to_stride_1": {str(s): round(r / rate[strides[0]], 2) for s, r in rate.items()},
        "machine": machine(),
    }
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
