"""How action-following grows with training steps: the world model trained from scratch to several
step counts side by side (issue 4). Made for the lent GPU machine, which has no lerobot or PyAV: the
`small` tier is op-dispatch bound there (57 ms per step alone on an H100, 67 ms with three runs side
by side: only ~3x a 2-core CPU per run, but the runs share the GPU almost for free). Runs on CPU too.

  export  decode the datasets once, where lerobot and PyAV are installed, into one .npz holding what
          `rise train dynamics` loads (every frame, action and state, the episode table, the action
          min/max), so a machine without them (the lent GPU machine) trains on exactly these data.
  train   one process per step count, all at once; each is `services.dynamics.train.train` from
          scratch (a resumed run restarts its learning-rate schedule, so it is not the same thing),
          publishing to its own registry under `--out/steps<N>/store`. A run stopped early (the
          deadline) continues from its checkpoint when the same command runs again on the same --out.

Judge the runs afterwards with `rise eval-dynamics` on held-out episodes (see bench/RESULTS.md).

    python bench/dynamics_steps.py export --data runs/steps/data --out .gpu/push.npz.xz
    python bench/dynamics_steps.py train --cache .gpu/push.npz.xz --steps 9000 --steps 18000 --out runs/steps
"""
from __future__ import annotations

import io
import json
import lzma
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.command()
def export(data: list[Path] = typer.Option(..., "--data", help="LeRobot dataset folder (repeat for several)."),
           out: Path = typer.Option(..., "--out", help="The .npz to write."),
           config: str = typer.Option("small", "--config")) -> None:
    """Decode the datasets into one compressed .npz."""
    from rise.data.loading import load_episodes_in_memory
    from services.dynamics.model import load_model_config
    from services.dynamics.train import action_normalizer

    emb = load_model_config(config).embodiment_spec
    episodes = load_episodes_in_memory(data, emb, show_progress=True)
    normalizer = action_normalizer(data)
    episode_tasks = episodes.frame_task_ids[episodes.episode_starts]
    episode_success = episodes.frame_success[episodes.episode_starts]
    out.parent.mkdir(parents=True, exist_ok=True)
    # Frames as lossless WebP strips, the rest xz: 25.5 MiB of xz'd raw frames for pick-place's 4,917
    # frames became 19 (-27%), so two tasks' data, the code and the wheels fit the 64 MiB that
    # travels to the GPU machine. (xz alone beat the .npz's own zip deflate: 31 MiB vs 47 for push.)
    webp = {}
    for v in emb.views:
        blob, offsets = frames_to_webp(episodes.views[v])
        if not np.array_equal(webp_to_frames(blob, offsets, episodes.views[v].shape[1:]), episodes.views[v]):
            raise RuntimeError(f"view {v}: WebP round trip is not lossless")
        webp |= {f"webp:{v}": blob, f"webp_offsets:{v}": offsets,
                 f"frame_shape:{v}": np.array(episodes.views[v].shape[1:])}
    with lzma.open(out, "wb", preset=6) as f:
        np.savez(f, **webp, actions=episodes.actions,
                 states=episodes.states, episode_lengths=episodes.episode_lengths, episode_tasks=episode_tasks,
                 episode_success=episode_success, episode_dataset=episodes.episode_dataset,
                 tasks=np.array(episodes.tasks), roots=np.array([str(r) for r in episodes.roots]),
                 action_low=normalizer.low, action_high=normalizer.high)
    print(f"{out}: {len(episodes)} frames, {episodes.num_episodes} episodes, {out.stat().st_size / 2**20:.1f} MiB")


def frames_to_webp(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, H, W, 3] uint8 frames as lossless WebP images, each a column of up to 16,383 // H frames
    (WebP's side limit is 16,383 px): (every image's bytes, one after another; offsets where each
    image starts, and the end)."""
    from PIL import Image

    per_strip = 16383 // frames.shape[1]
    images = []
    for i in range(0, len(frames), per_strip):
        strip = frames[i:i + per_strip]
        buffer = io.BytesIO()  # method 5: the size of method 6 at a third of its time, measured on MetaWorld frames
        Image.fromarray(strip.reshape(-1, *strip.shape[2:])).save(buffer, "WEBP", lossless=True, quality=100, method=5)
        images.append(buffer.getvalue())
    return np.frombuffer(b"".join(images), np.uint8), np.cumsum([0] + [len(b) for b in images])


def webp_to_frames(blob: np.ndarray, offsets: np.ndarray, frame_shape: tuple) -> np.ndarray:
    """The inverse of `frames_to_webp`."""
    from PIL import Image

    strips = [np.asarray(Image.open(io.BytesIO(blob[a:b].tobytes())).convert("RGB"))
              for a, b in zip(offsets[:-1], offsets[1:])]
    return np.concatenate(strips).reshape(-1, *frame_shape)


def load_cache(path: Path):
    """The exported data as the trainer's own types (`EpisodesInMemory`, `ActionNormalizer`)."""
    from rise.data.loading import EpisodesInMemory
    from rise.data.stats import ActionNormalizer

    with lzma.open(path) as f:
        z = np.load(io.BytesIO(f.read()))
    views = {k.split(":", 1)[1]: z[k] for k in z.files if k.startswith("view:")}  # exports before WebP
    for v in [k.split(":", 1)[1] for k in z.files if k.startswith("webp:")]:
        views[v] = webp_to_frames(z[f"webp:{v}"], z[f"webp_offsets:{v}"], tuple(z[f"frame_shape:{v}"]))
    episodes = EpisodesInMemory(views, z["actions"], z["states"], z["episode_lengths"], z["episode_tasks"],
                                z["episode_success"], z["episode_dataset"], [str(t) for t in z["tasks"]],
                                [Path(r) for r in z["roots"]])
    return episodes, ActionNormalizer(z["action_low"], z["action_high"], "min_max")


