"""Learner ranks: torch.distributed data parallelism for the policy update, launched by torchrun.

    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1   # needed with --max-restarts > 0 (see `check_launcher`)
    torchrun --nproc-per-node 2 -m rise.cli train rise --config run.yaml --run-id r1     # 2 ranks, one machine
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-endpoint head:29400 -m rise.cli train rise ...  # a cluster

Without torchrun (WORLD_SIZE unset or 1) `World()` is the single process and every method here
is the identity: the learner runs exactly as it always did, checkpointing to `learner.pt`.

With N ranks, each rank is a whole learner on 1/N of every batch:
- its own Redis consumer in the run's group (`consumer_name`), so it reads its own share of the
  replay stream, and its own shard of the offline episodes (`offline_shard`);
- gradients are averaged by DDP (small policies: each rank holds the whole model) or the model is
  sharded by FSDP2 `fully_shard` (`paper`-size: parameters, gradients and optimizer state split
  over the ranks); `learner.distributed.strategy` picks, "auto" by parameter count;
- checkpoints are `torch.distributed.checkpoint` folders (each rank writes its part, resharding
  on load), committed by rank 0 renaming a pointer; each rank acknowledges its own replay samples
  only after that commit (at-least-once, as before); `export_checkpoint` turns one into the plain
  model folder the policy service loads;
- rank 0 alone publishes versions and runs everything else (rollouts, gate, status, aliases); the
  others learn, and learn of new versions by broadcast.
Backend: gloo on CPU (this machine), NCCL on GPUs.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from rise.config import StrictModel

CHECKPOINTS = "checkpoints"  # <run>/checkpoints/step-000010/ (DCP files + meta.json), and LATEST naming one
LATEST = "LATEST"
META = "meta.json"


class DistributedConfig(StrictModel):
    # How ranks share the policy update: "ddp" replicates the model and averages gradients;
    # "fsdp" shards parameters, gradients and optimizer state (FSDP2 `fully_shard`); "auto" picks
    # FSDP for policies of at least `fsdp_min_params` parameters (the `paper` tier), else DDP.
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    fsdp_min_params: int = Field(50_000_000, ge=1)
    # "auto": NCCL when CUDA is available, else gloo (CPU).
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # A collective that waits longer than this fails the rank (torchrun then restarts the group).
    timeout_s: float = Field(600.0, gt=0)
    # Checkpoint folders kept (the newest ones); older ones are deleted after a commit.
    keep_checkpoints: int = Field(2, ge=1)


@dataclass
class World:
    """This process's place among the learner ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    strategy: str = "single"  # single | ddp | fsdp, fixed by `wrap`
    device: str = "cpu"
    _mesh: object = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # ---- who reads what ------------------------------------------------------------------------
    def consumer_name(self, base: str) -> str:
        """The rank's Redis consumer: the single process keeps its old name; a restarted rank gets its pending back."""
        return base if not self.distributed else f"{base}-rank{self.rank}"

    def seed(self, *entropy: int) -> list[int]:
        """Seed material for this rank's draws (the single process's seeds are unchanged)."""
        return [*entropy] if not self.distributed else [*entropy, 1_000 + self.rank]

    def offline_shard(self, episodes) -> np.ndarray:
        """Training-window indices (frames) this rank draws offline samples from: whole episodes,
        round robin over the ranks (frames round robin when there are fewer episodes than ranks)."""
        frames = np.arange(len(episodes))
        if not self.distributed:
            return frames
        owner = episodes.frame_episode if episodes.num_episodes >= self.size else frames
        return frames[owner % self.size == self.rank]

    # ---- collectives (identity for one process) ---------------------------------------------
    def sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (e.g. a stop asked of rank 0)."""
        return self.sum([float(flag)])[0] > 0 if self.distributed else flag

    def broadcast(self, value):
        """Rank 0's `value` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


def check_launcher(environ=os.environ) -> None:
    """Refuse a torchrun that would restart the group on a store shared with its predecessor.

    By default torchrun's c10d rendezvous keeps ONE TCPStore for the whole job and hands it to every
    generation of workers without a per-restart prefix, so the group torchrun restarts after a rank
    dies can read the dead group's gloo addresses (or NCCL unique id) and fail with "Connection
    refused" or hang in connectFullMesh until its timeout, restart after restart (pytorch#135712;
    seen here in CI with torch 2.11, depending on which rank writes first).
    `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` gives each generation a fresh store hosted by its rank 0.
    """
    shared = environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    restarts = int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if shared and restarts > 0:
        raise RuntimeError(
            f"torchrun may restart this group ({restarts} restarts) but shares its rendezvous store with the "
            "workers, so a restarted group can read the dead group's addresses and hang (pytorch#135712). "
            "Launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment.")


def init_world(config: DistributedConfig) -> World:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...), or the single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    check_launcher()
    import torch
    import torch.distributed as dist

    backend = config.backend if config.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    device = "cpu"
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=config.timeout_s))
    return World(dist.get_rank(), dist.get_world_size(), device=device)


