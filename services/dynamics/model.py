"""The learned world model: an action-conditioned multi-view latent video diffusion transformer.

Built from diffusers parts, one code path for every tier (`configs/{tiny,small,paper}.yaml`):

    frames --AutoencoderKLLTXVideo--> latents [C, t, h, w] per view
    history latents (clean) + future latents (noised) of every view
        --pack into one token sequence (view-major; patches of `patch_size` latent pixels)-->
    LTXVideoTransformer3DModel(tokens, per-token timesteps, action tokens as cross-attention context)
        --> flow-matching velocity for the future tokens

- Conditioning on the frame history: history tokens sit in the same sequence, clean, with timestep
  0; the transformer accepts one timestep per token (diffusers 0.42 flattens `timestep` and
  reshapes the embedding to [batch, tokens, ...]), the way LTX-Video conditions on given frames.
- Conditioning on the action chunk: min-max normalised to [-1, 1] with the dataset statistics,
  sub-sampled to every k-th action, zero-padded to a fixed width, through a small transformer
  encoder (`ActionEncoder`); its tokens are the transformer's `encoder_hidden_states` (where
  LTX-Video reads its text), as the RISE reference feeds them.
- Views: a learned embedding per view is added to every token of that view right after the
  input projection, so the views stay distinct while attending to each other in one sequence
  (full attention every block; the reference's cross-view attention every 3rd block is a cheaper
  variant for long sequences). Rotary positions: time, and pixel row/column (views share them).
- Autoencoder: `AutoencoderKLLTXVideo`. With `encode_clips: false` (tiny, small) every frame is
  its own one-frame clip, exactly how LTX encodes a video's first frame: no temporal compression,
  so each frame has its own latent and a 4-frame future is 4 latent frames. With `encode_clips:
  true` (paper, the LTX default VAE) the future frames form one causal clip (1 + 8k frames ->
  1 + k latent frames) while each history frame is encoded alone.

Latents are normalised per channel (statistics measured after the autoencoder is trained, kept
in the VAE's own `latents_mean` / `latents_std` buffers) so flow matching starts from unit scale.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, model_validator

from rise.config import StrictModel
from rise.embodiment import ModelTierConfig

CONFIG_DIR = Path(__file__).parent / "configs"
TIERS = ("tiny", "small", "paper")

# Files of a saved model (a run's `model/` folder and a registry version).
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_FILE_TORCH = "model.pt"  # only where safetensors is not installed
CONFIG_FILE = "config.yaml"
NORMALIZER_FILE = "action_normalizer.json"


# ---- configuration ---------------------------------------------------------------------------
class AutoencoderConfig(StrictModel):
    """AutoencoderKLLTXVideo sizes (the defaults are LTX-Video's VAE: 32x spatial, 8x temporal)."""

    latent_channels: int = Field(128, gt=0)
    block_out_channels: list[int] = [128, 256, 512, 512]
    # One entry per block plus one for the middle block.
    layers_per_block: list[int] = [4, 3, 3, 3, 4]
    # Which blocks halve height, width (and time, when clips are encoded).
    spatio_temporal_scaling: list[bool] = [True, True, True, False]
    # Pixels per side folded into channels before the first convolution.
    patch_size: int = Field(4, gt=0)
    encoder_causal: bool = True
    decoder_causal: bool = False
    # True: the future frames are one clip (temporal compression, needs 1 + k * ratio frames);
    # False: every frame is encoded alone (no temporal compression).
    encode_clips: bool = True

    @model_validator(mode="after")
    def _check(self) -> "AutoencoderConfig":
        blocks = len(self.block_out_channels)
        if blocks < 1 or len(self.spatio_temporal_scaling) != blocks or len(self.layers_per_block) != blocks + 1:
            raise ValueError(f"autoencoder: block_out_channels ({blocks}) and spatio_temporal_scaling "
                             f"({len(self.spatio_temporal_scaling)}) need one entry per block, layers_per_block "
                             f"({len(self.layers_per_block)}) one more (the middle block)")
        return self

    @property
    def spatial_compression(self) -> int:
        return self.patch_size * 2 ** sum(self.spatio_temporal_scaling)

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.spatio_temporal_scaling) if self.encode_clips else 1

    def diffusers_kwargs(self) -> dict[str, Any]:
        blocks = len(self.block_out_channels)
        return dict(
            latent_channels=self.latent_channels,
            block_out_channels=tuple(self.block_out_channels),
            decoder_block_out_channels=tuple(self.block_out_channels),
            down_block_types=("LTXVideoDownBlock3D",) * blocks,
            layers_per_block=tuple(self.layers_per_block),
            decoder_layers_per_block=tuple(self.layers_per_block),
            spatio_temporal_scaling=tuple(self.spatio_temporal_scaling),
            decoder_spatio_temporal_scaling=tuple(self.spatio_temporal_scaling),
            decoder_inject_noise=(False,) * (blocks + 1),
            upsample_residual=(False,) * blocks,
            upsample_factor=(1,) * blocks,
            patch_size=self.patch_size,
            encoder_causal=self.encoder_causal,
            decoder_causal=self.decoder_causal,
        )


