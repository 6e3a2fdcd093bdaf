"""`rise data collect`: MetaWorld episodes from a noisy scripted expert, written as a LeRobot dataset.

Why noise and perturbations: RISE's value and dynamics models must see failures and recoveries,
not only clean expert runs. Every step gets Gaussian action noise; some episodes also get a
burst of random actions at a random time. `--offset-noise` adds one more Gaussian offset per
block of `--offset-every` steps (a policy chunk's length): per-step noise on delta actions averages
out within a chunk, an offset held for a chunk moves the arm somewhere else, which is what a world
model needs to see to learn what an action chunk does. Actions are clipped to MetaWorld's [-1, 1] box
(clipping shrinks the noise where the expert saturates); the clipped, executed action is the
one recorded.

Frames and actions: frame t is the observation before step t, and its action is the one
executed from it; the observation after the last step is not stored (LeRobot's convention).

Episode length: an episode ends `--after-success` steps after its first success, or at
`--max-steps`. MetaWorld episodes never end on success, and the RISE reference records fixed
lengths; a short tail after success keeps the "task done" frames the value model needs while
making successful episodes (most of them) smaller. `--after-success` >= `--max-steps` gives
fixed-length episodes.

Reproducibility: episode i's layout seed and noise stream derive from (--seed, i) only (see
`episode_seed`), so a run is the same whatever the number of workers; `meta/rise_collect.json`
records the arguments and every episode's seed.

Workers are spawned (never forked: MuJoCo's EGL contexts do not survive a fork); each owns one
simulator and sends whole episodes (numpy arrays) back. The parent writes them in episode order,
because a LeRobot dataset has one writer and video encoding happens in it.
"""

from __future__ import annotations

from pathlib import Path

import typer

# A perturbation: this many uniform random actions in a row, starting in the first part of the
# episode so that the expert has time to recover (or not).
BURST_STEPS = (5, 20)
BURST_START_FRACTION = 0.6

_worker_sim = None  # the simulator a worker process owns (set by _worker_init)


