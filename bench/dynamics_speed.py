"""Imagined chunks per second of the learned dynamics model on this CPU: in-process vs through gRPC.

The model is the LTX-family latent world model (`services/dynamics/model.py`, registry kind
`ltx_latent_flow`). By default a freshly initialised model of `--tier` (random weights: the speed
does not depend on the weights) is built with the model module's own `build_model`, saved and
published into a temporary registry; with `--registry DIR --version REF` a published version
(e.g. the trained `small` model) is served instead.

  in-process  `LatentWorldModel.imagine(history, actions, num_steps, seed)` called directly on the
              very object the server holds (`host.get(version).model`): encode history, encode
              actions, `num_steps` flow-matching Euler steps, decode, uint8 frames out
  grpc        the same call through a real dynamics server (`rise serve dynamics`'s servicer,
              ModelAdmin, interceptors, dynamic batching with `--wait-ms`) on 127.0.0.1:0, from
              `rise.transport.connect_dynamics("grpc://...")`: numpy -> ImagineRequest -> server ->
              batcher -> worker thread -> model -> ImagineResponse -> numpy

The server is started in this process through `rise.model_host.start_model_service` with exactly
the arguments `services.dynamics.server.start` passes (start() does not return the ModelHost the
in-process mode must share), so both modes run the same weights under the same torch thread
setting. Calls are sequential (one in flight); after a warm-up, every round runs every (mode,
batch, steps) cell once in a shuffled order, so machine noise hits all cells alike. Reported per
cell: median and p90 seconds per call, chunks/s = batch / median seconds, and the gRPC/in-process
ratio of medians. Inputs are random uint8 histories and uniform actions in the normaliser's range;
every call uses seed 0 (the service's unseeded path, so gRPC requests go through the batcher).

torch threads: set explicitly with `--threads` (default 2 = this machine's 2 vCPUs, for an idle
machine). When other processes compete for the cores, 1 thread is much faster than 2 (the
intra-op threads wait on each other's time slices); rerun with `--threads 1` then.

    .venv/bin/python bench/dynamics_speed.py [--tier small] [--registry runs/store --version latest] \
        [--steps 0 4] [--batches 1 8] [--iterations 20] [--warmup 2] [--threads 2] [--wait-ms 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rise.batching import BatchingConfig  # noqa: E402
from rise.model_host import load_by_kind, start_model_service  # noqa: E402
from rise.proto.v1 import dynamics_pb2_grpc  # noqa: E402
from rise.registry import Registry  # noqa: E402
from rise.serving import ServerConfig  # noqa: E402
from services.dynamics.server import KINDS, DynamicsConfig, DynamicsServicer  # noqa: E402

MODES = ("in-process", "grpc")


def publish_random(registry: Registry, tier: str, seed: int) -> str:
    """A random-weights model of `tier`, built by the model module, saved and published; returns its version."""
    import torch

    from rise.data.stats import ActionNormalizer
    from services.dynamics.model import build_model, load_model_config
    from services.dynamics.sampler import KIND

    config = load_model_config(tier)
    emb = config.embodiment_spec
    torch.manual_seed(seed)
    normalizer = ActionNormalizer(-np.ones(emb.action_dim), np.ones(emb.action_dim), "min_max")
    model = build_model(config, normalizer).eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = model.save(Path(tmp) / "model")
        manifest = registry.publish("dynamics", folder, kind=KIND, embodiment=emb.model_dump(),
                                    config=config.model_dump(mode="json"), metrics={})
    return manifest.version


def inputs(emb, history: int, batch: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    views = {v: rng.integers(0, 256, (batch, history, emb.image_height, emb.image_width, 3), dtype=np.uint8)
             for v in emb.views}
    return views, rng.uniform(-1, 1, (batch, emb.chunk_length, emb.action_dim)).astype(np.float32)


async def bench(args, root: Path, version: str, console: Console) -> dict:
    from rise.transport import connect_dynamics

    logging.getLogger("rise.serving").setLevel(logging.WARNING)
    logging.getLogger("rise.model_host").setLevel(logging.ERROR)
    manifest = Registry(root).manifest("dynamics", version)
    emb_name = manifest.embodiment.get("name", "metaworld")
    config = DynamicsConfig(registry_root=root, embodiment=emb_name, preload=[], torch_threads=args.threads,
                            batching=BatchingConfig(max_wait_ms=args.wait_ms), server=ServerConfig(port=0, log_json=False))
    running, host = await start_model_service("dynamics", config, load_by_kind(KINDS, "dynamics"),
                                              lambda h: DynamicsServicer(h, config.batching),
                                              dynamics_pb2_grpc.add_DynamicsServiceServicer_to_server)
    try:
        model = (await host.load(version)).model  # the LatentWorldModel the server calls (ModelAdmin.LoadVersion's path)
    except BaseException:
        await running.stop(0)
        raise
    emb, mcfg = host.embodiment, model.config
    steps_list = [s or mcfg.default_num_steps for s in args.steps]
    steps_list = list(dict.fromkeys(steps_list))  # default may equal an explicit value
    cells = [(mode, b, s) for s in steps_list for b in args.batches for mode in MODES]
    data = {b: inputs(emb, mcfg.history, b, args.seed) for b in args.batches}
    client = connect_dynamics(f"grpc://{running.address}")
    times: dict[tuple, list[float]] = {c: [] for c in cells}

    async def call(mode: str, batch: int, steps: int) -> float:
        history, actions = data[batch]
        t = time.perf_counter()
        if mode == "in-process":
            frames = model.imagine(history, actions, steps, 0)
        else:
            frames = (await client.imagine(history, actions, steps, 0, version=version, timeout_s=600)).frames
        elapsed = time.perf_counter() - t
        shape = frames[emb.views[0]].shape
        assert shape == (batch, mcfg.future_frames, emb.image_height, emb.image_width, 3), (mode, shape)
        return elapsed

    try:
        rng = random.Random(args.seed)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("warm-up + interleaved rounds", total=args.warmup + args.iterations)
            for round_ in range(args.warmup + args.iterations):
                order = list(cells)
                rng.shuffle(order)
                for cell in order:
                    elapsed = await call(*cell)
                    if round_ >= args.warmup:
                        times[cell].append(elapsed)
                progress.advance(task)
    finally:
        await client.close()
        await running.stop(1.0)

    rows = []
    for steps in steps_list:
        for batch in args.batches:
            base = float(np.median(times[("in-process", batch, steps)]))
            for mode in MODES:
                a = np.asarray(times[(mode, batch, steps)])
                med, p90 = float(np.median(a)), float(np.percentile(a, 90))
                rows.append({"mode": mode, "batch": batch, "num_steps": steps, "median_s": med, "p90_s": p90,
                             "mean_s": float(a.mean()), "chunks_per_s": batch / med, "ratio_vs_in_process": med / base,
                             "n": len(a)})
    return {"model": {"version": version, "tier": mcfg.tier, "embodiment": emb.name, "views": list(emb.views),
                      "image": [emb.image_height, emb.image_width], "model_image": [mcfg.height, mcfg.width],
                      "history": mcfg.history, "future_frames": mcfg.future_frames,
                      "sequence_tokens": mcfg.sequence_length, "default_num_steps": mcfg.default_num_steps,
                      "parameters": parameter_counts(model.model)},
            "rows": rows}


def parameter_counts(model) -> dict[str, int]:
    from services.dynamics.model import parameter_counts as counts

    return counts(model)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": cpu, "nproc": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": platform.python_version(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "commit": commit}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", default="small", help="config tier for a random-weights model (tiny | small | paper)")
    parser.add_argument("--registry", type=Path, help="serve a published version from this registry instead")
    parser.add_argument("--version", default="", help="version or alias in --registry (default: latest)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 4], help="denoising steps; 0 = the config default")
    parser.add_argument("--iterations", type=int, default=20, help="timed rounds (each runs every cell once)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (both modes: one process)")
    parser.add_argument("--wait-ms", type=float, default=BatchingConfig().max_wait_ms,
                        help="server batching window (a lone request waits this long for company)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    console = Console()
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        if args.registry:
            registry = Registry(args.registry)
            ref = args.version or "latest"
            version = registry.resolve("dynamics", ref)
            source = f"{args.registry} dynamics/{version} ({ref})"
        else:
            registry = Registry(Path(tmp) / "store")
            version = publish_random(registry, args.tier, args.seed)
            source = f"random weights, tier {args.tier} (build_model)"
        result = asyncio.run(bench(args, registry.root, version, console))
    m = result["model"]
    table = Table("steps", "batch", "mode", "median s/call", "p90 s/call", "chunks/s", "grpc / in-process",
                  title=f"imagine, {source}: {m['embodiment']} {len(m['views'])} views {m['image'][0]}x{m['image'][1]}, "
                        f"history {m['history']} -> {m['future_frames']} frames; torch threads {args.threads}; "
                        f"{args.iterations} rounds after {args.warmup} warm-up, interleaved")
    for r in result["rows"]:
        table.add_row(str(r["num_steps"]), str(r["batch"]), r["mode"], f"{r['median_s']:.4f}", f"{r['p90_s']:.4f}",
                      f"{r['chunks_per_s']:.1f}", f"{r['ratio_vs_in_process']:.2f}x")
    console.print(table)
    console.print(f"parameters: {m['parameters']}; machine: {info['nproc']} x {info['cpu']}, load {info['loadavg_start']}")
    if args.out:
        args.out.write_text(json.dumps({"source": source, "threads": args.threads, "wait_ms": args.wait_ms,
                                        "iterations": args.iterations, "warmup": args.warmup, "machine": info,
                                        "torch": torch.__version__, **result}, indent=2) + "\n")
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
