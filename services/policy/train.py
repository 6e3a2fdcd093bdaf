"""`rise train policy`: train the flow-matching policy on LeRobot datasets, then publish it.

Reads top to bottom:
  1. data       every episode decoded once into memory (`load_episodes_in_memory`); action and
                state normalisers from the datasets' min/max statistics; a window per frame t:
                views and state at t, actions t .. t+chunk-1 (past the episode's end: the last
                action repeated and masked out of the loss, as LeRobot pads)
  2. bins       `imitation`: every window gets the null bin 0. `advantage` (RECAP-style offline
                advantage conditioning): each frame's `advantage_bin` column (written by
                `rise label`), replaced by the null bin with probability `advantage_dropout` so
                the same model still answers the null prompt
  3. train      flow matching (velocity target noise - actions), AdamW, linear warm-up then
                cosine decay to 10%; `--init` starts from a trained model (the imitation warm-up)
  4. evaluate   sampled chunks vs recorded ones on fixed windows (action MSE, in action units)
  5. publish    weights (safetensors) + config + normalisers -> the registry (`kind`
                flow_matching_policy; `parent` = the --init version when it came from a registry)

A checkpoint (model + optimiser + step) every `checkpoint_every` steps and at the end, so
`--resume` continues where a run stopped (and `--resume --steps M` extends a finished run).
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
import yaml

from services.policy.model import NULL_BIN, NUM_BINS, PolicyModelConfig, load_model_config

CHECKPOINT = "checkpoint.pt"
NORMALIZERS = "normalizers.json"  # the run's, so --resume normalises as the run began
ADVANTAGE_COLUMN = "advantage_bin"
MODES = ("imitation", "advantage")


# ---- data -----------------------------------------------------------------------------------------
def normalizer(roots: list[Path], feature: str):
    """Min/max over all datasets' statistics of `feature` (computed and saved first where missing)."""
    from rise.data.stats import ActionNormalizer, load_stats

    entries = [ActionNormalizer.from_stats(load_stats(root), "min_max", feature=feature) for root in roots]
    return ActionNormalizer(np.min([e.low for e in entries], axis=0), np.max([e.high for e in entries], axis=0), "min_max")


def advantage_bins(roots: list[Path], embodiment) -> np.ndarray:
    """int64 [N]: every frame's `advantage_bin`, in `load_episodes_in_memory`'s frame order."""
    from rise.data.dataset import open_dataset

    out = []
    for root in roots:
        dataset = open_dataset(root, embodiment)
        columns = dataset.hf_dataset.column_names
        if ADVANTAGE_COLUMN not in columns:
            raise ValueError(f"{root} has no {ADVANTAGE_COLUMN!r} column (it has {sorted(columns)}): --mode advantage "
                             "trains on a labelled dataset; make one with `rise label` (value model -> advantage bins), "
                             "or train with --mode imitation")
        table = dataset.hf_dataset.with_format("numpy").select_columns(["episode_index", "frame_index", ADVANTAGE_COLUMN])[:]
        for episode in dataset.meta.episodes.with_format("numpy")[:]["episode_index"].tolist():
            rows = np.flatnonzero(table["episode_index"] == episode)
            rows = rows[np.argsort(table["frame_index"][rows])]
            out.append(np.asarray(table[ADVANTAGE_COLUMN][rows]).reshape(len(rows), -1)[:, 0].astype(np.int64))
    bins = np.concatenate(out)
    bad = bins[(bins < 0) | (bins > NUM_BINS)]
    if len(bad):
        raise ValueError(f"{ADVANTAGE_COLUMN} values must be 0..{NUM_BINS}, found {int(bad[0])}")
    return bins