def episode_seed(seed: int, index: int) -> int:
    """The layout seed of episode `index` in a run with `seed` (independent of worker count)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0])


def _worker_init(task: str, max_steps: int) -> None:
    global _worker_sim
    from rise.embodiment import PRESETS
    from rise.sim.metaworld_sim import MetaWorldSim

    _worker_sim = MetaWorldSim(task, PRESETS["metaworld"], max_steps=max_steps)


def run_episode(sim, seed: int, noise: float, perturb_prob: float, after_success: int,
                offset_noise: float = 0.0, offset_every: int = 8):
    """One episode on `sim`; returns (Episode, info dict). Used by workers and by the benchmarks."""
    import warnings

    import numpy as np

    from rise.data.dataset import Episode
    from rise.sim.metaworld_sim import expert_policy, task_text

    # The experts' gains overshoot [-1, 1] and MetaWorld warns on every call; we clip on purpose.
    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
    # The noise stream is separate from the layout stream (same seed, different spawn key).
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    expert = expert_policy(sim.task)
    burst = None
    if rng.random() < perturb_prob:
        length = int(rng.integers(*BURST_STEPS, endpoint=True))
        start = int(rng.integers(0, max(1, int(sim.max_steps * BURST_START_FRACTION))))
        burst = (start, start + length)

    # Offsets draw from their own stream: episodes without them stay exactly as before.
    offsets = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
    offset = np.zeros(4)
    frame = sim.reset(seed)
    views = {v: [] for v in frame.views}  # none from a sim built with render=False (outcome studies)
    states, actions, sim_states = [], [], []
    first_success = None
    while not sim.done:
        t = sim.steps
        if offset_noise > 0 and t % offset_every == 0:
            offset = offsets.normal(0.0, offset_noise, size=4)
        if burst and burst[0] <= t < burst[1]:
            action = rng.uniform(-1.0, 1.0, size=4)
        else:
            action = expert.get_action(frame.raw_obs) + rng.normal(0.0, noise, size=4) + offset
        action = np.clip(action, -1.0, 1.0).astype(np.float32)
        for v in views:
            views[v].append(frame.views[v])
        states.append(frame.state)
        actions.append(action)
        sim_states.append(frame.sim_state)
        # The sim executes the float32 action that is stored, so replaying the dataset retraces the episode.
        frame = sim.step(action)
        if frame.success and first_success is None:
            first_success = sim.steps
        if first_success is not None and sim.steps >= first_success + after_success:
            break
    episode = Episode(views={v: np.stack(f) for v, f in views.items()}, states=np.stack(states),
                      actions=np.stack(actions), task=task_text(sim.task), success=frame.success,
                      sim_states=np.stack(sim_states))
    return episode, {"seed": seed, "success": bool(frame.success), "length": len(episode),
                     "first_success_step": first_success, "perturbation": list(burst) if burst else None}


def _worker_episode(job: tuple[int, int, float, float, int, float, int]):
    index, seed, noise, perturb_prob, after_success, offset_noise, offset_every = job
    episode, info = run_episode(_worker_sim, seed, noise, perturb_prob, after_success, offset_noise, offset_every)
    return index, episode, info


def collect(task: str, episodes: int, out: Path, noise: float = 0.2, workers: int = 1, seed: int = 0,
            max_steps: int = 200, perturb_prob: float = 0.2, after_success: int = 10, progress: bool = True,
            offset_noise: float = 0.0, offset_every: int = 8) -> dict:
    """Collect `episodes` episodes of `task` into a new dataset at `out`; returns the summary."""
    import json
    import multiprocessing
    import os
    import time

    import datasets
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from rise.data.dataset import DatasetError, DatasetWriter
    from rise.embodiment import PRESETS
    from rise.sim.metaworld_sim import MetaWorldSim

    if episodes < 1 or workers < 1 or max_steps < 1 or after_success < 0:
        raise ValueError("episodes, workers and max-steps must be >= 1 and after-success >= 0")
    if noise < 0 or offset_noise < 0 or offset_every < 1 or not 0 <= perturb_prob <= 1:
        raise ValueError(f"noise and offset-noise must be >= 0, offset-every >= 1 and perturb-prob in [0, 1] "
                         f"(got {noise}, {offset_noise}, {offset_every}, {perturb_prob})")
    # Quiet the libraries under our progress bar: SVT-AV1 prints its config for every video file.
    os.environ.setdefault("SVT_LOG", "1")
    datasets.disable_progress_bars()
    out = Path(out)
    if out.exists():
        raise DatasetError(f"{out} already exists; choose a new path (datasets are written once)")
    embodiment = PRESETS["metaworld"]
    probe = MetaWorldSim(task, embodiment, max_steps=max_steps, render=False)  # checks the name; sizes the state
    task, state_size = probe.task, probe.state_size
    probe.close()

    jobs = [(i, episode_seed(seed, i), noise, perturb_prob, after_success, offset_noise, offset_every)
            for i in range(episodes)]
    writer = DatasetWriter(out, embodiment, sim_state_dim=state_size)
    infos: list[dict] = []
    frames = 0
    started = time.perf_counter()
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("successes {task.fields[successes]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    context = multiprocessing.get_context("spawn")
    try:
        with context.Pool(min(workers, episodes), initializer=_worker_init, initargs=(task, max_steps)) as pool, \
                Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            bar_task = bar.add_task(f"collect {task}", total=episodes, successes=0)
            # imap keeps episode order, so dataset episode i is collection episode i (seed derivable).
            for index, episode, info in pool.imap(_worker_episode, jobs):
                writer.add(episode)
                infos.append({"episode_index": index, **info})
                frames += len(episode)
                bar.update(bar_task, advance=1, successes=sum(i["success"] for i in infos))
    finally:
        writer.finalize()  # episodes written so far stay readable if a worker fails or Ctrl-C
    elapsed = time.perf_counter() - started
    successes = sum(i["success"] for i in infos)
    summary = {"task": task, "episodes": len(infos), "frames": frames, "successes": successes,
               "success_rate": successes / len(infos), "seconds": elapsed,
               "episodes_per_minute": 60 * len(infos) / elapsed, "workers": workers}
    record = {"args": {"task": task, "episodes": episodes, "noise": noise, "workers": workers, "seed": seed,
                       "max_steps": max_steps, "perturb_prob": perturb_prob, "after_success": after_success,
                       "offset_noise": offset_noise, "offset_every": offset_every},
              "summary": summary, "episodes": infos}
    (out / "meta" / "rise_collect.json").write_text(json.dumps(record, indent=1))
    return summary


def register(app: typer.Typer) -> None:
    @app.command("collect")
    def collect_command(
        task: str = typer.Option(..., help="MetaWorld task, e.g. pick-place (see metaworld.ALL_V3_ENVIRONMENTS)."),
        episodes: int = typer.Option(..., min=1, help="Number of episodes."),
        out: Path = typer.Option(..., help="New dataset folder (must not exist)."),
        noise: float = typer.Option(0.2, min=0.0, help="Std of the Gaussian noise added to every expert action."),
        workers: int = typer.Option(1, min=1, help="Simulator processes (the parent encodes video)."),
        seed: int = typer.Option(0, help="Run seed: episode i's seed derives from (seed, i)."),
        max_steps: int = typer.Option(200, min=1, help="Steps per episode at most."),
        perturb_prob: float = typer.Option(0.2, min=0.0, max=1.0,
                                           help="Per-episode chance of a burst of 5-20 random actions."),
        after_success: int = typer.Option(10, min=0, help="Steps kept after the first success "
                                          "(>= max-steps: fixed-length episodes)."),
        offset_noise: float = typer.Option(0.0, min=0.0, help="Std of one Gaussian offset per block of "
                                           "--offset-every steps, added to every action in it (0: off)."),
        offset_every: int = typer.Option(8, min=1, help="Steps per offset block (a policy chunk's length)."),
    ) -> None:
        """Collect noisy scripted-expert MetaWorld episodes into a LeRobot dataset."""
        s = collect(task, episodes, out, noise=noise, workers=workers, seed=seed, max_steps=max_steps,
                    perturb_prob=perturb_prob, after_success=after_success, offset_noise=offset_noise,
                    offset_every=offset_every)
        typer.echo(f"{s['episodes']} episodes, {s['frames']} frames, success rate {s['success_rate']:.0%} "
                   f"({s['successes']}/{s['episodes']}), {s['episodes_per_minute']:.1f} episodes/min "
                   f"with {s['workers']} worker(s) -> {out}")
