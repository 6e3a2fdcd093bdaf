"""How fast the simulator renders and `rise data collect` fills a dataset, on this machine.

    .venv/bin/python bench/collect_speed.py [--task pick-place] [--episodes 6] [--steps 200]

1. Rendering: one MetaWorldSim under the scripted expert, 3 views at 64x64; sim steps per second
   with and without drawing the views, and the views drawn alone.
2. Writing: the parent's cost to add one episode to a LeRobot dataset (AV1 video encoding).
3. Collection: `collect()` with 1 and 2 workers, fixed-length episodes (no early stop after
   success), the same seeds, timed end to end including worker start-up and the final write;
   with --repeats 2 the order is 1, 2, 2, 1 so that a load change on a shared machine hits both.

Wall-clock rates depend on what else runs on the machine; CPU seconds (this process and its
children, user + sys) do much less, so both are printed.
4. Outcome mix: success rate under `rise data collect`'s defaults (noise 0.2, perturb-prob 0.2,
   seed 0; --mix-noise / --mix-perturb-prob change them) on a few tasks, physics only (no views
   drawn), the same episodes `collect` would run. --mix-only runs just this part.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from rise.data.collect import collect, episode_seed, run_episode
from rise.data.dataset import DatasetWriter
from rise.embodiment import PRESETS
from rise.sim.metaworld_sim import MetaWorldSim, expert_policy

os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its configuration for every video file


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_rendering(task: str, steps: int) -> dict:
    embodiment = PRESETS["metaworld"]
    sim = MetaWorldSim(task, embodiment, max_steps=steps)
    expert = expert_policy(task)
    result = {}
    for render in (True, False):
        frame = sim.reset(0)
        start, cpu = time.perf_counter(), cpu_seconds()
        while not sim.done:
            frame = sim.step(np.clip(expert.get_action(frame.raw_obs), -1, 1), render=render)
        name = "render" if render else "physics_only"
        result[f"steps_per_s_{name}"] = steps / (time.perf_counter() - start)
        result[f"steps_per_cpu_s_{name}"] = steps / (cpu_seconds() - cpu)
    start, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(steps):
        sim.render()
    result["render_calls_per_s"] = steps / (time.perf_counter() - start)
    result["render_calls_per_cpu_s"] = steps / (cpu_seconds() - cpu)
    views = len(embodiment.views)
    result["views_per_s_in_steps"] = result["steps_per_s_render"] * views
    result["views_per_s_render_only"] = result["render_calls_per_s"] * views
    sim.close()
    return result


def time_writing(task: str, steps: int, folder: Path) -> dict:
    embodiment = PRESETS["metaworld"]
    sim = MetaWorldSim(task, embodiment, max_steps=steps)
    episode, _ = run_episode(sim, episode_seed(0, 0), 0.2, 0.0, steps)
    writer = DatasetWriter(folder / "write", embodiment, sim_state_dim=sim.state_size)
    start, cpu = time.perf_counter(), cpu_seconds()
    writer.add(episode)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    writer.finalize()
    sim.close()
    return {"frames": len(episode), "seconds_per_episode": round(seconds, 2), "cpu_s_per_episode": round(cpu, 2)}


def outcome_mix(tasks: list[str], episodes: int, steps: int, noise: float, perturb_prob: float) -> dict:
    result = {}
    for task in tasks:
        sim = MetaWorldSim(task, PRESETS["metaworld"], max_steps=steps, render=False)
        infos = [run_episode(sim, episode_seed(0, i), noise, perturb_prob, 10)[1] for i in range(episodes)]
        perturbed = [i for i in infos if i["perturbation"]]
        result[task] = {"success": f"{sum(i['success'] for i in infos)}/{episodes}",
                        "perturbed_success": f"{sum(i['success'] for i in perturbed)}/{len(perturbed)}",
                        "mean_length": round(float(np.mean([i["length"] for i in infos])), 1)}
        sim.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="pick-place")
    parser.add_argument("--episodes", type=int, default=6)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1, help="Collection runs per worker count.")
    parser.add_argument("--mix-tasks", default="pick-place,push,drawer-open,peg-insert-side,assembly")
    parser.add_argument("--mix-episodes", type=int, default=40)
    parser.add_argument("--mix-noise", type=float, default=0.2)
    parser.add_argument("--mix-perturb-prob", type=float, default=0.2)
    parser.add_argument("--mix-only", action="store_true", help="Only the outcome mix (skips parts 1-3).")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
    print(f"load average at start: {os.getloadavg()}")
    if args.mix_only:
        for task, mix in outcome_mix(args.mix_tasks.split(","), args.mix_episodes, args.steps, args.mix_noise,
                                     args.mix_perturb_prob).items():
            print(f"outcome mix, {task}:", mix)
        return
    print("rendering:", {k: round(v, 1) for k, v in time_rendering(args.task, args.steps).items()})
    with tempfile.TemporaryDirectory() as tmp:
        print("writing:", time_writing(args.task, args.steps, Path(tmp)))
        for repeat in range(args.repeats):
            for workers in (1, 2) if repeat % 2 == 0 else (2, 1):
                cpu = cpu_seconds()
                summary = collect(args.task, args.episodes, Path(tmp) / f"w{workers}-{repeat}", workers=workers,
                                  seed=0, max_steps=args.steps, after_success=args.steps, progress=False)
                summary["cpu_s_per_episode"] = (cpu_seconds() - cpu) / summary["episodes"]
                summary["load_average_1min_after"] = os.getloadavg()[0]
                print(f"collect, {workers} worker(s):", {k: round(v, 2) if isinstance(v, float) else v
                                                         for k, v in summary.items()})
    for task, mix in outcome_mix(args.mix_tasks.split(","), args.mix_episodes, args.steps, args.mix_noise,
                                 args.mix_perturb_prob).items():
        print(f"outcome mix, {task}:", mix)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