def shutdown_world(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ---- the model across ranks --------------------------------------------------------------------
def _loss_module():
    from torch import nn

    class PolicyLoss(nn.Module):
        """The policy's flow-matching loss as a module's forward: DDP's gradient hooks and FSDP's
        parameter gathering both hang on `forward`, and the learner calls the loss, not the policy."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args, **kwargs):
            return self.model.flow_matching_loss(*args, **kwargs)

    return PolicyLoss


def wrap(world: World, config: DistributedConfig, model, ema):
    """-> (loss module, EMA root): what the learner calls and checkpoints. The single process gets
    the plain loss module; DDP a DistributedDataParallel around it; FSDP both sharded alike (each
    transformer block a unit, the rest in the root), so the EMA moves shard by shard."""
    loss, ema_root = _loss_module()(model), _loss_module()(ema)
    if not world.distributed:
        world.strategy = "single"
        return loss, ema_root
    count = sum(p.numel() for p in model.parameters())
    world.strategy = config.strategy if config.strategy != "auto" else ("fsdp" if count >= config.fsdp_min_params else "ddp")
    model.to(world.device)
    ema.to(world.device)
    if world.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # The EMA copy needs no wrapper: every rank applies the same averaged update to it.
        return DistributedDataParallel(loss, device_ids=None if world.device == "cpu" else [world.device]), ema_root
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world._mesh = world._mesh or init_device_mesh(world.device.split(":")[0], (world.size,))
    for root in (loss, ema_root):
        for block in root.model.transformer.layers:
            fully_shard(block, mesh=world._mesh)
        fully_shard(root, mesh=world._mesh)
    return loss, ema_root


def local(tensor):
    """A parameter's local part (FSDP shards are DTensors; plain tensors pass through)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full_module(world: World, ema_root, plain_factory):
    """The EMA policy as one plain module on rank 0 (collective under FSDP; None on other ranks)."""
    if world.strategy != "fsdp":
        return ema_root.model if world.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(ema_root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return None
    plain = plain_factory()
    plain.load_state_dict({k.removeprefix("model."): v for k, v in full.items()})
    return plain


# ---- checkpoints: torch.distributed.checkpoint folders --------------------------------------------
def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    return pointer.parent / pointer.read_text().strip() if pointer.exists() else None


def read_meta(run_dir: Path) -> dict | None:
    """The newest committed checkpoint's scalars (step, counters, versions), or None."""
    folder = latest_checkpoint(run_dir)
    return json.loads((folder / META).read_text()) if folder else None


def _state(loss, ema_root, optimizer):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(loss), "ema": get_model_state_dict(ema_root),
            "optimizer": get_optimizer_state_dict(loss, optimizer)}


def save_checkpoint(world: World, run_dir: Path, step: int, loss, ema_root, optimizer, meta: dict,
                    keep: int = 2) -> Path:
    """Every rank writes its part; rank 0 adds meta.json and commits by moving LATEST; all return
    after the commit (so acknowledging replay samples afterwards is safe)."""
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / CHECKPOINTS
    folder = root / f"step-{step:08d}"
    if world.is_main and folder.exists():  # a half-written one from a rank group that died
        shutil.rmtree(folder)
    world.barrier()
    dcp.save(_state(loss, ema_root, optimizer), checkpoint_id=str(folder))  # returns once every rank's part is written
    if world.is_main:
        (folder / META).write_text(json.dumps(meta, indent=1) + "\n")
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(folder.name + "\n")
        os.replace(tmp, root / LATEST)  # the commit
        for old in sorted(p for p in root.glob("step-*") if p.name < folder.name)[:-(keep - 1) or None]:
            shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return folder


def load_checkpoint(run_dir: Path, loss, ema_root, optimizer) -> dict:
    """Load the newest committed checkpoint into the (wrapped) modules and optimizer; -> its meta.
    DCP reshards: a run may resume on a different number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    folder = latest_checkpoint(run_dir)
    state = _state(loss, ema_root, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(loss, state["model"])
    set_model_state_dict(ema_root, state["ema"])
    set_optimizer_state_dict(loss, optimizer, state["optimizer"])
    return json.loads((folder / META).read_text())


def export_checkpoint(checkpoint: Path, out: Path, registry, which: Literal["ema", "model"] = "ema") -> Path:
    """A DCP checkpoint folder (or a run folder: its newest) -> the plain model folder the policy
    service loads (safetensors weights, config, normalizers), ready for `rise models publish`.
    Runs in one process, without a process group (`dcp_to_torch_save`)."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from services.policy.model import load_model

    checkpoint = Path(checkpoint)
    if not (checkpoint / META).exists():
        checkpoint = latest_checkpoint(checkpoint) or checkpoint
    meta = json.loads((checkpoint / META).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "checkpoint.pt"
        dcp_to_torch_save(str(checkpoint), str(flat))
        weights = torch.load(flat, weights_only=False)[which]
    model = load_model(registry.open("policy", meta["init_version"]).path)  # architecture, config, normalizers
    model.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()})
    return model.save(out)
