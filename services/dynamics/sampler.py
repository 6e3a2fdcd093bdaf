"""Imagination: few-step flow-matching sampling of future frames, and the service-facing model.

    history frames --encode--> clean latents      action chunk --normalise, encode--> tokens
    future latents <- seeded noise
    for t in FlowMatchEulerDiscreteScheduler(num_steps).timesteps:
        v = transformer(history + future tokens, per-token timesteps, action tokens)
        future = scheduler.step(v, t, future)
    (+ the last history latent frame, with predict_change)
    future latents --decode--> uint8 frames

Seeds: item b of a call with seed s starts from noise drawn with torch.Generator seeded from
SeedSequence([s, b]): the same (seed, position) gives the same frames whatever else is in the
batch, and different seeds give different futures.

Compiled serving (`compile_mode`, for GPUs): the transformer runs through torch.compile (with
`reduce-overhead`, as CUDA graphs), one static graph per batch size. Batches are padded to the
next power of two (repeating the last item; its output is dropped), so a service whose dynamic
batching makes every size from 1 to max_batch_size compiles only a handful of graphs, all of them
while the version loads (`warm_up`), never during a request: a request bigger than the largest
warmed-up size runs in slices of that size. bench/RESULTS.md has the timings.
"""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from rise.embodiment import Embodiment
from rise.errors import FailedPrecondition, InvalidArgument
from rise.registry import VerifiedVersion

# The registry `kind` of versions this module loads.
KIND = "ltx_latent_flow"


def item_generator(seed: int, index: int, device="cpu"):
    import torch

    state = np.random.SeedSequence([int(seed) % 2**64, index]).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


# torch.compile modes of the transformer ("off": eager).
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]
COMPILE_MODES = get_args(CompileMode)


def padded_batch_size(batch: int) -> int:
    """The batch a compiled model runs for `batch` items: the next power of two."""
    return 1 << (batch - 1).bit_length()