class Windows:
    """Training windows cut from `EpisodesInMemory`: one per frame (observation t, actions t..t+chunk-1)."""

    def __init__(self, episodes, chunk: int, bins: np.ndarray | None = None):
        self.episodes, self.chunk = episodes, chunk
        self.bins = np.zeros(len(episodes), np.int64) if bins is None else bins
        if len(self.bins) != len(episodes):
            raise ValueError(f"{len(self.bins)} advantage bins for {len(episodes)} frames")
        last = episodes.episode_starts + episodes.episode_lengths - 1
        self.last = last[episodes.frame_episode]

    def __len__(self) -> int:
        return len(self.episodes)

    def batch(self, frames: np.ndarray, views: list[str]):
        """views {v: uint8 [B, H, W, 3]}, states [B, S], task texts, bins [B], actions [B, chunk, A], pad [B, chunk]."""
        e = self.episodes
        idx = frames[:, None] + np.arange(self.chunk)[None]
        pad = idx > self.last[frames][:, None]
        idx = np.minimum(idx, self.last[frames][:, None])
        tasks = [e.tasks[i] for i in e.frame_task_ids[frames]]
        return ({v: e.views[v][frames] for v in views}, e.states[frames], tasks, self.bins[frames],
                e.actions[idx], pad)


# ---- helpers --------------------------------------------------------------------------------------
def learning_rate(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up to `base`, then cosine decay to 10% of it at `total`."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def random_shift(images, pad: int, generator):
    """DrQ-style augmentation: replicate-pad by `pad` px and crop back at a random offset per image."""
    import torch

    if pad <= 0:
        return images
    b, v, c, h, w = images.shape
    x = torch.nn.functional.pad(images.flatten(0, 1), (pad,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (b * v,), generator=generator).tolist()
    dy = torch.randint(0, 2 * pad + 1, (b * v,), generator=generator).tolist()
    return torch.stack([x[i, :, y:y + h, xx:xx + w] for i, (xx, y) in enumerate(zip(dx, dy))]).view(b, v, c, h, w)


def save_checkpoint(out: Path, step: int, model, optimizer) -> None:
    import torch

    tmp = out / f".{CHECKPOINT}.tmp"
    torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp)
    os.replace(tmp, out / CHECKPOINT)  # a crash mid-save leaves the previous checkpoint intact


def evaluate(model, windows: Windows, frames: np.ndarray, num_steps: int, seed: int, device) -> dict[str, float]:
    """Sampled (null bin and, where labelled, each window's own bin) vs recorded chunks: MSE in action units."""

    from services.policy.model import FlowMatchingPolicy

    model.eval()
    policy = FlowMatchingPolicy(model, model.config.embodiment_spec, str(device))
    views, states, tasks, bins, actions, pad = windows.batch(frames, model.views)
    keep = ~pad
    metrics = {}
    for name, prompt in (("null", np.zeros_like(bins)), ("labelled", bins)):
        if name == "labelled" and not bins.any():
            continue
        chunks = policy.act(views, states, tasks, prompt, num_steps, seed)
        metrics[f"action_mse_{name}_bin"] = float(((chunks - actions) ** 2)[keep].mean())
    model.train()
    return metrics


# ---- training -------------------------------------------------------------------------------------
def train(config: PolicyModelConfig, data: list[Path], out: Path, *, init: Path | None = None, resume: bool = False,
          registry: Path | None = None, publish: bool = False, device: str = "auto", threads: int | None = None,
          progress: bool = True, log=print) -> dict[str, Any]:
    """Train, save `out/model`, optionally publish; returns a summary (metrics, timings, version)."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from torch.utils.tensorboard import SummaryWriter

    from rise.config import dump_config
    from rise.data.loading import load_episodes_in_memory
    from rise.data.stats import ActionNormalizer
    from services.policy.model import KIND, build_model, load_model, parameter_count

    started = time.perf_counter()
    out, data = Path(out), [Path(d) for d in data]
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    checkpoint_path = out / CHECKPOINT
    if checkpoint_path.exists() and not resume:
        raise FileExistsError(f"{out} holds a run already; pass --resume to continue it or choose a new --out")
    if resume and not checkpoint_path.exists():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {out}")
    tcfg = config.training
    parent = ""
    if init is not None:
        # The architecture and normalisers come from the initial model (its weights fit them); the
        # training section from this run's config.
        init = Path(init)
        if not (init / "config.yaml").is_file():
            raise FileNotFoundError(f"--init {init}: not a saved policy (no config.yaml); give a run's model/ folder "
                                    "or a registry version folder")
        saved = PolicyModelConfig.model_validate(yaml.safe_load((init / "config.yaml").read_text()))
        config = saved.model_copy(update={"training": tcfg})
        if (init / "manifest.json").is_file():
            parent = json.loads((init / "manifest.json").read_text()).get("version", "")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(config))
    emb = config.embodiment_spec
    torch.manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)

    # 1-2. data and bins ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    bins = advantage_bins(data, emb) if tcfg.mode == "advantage" else None  # fails fast, before decoding
    episodes = load_episodes_in_memory(data, emb, show_progress=progress)
    windows = Windows(episodes, emb.chunk_length, bins)
    if init is not None:
        model = load_model(init, str(dev), config)
        log(f"initialised from {init}" + (f" (version {parent})" if parent else ""))
    elif resume and (out / NORMALIZERS).is_file():  # the run's own normalisers (an --init run kept its model's)
        saved = json.loads((out / NORMALIZERS).read_text())
        model = build_model(config, ActionNormalizer.from_dict(saved["action"]),
                            ActionNormalizer.from_dict(saved["state"])).to(dev)
    else:
        model = build_model(config, normalizer(data, "action"), normalizer(data, "observation.state")).to(dev)
    (out / NORMALIZERS).write_text(json.dumps({"action": model.normalizer.to_dict(),
                                               "state": model.state_normalizer.to_dict()}, indent=2) + "\n")
    log(f"data: {len(episodes)} frames in {episodes.num_episodes} episodes of {len(episodes.tasks)} task(s), "
        f"decoded in {time.perf_counter() - t0:.1f} s; mode {tcfg.mode}"
        + (f", bins {np.bincount(windows.bins, minlength=NUM_BINS + 1).tolist()}" if bins is not None else ""))
    log(f"model: {parameter_count(model)} parameters, {config.prefix_tokens} prefix + {emb.chunk_length} action tokens; "
        f"device {dev}{' (bf16 autocast)' if bf16 else ''}, {torch.get_num_threads()} CPU threads")

    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    step = 0
    if resume:
        checkpoint = torch.load(checkpoint_path, map_location=dev, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step = checkpoint["step"]
        log(f"resumed from {checkpoint_path} at step {step}")
    eval_frames = np.sort(rng.choice(len(windows), size=min(tcfg.eval_windows, len(windows)), replace=False))
    # Batches drawn from a generator seeded by (seed, step): a resumed run sees what an uninterrupted one would.
    writer = SummaryWriter(str(out / "tensorboard"))
    autocast = lambda: torch.autocast("cuda", torch.bfloat16, enabled=bf16)  # noqa: E731
    losses: dict[str, float] = {}
    timings: dict[str, float] = {}

    # 3. train ---------------------------------------------------------------------------------------
    model.train()
    t_train, first_step, ema = time.perf_counter(), step, None
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(f"policy ({tcfg.mode})", total=tcfg.steps, completed=step, info="")
        while step < tcfg.steps:
            batch_rng = np.random.default_rng([tcfg.seed, step])
            generator = torch.Generator().manual_seed(int(batch_rng.integers(2**62)))
            frames = batch_rng.integers(0, len(windows), tcfg.batch_size)
            views, states, tasks, b, actions, pad = windows.batch(frames, model.views)
            if bins is not None:  # classifier-free style: some labelled samples shown with the null bin
                b = np.where(batch_rng.random(len(b)) < tcfg.advantage_dropout, NULL_BIN, b)
            images = random_shift(model.images_to_input({v: torch.from_numpy(x) for v, x in views.items()}),
                                  tcfg.random_shift, generator).to(dev)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, tcfg.lr, tcfg.warmup_steps, tcfg.steps)
            with autocast():
                loss = model.flow_matching_loss(
                    images, model.state_normalizer.normalize(torch.from_numpy(states).to(dev)), tasks,
                    torch.from_numpy(b).to(dev), model.normalizer.normalize(torch.from_numpy(actions).to(dev)),
                    torch.from_numpy(pad).to(dev), generator=None if dev.type == "cuda" else generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            optimizer.step()
            step += 1
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            losses.setdefault("loss_first", loss.item())
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/loss_ema", ema, step)
                writer.add_scalar("train/grad_norm", float(grad_norm), step)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
            bar.update(task, completed=step, info=f"loss {ema:.4f}")
            if step % tcfg.checkpoint_every == 0:
                save_checkpoint(out, step, model, optimizer)
    losses["loss_last"] = ema if ema is not None else float("nan")
    timings["train_s"] = time.perf_counter() - t_train
    timings["step_s"] = timings["train_s"] / max(1, tcfg.steps - first_step)
    save_checkpoint(out, step, model, optimizer)

    # 4-5. evaluate, save, publish -------------------------------------------------------------------
    metrics = evaluate(model, windows, eval_frames, config.default_num_steps, tcfg.seed, dev)
    for key, value in metrics.items():
        writer.add_scalar(f"eval/{key}", value, step)
    metrics.update(losses)
    timings["total_s"] = time.perf_counter() - started
    folder = model.save(out / "model")
    summary: dict[str, Any] = {"metrics": metrics, "timings": timings, "model": str(folder), "mode": tcfg.mode}
    log(f"done: loss {losses.get('loss_first', float('nan')):.4f} -> {losses['loss_last']:.4f}; "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("action_mse")))
    if publish:
        from rise.training import publish_trained

        summary["version"] = publish_trained(registry, "policy", folder, kind=KIND, embodiment=emb, config=config,
                                             metrics=metrics, parent=parent, log=log).version
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    writer.close()
    return summary


def register(train_app: typer.Typer) -> None:
    """Adds `policy` to the `rise train` group."""

    @train_app.command("policy")
    def policy_command(
        config: str = typer.Option("small", "--config", "-c", help="Tier (tiny | small | paper) or a YAML path."),
        data: list[Path] = typer.Option(..., "--data", help="LeRobot dataset folder (repeat for several)."),
        out: Path = typer.Option(..., "--out", help="Run folder: checkpoint, TensorBoard events, model."),
        mode: Optional[str] = typer.Option(None, "--mode", help="imitation (null bin) | advantage (the datasets' "
                                           "advantage_bin column, from `rise label`); default: the config's."),
        init: Optional[Path] = typer.Option(None, "--init", help="Start from a saved policy (a run's model/ folder "
                                            "or a registry version folder), e.g. the imitation warm-up."),
        steps: Optional[int] = typer.Option(None, "--steps", min=0, help="Training steps (overrides the config)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint."),
        registry: Optional[Path] = typer.Option(None, "--registry", envvar="RISE_REGISTRY_ROOT", help="Model registry root."),
        publish: bool = typer.Option(False, "--publish", help="Publish the trained model to --registry."),
        device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
        threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for torch (default: torch's choice)."),
        set_: list[str] = typer.Option([], "--set", help="Config override KEY=VALUE, e.g. training.lr=1e-4."),
    ) -> None:
        """Train the advantage-conditioned flow-matching policy (imitation or RECAP-style); publish it."""
        from rise.training import run_training_command

        overrides: dict[str, Any] = {}
        if steps is not None:
            overrides["training.steps"] = steps
        if mode is not None:
            if mode not in MODES:
                raise typer.BadParameter(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
            overrides["training.mode"] = mode
        run_training_command("policy", load_model_config, train, config=config, data=data, out=out, resume=resume,
                             registry=registry, publish=publish, set_items=set_, overrides=overrides,
                             init=None if resume else init, device=device, threads=threads)
