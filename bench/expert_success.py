"""How good is the scripted expert? Success rate by task and action-noise level, with Wilson 95% intervals.

Direct: the expert runs closed loop (a new action from every observation) in
`MetaWorldSim(render=False)`, in worker processes. Served (`--served TASK`): the same expert
as the "scripted-expert" policy version behind `rise serve policy` (a separate process on
127.0.0.1), evaluated with `rise.sim.evaluate.evaluate` after a one-episode warm-up: open loop per chunk (8 actions from
one observation, executed at 80 Hz), views rendered at decision points only.

Both use the same held-out layouts (`eval_seed(seed, i)`, reset with `MetaWorldSim.reset`) and the
same noise: executed action = clip(clip(expert action) + N(0, sigma^2 I)), the noise stream
seeded per episode exactly as `evaluate(..., action_noise=sigma)` seeds it. With sigma = 0
served and direct must agree episode by episode (the served chunk is what closed loop does);
with noise they differ only in that the served expert cannot react to noise inside a chunk.
Episodes end at the first success or at --max-steps.

    .venv/bin/python bench/expert_success.py --served pick-place
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rise.sim.stats import format_rate  # noqa: E402

_sims: dict = {}  # per worker process: task -> (simulator, expert)


def run_episode(job: tuple[str, float, int, int, int]) -> tuple[str, float, int, bool, int]:
    """(task, sigma, episode, seed, max_steps) -> (task, sigma, episode, success, steps); closed loop."""
    from rise.embodiment import PRESETS
    from rise.sim.evaluate import eval_seed
    from rise.sim.metaworld_sim import MetaWorldSim, expert_policy

    task, sigma, episode, seed, max_steps = job
    if task not in _sims:
        _sims[task] = (MetaWorldSim(task, PRESETS["metaworld"], max_steps=max_steps, render=False), expert_policy(task))
    sim, expert = _sims[task]
    layout_seed = eval_seed(seed, episode)
    noise = np.random.default_rng(np.random.SeedSequence(layout_seed, spawn_key=(2,)))  # as evaluate() seeds it
    frame = sim.reset(layout_seed)
    while not (frame.success or sim.done):
        action = np.clip(expert.get_action(frame.raw_obs), -1.0, 1.0).astype(np.float32)
        if sigma:
            action = action + noise.normal(0.0, sigma, size=action.shape)
        frame = sim.step(np.clip(action, -1.0, 1.0).astype(np.float32))
    return task, sigma, episode, bool(frame.success), sim.steps


def direct(tasks, sigmas, episodes, seed, max_steps, workers) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    jobs = [(t, s, i, seed, max_steps) for t in tasks for s in sigmas for i in range(episodes)]
    results: dict = {(t, s): {} for t in tasks for s in sigmas}
    # Spawned, never forked: MuJoCo state must not be shared with a parent.
    with multiprocessing.get_context("spawn").Pool(workers) as pool, Progress(
            TextColumn("[bold]direct"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()) as bar:
        job = bar.add_task("episodes", total=len(jobs))
        # Chunks of one (task, sigma) keep each worker on few tasks, so it builds few simulators.
        for task, sigma, i, success, steps in pool.imap_unordered(run_episode, jobs, chunksize=max(1, episodes // 2)):
            results[(task, sigma)][i] = (success, steps)
            bar.advance(job)
    return {key: [eps[i] for i in range(episodes)] for key, eps in results.items()}


def served(task, sigmas, episodes, seed, max_steps) -> list[dict]:
    """`rise serve policy` with the scripted expert as stable, then evaluate() per sigma."""
    import grpc

    from rise.baselines import publish_scripted_expert
    from rise.embodiment import PRESETS
    from rise.registry import Registry
    from rise.sim.evaluate import evaluate

    with tempfile.TemporaryDirectory() as tmp, socket.socket() as probe:
        registry = Registry(Path(tmp) / "store")
        registry.set_alias("policy", "stable", publish_scripted_expert(registry, PRESETS["metaworld"]).version)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        env = {**os.environ, "RISE_REGISTRY_ROOT": str(registry.root), "RISE_SERVER__LOG_JSON": "false"}
        server = subprocess.Popen([sys.executable, "-m", "rise.cli", "serve", "policy", "--port", str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=120)
            # The first call for a task builds the server's simulator (about a second): keep it out of the latency.
            evaluate(f"127.0.0.1:{port}", task, 1, seed=seed + 1, max_steps=8, progress=False)
            return [evaluate(f"127.0.0.1:{port}", task, episodes, seed=seed, max_steps=max_steps, action_noise=sigma).summary()
                    for sigma in sigmas]
        finally:
            server.terminate()
            server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["reach", "push", "pick-place", "drawer-open", "peg-insert-side"])
    parser.add_argument("--sigmas", nargs="+", type=float, default=[0.0, 0.1, 0.3])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--served", default="", help="Also evaluate the expert served over gRPC on this task.")
    parser.add_argument("--out", type=Path, default=Path("bench/expert_success.json"))
    args = parser.parse_args()

    started = time.perf_counter()
    results = direct(args.tasks, args.sigmas, args.episodes, args.seed, args.max_steps, args.workers)
    direct_s = time.perf_counter() - started
    header = "| task | " + " | ".join(f"sigma {s:g}" for s in args.sigmas) + " |"
    lines = [header, "|---|" + "---:|" * len(args.sigmas)]
    for task in args.tasks:
        cells = [format_rate(sum(ok for ok, _ in results[(task, s)]), args.episodes) for s in args.sigmas]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(f"\nDirect, closed loop ({args.episodes} episodes per cell, max {args.max_steps} steps, {direct_s:.0f} s):\n{table}")

    served_rows = []
    if args.served:
        for summary, sigma in zip(served(args.served, args.sigmas, args.episodes, args.seed, args.max_steps), args.sigmas):
            direct_eps = results.get((args.served, sigma))
            agree = None
            if direct_eps is not None:
                agree = sum(e["success"] == ok and e["steps"] == steps for e, (ok, steps) in zip(summary["per_episode"], direct_eps))
            served_rows.append({"sigma": sigma, "summary": summary, "episodes_identical_to_direct": agree})
            print(f"served {args.served} sigma {sigma:g}: {format_rate(summary['successes'], summary['episodes'])}, "
                  f"Act mean {summary['act_ms_mean']:.2f} ms (p50 {summary['act_ms_p50']:.2f}) over {summary['act_calls']} calls, "
                  f"server mean {summary['server_ms_mean']:.2f} ms; episodes identical to direct: {agree}/{args.episodes}")

    args.out.write_text(json.dumps({
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "direct_seconds": direct_s,
        "direct": {f"{t}|{s:g}": [{"success": ok, "steps": n} for ok, n in eps] for (t, s), eps in results.items()},
        "served": served_rows, "table_markdown": table}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