class TransformerConfig(StrictModel):
    """LTXVideoTransformer3DModel sizes (defaults: LTX-Video's 28 x 2048, 32 heads x 64)."""

    num_layers: int = Field(28, gt=0)
    num_attention_heads: int = Field(32, gt=0)
    attention_head_dim: int = Field(64, gt=0)
    # Latent pixels per token side: tokens per latent frame = (h / patch) * (w / patch).
    patch_size: int = Field(1, gt=0)

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


class ActionEncoderConfig(StrictModel):
    # Keep every k-th action of the chunk (the one executed just before each k-th frame).
    subsample: int = Field(2, gt=0)
    # Actions are zero-padded to this many dimensions (one encoder fits several embodiments).
    pad_dim: int = Field(30, gt=0)
    num_layers: int = Field(6, gt=0)
    width: int = Field(1024, gt=0)
    num_heads: int = Field(16, gt=0)
    # Also add each future frame's own actions to the timestep embedding of that frame's tokens
    # (adaptive norm in every block, as DiT conditions on a class), besides cross-attention to all
    # action tokens (the reference's only path). Off: on push at the small tier it lowered the
    # held-out flow loss (0.121 vs 0.132) but followed actions no better (bench/RESULTS.md, issue 4).
    frame_conditioning: bool = False


class AutoencoderTraining(StrictModel):
    steps: int = Field(1000, ge=0)
    batch_size: int = Field(32, gt=0)  # clips (single frames when clip_frames is 1)
    clip_frames: int = Field(1, gt=0)  # 1, or 1 + k * temporal compression
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    kl_weight: float = Field(1e-4, ge=0)


