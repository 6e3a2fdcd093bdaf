"""`rise train dynamics`: train the world model on LeRobot datasets, then publish it.

Reads top to bottom:
  1. data       every episode decoded once into memory; the action normaliser from the datasets'
                min/max statistics; windows (history frames, action chunk, future frames); the
                last `eval_episodes` episodes of each dataset held out for samples and metrics
  2. stage 1    the autoencoder (AutoencoderKLLTXVideo) learns to reconstruct frames: MSE + a
                small KL; then per-channel latent statistics are measured (unit-scale latents)
  3. stage 2    the transformer + action encoder learn flow matching: velocity target noise -
                latents, logit-normal noise levels, loss on the future frames only, task-centric
                batches (TaskBatchSampler); with per-frame latents every frame is encoded once
  4. evaluate   imagined vs real future frames on held-out windows, with the real and with
                shuffled action chunks (an action-following model must do clearly worse with
                the latter); GIFs of real / imagined / shuffled next to the TensorBoard events
  5. publish    weights (safetensors) + config + action normaliser -> the registry

AdamW with linear warm-up then cosine decay to 10%; bf16 autocast on CUDA only; `compile_loss`
(`--compile`) puts the transformer's loss under torch.compile (fused forward and backward: the
`small` tier is op-dispatch bound on a GPU, ~11,000 ATen calls per eager step); a checkpoint
(model + optimiser + stage + step) every `checkpoint_every` steps and at each stage's end, so
`--resume` continues where a run stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from services.dynamics.model import DynamicsModelConfig, load_model_config

CHECKPOINT = "checkpoint.pt"


# ---- data -----------------------------------------------------------------------------------------
class Windows:
    """Index arithmetic for training windows cut from `EpisodesInMemory`.

    A window starting at global frame g: history frames g - (history-1-k) * stride (clamped to
    the episode's first frame, as LeRobot pads), actions g .. g + chunk - 1, future frames
    g + stride, ..., g + chunk (frame t is the observation before action t).
    """

    def __init__(self, episodes, config: DynamicsModelConfig):
        self.episodes, self.config = episodes, config
        self.chunk = config.embodiment_spec.chunk_length
        # A window needs its last future frame inside the episode.
        valid = episodes.frame_index <= episodes.episode_lengths[episodes.frame_episode] - 1 - self.chunk
        held_out = np.zeros(episodes.num_episodes, bool)
        want = config.training.eval_episodes
        for d in np.unique(episodes.episode_dataset):
            mine = np.flatnonzero(episodes.episode_dataset == d)
            if want and len(mine) > want:
                held_out[mine[-want:]] = True
        frame_held_out = held_out[episodes.frame_episode]
        self.train_starts = np.flatnonzero(valid & ~frame_held_out)
        eval_pool = np.flatnonzero(valid & frame_held_out)
        self.eval_pool = eval_pool if len(eval_pool) else self.train_starts
        if not len(self.train_starts):
            raise ValueError(f"no episode is longer than a chunk ({self.chunk} actions): nothing to train on")
        # What TaskBatchSampler reads (it indexes into train_starts).
        self.tasks = episodes.tasks
        self.frame_task_ids = episodes.frame_task_ids[self.train_starts]

    def indices(self, starts: np.ndarray):
        cfg, e = self.config, self.episodes
        first = e.episode_starts[e.frame_episode[starts]]
        back = (np.arange(cfg.history)[::-1] * cfg.frame_stride)[None]
        history = np.maximum(starts[:, None] - back, first[:, None])
        future = starts[:, None] + cfg.frame_stride * np.arange(1, cfg.future_frames + 1)[None]
        actions = starts[:, None] + np.arange(self.chunk)[None]
        return history, future, actions

    def frames(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 history [B, V, T, H, W, 3], future [B, V, F, H, W, 3], float32 actions [B, chunk, A]."""
        history, future, actions = self.indices(starts)
        views = self.config.embodiment_spec.views
        h = np.stack([self.episodes.views[v][history] for v in views], axis=1)
        f = np.stack([self.episodes.views[v][future] for v in views], axis=1)
        return h, f, self.episodes.actions[actions]

    def eval_starts(self, count: int, seed: int) -> np.ndarray:
        """`count` windows of the evaluation pool, as many from each dataset (task) as possible."""
        rng = np.random.default_rng(seed)
        dataset = self.episodes.episode_dataset[self.episodes.frame_episode[self.eval_pool]]
        groups = [self.eval_pool[dataset == d] for d in np.unique(dataset)]
        picked = [rng.permutation(g) for g in groups]
        order = [w for k in range(max(map(len, picked))) for w in (p[k] for p in picked if k < len(p))]
        return np.sort(np.asarray(order[:count]))


def action_normalizer(roots: list[Path]):
    """Min/max over all datasets' statistics (computed and saved first where a dataset lacks them)."""
    from rise.data.stats import ActionNormalizer, load_stats

    lows, highs = [], []
    for root in roots:
        entry = ActionNormalizer.from_stats(load_stats(root), "min_max")
        lows.append(entry.low)
        highs.append(entry.high)
    return ActionNormalizer(np.min(lows, axis=0), np.max(highs, axis=0), "min_max")


# ---- helpers --------------------------------------------------------------------------------------
def learning_rate(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up to `base`, then cosine decay to 10% of it at `total`."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(out: Path, stage: str, step: int, model, optimizer, extra: dict | None = None) -> None:
    import torch

    tmp = out / f".{CHECKPOINT}.tmp"
    torch.save({"stage": stage, "step": step, "model": model.state_dict(),
                "optimizer": optimizer.state_dict() if optimizer is not None else None, **(extra or {})}, tmp)
    os.replace(tmp, out / CHECKPOINT)  # a crash mid-save leaves the previous checkpoint intact


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def moving_mse(pred: np.ndarray, real: np.ndarray, last: np.ndarray, threshold: int = 24) -> float:
    """Mean squared error (in [0, 1] pixel units) over the pixels that change in the real future.

    Most pixels of a robot video are static background that any model copies; the error where
    the scene moves is what separates following the actions from ignoring them.
    """
    moving = np.abs(real.astype(np.int16) - last.astype(np.int16)).max(-1) > threshold
    if not moving.any():
        return float("nan")
    diff = (pred.astype(np.float64) - real.astype(np.float64)) / 255
    return float(np.mean((diff**2).mean(-1)[moving]))


def _label(image: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(image)
    ImageDraw.Draw(canvas).text((2, 1), text, fill=(255, 255, 0))
    return np.asarray(canvas)


def sample_grid(history, real, rows: dict[str, np.ndarray], scale: int = 2) -> list[np.ndarray]:
    """Frames of a GIF: per window a block of rows (real, then each of `rows`) x views.

    history [B, V, T, H, W, 3]; real and rows[...] [B, V, F, H, W, 3]. History frames have a green
    border, imagined ones red; the row name is written on the first view.
    """
    b, v, t = history.shape[:3]
    frames = []
    named = {"real": real, **rows}
    for k in range(t + real.shape[2]):
        blocks = []
        for i in range(b):
            lines = []
            for name, video in named.items():
                tiles = []
                for j in range(v):
                    img = history[i, j, k] if k < t else video[i, j, k - t]
                    img = np.kron(img, np.ones((scale, scale, 1), np.uint8))
                    colour = (0, 200, 0) if k < t else (220, 0, 0)
                    img = np.pad(img, ((2, 2), (2, 2), (0, 0)))
                    img[:2], img[-2:], img[:, :2], img[:, -2:] = colour, colour, colour, colour
                    tiles.append(_label(img, name) if j == 0 else img)
                lines.append(np.concatenate(tiles, axis=1))
            blocks.append(np.concatenate(lines, axis=0))
            blocks.append(np.full((6, blocks[-1].shape[1], 3), 255, np.uint8))
        frames.append(np.concatenate(blocks[:-1], axis=0))
    return frames


def write_gif(path: Path, frames: list[np.ndarray], fps: float = 4) -> Path:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


# ---- evaluation -----------------------------------------------------------------------------------
def evaluate(model, windows: Windows, starts: np.ndarray, num_steps: int, seed: int, device) -> tuple[dict, dict]:
    """Imagine held-out windows with their real and with shuffled action chunks; metrics + arrays."""
    import torch

    from services.dynamics.sampler import LatentWorldModel

    cfg = model.config
    history, real, actions = windows.frames(starts)
    world = LatentWorldModel(model, cfg.embodiment_spec, str(device))
    views = cfg.embodiment_spec.views
    as_dict = {v: history[:, i] for i, v in enumerate(views)}
    stack = lambda out: np.stack([out[v] for v in views], axis=1)  # noqa: E731
    imagined = stack(world.imagine(as_dict, actions, num_steps, seed))
    # Shuffled control: every window gets another window's chunk. The windows are sorted and
    # stratified by dataset, so rolling by half the batch pairs windows of different episodes
    # (neighbours would often share an episode and nearly the same actions).
    shuffled = (stack(world.imagine(as_dict, np.roll(actions, len(starts) // 2, axis=0), num_steps, seed))
                if len(starts) > 1 else imagined)
    with torch.inference_mode():
        px = model.frames_to_pixels(torch.from_numpy(real).to(device))
        reconstructed = model.pixels_to_frames(model.decode_future(model.encode_future(px))).cpu().numpy()
    model.train()
    model.vae.eval()
    last = np.repeat(history[:, :, -1:], real.shape[2], axis=2)
    metrics = {
        "psnr_imagined": psnr(imagined, real),
        "psnr_shuffled_actions": psnr(shuffled, real),
        "psnr_persistence": psnr(last, real),
        "psnr_autoencoder": psnr(reconstructed, real),
        "moving_mse_imagined": moving_mse(imagined, real, last),
        "moving_mse_shuffled_actions": moving_mse(shuffled, real, last),
        "moving_mse_persistence": moving_mse(last, real, last),
    }
    return metrics, {"history": history, "real": real, "imagined": imagined, "shuffled": shuffled}


# ---- training -------------------------------------------------------------------------------------
def train(config: DynamicsModelConfig, data: list[Path], out: Path, *, resume: bool = False,
          registry: Path | None = None, publish: bool = False, device: str = "auto", threads: int | None = None,
          progress: bool = True, log=print, preloaded: tuple | None = None,
          compile_loss: bool = False) -> dict[str, Any]:
    """Train (both stages), save `out/model`, optionally publish; returns a summary (metrics, timings).

    `preloaded`: (EpisodesInMemory, ActionNormalizer) already decoded from `data`, for a machine
    without lerobot/PyAV (bench/dynamics_steps.py exports them once)."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from torch.utils.tensorboard import SummaryWriter

    from rise.config import dump_config
    from rise.data.loading import TaskBatchSampler, load_episodes_in_memory
    from services.dynamics.model import build_model, parameter_counts
    from services.dynamics.sampler import KIND

    started = time.perf_counter()
    out = Path(out)
    data = [Path(d) for d in data]
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    checkpoint_path = out / CHECKPOINT
    if checkpoint_path.exists() and not resume:
        raise FileExistsError(f"{out} holds a run already; pass --resume to continue it or choose a new --out")
    if resume and not checkpoint_path.exists():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {out}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(config))
    emb = config.embodiment_spec
    tcfg = config.training
    torch.manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)

    # 1. data ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    episodes, normalizer = preloaded or (load_episodes_in_memory(data, emb, show_progress=progress),
                                         action_normalizer(data))
    windows = Windows(episodes, config)
    log(f"data: {len(episodes)} frames in {episodes.num_episodes} episodes of {len(episodes.tasks)} task(s), "
        f"{len(windows.train_starts)} training windows, decoded in {time.perf_counter() - t0:.1f} s; "
        f"actions min {np.round(normalizer.low, 3).tolist()} max {np.round(normalizer.high, 3).tolist()}")

    model = build_model(config, normalizer).to(dev)
    log(f"model: {parameter_counts(model)} parameters; {config.sequence_length} tokens per sample "
        f"({len(emb.views)} views x {config.history_latent_frames}+{config.future_latent_frames} latent frames x "
        f"{config.tokens_per_frame}), {config.action_tokens} action tokens; device {dev}"
        f"{' (bf16 autocast)' if bf16 else ''}, {torch.get_num_threads()} CPU threads")
    stage, step, optimizer_state = "autoencoder", 0, None
    if resume:
        checkpoint = torch.load(checkpoint_path, map_location=dev, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        stage, step, optimizer_state = checkpoint["stage"], checkpoint["step"], checkpoint["optimizer"]
        log(f"resumed from {checkpoint_path}: stage {stage}, step {step}")

    writer = SummaryWriter(str(out / "tensorboard"))
    samples_dir = out / "samples"
    samples_dir.mkdir(exist_ok=True)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    timings: dict[str, float] = {}
    losses: dict[str, float] = {}
    autocast = lambda: torch.autocast("cuda", torch.bfloat16, enabled=bf16)  # noqa: E731

    # 2. stage 1: the autoencoder ------------------------------------------------------------------
    acfg = tcfg.autoencoder
    if stage == "autoencoder":
        params = list(model.vae.parameters())
        optimizer = torch.optim.AdamW(params, lr=acfg.lr, weight_decay=0.0)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        clip = acfg.clip_frames
        clip_starts = np.flatnonzero(episodes.frame_index <= episodes.episode_lengths[episodes.frame_episode] - clip)
        model.vae.train()
        t_stage, first_step, ema = time.perf_counter(), step, None
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task("stage 1: autoencoder", total=acfg.steps, completed=step, info="")
            while step < acfg.steps:
                starts = rng.choice(clip_starts, acfg.batch_size)
                view_ids = rng.integers(0, len(emb.views), acfg.batch_size)
                frames = np.stack([episodes.views[emb.views[j]][s:s + clip] for s, j in zip(starts, view_ids)])
                pixels = model.frames_to_pixels(torch.from_numpy(frames).to(dev)).transpose(1, 2)  # [B, 3, T, H, W]
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, acfg.lr, acfg.warmup_steps, acfg.steps)
                with autocast():
                    posterior = model.vae.encode(pixels).latent_dist
                    reconstruction = model.vae.decode(posterior.sample()).sample
                recon = torch.nn.functional.mse_loss(reconstruction.float(), pixels)
                kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1 - posterior.logvar.float()).mean()
                loss = recon + acfg.kl_weight * kl
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                step += 1
                ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
                losses.setdefault("autoencoder_first", loss.item())
                if step % tcfg.log_every == 0 or step == acfg.steps:
                    writer.add_scalar("autoencoder/loss", loss.item(), step)
                    writer.add_scalar("autoencoder/reconstruction_mse", recon.item(), step)
                    writer.add_scalar("autoencoder/kl", kl.item(), step)
                    writer.add_scalar("autoencoder/lr", optimizer.param_groups[0]["lr"], step)
                    psnr_db = 10 * math.log10(4 / max(recon.item(), 1e-10))  # pixels span 2 in [-1, 1]
                    writer.add_scalar("autoencoder/psnr", psnr_db, step)
                bar.update(task, completed=step, info=f"loss {ema:.4f}")
                if step % tcfg.checkpoint_every == 0:
                    save_checkpoint(out, "autoencoder", step, model, optimizer)
        losses["autoencoder_last"] = ema if ema is not None else float("nan")
        timings["autoencoder_s"] = time.perf_counter() - t_stage
        timings["autoencoder_step_s"] = timings["autoencoder_s"] / max(1, acfg.steps - first_step)

        # Unit-scale latents: per-channel statistics of posterior means over a sample of frames.
        model.vae.eval()
        with torch.inference_mode():
            picks = rng.choice(len(episodes), min(len(episodes), 512), replace=False)
            frames = np.stack([episodes.views[v][picks] for v in emb.views], axis=1)[:, :, None]  # [n, V, 1, H, W, 3]
            z = torch.cat([model.encode(model.frames_to_pixels(torch.from_numpy(frames[i:i + 64]).to(dev)), clip=False)
                           for i in range(0, len(frames), 64)])  # still unnormalised: mean 0, std 1 so far
            channels = z.transpose(0, 2).reshape(z.shape[2], -1)
            model.vae.latents_mean.copy_(channels.mean(1))
            model.vae.latents_std.copy_(channels.std(1).clamp_min(1e-4))
            reconstruction = model.decode(model.encode(model.frames_to_pixels(
                torch.from_numpy(frames[:4]).to(dev)), clip=False), clip=False)
            pairs = np.concatenate([frames[:4, :, 0], model.pixels_to_frames(reconstruction[:, :, 0]).cpu().numpy()], axis=2)
            writer.add_image("autoencoder/real_above_reconstruction", np.concatenate(list(np.concatenate(list(pairs), 2)), 1),
                             acfg.steps, dataformats="HWC")
        log(f"stage 1 done: autoencoder loss {losses['autoencoder_last']:.4f} in {timings['autoencoder_s']:.0f} s; "
            f"latent mean {model.vae.latents_mean.abs().mean():.3f}, std {model.vae.latents_std.mean():.3f}")
        stage, step, optimizer_state = "transformer", 0, None
        save_checkpoint(out, stage, step, model, None)

    # 3. stage 2: the denoising transformer and the action encoder ---------------------------------
    xcfg = tcfg.transformer
    eval_starts = windows.eval_starts(tcfg.eval_windows, tcfg.seed)
    metrics: dict[str, float] = {}

    def run_eval(at: int) -> dict[str, float]:
        result, arrays = evaluate(model, windows, eval_starts, config.default_num_steps, tcfg.seed, dev)
        for key, value in result.items():
            if not math.isnan(value):
                writer.add_scalar(f"eval/{key}", value, at)
        shown = np.unique(np.linspace(0, len(eval_starts) - 1, min(4, len(eval_starts))).round().astype(int))
        grid = sample_grid(arrays["history"][shown], arrays["real"][shown],
                           {"imagined": arrays["imagined"][shown], "shuffled": arrays["shuffled"][shown]})
        gif = write_gif(samples_dir / f"step_{at:06d}.gif", grid)
        writer.add_image("samples/last_future_frame", grid[-1], at, dataformats="HWC")
        writer.add_text("samples/gif", str(gif), at)
        return result

    if stage == "transformer":
        model.vae.eval().requires_grad_(False)
        params = list(model.transformer.parameters()) + list(model.action_encoder.parameters())
        optimizer = torch.optim.AdamW(params, lr=xcfg.lr, weight_decay=xcfg.weight_decay)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)

        # Per-frame latents (no temporal compression): encode every frame of every view once.
        latents = None
        if not config.autoencoder.encode_clips:
            t_cache = time.perf_counter()
            with torch.inference_mode():
                chunks = []
                for i in range(0, len(episodes), 128):
                    frames = np.stack([episodes.views[v][i:i + 128] for v in emb.views], axis=1)[:, :, None]
                    chunks.append(model.encode(model.frames_to_pixels(torch.from_numpy(frames).to(dev)), clip=False)[:, :, :, 0])
                latents = torch.cat(chunks)  # [N, V, C, h, w]
            log(f"latents of all {len(episodes)} frames x {len(emb.views)} views cached in "
                f"{time.perf_counter() - t_cache:.1f} s ({latents.numel() * 4 / 2**20:.0f} MiB)")

        def batch(starts: np.ndarray):
            history_idx, future_idx, action_idx = windows.indices(starts)
            actions = model.normalize_actions(torch.from_numpy(episodes.actions[action_idx]).to(dev))
            if latents is not None:
                h = latents[torch.from_numpy(history_idx)].permute(0, 2, 3, 1, 4, 5)  # [B, V, C, T, h, w]
                f = latents[torch.from_numpy(future_idx)].permute(0, 2, 3, 1, 4, 5)
                return h, f, actions
            history, future, _ = windows.frames(starts)
            with torch.no_grad(), autocast():
                h = model.encode_history(model.frames_to_pixels(torch.from_numpy(history).to(dev)))
                f = model.encode_future(model.frames_to_pixels(torch.from_numpy(future).to(dev)))
            return h.float(), f.float(), actions

        def held_out_loss() -> float:
            """Flow-matching loss on the evaluation windows with fixed noise: comparable across steps."""
            with torch.no_grad(), autocast():
                h, f, a = batch(eval_starts)
                return float(np.mean([model.flow_matching_loss(h, f, a, torch.Generator(device=dev).manual_seed(k)).item()
                                      for k in range(4)]))

        if step == 0:
            losses["flow_loss_eval_start"] = held_out_loss()
            writer.add_scalar("eval/flow_loss", losses["flow_loss_eval_start"], 0)

        tasks_per_batch = min(xcfg.tasks_per_batch, len(np.unique(windows.frame_task_ids)))
        if tasks_per_batch < xcfg.tasks_per_batch:
            log(f"the data hold {tasks_per_batch} task(s): batches take {tasks_per_batch} x {xcfg.samples_per_task}")
        sampler = TaskBatchSampler(windows, tasks_per_batch, xcfg.samples_per_task, num_batches=max(1, xcfg.steps),
                                   seed=tcfg.seed)
        batches = iter(sampler)
        for _ in range(step):  # resume: the same batches as an uninterrupted run
            next(batches)
        generator = torch.Generator(device=dev).manual_seed(tcfg.seed + step)
        # The noise is drawn eagerly (flow_noise), so the compiled graph holds no random op: same draws.
        loss_at = torch.compile(model.flow_loss_at, dynamic=False) if compile_loss else model.flow_loss_at
        model.transformer.train()
        model.action_encoder.train()
        t_stage, first_step, ema = time.perf_counter(), step, None
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task("stage 2: transformer", total=xcfg.steps, completed=step, info="")
            while step < xcfg.steps:
                t_step = time.perf_counter()
                history, future, actions = batch(windows.train_starts[np.asarray(next(batches))])
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, xcfg.lr, xcfg.warmup_steps, xcfg.steps)
                with autocast():
                    loss = loss_at(history, future, actions, *model.flow_noise(future, generator))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, xcfg.grad_clip)
                optimizer.step()
                step += 1
                ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
                losses.setdefault("transformer_first", loss.item())
                if step % tcfg.log_every == 0 or step == xcfg.steps:
                    writer.add_scalar("transformer/loss", loss.item(), step)
                    writer.add_scalar("transformer/loss_ema", ema, step)
                    writer.add_scalar("transformer/grad_norm", float(grad_norm), step)
                    writer.add_scalar("transformer/lr", optimizer.param_groups[0]["lr"], step)
                    writer.add_scalar("transformer/step_seconds", time.perf_counter() - t_step, step)
                bar.update(task, completed=step, info=f"loss {ema:.4f}")
                if step % tcfg.sample_every == 0 and step < xcfg.steps:
                    writer.add_scalar("eval/flow_loss", held_out_loss(), step)
                    result = run_eval(step)
                    log(f"step {step}: loss {ema:.4f}; PSNR imagined {result['psnr_imagined']:.2f} dB, shuffled actions "
                        f"{result['psnr_shuffled_actions']:.2f} dB, persistence {result['psnr_persistence']:.2f} dB")
                if step % tcfg.checkpoint_every == 0:
                    save_checkpoint(out, "transformer", step, model, optimizer)
        losses["transformer_last"] = ema if ema is not None else float("nan")
        losses["flow_loss_eval"] = held_out_loss()
        writer.add_scalar("eval/flow_loss", losses["flow_loss_eval"], step)
        timings["transformer_s"] = time.perf_counter() - t_stage
        timings["transformer_step_s"] = timings["transformer_s"] / max(1, xcfg.steps - first_step)
        save_checkpoint(out, "transformer", step, model, optimizer)  # --resume --steps M>N extends the run

    # 4. evaluate, save, publish -----------------------------------------------------------------
    metrics = run_eval(xcfg.steps)
    metrics.update({k if k.startswith("flow_loss") else f"loss_{k}": v for k, v in losses.items()})
    timings["total_s"] = time.perf_counter() - started
    folder = model.save(out / "model")
    summary = {"metrics": metrics, "timings": timings, "model": str(folder), "gif": str(samples_dir / f"step_{xcfg.steps:06d}.gif")}
    if publish:
        from rise.training import publish_trained

        summary["version"] = publish_trained(registry, "dynamics", folder, kind=KIND, embodiment=emb, config=config,
                                             metrics=metrics, log=log).version
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    writer.close()
    return summary


def register(train_app: typer.Typer) -> None:
    """Adds `dynamics` to the `rise train` group."""

    @train_app.command("dynamics")
    def dynamics_command(
        config: str = typer.Option("small", "--config", "-c", help="Tier (tiny | small | paper) or a YAML path."),
        data: list[Path] = typer.Option(..., "--data", help="LeRobot dataset folder (repeat for several)."),
        out: Path = typer.Option(..., "--out", help="Run folder: checkpoints, TensorBoard events, samples, model."),
        steps: Optional[int] = typer.Option(None, "--steps", min=0, help="Transformer steps (overrides the config)."),
        autoencoder_steps: Optional[int] = typer.Option(None, "--autoencoder-steps", min=0,
                                                        help="Autoencoder steps (overrides the config)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint."),
        registry: Optional[Path] = typer.Option(None, "--registry", envvar="RISE_REGISTRY_ROOT",
                                                help="Model registry root."),
        publish: bool = typer.Option(False, "--publish", help="Publish the trained model to --registry."),
        device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
        threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for torch (default: torch's choice)."),
        set_: list[str] = typer.Option([], "--set", help="Config override KEY=VALUE, e.g. training.transformer.lr=3e-4."),
        compile_loss: bool = typer.Option(False, "--compile",
                                          help="torch.compile the transformer's loss (GPUs: the small tier is dispatch-bound)."),
    ) -> None:
        """Train the dynamics (world) model: autoencoder, then flow-matching transformer; publish it."""
        from rise.training import run_training_command

        overrides: dict[str, Any] = {}
        if steps is not None:
            overrides["training.transformer.steps"] = steps
        if autoencoder_steps is not None:
            overrides["training.autoencoder.steps"] = autoencoder_steps
        run_training_command("dynamics", load_model_config, train, config=config, data=data, out=out, resume=resume,
                             registry=registry, publish=publish, set_items=set_, overrides=overrides,
                             device=device, threads=threads, compile_loss=compile_loss)
