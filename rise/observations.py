"""Check request messages against the embodiment and decode them into numpy arrays.

The one validation helper the services share: every failure is `InvalidArgument` naming the
field, what was expected and what came.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from rise.embodiment import Embodiment
from rise.errors import InvalidArgument
from rise.proto.v1 import tensor_pb2
from rise.tensors import Dim, from_tensor

NUM_ADVANTAGE_BINS = 10


def decode_views(
    views: Mapping[str, tensor_pb2.Tensor],
    embodiment: Embodiment,
    where: str,
    lead: Sequence[Dim] = (),
    dims: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Every embodiment view, uint8 [*lead, H, W, 3]; unknown or missing views are errors."""
    unknown = sorted(set(views) - set(embodiment.views))
    if unknown:
        raise InvalidArgument(f"{where}: unknown view(s) {unknown}; embodiment {embodiment.name!r} has views {embodiment.views}")
    missing = [v for v in embodiment.views if v not in views]
    if missing:
        raise InvalidArgument(f"{where}: missing view(s) {missing}; embodiment {embodiment.name!r} needs {embodiment.views}")
    shape = (*lead, embodiment.image_height, embodiment.image_width, 3)
    dims = {} if dims is None else dims
    return {v: from_tensor(views[v], f"{where}.views[{v!r}]", "uint8", shape, dims) for v in embodiment.views}


def decode_state(tensor: tensor_pb2.Tensor, embodiment: Embodiment, where: str) -> np.ndarray:
    return from_tensor(tensor, f"{where}.state", "float32", (embodiment.state_dim,))


def decode_actions(tensor: tensor_pb2.Tensor, embodiment: Embodiment, where: str) -> np.ndarray:
    return from_tensor(tensor, f"{where}.actions", "float32", (embodiment.chunk_length, embodiment.action_dim))


def check_advantage_bins(bins: Sequence[int], batch: int, where: str) -> np.ndarray:
    """0 (null) or 1..10 per item; one value broadcasts to the batch, none means null."""
    values = np.asarray(list(bins) or [0], dtype=np.int64)
    if len(values) == 1:
        values = np.repeat(values, batch)
    if len(values) != batch:
        raise InvalidArgument(f"{where}: expected 1 or {batch} advantage bins (one per observation), got {len(bins)}")
    bad = values[(values < 0) | (values > NUM_ADVANTAGE_BINS)]
    if len(bad):
        raise InvalidArgument(f"{where}: advantage bin must be 0 (null) or 1..{NUM_ADVANTAGE_BINS}, got {int(bad[0])}")
    return values


def stack_views(items: list[dict[str, np.ndarray]], embodiment: Embodiment) -> dict[str, np.ndarray]:
    """[{view: [...]}] * B -> {view: [B, ...]}"""
    return {v: np.stack([item[v] for item in items]) for v in embodiment.views}
