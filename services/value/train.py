"""`rise train value`: train the progress value model on LeRobot datasets, then publish it.

Reads top to bottom:
  1. data       every episode decoded once into memory (`EpisodesInMemory`); per frame its
                progress target frame_index / (length - 1), its next frame, whether it is the
                episode's last, and its terminal reward (+1 success, -0.6 failure, else 0);
                task texts embedded once (MiniLM)
  2. stage 1    progress regression MSE(V(s), progress) on frames of successful episodes only
  3. stage 2    1-step TD against an EMA target network (tau 0.01):
                    y = clamp(r + gamma * (1 - done) * V_target(s'), -1, 1)
                loss = MSE(V(s), y) over all frames + td_progress_weight * the progress loss on
                the batch's successful frames (the progress objective stays on, TD is added)
  4. evaluate   ranking metrics: how often a later frame of a successful episode scores above
                an earlier one, and how often a successful episode's last frame scores above a
                failed one's (success vs failure ranking)
  5. publish    weights (safetensors) + config -> the registry, kind `progress_value`

AdamW with linear warm-up then cosine decay to 10%; a checkpoint (model + target + optimiser
+ stage + step) every `checkpoint_every` steps and at each stage's end, so `--resume` continues.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from services.value.model import ValueModelConfig, load_model_config

CHECKPOINT = "checkpoint.pt"
STAGES = ("progress", "td")


# ---- data -----------------------------------------------------------------------------------------
class Frames:
    """Per-frame training targets over `EpisodesInMemory` (indices are global frame numbers)."""

    def __init__(self, episodes, config: ValueModelConfig):
        t = config.training
        e = self.episodes = episodes
        self.views = list(config.embodiment_spec.views)
        length = e.episode_lengths[e.frame_episode]
        self.progress = (e.frame_index / np.maximum(length - 1, 1)).astype(np.float32)
        self.done = e.frame_index == length - 1
        self.next = np.where(self.done, np.arange(len(e)), np.arange(len(e)) + 1)
        self.reward = np.where(self.done, np.where(e.frame_success, t.success_reward, t.failure_reward), 0.0).astype(np.float32)
        held_out = np.zeros(e.num_episodes, bool)
        for d in np.unique(e.episode_dataset):
            mine = np.flatnonzero(e.episode_dataset == d)
            if t.eval_episodes and len(mine) > t.eval_episodes:
                held_out[mine[-t.eval_episodes:]] = True
        self.held_out_episode = held_out
        frame_held_out = held_out[e.frame_episode]
        self.train_all = np.flatnonzero(~frame_held_out)
        self.train_success = np.flatnonzero(~frame_held_out & e.frame_success)
        self.eval_episodes = np.flatnonzero(held_out) if held_out.any() else np.arange(e.num_episodes)

    def frames(self, index: np.ndarray) -> np.ndarray:
        """uint8 [B, V, H, W, 3]."""
        return np.stack([self.episodes.views[v][index] for v in self.views], axis=1)


def learning_rate(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up to `base`, then cosine decay to 10% of it at `total`."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def ranking_metrics(values: np.ndarray, episodes, episode_ids: np.ndarray) -> dict[str, float]:
    """Ranking quality of per-frame values over the given episodes.

    progress_ranking: over successful episodes, the fraction of frame pairs (i < j) with V_j > V_i;
    late_minus_early: mean V of each successful episode's last third minus its first third;
    success_vs_failure: the fraction of (success, failure) episode pairs whose last-frame value
    orders them right (NaN without both kinds); progress_mse: MSE to frame_index / (length - 1).
    """
    e = episodes
    pairs, late_early, ends_s, ends_f, mse = [], [], [], [], []
    for ep in episode_ids:
        start, length = int(e.episode_starts[ep]), int(e.episode_lengths[ep])
        v = values[start:start + length]
        if bool(e.frame_success[start]):
            third = max(1, length // 3)
            late_early.append(float(v[-third:].mean() - v[:third].mean()))
            diff = v[None, :] - v[:, None]
            upper = np.triu(np.ones((length, length), bool), 1)
            if upper.any():
                pairs.append(float((diff[upper] > 0).mean()))
            mse.append(float(np.mean((v - np.arange(length) / max(length - 1, 1)) ** 2)))
            ends_s.append(float(v[-1]))
        else:
            ends_f.append(float(v[-1]))
    sf = (float(np.mean([s > f for s in ends_s for f in ends_f])) if ends_s and ends_f else float("nan"))
    return {"progress_ranking": float(np.mean(pairs)) if pairs else float("nan"),
            "late_minus_early": float(np.mean(late_early)) if late_early else float("nan"),
            "success_vs_failure": sf,
            "progress_mse": float(np.mean(mse)) if mse else float("nan")}


def save_checkpoint(out: Path, stage: str, step: int, model, target, optimizer) -> None:
    import os

    import torch

    tmp = out / f".{CHECKPOINT}.tmp"
    torch.save({"stage": stage, "step": step, "model": model.state_dict(),
                "target": target.state_dict() if target is not None else None,
                "optimizer": optimizer.state_dict()}, tmp)
    os.replace(tmp, out / CHECKPOINT)  # a crash mid-save leaves the previous checkpoint intact


# ---- training -------------------------------------------------------------------------------------
def train(config: ValueModelConfig, data: list[Path], out: Path, *, resume: bool = False,
          registry: Path | None = None, publish: bool = False, device: str = "auto", threads: int | None = None,
          progress: bool = True, log=print) -> dict[str, Any]:
    """Train (progress, then TD), save `out/model`, optionally publish; returns a summary."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from torch.utils.tensorboard import SummaryWriter

    from rise.config import dump_config
    from rise.data.loading import load_episodes_in_memory
    from services.value.model import KIND, TextEmbedder, build_model, parameter_count

    started = time.perf_counter()
    out = Path(out)
    data = [Path(d) for d in data]
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    checkpoint_path = out / CHECKPOINT
    if checkpoint_path.exists() and not resume:
        raise FileExistsError(f"{out} holds a run already; pass --resume to continue it or choose a new --out")
    if resume and not checkpoint_path.exists():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {out}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(config))
    tcfg = config.training
    torch.manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)

    # 1. data ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    episodes = load_episodes_in_memory(data, config.embodiment_spec, show_progress=progress)
    frames = Frames(episodes, config)
    task_vectors = torch.from_numpy(TextEmbedder.shared(config.text.model_path)(episodes.tasks)).to(dev)
    frame_tasks = torch.from_numpy(episodes.frame_task_ids).to(dev)
    successes = int(episodes.frame_success[episodes.episode_starts].sum())
    log(f"data: {len(episodes)} frames in {episodes.num_episodes} episodes ({successes} successful) of "
        f"{len(episodes.tasks)} task(s), decoded in {time.perf_counter() - t0:.1f} s")
    if tcfg.progress_steps and not len(frames.train_success):
        raise ValueError("no successful episode in the training data: the progress stage needs some")

    model = build_model(config).to(dev)
    log(f"model: {parameter_count(model)} parameters; device {dev}, {torch.get_num_threads()} CPU threads")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    stage, step, target = "progress", 0, None
    if resume:
        checkpoint = torch.load(checkpoint_path, map_location=dev, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        stage, step = checkpoint["stage"], checkpoint["step"]
        if checkpoint.get("target") is not None:
            target = copy.deepcopy(model)
            target.load_state_dict(checkpoint["target"])
        log(f"resumed from {checkpoint_path}: stage {stage}, step {step}")

    def values_of(net, index: np.ndarray):
        x = torch.from_numpy(frames.frames(index)).to(dev)
        return net(x, task_vectors[frame_tasks[torch.from_numpy(index).to(dev)]])

    def evaluate(batch: int = 256) -> dict[str, float]:
        model.eval()
        with torch.inference_mode():
            values = np.concatenate([values_of(model, np.arange(a, min(a + batch, len(episodes)))).float().cpu().numpy()
                                     for a in range(0, len(episodes), batch)])
        model.train()
        return ranking_metrics(values, episodes, frames.eval_episodes)

    writer = SummaryWriter(str(out / "tensorboard"))
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    total = tcfg.progress_steps + tcfg.td_steps
    losses: dict[str, float] = {}
    timings: dict[str, float] = {}
    metrics_start = evaluate()
    model.train()

    def optimise(loss, at: int):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(at, tcfg.lr, tcfg.warmup_steps, total)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        optimizer.step()
        return float(grad_norm)

    def progress_loss(index: np.ndarray):
        predicted = values_of(model, index)
        return torch.nn.functional.mse_loss(predicted, torch.from_numpy(frames.progress[index]).to(dev))

    # 2. stage 1: progress on successful episodes ----------------------------------------------------
    with Progress(*columns, disable=not progress) as bar:
        if stage == "progress":
            t_stage, ema = time.perf_counter(), None
            task = bar.add_task("stage 1: progress", total=tcfg.progress_steps, completed=step, info="")
            while step < tcfg.progress_steps:
                index = rng.choice(frames.train_success, size=tcfg.batch_size)
                loss = progress_loss(index)
                grad_norm = optimise(loss, step)
                step += 1
                ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
                losses.setdefault("progress_first", loss.item())
                if step % tcfg.log_every == 0 or step == tcfg.progress_steps:
                    writer.add_scalar("progress/loss", loss.item(), step)
                    writer.add_scalar("progress/grad_norm", grad_norm, step)
                    writer.add_scalar("progress/lr", optimizer.param_groups[0]["lr"], step)
                bar.update(task, completed=step, info=f"loss {ema:.4f}")
                if step % tcfg.checkpoint_every == 0:
                    save_checkpoint(out, "progress", step, model, None, optimizer)
            losses["progress_last"] = ema if ema is not None else float("nan")
            timings["progress_s"] = time.perf_counter() - t_stage
            stage, step = "td", 0
            save_checkpoint(out, stage, step, model, None, optimizer)

        # 3. stage 2: TD against the EMA target, progress loss kept on ---------------------------------
        if target is None:
            target = copy.deepcopy(model)
        target.eval().requires_grad_(False)
        t_stage, ema = time.perf_counter(), None
        task = bar.add_task("stage 2: TD", total=tcfg.td_steps, completed=step, info="")
        while step < tcfg.td_steps:
            index = rng.choice(frames.train_all, size=tcfg.batch_size)
            with torch.no_grad():
                next_value = values_of(target, frames.next[index])
                done = torch.from_numpy(frames.done[index].astype(np.float32)).to(dev)
                reward = torch.from_numpy(frames.reward[index]).to(dev)
                y = torch.clamp(reward + tcfg.gamma * (1 - done) * next_value, -1, 1)
            td_loss = torch.nn.functional.mse_loss(values_of(model, index), y)
            loss = td_loss
            succ = index[episodes.frame_success[index]]
            if tcfg.td_progress_weight and len(succ):
                loss = loss + tcfg.td_progress_weight * progress_loss(succ)
            grad_norm = optimise(loss, tcfg.progress_steps + step)
            with torch.no_grad():
                for p_target, p in zip(target.parameters(), model.parameters()):
                    p_target.lerp_(p, tcfg.tau)
                for b_target, b in zip(target.buffers(), model.buffers()):
                    b_target.copy_(b)
            step += 1
            ema = td_loss.item() if ema is None else 0.95 * ema + 0.05 * td_loss.item()
            losses.setdefault("td_first", td_loss.item())
            if step % tcfg.log_every == 0 or step == tcfg.td_steps:
                writer.add_scalar("td/td_loss", td_loss.item(), step)
                writer.add_scalar("td/loss", loss.item(), step)
                writer.add_scalar("td/grad_norm", grad_norm, step)
            bar.update(task, completed=step, info=f"TD loss {ema:.4f}")
            if step % tcfg.checkpoint_every == 0:
                save_checkpoint(out, "td", step, model, target, optimizer)
        losses["td_last"] = ema if ema is not None else float("nan")
        timings["td_s"] = time.perf_counter() - t_stage
        save_checkpoint(out, "td", step, model, target, optimizer)  # --resume --steps M>N extends the run

    # 4. evaluate, save, publish -----------------------------------------------------------------
    metrics = evaluate()
    for name, value in metrics.items():
        writer.add_scalar(f"eval/{name}", value, total)
    metrics.update({f"{k}_start": v for k, v in metrics_start.items()})
    metrics.update({f"loss_{k}": v for k, v in losses.items()})
    timings["total_s"] = time.perf_counter() - started
    model.eval()
    folder = model.save(out / "model")
    summary = {"metrics": metrics, "timings": timings, "model": str(folder)}
    log(f"ranking: progress {metrics['progress_ranking']:.3f} (start {metrics_start['progress_ranking']:.3f}), "
        f"success vs failure {metrics['success_vs_failure']:.3f}")
    if publish:
        from rise.training import publish_trained

        summary["version"] = publish_trained(registry, "value", folder, kind=KIND, embodiment=config.embodiment_spec, config=config,
                                             metrics=metrics, log=log).version
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    writer.close()
    return summary


def register(train_app: typer.Typer) -> None:
    """Adds `value` to the `rise train` group."""

    @train_app.command("value")
    def value_command(
        config: str = typer.Option("small", "--config", "-c", help="Tier (tiny | small | paper) or a YAML path."),
        data: list[Path] = typer.Option(..., "--data", help="LeRobot dataset folder (repeat for several)."),
        out: Path = typer.Option(..., "--out", help="Run folder: checkpoints, TensorBoard events, model."),
        steps: Optional[int] = typer.Option(None, "--steps", min=0, help="TD steps (overrides the config)."),
        progress_steps: Optional[int] = typer.Option(None, "--progress-steps", min=0,
                                                     help="Progress-only steps (overrides the config)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint."),
        registry: Optional[Path] = typer.Option(None, "--registry", envvar="RISE_REGISTRY_ROOT",
                                                help="Model registry root."),
        publish: bool = typer.Option(False, "--publish", help="Publish the trained model to --registry."),
        device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
        threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for torch (default: torch's choice)."),
        set_: list[str] = typer.Option([], "--set", help="Config override KEY=VALUE, e.g. training.lr=3e-4."),
    ) -> None:
        """Train the progress value model: progress regression, then TD with an EMA target; publish it."""
        from rise.training import run_training_command

        overrides: dict[str, Any] = {}
        if steps is not None:
            overrides["training.td_steps"] = steps
        if progress_steps is not None:
            overrides["training.progress_steps"] = progress_steps
        run_training_command("value", load_model_config, train, config=config, data=data, out=out, resume=resume,
                             registry=registry, publish=publish, set_items=set_, overrides=overrides,
                             device=device, threads=threads)
