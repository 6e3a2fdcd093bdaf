"""A linear policy: the smallest real model the policy service can serve.

chunk = reshape(W @ [state, mean RGB of each view, 1]). It ignores the task text and the
advantage bin. It is the baseline the serving path (version swaps, batching, the robot agent's
wiring) is exercised with before a learned policy exists; learned policies are other kinds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rise.embodiment import Embodiment
from rise.errors import CorruptVersion
from rise.registry import VerifiedVersion

KIND = "linear"
WEIGHTS = "weights.npz"


def features(views: dict[str, np.ndarray], state: np.ndarray, embodiment: Embodiment) -> np.ndarray:
    """[B, state_dim + 3 * views + 1]: state, per-view mean colour in [0, 1], bias."""
    colours = [views[v].reshape(len(state), -1, 3).mean(axis=1) / 255.0 for v in embodiment.views]
    return np.concatenate([state, *colours, np.ones((len(state), 1))], axis=1).astype(np.float32)


def feature_dim(embodiment: Embodiment) -> int:
    return embodiment.state_dim + 3 * len(embodiment.views) + 1


class LinearPolicy:
    def __init__(self, weight: np.ndarray, embodiment: Embodiment):
        want = (embodiment.chunk_length * embodiment.action_dim, feature_dim(embodiment))
        if weight.shape != want:
            raise CorruptVersion(f"linear policy weight has shape {list(weight.shape)}, expected {list(want)}")
        self.weight = weight.astype(np.float32)
        self.embodiment = embodiment

    def act(self, views: dict[str, np.ndarray], state: np.ndarray, tasks: list[str], advantage_bins: np.ndarray,
            num_steps: int = 0, seed: int = 0) -> np.ndarray:
        """views {name: uint8 [B, H, W, 3]}, state float32 [B, S] -> float32 [B, chunk, action_dim]."""
        out = features(views, state, self.embodiment) @ self.weight.T
        return out.reshape(len(state), self.embodiment.chunk_length, self.embodiment.action_dim)

    @staticmethod
    def save(folder: Path, weight: np.ndarray) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / WEIGHTS, weight=weight.astype(np.float32))

    @staticmethod
    def initial_weight(embodiment: Embodiment, scale: float = 0.0, seed: int = 0) -> np.ndarray:
        """Hold the current state (identity on the state part where dims agree) plus optional noise."""
        rows, cols = embodiment.chunk_length * embodiment.action_dim, feature_dim(embodiment)
        weight = np.random.default_rng(seed).normal(0.0, scale, (rows, cols)) if scale else np.zeros((rows, cols))
        if embodiment.action_dim == embodiment.state_dim:
            for t in range(embodiment.chunk_length):
                for j in range(embodiment.action_dim):
                    weight[t * embodiment.action_dim + j, j] += 1.0
        return weight.astype(np.float32)


def load(verified: VerifiedVersion, embodiment: Embodiment) -> LinearPolicy:
    with np.load(verified.path / WEIGHTS) as data:
        return LinearPolicy(data["weight"], embodiment)
