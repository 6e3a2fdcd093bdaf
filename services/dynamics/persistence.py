"""The persistence world model: every future frame is the last observed frame.

The standard floor for video prediction (a learned model must beat it on PSNR/SSIM to be
worth anything) and the model the serving path is exercised with before a learned one exists.
It has no weights; its manifest config gives the number of future frames.
"""

from __future__ import annotations

import numpy as np

from rise.embodiment import Embodiment
from rise.registry import VerifiedVersion

KIND = "persistence"


class PersistenceDynamics:
    def __init__(self, future_frames: int, embodiment: Embodiment):
        self.future_frames = future_frames
        self.embodiment = embodiment

    def imagine(self, history: dict[str, np.ndarray], actions: np.ndarray, num_steps: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
        """history {view: uint8 [B, T, H, W, 3]}, actions [B, chunk, A] -> {view: uint8 [B, F, H, W, 3]}."""
        return {v: np.repeat(frames[:, -1:], self.future_frames, axis=1) for v, frames in history.items()}


def load(verified: VerifiedVersion, embodiment: Embodiment) -> PersistenceDynamics:
    return PersistenceDynamics(int(verified.manifest.config.get("future_frames", embodiment.chunk_length)), embodiment)