def sample_future_latents(model, history_latents, action_tokens, num_steps: int, seeds: list[tuple[int, int]],
                          transformer=None):
    """Future latents [B, V, C, tf, h, w] given clean history latents and encoded actions.

    seeds: (seed, index) per batch item, for its starting noise. transformer: what runs the
    denoising steps (a compiled wrapper of model.transformer), default the model's own.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = model.config
    b, v, c, _, h, w = history_latents.shape
    shape = (v, c, cfg.future_latent_frames, h, w)
    device = history_latents.device
    noise = [torch.randn(shape, generator=item_generator(s, i), dtype=torch.float32) for s, i in seeds]
    future = torch.stack(noise).to(device=device, dtype=history_latents.dtype)
    # A scheduler per call: it keeps a step index, and concurrent calls must not share one.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.scheduler_shift)
    scheduler.set_timesteps(num_steps, device=device)
    for t in scheduler.timesteps:
        velocity = model.velocity(history_latents, future, t.expand(b), action_tokens, transformer)
        future = scheduler.step(velocity, t, future).prev_sample.to(history_latents.dtype)
    return future + model.anchor(history_latents)


class LatentWorldModel:
    """What the dynamics service calls: `imagine(history, actions, num_steps, seed)`."""

    def __init__(self, model, embodiment: Embodiment, device: str = "cpu", compile_mode: CompileMode = "off"):
        """compile_mode: torch.compile mode of the transformer ("off": eager; compiled models run
        power-of-two batches)."""
        import torch

        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")

        self.model = model.to(device).eval()
        self.config = model.config
        self.embodiment = embodiment
        self.device = torch.device(device)
        self.future_frames = self.config.future_frames
        self.history = self.config.history
        mine = self.config.embodiment_spec
        for field in ("views", "action_dim", "chunk_length"):
            if getattr(mine, field) != getattr(embodiment, field):
                raise FailedPrecondition(f"the model was built for {field} {getattr(mine, field)!r}, the service's "
                                         f"embodiment {embodiment.name!r} has {getattr(embodiment, field)!r}")
        self._autocast = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self._lock = threading.Lock()  # one batch at a time: CPU threads are shared anyway
        self.compile_mode = compile_mode
        self._transformer = None  # None: the model's own (eager)
        self._thread = None  # compiled: every call runs on this one thread
        if compile_mode != "off":
            self._transformer = torch.compile(self.model.transformer, mode=compile_mode, fullgraph=False, dynamic=False)
            # CUDA graphs belong to the thread that recorded them: calls from the service's thread
            # pool would each record (and hold memory for) their own copies.
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="imagine")
        self.pad_batches = compile_mode != "off"
        self.max_run = None  # set by warm_up: larger batches run in slices of this size (no new graphs)

    def warm_up(self, max_batch_size: int, num_steps: int = 1) -> dict[int, float]:
        """One call per batch size the model will run for up to `max_batch_size` items (with
        compilation: every graph is built now, not in a request) -> seconds per batch size."""
        import time

        emb, spent = self.embodiment, {}
        sizes = sorted({padded_batch_size(n) if self.pad_batches else n for n in range(1, max_batch_size + 1)})
        for size in sizes:
            history = {v: np.zeros((size, self.history, emb.image_height, emb.image_width, 3), np.uint8) for v in emb.views}
            start = time.perf_counter()
            self.imagine(history, np.zeros((size, emb.chunk_length, emb.action_dim), np.float32), num_steps)
            spent[size] = time.perf_counter() - start
        self.max_run = max(sizes)
        return spent

    def imagine(self, history: dict[str, np.ndarray], actions: np.ndarray, num_steps: int = 0,
                seed: int = 0) -> dict[str, np.ndarray]:
        """history {view: uint8 [B, T, H, W, 3]}, actions [B, chunk, A] -> {view: uint8 [B, F, H, W, 3]}."""
        emb, cfg = self.embodiment, self.config
        missing = [v for v in emb.views if v not in history]
        if missing:
            raise InvalidArgument(f"history lacks view(s) {missing}; expected {emb.views}")
        shapes = {v: np.shape(history[v]) for v in emb.views}
        first = shapes[emb.views[0]]
        if len(first) != 5 or first[-1] != 3 or any(s != first for s in shapes.values()):
            raise InvalidArgument(f"history frames must be uint8 [B, T, H, W, 3], the same for every view; got {shapes}")
        batch, length = first[0], first[1]
        if length != cfg.history:
            raise InvalidArgument(f"this dynamics model needs a history of {cfg.history} frames per view "
                                  f"(oldest first, {cfg.frame_stride} control ticks apart); got {length}")
        actions = np.asarray(actions, np.float32)
        if actions.shape != (batch, emb.chunk_length, emb.action_dim):
            raise InvalidArgument(f"actions must be [{batch}, {emb.chunk_length}, {emb.action_dim}], "
                                  f"got {list(actions.shape)}")
        if not np.all(np.isfinite(actions)):
            raise InvalidArgument("actions contain NaN or infinity")
        if num_steps < 0:
            raise InvalidArgument(f"num_steps must be >= 0 (0: the model's default), got {num_steps}")
        steps = num_steps or cfg.default_num_steps
        out_size = (first[2], first[3])
        frames = np.stack([np.asarray(history[v], np.uint8) for v in emb.views], axis=1)
        # Bigger than every warmed-up graph: run in slices (item b keeps its noise), never compile in a request.
        size = max(1, min(batch, self.max_run or batch))
        parts = []
        for start in range(0, max(batch, 1), size):
            part = (frames[start:start + size], actions[start:start + size], steps, seed, start, out_size)
            parts.append(self._thread.submit(self._sample, *part).result() if self._thread else self._sample(*part))
        if len(parts) == 1:
            return parts[0]
        return {v: np.concatenate([p[v] for p in parts]) for v in emb.views}

    def _sample(self, frames: np.ndarray, actions: np.ndarray, steps: int, seed: int, first: int,
                out_size: tuple[int, int]) -> dict[str, np.ndarray]:
        """Checked inputs (uint8 [B, V, T, H, W, 3], float32 [B, chunk, A]) of the batch's items
        first, first + 1, ... -> their frames per view. Padded to a power of two if `pad_batches`
        (copies of the last item; item b's noise depends on (seed, b) only)."""
        import torch

        batch = frames.shape[0]
        run = padded_batch_size(batch) if self.pad_batches else batch
        if run > batch:
            frames = np.concatenate([frames, np.repeat(frames[-1:], run - batch, axis=0)])
            actions = np.concatenate([actions, np.repeat(actions[-1:], run - batch, axis=0)])
        with self._lock, torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self._autocast):
            pixels = self.model.frames_to_pixels(torch.from_numpy(frames).to(self.device))  # [B, V, T, 3, h, w]
            history_latents = self.model.encode_history(pixels)
            tokens = self.model.encode_actions(self.model.normalize_actions(torch.from_numpy(actions).to(self.device)))
            future = sample_future_latents(self.model, history_latents, tokens, steps,
                                           [(seed, first + i) for i in range(run)], self._transformer)
            imagined = self.model.pixels_to_frames(self.model.decode_future(future[:batch]).float(), out_size).cpu().numpy()
        return {v: np.ascontiguousarray(imagined[:, i]) for i, v in enumerate(self.embodiment.views)}


def load(verified: VerifiedVersion, embodiment: Embodiment, compile_mode: CompileMode = "off",
         warm_up_batch_size: int = 0) -> LatentWorldModel:
    """The registry loader (KINDS in services/dynamics/server.py). With compile_mode, every graph up
    to `warm_up_batch_size` items is built before the version is served."""
    import logging

    import torch

    from services.dynamics.model import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    world = LatentWorldModel(load_model(Path(verified.path), device), embodiment, device, compile_mode)
    if compile_mode != "off" and warm_up_batch_size > 0:
        spent = world.warm_up(warm_up_batch_size)
        logging.getLogger(__name__).info("compiled %s/%s (%s) for batch sizes %s in %.1f s", verified.manifest.model,
                                         verified.manifest.version, compile_mode, sorted(spent), sum(spent.values()))
    return world
