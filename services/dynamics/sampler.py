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
"""

from __future__ import annotations

import threading
from pathlib import Path

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


def sample_future_latents(model, history_latents, action_tokens, num_steps: int, seeds: list[tuple[int, int]]):
    """Future latents [B, V, C, tf, h, w] given clean history latents and encoded actions.

    seeds: (seed, index) per batch item, for its starting noise.
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
        velocity = model.velocity(history_latents, future, t.expand(b), action_tokens)
        future = scheduler.step(velocity, t, future).prev_sample.to(history_latents.dtype)
    return future + model.anchor(history_latents)


class LatentWorldModel:
    """What the dynamics service calls: `imagine(history, actions, num_steps, seed)`."""

    def __init__(self, model, embodiment: Embodiment, device: str = "cpu"):
        import torch

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

    def imagine(self, history: dict[str, np.ndarray], actions: np.ndarray, num_steps: int = 0,
                seed: int = 0) -> dict[str, np.ndarray]:
        """history {view: uint8 [B, T, H, W, 3]}, actions [B, chunk, A] -> {view: uint8 [B, F, H, W, 3]}."""
        import torch

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
        with self._lock, torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self._autocast):
            frames = torch.from_numpy(np.stack([np.asarray(history[v], np.uint8) for v in emb.views], axis=1))
            pixels = self.model.frames_to_pixels(frames.to(self.device))  # [B, V, T, 3, h, w]
            history_latents = self.model.encode_history(pixels)
            tokens = self.model.encode_actions(self.model.normalize_actions(torch.from_numpy(actions).to(self.device)))
            future = sample_future_latents(self.model, history_latents, tokens, steps,
                                           [(seed, i) for i in range(batch)])
            imagined = self.model.pixels_to_frames(self.model.decode_future(future).float(), out_size).cpu().numpy()
        return {v: np.ascontiguousarray(imagined[:, i]) for i, v in enumerate(emb.views)}


def load(verified: VerifiedVersion, embodiment: Embodiment) -> LatentWorldModel:
    """The registry loader (KINDS in services/dynamics/server.py)."""
    import torch

    from services.dynamics.model import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return LatentWorldModel(load_model(Path(verified.path), device), embodiment, device)
