"""The embodiment: what a robot (real or simulated) sees and does, shared by every model.

A model version records the embodiment it was trained for; a service refuses to load a
version whose embodiment differs from its own.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import yaml
from pydantic import Field, model_validator

from rise.config import StrictModel


class Embodiment(StrictModel):
    name: str
    # Camera view names in a fixed order (the order models stack them in).
    views: list[str] = Field(min_length=1)
    # Image size every view is resized (with padding) to before it reaches a model, in pixels.
    image_height: int = Field(gt=0)
    image_width: int = Field(gt=0)
    # Robot state vector length and the names of its entries (radians / metres of opening).
    state_dim: int = Field(gt=0)
    # Action vector length: absolute targets per control tick.
    action_dim: int = Field(gt=0)
    # Actions per chunk the policy outputs.
    chunk_length: int = Field(gt=0)
    # Control rate in Hz: actions in a chunk are 1 / control_hz seconds apart.
    control_hz: float = Field(gt=0)
    state_names: list[str] = []
    action_names: list[str] = []

    @model_validator(mode="after")
    def _check(self) -> "Embodiment":
        if len(set(self.views)) != len(self.views):
            raise ValueError(f"view names must be unique: {self.views}")
        for field, dim in (("state_names", self.state_dim), ("action_names", self.action_dim)):
            names = getattr(self, field)
            if names and len(names) != dim:
                raise ValueError(f"{field} has {len(names)} entries, expected {dim}")
        return self

    def differences(self, other: "Embodiment") -> list[str]:
        """Human-readable list of fields where `other` differs from this embodiment."""
        mine, theirs = self.model_dump(), other.model_dump()
        return [f"{k}: {theirs[k]!r} != {mine[k]!r}" for k in mine if mine[k] != theirs[k]]


_PIPER_ARM = ["joint1", "joint2", "joint3", "joint4", "joint5", "joint6", "gripper"]

PRESETS: dict[str, Embodiment] = {
    # The reference robot: AgileX Piper dual arm, three RealSense cameras, pi0.5-style I/O.
    "piper_dual": Embodiment(
        name="piper_dual",
        views=["head", "left_wrist", "right_wrist"],
        image_height=224,
        image_width=224,
        state_dim=14,
        action_dim=14,
        chunk_length=50,
        control_hz=30.0,
        state_names=[f"left_{n}" for n in _PIPER_ARM] + [f"right_{n}" for n in _PIPER_ARM],
        action_names=[f"left_{n}" for n in _PIPER_ARM] + [f"right_{n}" for n in _PIPER_ARM],
    ),
    # MetaWorld v3 (Sawyer), 80 Hz control: hand xyz + gripper opening in, delta xyz + gripper
    # effort out; a head view (corner), a view over the gripper and one from the gripper.
    "metaworld": Embodiment(
        name="metaworld",
        views=["corner", "behindGripper", "gripperPOV"],
        image_height=64,
        image_width=64,
        state_dim=4,
        action_dim=4,
        chunk_length=8,
        control_hz=80.0,
        state_names=["hand_x", "hand_y", "hand_z", "gripper"],
        action_names=["delta_x", "delta_y", "delta_z", "gripper"],
    ),
}


def load_embodiment(name_or_path: str | Path) -> Embodiment:
    """A preset by name, or a YAML file describing one."""
    if str(name_or_path) in PRESETS:
        return PRESETS[str(name_or_path)]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"unknown embodiment {name_or_path!r}: use one of {sorted(PRESETS)} or a YAML file path")
    return Embodiment.model_validate(yaml.safe_load(path.read_text()))


class ModelTierConfig(StrictModel):
    """The part every learned model's config shares: its tier, embodiment and image size."""

    tier: str = "custom"
    # Embodiment preset name or YAML path: views, state/action dims, chunk length.
    embodiment: str = "metaworld"
    # The model's image size (None: the embodiment's); frames of another size are resized.
    image_height: int | None = None
    image_width: int | None = None

    @cached_property
    def embodiment_spec(self) -> Embodiment:
        return load_embodiment(self.embodiment)

    @property
    def height(self) -> int:
        return self.image_height or self.embodiment_spec.image_height

    @property
    def width(self) -> int:
        return self.image_width or self.embodiment_spec.image_width
