"""A trainer run's configuration: one YAML (`configs/default.yaml`) with a section per stage.

Every default is the reference's setting where it has one (offline ratio 0.6, EMA 0.995, two
chained chunks, ten advantage bins with the best prompted); sizes are the laptop's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from rise.config import StrictModel
from rise.serving import ClientConfig
from services.trainer.distributed import DistributedConfig
from services.trainer.replay import ReplayConfig

CONFIG_DIR = Path(__file__).parent / "configs"


class ServicesConfig(StrictModel):
    # Model services by URL: grpc://host:port or triton://host:port[/model] (rise.transport).
    policy: str = "grpc://127.0.0.1:50051"
    value: str = "grpc://127.0.0.1:50052"
    dynamics: str = "grpc://127.0.0.1:50053"
    # Where the policy's ModelAdmin answers (gRPC); "" = the policy URL.
    policy_admin: str = ""
    timeout_s: float = Field(300.0, gt=0)
    # Transient failures (a service restarting) are retried with exponential backoff.
    retry_attempts: int = Field(10, ge=1)
    retry_backoff_s: float = Field(0.5, gt=0)
    retry_max_backoff_s: float = Field(8.0, gt=0)
    # Credentials for every model service, matching their `server.tls` / `server.auth_token_file`
    # (unset: plaintext, no token). In Kubernetes the rise-tls / rise-tokens Secrets are mounted
    # at /etc/rise/tls and /etc/rise/tokens (k8s/base).
    tls_ca_file: Path | None = None
    # Client certificate and key, for services that require mutual TLS.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Expected name in the services' certificates when it differs from the URL's host.
    tls_server_name: str | None = None
    # Bearer token: the file's first non-empty line.
    token_file: Path | None = None
    max_message_mb: float = Field(64.0, gt=0)

    def client(self, address: str = "-") -> ClientConfig:
        """The client settings every call to a model service uses (the URL supplies the address)."""
        return ClientConfig(address=address, max_message_mb=self.max_message_mb, tls_ca_file=self.tls_ca_file,
                            tls_cert_file=self.tls_cert_file, tls_key_file=self.tls_key_file,
                            tls_server_name=self.tls_server_name, token_file=self.token_file, timeout_s=self.timeout_s)


class RolloutConfig(StrictModel):
    # Imagined episodes in flight; their calls are merged into one batch per service round.
    workers: int = Field(8, ge=1)
    # Imagined chunks chained from one real start before returning to the data (reference: 2).
    max_chain: int = Field(2, ge=1)
    # Alias (or version) of the rollout policy on the policy service.
    policy_version: str = "candidate"
    # The prompt: the best advantage bin.
    advantage_bin: int = Field(10, ge=1, le=10)
    # A = clamp(scale * mean(V(imagined) - V(current)), -1, 1) (the reference's, with group_size 1).
    advantage_scale: float = 5.0
    # Workers per real start: each group of `group_size` workers starts from the same state, and a
    # chunk's advantage is its value gain relative to its group, in group standard deviations
    # (clamped to [-1, 1]). Why: measured on push, the reference's absolute advantage is mostly
    # set by the start state (r 0.86 between two chunks from one start, even in the simulator),
    # so its bins say "easy state", not "good action". 1 = the reference's absolute advantage.
    group_size: int = Field(4, ge=1)
    # The chunks of a group are imagined from the same starting noise (see rollout.imagine_groups).
    common_noise: bool = True
    # Std of Gaussian noise added to every proposed chunk's actions before it is imagined (and
    # stored): more different chunks per start, easier to rank. 0 = the policy's own samples.
    exploration_noise: float = Field(0.0, ge=0)
    # Std of one Gaussian offset per chunk and action dimension, added to every step of the chunk:
    # with delta actions, per-step noise averages out over a chunk, an offset moves the arm.
    # Measured on pick-place, 0.3 widened the simulator's within-start gain spread by 37%, still a
    # third of the between-start spread: off until an RL run shows it helps.
    exploration_offset: float = Field(0.0, ge=0)
    # The bin each position of a group is prompted with, e.g. [10, 7, 4, 1]: proposals that differ
    # more than one prompt's samples (a group's rank is only informative if its chunks differ).
    # Empty = every position gets `advantage_bin` (the reference). Measured on pick-place, the RECAP
    # policy's chunks barely change with the prompt ([10, 7, 4, 1]: within-start spread 0.0101 vs 0.0096).
    proposal_bins: list[int] = Field(default_factory=list)
    # Chunks the policy imagines after each proposed chunk before the proposal is scored: its
    # advantage is the value gain over all of them (a group's continuations share their noise, so
    # they differ only by where the proposals led). Why: one 8-tick chunk moves the value little
    # (simulator, push: within-start spread 0.011 vs 0.043 between starts). Measured on push with
    # the simulator as world model (bench/lookahead_signal.py): depths 1-3 widen the spread between
    # starts as much as within them, do not make rankings predict success, and RL with depth 1 gave
    # 9/50 vs 10/50 without: off. 0 = the reference's one-chunk gain. Costs (1 + lookahead_chunks)
    # times the policy and dynamics calls per sample.
    lookahead_chunks: int = Field(0, ge=0)
    # Which imagined chunks go to replay: "all" (each under the bin its advantage earned: the
    # reference) or "best" (only each group's highest-value-gain chunk, under `advantage_bin`: the
    # group's pick distilled into the prompt, as in rejection sampling). Why: the trainer's group
    # ranking is weak (bench/lookahead_signal.py: r 0.05-0.20 with the simulator's outcome at
    # depth 0), so the bins "all" gives the other chunks are mostly noise, and training them
    # blurs what the prompt means (RECAP -> RISE shrank the prompt's effect, bench/guidance_gap.py);
    # "best" keeps only the decision the ranking is for. Pushes 1 / group_size of the chunks.
    train_on: Literal["all", "best"] = "all"
    # The robot state a chained chunk (and a lookahead chunk) is proposed from: "imagined" takes the
    # state the world model says the last chunk ended in where it imagines one (the oracle: the
    # simulator's own), else keeps the real start's; "start" always keeps the real start's (the
    # behaviour before 2026-12-08). Why: with the start's state, the policy at a chained step reads
    # images of one moment and the hand position of another (one chunk earlier), and the learner is
    # trained on those mismatched inputs, which real episodes never show it.
    chained_state: Literal["imagined", "start"] = "imagined"
    # Denoising steps per call (0 = the model's default).
    policy_steps: int = Field(0, ge=0)
    dynamics_steps: int = Field(0, ge=0)
    dynamics_version: str = ""
    value_version: str = ""
    # Stop after this many imagined samples (0 = until the learner is done).
    max_samples: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _whole_groups(self) -> "RolloutConfig":
        if self.workers % self.group_size:
            raise ValueError(f"rollout.workers ({self.workers}) must be a multiple of rollout.group_size "
                             f"({self.group_size}): every start is rolled out by a whole group")
        if self.proposal_bins and (len(self.proposal_bins) != self.group_size
                                   or not all(1 <= b <= 10 for b in self.proposal_bins)):
            raise ValueError(f"rollout.proposal_bins ({self.proposal_bins}) must hold one bin in 1..10 per group "
                             f"position (group_size {self.group_size}), or be empty")
        if self.train_on == "best" and self.group_size < 2:
            raise ValueError("rollout.train_on 'best' picks within a group: it needs rollout.group_size >= 2")
        return self


class LearnerConfig(StrictModel):
    # Policy version to start from (alias or id in the registry) when the run has no checkpoint.
    init_policy: str = "stable"
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    # Each sample of a batch is offline with this probability (the paper's best: 0.6).
    offline_ratio: float = Field(0.6, ge=0.0, le=1.0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # The rollout (and published) policy is an EMA of the learner's weights. In a 300-step run 0.995 keeps 22%
    # of the start's weights; measured on peg-insert-side (bench/RESULTS.md, "A faster-moving published policy"),
    # 0.98 moved the policy twice as far and halved its successes: RISE's step is not yet an improvement.
    ema_decay: float = Field(0.995, ge=0.0, lt=1.0)
    # Publish the EMA weights as a new version (and make it `candidate`) every K steps.
    publish_every: int = Field(50, ge=1)
    # Checkpoint (and acknowledge the replay samples used so far) every N steps.
    checkpoint_every: int = Field(10, ge=1)
    # Offline samples keep their labelled advantage bin where the dataset has one, else the null bin.
    random_shift: int = Field(4, ge=0)
    seed: int = 0
    torch_threads: int | None = 1
    # How long a step waits for its replay share before filling the rest with offline samples
    # (imagination slower than the learner: steps wait, rather than drift off the offline ratio).
    replay_wait_s: float = Field(30.0, ge=0)
    # Under torchrun (several learner ranks): DDP or FSDP, backend, checkpoints kept. `batch_size`
    # is the global batch: each of N ranks trains on batch_size / N samples per step.
    distributed: DistributedConfig = DistributedConfig()


class GateConfig(StrictModel):
    # Evaluate `candidate` in the simulator every M published versions (0 = never).
    every_versions: int = Field(2, ge=0)
    task: str = ""  # "" = the first task of the offline data
    episodes: int = Field(20, ge=1)
    seed: int = 0
    max_steps: int = 200
    # Promote to `stable` only when the candidate beats stable with this one-sided confidence.
    confidence: float = Field(0.9, gt=0.5, lt=1.0)
    # Also evaluate the starting policy first, so there is a "before" to compare with.
    evaluate_initial: bool = True


class RunConfig(StrictModel):
    # Run folder root: a run writes to <out>/<run_id>/ (checkpoint, metrics, gate history).
    out: Path = Path("runs/trainer")
    registry_root: Path = Path("model_store")
    embodiment: str = "metaworld"
    # Offline LeRobot datasets: imagined episodes start from their frames; the learner mixes them in.
    data: list[Path] = []
    # More LeRobot datasets that imagined episodes also start from, but the learner does not train on,
    # e.g. the policy's own recorded rollouts (with simulator states, for the oracle). Why: with expert
    # demonstrations alone, imagination never visits the states the policy itself reaches, where
    # its judge's picks were worth the most (bench/judge_planning.py). [] = starts from `data` only.
    start_data: list[Path] = []
    services: ServicesConfig = ServicesConfig()
    rollout: RolloutConfig = RolloutConfig()
    replay: ReplayConfig = ReplayConfig()
    learner: LearnerConfig = LearnerConfig()
    gate: GateConfig = GateConfig()
    # Prometheus metrics port for this run's process (None: off).
    metrics_port: int | None = None


def load_run_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """The default config, or a YAML file, with dotted-key overrides on top."""
    from rise.config import load_config

    return load_config(RunConfig, path if path is not None else CONFIG_DIR / "default.yaml", overrides=overrides)
