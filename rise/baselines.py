"""Publish the untrained baseline version of each model (linear policy and value, persistence
dynamics), so a fresh store can serve end to end before anything is trained."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from rise.embodiment import Embodiment
from rise.registry import Manifest, Registry


def publish_baseline(registry: Registry, model: str, embodiment: Embodiment, seed: int = 0) -> Manifest:
    emb = embodiment.model_dump()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if model == "policy":
            from services.policy.linear import KIND, LinearPolicy

            LinearPolicy.save(folder, LinearPolicy.initial_weight(embodiment, scale=0.01, seed=seed))
            return registry.publish(model, folder, kind=KIND, embodiment=emb, config={"init": "hold-state", "seed": seed})
        if model == "value":
            from services.value.linear import KIND, LinearValue, feature_dim

            weight = np.random.default_rng(seed).normal(0.0, 0.1, feature_dim(embodiment))
            LinearValue.save(folder, weight)
            return registry.publish(model, folder, kind=KIND, embodiment=emb, config={"init": "random", "seed": seed})
        if model == "dynamics":
            from services.dynamics.persistence import KIND

            return registry.publish(model, folder, kind=KIND, embodiment=emb, config={"future_frames": embodiment.chunk_length})
    raise ValueError(f"no baseline for model {model!r}; choose policy, value or dynamics")


def publish_scripted_expert(registry: Registry, embodiment: Embodiment) -> Manifest:
    """MetaWorld's scripted expert as a policy version (no weights; privileged: reads sim_state)."""
    from services.policy import scripted_expert

    with tempfile.TemporaryDirectory() as tmp:
        return registry.publish("policy", tmp, kind=scripted_expert.KIND, embodiment=embodiment.model_dump(),
                                config=scripted_expert.config())


def publish_oracle_value(registry: Registry, embodiment: Embodiment) -> Manifest:
    """MetaWorld's shaped reward as a value version (no weights; privileged: reads sim_states)."""
    from services.value import oracle

    with tempfile.TemporaryDirectory() as tmp:
        return registry.publish("value", tmp, kind=oracle.KIND, embodiment=embodiment.model_dump(), config=oracle.config())


def publish_oracle_dynamics(registry: Registry, embodiment: Embodiment, frame_stride: int = 1) -> Manifest:
    """The MetaWorld simulator as a dynamics version (no weights; privileged: reads sim_state).

    It returns every `frame_stride`-th frame of a chunk: chunk_length / frame_stride frames.
    """
    from services.dynamics import oracle

    oracle.OracleDynamics(embodiment, frame_stride)  # refuse an unusable version now, not at load
    with tempfile.TemporaryDirectory() as tmp:
        return registry.publish("dynamics", tmp, kind=oracle.KIND, embodiment=embodiment.model_dump(),
                                config=oracle.config(frame_stride))