@app.command("train-one", hidden=True)
def train_one(cache: Path = typer.Option(...), steps: int = typer.Option(...), out: Path = typer.Option(...),
              config: str = typer.Option("small"), set_: list[str] = typer.Option([], "--set"),
              threads: int = typer.Option(0), compile_loss: bool = typer.Option(False, "--compile")) -> None:
    """One run (a child of `train`): the trainer on the cache's data instead of the datasets'."""
    from rise.config import parse_overrides
    from services.dynamics.model import load_model_config
    from services.dynamics.train import train as train_dynamics

    episodes, normalizer = load_cache(cache)
    cfg = load_model_config(config, {**parse_overrides(set_), "training.transformer.steps": steps})
    summary = train_dynamics(cfg, list(episodes.roots), out, resume=(out / "checkpoint.pt").exists(),
                             registry=out / "store", publish=True, progress=False, threads=threads or None,
                             preloaded=(episodes, normalizer), compile_loss=compile_loss)
    print(json.dumps({"steps": steps, "metrics": summary["metrics"], "timings": summary["timings"]}))


@app.command()
def train(cache: Path = typer.Option(..., help="From `export`."),
          steps: list[int] = typer.Option(..., "--steps", help="Transformer steps, one run each (repeat)."),
          out: Path = typer.Option(..., "--out"), config: str = typer.Option("small", "--config"),
          set_: list[str] = typer.Option([], "--set", help="Config override for every run, KEY=VALUE."),
          threads: int = typer.Option(0, help="CPU threads per run (0: torch's choice)."),
          deadline_s: float = typer.Option(0, help="Stop runs still going after this many seconds (0: none)."),
          compile_loss: bool = typer.Option(False, "--compile", help="torch.compile each run's loss (`rise train dynamics --compile`).")) -> None:
    """All step counts at once, one process each; a summary line per run in `out/steps.json`."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs = {}
    for n in steps:
        folder = out / f"steps{n}"
        cmd = [sys.executable, __file__, "train-one", "--cache", str(cache), "--steps", str(n), "--out", str(folder),
               "--config", config, "--threads", str(threads), *[x for s in set_ for x in ("--set", s)],
               *(["--compile"] if compile_loss else [])]
        with open(out / f"steps{n}.log", "w") as log:  # the child keeps its own copy of the handle
            runs[n] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    results, shown = {}, 0.0
    while runs:
        time.sleep(5)
        elapsed = time.perf_counter() - started
        if elapsed - shown >= 60:  # progress: each run's latest log line
            shown = elapsed
            for n in runs:
                lines = (out / f"steps{n}.log").read_text().strip().splitlines()
                print(f"[{elapsed:.0f} s] steps {n}: {lines[-1] if lines else '(starting)'}", flush=True)
        for n, proc in list(runs.items()):
            if proc.poll() is not None or (deadline_s and elapsed > deadline_s):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                lines = (out / f"steps{n}.log").read_text().strip().splitlines()
                done = proc.returncode == 0 and lines and lines[-1].startswith("{")
                results[n] = json.loads(lines[-1]) if done else {"steps": n, "failed": proc.returncode,
                                                                   "wall_s": round(elapsed, 1), "log_tail": lines[-5:]}
                print(f"steps {n}: {'done' if done else 'FAILED/stopped'} after {elapsed:.0f} s", flush=True)
                del runs[n]
    (out / "steps.json").write_text(json.dumps({"cache": str(cache), "config": config, "set": set_,
                                                "runs": [results[n] for n in steps]}, indent=2) + "\n")
    if any("failed" in r for r in results.values()):
        raise typer.Exit(1)


@app.command()
def plot(report: list[str] = typer.Option(..., "--report", help="STEPS=path of an eval-dynamics report.json (repeat)."),
         out: Path = typer.Option(..., "--out", help="PNG to write.")) -> None:
    """Action-following against training steps: the EPE ratio (shuffled / real chunk) with the 1.1
    rule, and the paired EPE difference with its 95% interval, from `rise eval-dynamics` reports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from services.dynamics.evaluate import ACTION_SENSITIVE_RATIO

    points = sorted((int(k), json.loads(Path(v).read_text())["controllability"])
                    for k, v in (item.split("=", 1) for item in report))
    steps = [k for k, _ in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(steps, [c["epe_ratio"] for _, c in points], "o-")
    left.axhline(ACTION_SENSITIVE_RATIO, color="grey", ls="--", label=f"rule {ACTION_SENSITIVE_RATIO}")
    left.set(xlabel="transformer steps", ylabel="EPE shuffled / real", title="action-following ratio")
    left.legend()
    mean = np.array([c["paired_difference_mean"] for _, c in points])
    ci = np.array([c["paired_difference_ci95"] for _, c in points]).T
    right.errorbar(steps, mean, yerr=[mean - ci[0], ci[1] - mean], fmt="o-", capsize=3)
    right.axhline(0, color="grey", lw=0.8)
    right.set(xlabel="transformer steps", ylabel="px", title="EPE shuffled - real (95% interval)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    app()
