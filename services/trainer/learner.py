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
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from services.trainer.config import LearnerConfig
from services.trainer.replay import version_number

CHECKPOINT = "learner.pt"


class Learner:
    def __init__(self, config: LearnerConfig, run_dir: Path, registry, replay, episodes, embodiment,
                 consumer: str, replay_batch_ms: int = 1000, log=print):
        import torch

        from services.policy.model import load_model

        self.config, self.run_dir, self.registry, self.replay = config, Path(run_dir), registry, replay
        self.embodiment, self.consumer, self.replay_batch_ms, self.log = embodiment, consumer, replay_batch_ms, log
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        checkpoint_path = self.run_dir / CHECKPOINT
        state = torch.load(checkpoint_path, weights_only=False) if checkpoint_path.exists() else None
        init_version = state["init_version"] if state else registry.resolve("policy", config.init_policy)
        folder = registry.open("policy", init_version).path
        self.model = load_model(folder).train()
        # A second load, not deepcopy: the frozen MiniLM text encoder holds a lock that cannot be copied.
        self.ema = load_model(folder).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.step, self.samples_used, self.offline_used = 0, 0, 0
        self.init_version, self.published = init_version, [init_version]
        if state:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step, self.samples_used, self.offline_used = state["step"], state["samples_used"], state["offline_used"]
            self.published = state["published"]
            log(f"learner: resumed at step {self.step} ({self.samples_used} replay samples used so far)")
        self.windows, self.offline_labelled = _offline_windows(episodes, embodiment)
        self.pending_ids: list[str] = []  # used in finished steps, acknowledged at the next checkpoint
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

    def train_step(self, stop: threading.Event) -> dict[str, float]:
        import torch

        from services.policy.train import random_shift

        cfg, model, emb = self.config, self.model, self.embodiment
        rng = np.random.default_rng([cfg.seed, self.step])
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        t0 = time.perf_counter()
        ids, items = self._replay_part(int(rng.binomial(cfg.batch_size, 1.0 - cfg.offline_ratio)), stop)
        t_replay = time.perf_counter() - t0
        frames = rng.integers(0, len(self.windows), cfg.batch_size - len(items))
        views, states, tasks, bins, actions, pad = self.windows.batch(frames, model.views)
        if not self.offline_labelled:
            bins = np.zeros_like(bins)
        if items:
            views = {v: np.concatenate([views[v], np.stack([it.views[v] for it in items])]) for v in model.views}
            states = np.concatenate([states, np.stack([it.state for it in items])])
            tasks = list(tasks) + [it.task for it in items]
            bins = np.concatenate([bins, [it.advantage_bin for it in items]])
            actions = np.concatenate([actions, np.stack([it.actions for it in items])])
            pad = np.concatenate([pad, np.zeros((len(items), emb.chunk_length), bool)])
        images = random_shift(model.images_to_input({v: torch.from_numpy(x) for v, x in views.items()}),
                              cfg.random_shift, generator)
        loss = model.flow_matching_loss(
            images, model.state_normalizer.normalize(torch.from_numpy(states.astype(np.float32))), tasks,
            torch.from_numpy(np.asarray(bins, np.int64)), model.normalizer.normalize(torch.from_numpy(actions.astype(np.float32))),
            torch.from_numpy(pad), generator=generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), model.parameters()):
                e.lerp_(p, 1.0 - cfg.ema_decay)
        self.step += 1
        self.offline_used += len(frames)
        self.pending_ids.extend(ids)
        self.bins_seen = (self.bins_seen + [it.advantage_bin for it in items])[-4096:]
        self.metrics = {"loss": loss.item(), "grad_norm": float(grad_norm), "replay_fraction": len(items) / cfg.batch_size,
                        "replay_wait_s": t_replay, "step_s": time.perf_counter() - t0,
                        "staleness": float(np.mean([version_number(self.version) - version_number(it.policy_version)
                                                    for it in items])) if items else 0.0}
        return self.metrics

    # ---- durability -----------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Save, then acknowledge the samples the saved steps used (the order makes it at-least-once)."""
        import torch

        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / f".{CHECKPOINT}.tmp"
        used = self.samples_used + len(self.pending_ids)
        torch.save({"step": self.step, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "samples_used": used, "offline_used": self.offline_used,
                    "init_version": self.init_version, "published": self.published}, tmp)
        os.replace(tmp, self.run_dir / CHECKPOINT)
        if self.pending_ids:
            self.replay.ack(self.pending_ids)
        self.samples_used, self.pending_ids = used, []

    def publish(self) -> str:
        """The EMA weights as a new registry version (parent: the previous one); returns its id."""
        from rise.training import publish_trained
        from services.policy.model import KIND

        manifest = publish_trained(self.registry.root, "policy", self.ema.save(self.run_dir / "publish"), kind=KIND,
                                   embodiment=self.embodiment, config=self.ema.config, parent=self.version, log=self.log,
                                   metrics={"learner_step": float(self.step), "samples_used": float(self.samples_used)})
        self.published.append(manifest.version)
        return manifest.version

    def run(self, stop: threading.Event, on_publish: Callable[[str], None], on_step: Callable[[dict], None]) -> None:
        """Steps until `config.steps` or `stop`; checkpoints on the way and at the end."""
        cfg = self.config
        while self.step < cfg.steps and not stop.is_set():
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