class TransformerTraining(StrictModel):
    steps: int = Field(10000, ge=0)
    # Task-centric batches (the reference: 2 tasks x 16 samples).
    tasks_per_batch: int = Field(2, gt=0)
    samples_per_task: int = Field(16, gt=0)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(500, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # Flow-matching noise levels sigma = sigmoid(N(mean, std)) (logit-normal, as SD3).
    logit_normal_mean: float = 0.0
    logit_normal_std: float = Field(1.0, gt=0)


class TrainingConfig(StrictModel):
    seed: int = 0
    autoencoder: AutoencoderTraining = AutoencoderTraining()
    transformer: TransformerTraining = TransformerTraining()
    log_every: int = Field(10, gt=0)
    sample_every: int = Field(1000, gt=0)  # transformer steps between sample videos + metrics
    checkpoint_every: int = Field(500, gt=0)
    # Episodes per dataset held out of training: sample videos and metrics come from them.
    eval_episodes: int = Field(1, ge=0)
    eval_windows: int = Field(16, gt=0)


class DynamicsModelConfig(ModelTierConfig):
    # Frames of every view given as context (the service refuses other lengths).
    history: int = Field(4, gt=0)
    # Control ticks between consecutive frames; future frames = chunk_length / frame_stride.
    frame_stride: int = Field(2, gt=0)
    # Denoising steps when a request asks for 0.
    default_num_steps: int = Field(10, gt=0)
    # FlowMatchEulerDiscreteScheduler's shift (> 1 spends more steps at high noise).
    scheduler_shift: float = Field(1.0, gt=0)
    # The transformer generates the change from the last history latent frame (future - last),
    # added back after sampling: static content comes for free, so training spends itself on what
    # moves, which is what the actions decide. False: the future latents themselves. Off: measured
    # on pick-place (small tier) it was worse on every image measure and no more action-following
    # (bench/RESULTS.md).
    predict_change: bool = False
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    transformer: TransformerConfig = TransformerConfig()
    action_encoder: ActionEncoderConfig = ActionEncoderConfig()
    training: TrainingConfig = TrainingConfig()

    @property
    def future_frames(self) -> int:
        return self.embodiment_spec.chunk_length // self.frame_stride

    @property
    def latent_height(self) -> int:
        return self.height // self.autoencoder.spatial_compression

    @property
    def latent_width(self) -> int:
        return self.width // self.autoencoder.spatial_compression

    @property
    def history_latent_frames(self) -> int:
        return self.history  # history frames are always encoded one by one

    @property
    def future_latent_frames(self) -> int:
        return 1 + (self.future_frames - 1) // self.autoencoder.temporal_compression

    @property
    def action_tokens(self) -> int:
        return math.ceil(self.embodiment_spec.chunk_length / self.action_encoder.subsample)

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_height // self.transformer.patch_size) * (self.latent_width // self.transformer.patch_size)

    @property
    def sequence_length(self) -> int:
        views = len(self.embodiment_spec.views)
        return views * (self.history_latent_frames + self.future_latent_frames) * self.tokens_per_frame

    @model_validator(mode="after")
    def _check(self) -> "DynamicsModelConfig":
        try:
            emb = self.embodiment_spec
        except ValueError as exc:
            raise ValueError(f"embodiment: {exc}") from None
        if (self.image_height is None) != (self.image_width is None):
            raise ValueError("give both image_height and image_width, or neither")
        if emb.chunk_length % self.frame_stride:
            raise ValueError(f"frame_stride {self.frame_stride} must divide the chunk length {emb.chunk_length}")
        unit = self.autoencoder.spatial_compression * self.transformer.patch_size
        if self.height % unit or self.width % unit:
            raise ValueError(f"image size {self.height}x{self.width} must be a multiple of the autoencoder's "
                             f"compression x patch size = {unit}")
        if self.autoencoder.encode_clips and (self.future_frames - 1) % self.autoencoder.temporal_compression:
            raise ValueError(f"{self.future_frames} future frames cannot form one clip: clips hold 1 + k x "
                             f"{self.autoencoder.temporal_compression} frames (or set autoencoder.encode_clips: false)")
        clip = self.training.autoencoder.clip_frames
        if clip != 1 and (not self.autoencoder.encode_clips or (clip - 1) % self.autoencoder.temporal_compression):
            raise ValueError(f"training.autoencoder.clip_frames {clip}: use 1, or 1 + k x "
                             f"{self.autoencoder.temporal_compression} with encode_clips")
        if self.action_encoder.pad_dim < emb.action_dim:
            raise ValueError(f"action_encoder.pad_dim {self.action_encoder.pad_dim} < action_dim {emb.action_dim}")
        if self.action_encoder.width % self.action_encoder.num_heads:
            raise ValueError("action_encoder.width must be a multiple of action_encoder.num_heads")
        return self


def load_model_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> DynamicsModelConfig:
    """A tier by name (tiny, small, paper) or a YAML file; `overrides` are dotted keys (a.b.c: value)."""
    from rise.config import load_config

    path = CONFIG_DIR / f"{name_or_path}.yaml" if str(name_or_path) in TIERS else Path(name_or_path)
    return load_config(DynamicsModelConfig, path, env_prefix="RISE_DYNAMICS_MODEL_", overrides=overrides, environ={})


# ---- modelling ---------------------------------------------------------------------------------
def _modules():
    """The torch modules, defined on first use so that importing the config costs no torch import."""
    import torch
    from diffusers import AutoencoderKLLTXVideo, LTXVideoTransformer3DModel
    from diffusers.models.normalization import AdaLayerNormSingle
    from torch import nn

    class UniqueTimestepAdaLayerNormSingle(AdaLayerNormSingle):
        """LTX's timestep embedding, computed once per distinct timestep instead of once per token.

        With per-token timesteps a sequence holds only two values (0 for history, t for the rest):
        embedding each token's timestep separately doubled the step time of a small model on CPU.
        Same parameters and outputs as AdaLayerNormSingle (a pretrained LTX checkpoint loads as is).
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Per-token conditioning [B, N, width] added to the timestep embedding, set by
            # DynamicsModel.velocity around one transformer call (the transformer's forward has no
            # argument for it); None: LTX's own embedding. An instance attribute from the start:
            # torch.compile guards on the module's __dict__, and a class attribute that velocity()
            # later shadows made every compiled graph recompile once.
            self.token_condition = None

        def forward(self, timestep, added_cond_kwargs=None, batch_size=None, hidden_dtype=None):
            if (timestep.is_cuda or torch.compiler.is_compiling()) and self.token_condition is None:
                # On a GPU the per-token embedding is ~1% of a step, while unique() would wait for
                # the device; and under torch.compile its data-dependent size splits the graph.
                return super().forward(timestep, added_cond_kwargs, batch_size=None, hidden_dtype=hidden_dtype)
            values, inverse = torch.unique(timestep, return_inverse=True)
            temb, embedded = super().forward(values, added_cond_kwargs, batch_size=None, hidden_dtype=hidden_dtype)
            if self.token_condition is None:
                return temb[inverse], embedded[inverse]
            embedded = embedded[inverse] + self.token_condition.reshape(-1, embedded.shape[-1]).to(embedded.dtype)
            return self.linear(self.silu(embedded)), embedded

    class ViewEmbeddedLinear(nn.Linear):
        """The transformer's input projection plus a learned embedding of each token's view.

        The sequence is view-major (all tokens of view 0, then view 1, ...), so a token's view is
        its position // (tokens / views). Weight names stay `proj_in.weight` / `proj_in.bias`.
        """

        def __init__(self, in_features: int, out_features: int, num_views: int):
            super().__init__(in_features, out_features)
            self.view_embedding = nn.Parameter(torch.randn(num_views, out_features) * 0.02)

        def forward(self, x):
            views, tokens = self.view_embedding.shape[0], x.shape[1]
            if tokens % views:
                raise ValueError(f"{tokens} tokens do not split into {views} views")
            per_view = self.view_embedding.repeat_interleave(tokens // views, dim=0)
            return super().forward(x) + per_view.to(x.dtype)

    class ActionEncoder(nn.Module):
        """Normalised action chunk [B, chunk, A] -> tokens [B, ceil(chunk / k), width]."""

        def __init__(self, config: ActionEncoderConfig, chunk_length: int, action_dim: int, model_width: int):
            super().__init__()
            self.subsample, self.pad_dim, self.action_dim = config.subsample, config.pad_dim, action_dim
            tokens = math.ceil(chunk_length / config.subsample)
            self.input = nn.Linear(config.pad_dim, config.width)
            self.position = nn.Parameter(torch.randn(1, tokens, config.width) * 0.02)
            layer = nn.TransformerEncoderLayer(config.width, config.num_heads, 4 * config.width, dropout=0.0,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(config.width)
            # frame_conditioning: action tokens -> the transformer's timestep-embedding space. Zero at
            # the start, so training begins from the cross-attention-only model.
            self.to_frames = nn.Linear(config.width, model_width) if config.frame_conditioning else None
            if self.to_frames is not None:
                nn.init.zeros_(self.to_frames.weight)
                nn.init.zeros_(self.to_frames.bias)

        def forward(self, actions):
            # The k-th, 2k-th, ... action: the command executed just before each k-th future frame.
            # (The actions in between are dropped, as in the reference: harmless for absolute
            # targets, lossy for deltas, which is why the MetaWorld tiers keep every action.)
            picked = actions[:, self.subsample - 1::self.subsample]
            if picked.shape[1] < self.position.shape[1]:  # chunk not a multiple of k: keep the last one too
                picked = torch.cat([picked, actions[:, -1:]], dim=1)
            padded = nn.functional.pad(picked, (0, self.pad_dim - actions.shape[-1]))
            return self.norm(self.encoder(self.input(padded) + self.position))

    class DynamicsModel(nn.Module):
        """Autoencoder + denoising transformer + action encoder, and the action normaliser they were trained with."""

        def __init__(self, config: DynamicsModelConfig, normalizer):
            super().__init__()
            self.config = config
            self.normalizer = normalizer
            emb = config.embodiment_spec
            if normalizer.dim != emb.action_dim:
                raise ValueError(f"the action normaliser has {normalizer.dim} dims, embodiment {emb.name!r} "
                                 f"{emb.action_dim}")
            self.views = list(emb.views)
            self.vae = AutoencoderKLLTXVideo(**config.autoencoder.diffusers_kwargs())
            p, c = config.transformer.patch_size, config.autoencoder.latent_channels
            self.transformer = LTXVideoTransformer3DModel(
                in_channels=c * p * p, out_channels=c * p * p, patch_size=p, patch_size_t=1,
                num_attention_heads=config.transformer.num_attention_heads,
                attention_head_dim=config.transformer.attention_head_dim,
                cross_attention_dim=config.transformer.width, num_layers=config.transformer.num_layers,
                caption_channels=config.action_encoder.width)
            width = config.transformer.width
            time_embed = UniqueTimestepAdaLayerNormSingle(width, use_additional_conditions=False)
            time_embed.load_state_dict(self.transformer.time_embed.state_dict())
            self.transformer.time_embed = time_embed
            proj_in = ViewEmbeddedLinear(c * p * p, width, len(self.views))
            proj_in.load_state_dict(self.transformer.proj_in.state_dict(), strict=False)
            self.transformer.proj_in = proj_in
            self.action_encoder = ActionEncoder(config.action_encoder, emb.chunk_length, emb.action_dim, width)
            self._layout_cache: dict[Any, Any] = {}

        # -- pixels <-> latents ------------------------------------------------------------------
        def frames_to_pixels(self, frames):
            """uint8 [..., H, W, 3] (any H, W) -> float [..., 3, h, w] in [-1, 1] at the model's size."""
            x = frames.permute(*range(frames.ndim - 3), -1, -3, -2).float().div(127.5).sub(1)
            size = (self.config.height, self.config.width)
            if tuple(x.shape[-2:]) != size:
                lead = x.shape[:-3]
                x = nn.functional.interpolate(x.reshape(-1, *x.shape[-3:]), size=size, mode="bilinear",
                                              antialias=True, align_corners=False).reshape(*lead, 3, *size)
            return x

        @staticmethod
        def pixels_to_frames(pixels, size: tuple[int, int] | None = None):
            """float [..., 3, h, w] in [-1, 1] -> uint8 [..., H, W, 3] (resized to `size` if given)."""
            if size is not None and tuple(pixels.shape[-2:]) != tuple(size):
                lead = pixels.shape[:-3]
                pixels = nn.functional.interpolate(pixels.reshape(-1, *pixels.shape[-3:]), size=size, mode="bilinear",
                                                   antialias=True, align_corners=False).reshape(*lead, 3, *size)
            x = pixels.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
            return x.permute(*range(x.ndim - 3), -2, -1, -3)

        def _latent_scale(self, dtype):
            mean = self.vae.latents_mean.to(dtype).view(1, -1, 1, 1, 1)
            std = self.vae.latents_std.to(dtype).view(1, -1, 1, 1, 1)
            return mean, std

        def encode(self, pixels, clip: bool, sample: bool = False, generator=None):
            """[B, V, T, 3, H, W] in [-1, 1] -> normalised latents [B, V, C, t, h, w].

            clip False: every frame alone (t = T); True: the T frames are one clip (t = 1 + (T-1)/ratio).
            `sample` draws from the posterior (the autoencoder's training); otherwise its mean.
            """
            b, v, t, _, height, width = pixels.shape
            if clip:
                x = pixels.reshape(b * v, t, 3, height, width).transpose(1, 2)  # [BV, 3, T, H, W]
            else:
                x = pixels.reshape(b * v * t, 3, 1, height, width)  # one-frame clips
            posterior = self.vae.encode(x).latent_dist
            z = posterior.sample(generator) if sample else posterior.mode()  # [N, C, t', h, w]
            mean, std = self._latent_scale(z.dtype)
            z = (z - mean) / std
            if clip:
                return z.reshape(b, v, *z.shape[1:])
            return z.reshape(b, v, t, z.shape[1], *z.shape[3:]).permute(0, 1, 3, 2, 4, 5)

        def decode(self, latents, clip: bool):
            """Normalised latents [B, V, C, t, h, w] -> pixels [B, V, T, 3, H, W] in [-1, 1]."""
            b, v, c, t, h, w = latents.shape
            mean, std = self._latent_scale(latents.dtype)
            if clip:
                z = latents.reshape(b * v, c, t, h, w)
            else:
                z = latents.permute(0, 1, 3, 2, 4, 5).reshape(b * v * t, c, 1, h, w)
            x = self.vae.decode(z * std + mean).sample  # [N, 3, T', H, W]
            channels, height, width = x.shape[1], x.shape[3], x.shape[4]
            x = x.transpose(1, 2).reshape(b, v, -1, channels, height, width)
            return x.clamp(-1, 1)

        def encode_history(self, pixels):
            return self.encode(pixels, clip=False)

        def encode_future(self, pixels):
            return self.encode(pixels, clip=self.config.autoencoder.encode_clips)

        def decode_future(self, latents):
            return self.decode(latents, clip=self.config.autoencoder.encode_clips)

        # -- latents <-> tokens ------------------------------------------------------------------
        def pack(self, latents):
            """[B, V, C, t, h, w] -> [B, V*t*(h/p)*(w/p), C*p*p] (LTX's patch order, views concatenated)."""
            p = self.config.transformer.patch_size
            b, v, c, t, h, w = latents.shape
            x = latents.reshape(b, v, c, t, h // p, p, w // p, p)
            x = x.permute(0, 1, 3, 4, 6, 2, 5, 7)  # B V t h' w' C p p
            return x.reshape(b, v * t * (h // p) * (w // p), c * p * p)

        def unpack(self, tokens, frames: int):
            """Inverse of `pack` for latents of `frames` latent frames at the model's latent size."""
            p = self.config.transformer.patch_size
            h, w = self.config.latent_height // p, self.config.latent_width // p
            b, v, c = tokens.shape[0], len(self.views), self.config.autoencoder.latent_channels
            x = tokens.reshape(b, v, frames, h, w, c, p, p).permute(0, 1, 5, 2, 3, 6, 4, 7)
            return x.reshape(b, v, c, frames, h * p, w * p)

        def layout(self, device):
            """(video_coords [3, N], is_future bool [N]) of the packed history + future sequence.

            Time coordinates are frame times in units of `frame_stride` ticks, 0 at the oldest history
            frame (a latent frame of a future clip sits at the time of its last frame); rows and columns
            are pixel positions of the token's corner, like LTX's rope_interpolation_scale gives them.
            """
            key = str(device)
            if key not in self._layout_cache:
                cfg = self.config
                ratio, history = cfg.autoencoder.temporal_compression, cfg.history_latent_frames
                times = [float(i) for i in range(history)]
                times += [history - 1 + 1 + k * ratio for k in range(cfg.future_latent_frames)]
                p = cfg.transformer.patch_size
                step = cfg.autoencoder.spatial_compression * p
                rows = torch.arange(cfg.latent_height // p, dtype=torch.float32) * step
                cols = torch.arange(cfg.latent_width // p, dtype=torch.float32) * step
                grid = torch.stack(torch.meshgrid(torch.tensor(times), rows, cols, indexing="ij")).reshape(3, -1)
                future = torch.zeros(len(times), len(rows), len(cols), dtype=torch.bool)
                future[history:] = True
                coords = grid.repeat(1, len(self.views))
                is_future = future.reshape(-1).repeat(len(self.views))
                self._layout_cache[key] = (coords.to(device), is_future.to(device))
            return self._layout_cache[key]

        # -- conditioning and denoising ----------------------------------------------------------
        def normalize_actions(self, actions):
            return self.normalizer.normalize(actions).float()

        def encode_actions(self, normalized_actions):
            return self.action_encoder(normalized_actions)

        def velocity(self, history, future, timestep, action_tokens, transformer=None):
            """Predicted flow-matching velocity of the future latents.

            history [B, V, C, th, h, w] clean latents; future [B, V, C, tf, h, w] noisy latents at
            `timestep` [B] (sigma x 1000); action_tokens [B, n, width]. transformer: a compiled
            wrapper of self.transformer to run instead (same weights), or None.
            """
            tokens = self.pack(torch.cat([history, future], dim=3))
            coords, is_future = self.layout(tokens.device)
            b = tokens.shape[0]
            per_token = torch.where(is_future[None], timestep.float()[:, None], torch.zeros((), device=tokens.device))
            mask = torch.ones(b, action_tokens.shape[1], device=tokens.device, dtype=tokens.dtype)
            time_embed = self.transformer.time_embed
            if self.action_encoder.to_frames is not None:
                time_embed.token_condition = self.frame_condition(action_tokens, history.shape[3], future.shape[3])
            try:
                net = self.transformer if transformer is None else transformer
                out = net(hidden_states=tokens, encoder_hidden_states=action_tokens, timestep=per_token,
                          encoder_attention_mask=mask, video_coords=coords[None].expand(b, -1, -1)).sample
            finally:
                time_embed.token_condition = None
            frames = history.shape[3] + future.shape[3]
            return self.unpack(out, frames)[:, :, :, history.shape[3]:]

        def frame_condition(self, action_tokens, history_frames: int, future_frames: int):
            """Action tokens [B, n, a] -> per-token conditioning [B, N, width] in `pack`'s order: zero
            for history tokens; a future latent frame's tokens get its share of the action tokens (the
            n tokens split in order into `future_frames` runs, each run averaged and projected)."""
            b = action_tokens.shape[0]
            per_frame = torch.stack([run.mean(dim=1) for run in torch.tensor_split(action_tokens, future_frames, dim=1)], 1)
            per_frame = self.action_encoder.to_frames(per_frame)  # [B, tf, width]
            per_frame = torch.cat([per_frame.new_zeros(b, history_frames, per_frame.shape[-1]), per_frame], dim=1)
            tokens = self.config.tokens_per_frame
            per_token = per_frame[:, None, :, None].expand(b, len(self.views), -1, tokens, -1)  # B V t hw width
            return per_token.reshape(b, -1, per_frame.shape[-1])

        def anchor(self, history):
            """What the generated latents are relative to: the last history latent frame with
            `predict_change`, else nothing (zero)."""
            return history[:, :, :, -1:] if self.config.predict_change else history.new_zeros(())

        def flow_matching_loss(self, history, future, normalized_actions, generator=None):
            """Velocity-matching loss on the future latents only (history tokens are conditioning)."""
            return self.flow_loss_at(history, future, normalized_actions, *self.flow_noise(future, generator))

        def flow_noise(self, future, generator=None):
            """(noise level sigma [B], noise like `future`): the random part of the loss, drawn eagerly
            so that the rest (`flow_loss_at`) is a pure function torch.compile can capture whole."""
            cfg = self.config.training.transformer
            logits = torch.randn(future.shape[0], generator=generator, device=future.device) * cfg.logit_normal_std
            noise = torch.randn(future.shape, generator=generator, device=future.device, dtype=future.dtype)
            return torch.sigmoid(logits + cfg.logit_normal_mean), noise

        def flow_loss_at(self, history, future, normalized_actions, sigma, noise):
            future = future - self.anchor(history)
            s = sigma.view(-1, 1, 1, 1, 1, 1).to(future.dtype)
            noisy = (1 - s) * future + s * noise
            predicted = self.velocity(history, noisy, sigma * 1000, self.encode_actions(normalized_actions))
            return nn.functional.mse_loss(predicted.float(), (noise - future).float())

        # -- saving ------------------------------------------------------------------------------
        def save(self, folder: str | Path) -> Path:
            """Weights (safetensors), config and action normaliser into `folder`, ready to publish."""
            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            try:
                from safetensors.torch import save_file
            except ImportError:  # pragma: no cover - safetensors comes with diffusers
                torch.save(state, folder / WEIGHTS_FILE_TORCH)
            else:
                save_file(state, folder / WEIGHTS_FILE)
            (folder / CONFIG_FILE).write_text(yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False))
            (folder / NORMALIZER_FILE).write_text(json.dumps(self.normalizer.to_dict(), indent=2) + "\n")
            return folder

    return DynamicsModel, ActionEncoder


def build_model(config: DynamicsModelConfig, normalizer):
    """A freshly initialised model (random weights; nothing is downloaded)."""
    model_cls, _ = _modules()
    return model_cls(config, normalizer)


def load_model(folder: str | Path, device: str = "cpu"):
    """A model saved by `DynamicsModel.save` (a run's model folder or a registry version)."""
    import torch

    from rise.data.stats import ActionNormalizer

    folder = Path(folder)
    config = DynamicsModelConfig.model_validate(yaml.safe_load((folder / CONFIG_FILE).read_text()))
    normalizer = ActionNormalizer.from_dict(json.loads((folder / NORMALIZER_FILE).read_text()))
    model = build_model(config, normalizer)
    if (folder / WEIGHTS_FILE).is_file():
        from safetensors.torch import load_file

        state = load_file(folder / WEIGHTS_FILE)
    else:
        state = torch.load(folder / WEIGHTS_FILE_TORCH, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()


def parameter_counts(model) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(model, name).parameters())
            for name in ("vae", "transformer", "action_encoder")}

