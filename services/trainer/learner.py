"""The learner: advantage-conditioned flow matching on imagined samples mixed with offline data.

One optimizer step:
  1. each of the batch's samples is offline with probability `offline_ratio` (0.6); the rest
     come from the replay stream (the samples-per-insert limiter may make it wait; if the
     stream stays empty the batch is filled offline, never stalled forever);
  2. imagined samples train under the advantage bin they earned, offline ones under their
     labelled bin (a `rise label`-ed dataset) or the null bin;
  3. the EMA copy (decay 0.995) follows; it is what gets published and rolled out.

Replay samples are acknowledged only when a checkpoint holding the steps that used them is on
disk: a learner killed at any point resumes from its checkpoint and gets the unacknowledged
samples back (at-least-once). `samples_used` in the checkpoint counts replay samples used by
checkpointed steps; a kill between a checkpoint and its acknowledgement re-delivers (and so
counts twice) that checkpoint's samples, which Redis's own `consumed` counter counts once.

Under torchrun the same learner runs on every rank (`distributed.py`): each draws 1/N of the
batch from its own replay consumer and offline shard, gradients meet in DDP (or FSDP), and the
checkpoint is a torch.distributed.checkpoint folder; one process is the world of one.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from services.trainer import distributed
from services.trainer.config import LearnerConfig
from services.trainer.distributed import World
from services.trainer.replay import version_number

CHECKPOINT = "learner.pt"  # the single process's checkpoint; ranks write distributed.CHECKPOINTS folders


@dataclass
class Batch:
    """One rank's share of a step: offline windows followed by replay samples, and the step's seed."""

    views: dict[str, np.ndarray]
    states: np.ndarray
    tasks: list[str]
    bins: np.ndarray
    actions: np.ndarray
    pad: np.ndarray
    seed: int  # of the torch generator: flow-matching noise, times and image shifts
    ids: list[str]  # replay entry ids, acknowledged after the next checkpoint
    items: list  # the replay samples (ReplayItem)
    offline: int  # offline windows in the batch
    replay_wait_s: float


class Learner:
    def __init__(self, config: LearnerConfig, run_dir: Path, registry, replay, episodes, embodiment,
                 consumer: str, replay_batch_ms: int = 1000, log=print, world: World | None = None):
        import torch

        from services.policy.model import load_model

        self.config, self.run_dir, self.registry, self.replay = config, Path(run_dir), registry, replay
        self.world = world or World()
        self.embodiment, self.consumer, self.replay_batch_ms, self.log = (
            embodiment, self.world.consumer_name(consumer), replay_batch_ms, log)
        if config.batch_size % self.world.size:
            raise ValueError(f"learner.batch_size {config.batch_size} is the global batch: it must divide over "
                             f"{self.world.size} ranks")
        self.local_batch = config.batch_size // self.world.size
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        checkpoint_path = self.run_dir / CHECKPOINT
        meta = distributed.read_meta(self.run_dir) if self.world.distributed else None
        state = torch.load(checkpoint_path, weights_only=False) if not self.world.distributed and checkpoint_path.exists() else None
        saved = state or meta
        init_version = saved["init_version"] if saved else registry.resolve("policy", config.init_policy)
        folder = registry.open("policy", init_version).path
        self._plain_policy = lambda: load_model(folder)
        self.model = load_model(folder).train()
        # A second load, not deepcopy: the frozen MiniLM text encoder holds a lock that cannot be copied.
        self.ema = load_model(folder).eval().requires_grad_(False)
        # What a step calls (the loss; DDP / FSDP around it on several ranks) and the EMA's checkpoint root.
        self.loss_module, self.ema_root = distributed.wrap(self.world, config.distributed, self.model, self.ema)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.step, self.samples_used, self.offline_used = 0, 0, 0
        self.init_version, self.published = init_version, [init_version]
        if state:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        elif meta:
            distributed.load_checkpoint(self.run_dir, self.loss_module, self.ema_root, self.optimizer)
        if saved:
            self.step, self.samples_used, self.offline_used = saved["step"], saved["samples_used"], saved["offline_used"]
            self.published = saved["published"]
            log(f"learner: resumed at step {self.step} ({self.samples_used} replay samples used so far)")
        self.windows, self.offline_labelled = _offline_windows(episodes, embodiment)
        self.shard = self.world.offline_shard(episodes)  # the frames this rank draws offline samples from
        self.pending_ids: list[str] = []  # used in finished steps, acknowledged at the next checkpoint
        self._offline_unsaved = 0  # offline windows used since the last checkpoint
        self.metrics: dict[str, float] = {}
        self.bins_seen: list[int] = []

    @property
    def version(self) -> str:
        """The newest published version: the staleness bound counts from it."""
        return self.published[-1]

    # ---- one step ------------------------------------------------------------------------------
    def _replay_part(self, n: int, stop: threading.Event):
        """n replay samples, waiting up to `replay_wait_s` for imagination to make them (then fewer):
        the batch keeps its offline ratio unless the rollouts fall far behind."""
        deadline = time.monotonic() + self.config.replay_wait_s
        if n == 0 or not self.replay.wait_learner(n, timeout_s=self.config.replay_wait_s, stop=stop.is_set):
            return [], []
        ids, items = [], []
        while len(items) < n and not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            batch = self.replay.read(self.consumer, n - len(items), max(1, min(self.replay_batch_ms, int(left * 1000))),
                                     current_version=self.version)
            ids += batch.ids
            items += batch.items
        return ids, items

    def draw(self, stop: threading.Event) -> Batch:
        """This rank's share of the next step: replay samples (its own consumer) and offline windows (its own shard)."""
        cfg, emb, views_used = self.config, self.embodiment, self.model.views
        rng = np.random.default_rng(self.world.seed(cfg.seed, self.step))
        seed = int(rng.integers(2**62))
        t0 = time.perf_counter()
        ids, items = self._replay_part(int(rng.binomial(self.local_batch, 1.0 - cfg.offline_ratio)), stop)
        t_replay = time.perf_counter() - t0
        frames = self.shard[rng.integers(0, len(self.shard), self.local_batch - len(items))]
        views, states, tasks, bins, actions, pad = self.windows.batch(frames, views_used)
        if not self.offline_labelled:
            bins = np.zeros_like(bins)
        if items:
            views = {v: np.concatenate([views[v], np.stack([it.views[v] for it in items])]) for v in views_used}
            states = np.concatenate([states, np.stack([it.state for it in items])])
            tasks = list(tasks) + [it.task for it in items]
            bins = np.concatenate([bins, [it.advantage_bin for it in items]])
            actions = np.concatenate([actions, np.stack([it.actions for it in items])])
            pad = np.concatenate([pad, np.zeros((len(items), emb.chunk_length), bool)])
        return Batch(views, states, list(tasks), np.asarray(bins, np.int64), actions, pad, seed, ids, items, len(frames),
                     t_replay)

    def loss(self, batch: Batch):
        """Advantage-conditioned flow matching on one batch (through DDP / FSDP when there are ranks)."""
        import torch

        from services.policy.train import random_shift

        model, device = self.model, self.world.device
        generator = torch.Generator().manual_seed(batch.seed)
        images = random_shift(model.images_to_input({v: torch.from_numpy(x) for v, x in batch.views.items()}),
                              self.config.random_shift, generator)
        return self.loss_module(
            images.to(device), model.state_normalizer.normalize(torch.from_numpy(batch.states.astype(np.float32))).to(device),
            batch.tasks, torch.from_numpy(batch.bins).to(device),
            model.normalizer.normalize(torch.from_numpy(batch.actions.astype(np.float32))).to(device),
            torch.from_numpy(batch.pad).to(device), generator=generator)

    def apply(self, loss) -> float:
        """Backward, clip, optimizer step, EMA; -> the gradient norm (gradients already averaged over ranks)."""
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                distributed.local(e).lerp_(distributed.local(p), 1.0 - self.config.ema_decay)
        return float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)

    def train_step(self, stop: threading.Event) -> dict[str, float]:
        t0 = time.perf_counter()
        batch = self.draw(stop)
        loss = self.loss(batch)
        grad_norm = self.apply(loss)
        items = batch.items
        self.step += 1
        self.offline_used += batch.offline
        self._offline_unsaved += batch.offline
        self.pending_ids.extend(batch.ids)
        self.bins_seen = (self.bins_seen + [it.advantage_bin for it in items])[-4096:]
        self.metrics = {"loss": loss.item(), "grad_norm": grad_norm, "replay_fraction": len(items) / self.local_batch,
                        "replay_wait_s": batch.replay_wait_s, "step_s": time.perf_counter() - t0,
                        "staleness": float(np.mean([version_number(self.version) - version_number(it.policy_version)
                                                    for it in items])) if items else 0.0}
        return self.metrics

    # ---- durability -----------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Save, then acknowledge the samples the saved steps used (the order makes it at-least-once).

        Counters are summed over the ranks; each rank acknowledges its own samples, after the commit."""
        import torch

        self.run_dir.mkdir(parents=True, exist_ok=True)
        pending, offline = self.world.sum([len(self.pending_ids), self._offline_unsaved])
        used, offline_used = self.samples_used + int(pending), self.offline_used - self._offline_unsaved + int(offline)
        meta = {"step": self.step, "samples_used": used, "offline_used": offline_used,
                "init_version": self.init_version, "published": self.published}
        if self.world.distributed:
            distributed.save_checkpoint(self.world, self.run_dir, self.step, self.loss_module, self.ema_root, self.optimizer,
                                        {**meta, "world_size": self.world.size, "strategy": self.world.strategy},
                                        keep=self.config.distributed.keep_checkpoints)
        else:
            tmp = self.run_dir / f".{CHECKPOINT}.tmp"
            torch.save({**meta, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                        "optimizer": self.optimizer.state_dict()}, tmp)
            os.replace(tmp, self.run_dir / CHECKPOINT)
        if self.pending_ids:
            self.replay.ack(self.pending_ids)
        self.samples_used, self.offline_used, self.pending_ids, self._offline_unsaved = used, offline_used, [], 0

    def publish(self) -> str:
        """The EMA weights as a new registry version (parent: the previous one); returns its id.
        Rank 0 publishes; the other ranks learn the id (the staleness bound counts from it)."""
        from rise.training import publish_trained
        from services.policy.model import KIND

        ema, version = distributed.full_module(self.world, self.ema_root, self._plain_policy), None
        if self.world.is_main:
            manifest = publish_trained(self.registry.root, "policy", ema.save(self.run_dir / "publish"), kind=KIND,
                                       embodiment=self.embodiment, config=ema.config, parent=self.version, log=self.log,
                                       metrics={"learner_step": float(self.step), "samples_used": float(self.samples_used)})
            version = manifest.version
        self.published.append(self.world.broadcast(version))
        return self.published[-1]

    def run(self, stop: threading.Event, on_publish: Callable[[str], None], on_step: Callable[[dict], None]) -> None:
        """Steps until `config.steps` or `stop` (on any rank); checkpoints on the way and at the end."""
        cfg = self.config
        while self.step < cfg.steps and not self.world.any(stop.is_set()):
            metrics = self.train_step(stop)
            if self.step % cfg.checkpoint_every == 0:
                self.checkpoint()
            if self.step % cfg.publish_every == 0:
                version = self.publish()
                self.checkpoint()  # records the new version (the staleness bound counts from it)
                on_publish(version)
            on_step(metrics)
        self.checkpoint()


def _offline_windows(episodes, embodiment):
    """Training windows over the offline data, with their `advantage_bin` labels where the data has them."""
    from services.policy.train import ADVANTAGE_COLUMN, Windows, advantage_bins

    try:
        bins = advantage_bins(episodes.roots, embodiment)
        return Windows(episodes, embodiment.chunk_length, bins), True
    except ValueError as exc:
        if ADVANTAGE_COLUMN not in str(exc):
            raise
        return Windows(episodes, embodiment.chunk_length), False
