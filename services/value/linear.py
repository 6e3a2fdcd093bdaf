"""A linear value model: tanh(w . [mean RGB of each view's 2x2 quadrants, 1]).

The smallest real model the value service can serve, used to exercise the serving path before
a learned value model exists; learned models are other kinds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rise.embodiment import Embodiment
from rise.errors import CorruptVersion
from rise.registry import VerifiedVersion

KIND = "linear"
WEIGHTS = "weights.npz"


def features(views: dict[str, np.ndarray], embodiment: Embodiment) -> np.ndarray:
    """[N, 12 * views + 1]: mean colour in [0, 1] of each quadrant of each view, and a bias."""
    parts = []
    for name in embodiment.views:
        frames = views[name].astype(np.float32) / 255.0
        h, w = frames.shape[1] // 2, frames.shape[2] // 2
        for rows in (slice(0, h), slice(h, None)):
            for cols in (slice(0, w), slice(w, None)):
                parts.append(frames[:, rows, cols].mean(axis=(1, 2)))
    return np.concatenate([*parts, np.ones((len(parts[0]), 1), np.float32)], axis=1)


def feature_dim(embodiment: Embodiment) -> int:
    return 12 * len(embodiment.views) + 1


class LinearValue:
    def __init__(self, weight: np.ndarray, embodiment: Embodiment):
        if weight.shape != (feature_dim(embodiment),):
            raise CorruptVersion(f"linear value weight has shape {list(weight.shape)}, expected [{feature_dim(embodiment)}]")
        self.weight = weight.astype(np.float32)
        self.embodiment = embodiment

    def score(self, views: dict[str, np.ndarray], tasks: list[str]) -> np.ndarray:
        """views {name: uint8 [N, H, W, 3]} -> float32 [N] in [-1, 1]."""
        return np.tanh(features(views, self.embodiment) @ self.weight)

    @staticmethod
    def save(folder: Path, weight: np.ndarray) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / WEIGHTS, weight=weight.astype(np.float32))


def load(verified: VerifiedVersion, embodiment: Embodiment) -> LinearValue:
    with np.load(verified.path / WEIGHTS) as data:
        return LinearValue(data["weight"], embodiment)
