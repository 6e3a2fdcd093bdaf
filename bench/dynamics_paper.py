"""GPU timing of the `paper` dynamics tier with random weights: seconds per imagined chunk.

The model is the full paper config (`services/dynamics/configs/paper.yaml`): LTX-Video VAE
(defaults: 32x spatial, 8x temporal, 128 latent channels), a 28 x 2048 LTXVideoTransformer3DModel
and the 6-layer action encoder, for 3 views at 192x256, 4 history + 25 future frames (1152 tokens),
piper_dual actions (50 x 14). It is built with the model module's own `build_model` directly on
the GPU (random initialisation; nothing is downloaded), cast to bf16 (`--dtype`), and called
through the service's own `LatentWorldModel.imagine` (services/dynamics/sampler.py, which also
runs under bf16 autocast on CUDA): uint8 history frames in (224x224, resized to 192x256), VAE
encode of the history, action encoding, `num_steps` FlowMatchEulerDiscreteScheduler steps of the
transformer, VAE decode of the 25-frame clip, uint8 frames out (resized back to 224x224).

Cells: batch 1 and 16 chunks x 25 and 4 steps, for each mode: `eager`, and with `--compile MODE`
also `compile-MODE`: the service's compiled path (`LatentWorldModel(compile_mode=MODE)`, what
`rise serve dynamics` runs with `compile: MODE`): torch.compile of the transformer, one static graph
per batch size, batches padded to a power of two (batch 3 runs as 4); MODE `reduce-overhead` uses
CUDA graphs, `max-autotune` autotunes and also uses CUDA graphs. Every mode is warmed up cell by cell first
(`--warmup` calls each; compilation happens there), then `--repeats` rounds run every cell once in
a shuffled order (interleaved, so clock and thermal drift hit every cell alike), each call timed
between torch.cuda.synchronize() barriers. Reported: median and min seconds per call, seconds per
chunk = median / batch, chunks/s, peak GPU memory; at 25 steps also the ratio to the reference
(plain diffusers LTX modules at paper size, bf16, eager, one H100: 1.52 s per chunk at batch 1,
0.354 s per chunk at batch 16). With `--breakdown` (default on) the eager pieces are timed alone
too: history VAE encode, one transformer velocity call, future VAE decode.

A cell that runs out of GPU memory is reported as OOM and skipped afterwards; a compile mode that
fails is reported with its error and dropped. Without CUDA the script exits with a message, unless
`--allow-cpu` (a smoke test of this script's logic; only with a small tier, and in float32).
`--count-only` builds the model on the meta device (no memory, no GPU) and prints parameter counts.

    .venv/bin/python bench/dynamics_paper.py [--compile reduce-overhead] [--repeats 5] [--warmup 2] [--out bench/dynamics_paper.json]
    .venv/bin/python bench/dynamics_paper.py --allow-cpu --tier tiny --repeats 2 --warmup 1   # CPU smoke test
    .venv/bin/python bench/dynamics_paper.py --count-only                                       # parameter counts
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.dynamics.model import build_model, load_model_config, parameter_counts  # noqa: E402

REFERENCE_S_PER_CHUNK = {1: 1.52, 16: 0.354}  # plain diffusers LTX, paper size, bf16, eager, 1 x H100, 25 steps
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def normalizer_for(config):
    from rise.data.stats import ActionNormalizer

    dim = config.embodiment_spec.action_dim
    return ActionNormalizer(-np.ones(dim), np.ones(dim), "min_max")


def count_only(tier: str) -> dict:
    import torch

    config = load_model_config(tier)
    with torch.device("meta"):
        model = build_model(config, normalizer_for(config))
    counts = parameter_counts(model)
    counts["total"] = sum(counts.values())
    return {"tier": tier, "sequence_tokens": config.sequence_length, "parameters": counts}


def inputs(emb, history: int, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    views = {v: rng.integers(0, 256, (batch, history, emb.image_height, emb.image_width, 3), dtype=np.uint8)
             for v in emb.views}
    return views, rng.uniform(-1, 1, (batch, emb.chunk_length, emb.action_dim)).astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", default="paper")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 4])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs every cell once)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per cell and mode first")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="weights (CUDA autocast is bf16 anyway)")
    parser.add_argument("--compile", choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="also time torch.compile(transformer, mode=...) next to eager (reduce-overhead: CUDA graphs)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip timing VAE encode / one step / VAE decode alone")
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-test on CPU (small tiers only, float32)")
    parser.add_argument("--count-only", action="store_true", help="build on the meta device, print parameter counts, exit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args()

    import torch

    if args.count_only:
        info = count_only(args.tier)
        print(json.dumps(info, indent=2))
        if args.out:
            args.out.write_text(json.dumps(info, indent=2) + "\n")
        return 0
    if torch.cuda.is_available():
        device = "cuda"
    elif args.allow_cpu and args.tier != "paper":
        device = "cpu"
        if args.dtype != "fp32":
            print(f"note: CPU smoke test runs in float32 (asked for {args.dtype})")
            args.dtype = "fp32"
        torch.set_num_threads(1)  # a smoke test; stays out of the way of other work on the machine
    else:
        print("dynamics_paper.py: no CUDA device here (torch.cuda.is_available() is False); this benchmark times the "
              "paper tier on a GPU. For a CPU smoke test of the script use `--allow-cpu --tier tiny`; for parameter "
              "counts `--count-only`.", file=sys.stderr)
        return 2

    from services.dynamics.sampler import LatentWorldModel

    dtype = getattr(torch, DTYPES[args.dtype])
    config = load_model_config(args.tier)
    emb = config.embodiment_spec
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.device(device):  # initialise on the GPU: a 2B-parameter CPU init takes minutes
        model = build_model(config, normalizer_for(config))
    model = model.to(dtype).eval()
    world = LatentWorldModel(model, emb, device)
    build_s = time.perf_counter() - t0
    counts = parameter_counts(model)
    counts["total"] = sum(counts.values())
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"{args.tier}: {counts['total'] / 1e6:.1f} M parameters {counts}, {config.sequence_length} tokens, built in "
          f"{build_s:.1f} s on {gpu}, weights {args.dtype}")

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    # Each mode is the service's own LatentWorldModel over the same weights; compiled ones run
    # power-of-two batches, as `rise serve dynamics` with `compile:` does.
    modes = {"eager": world}
    if args.compile:
        modes[f"compile-{args.compile}"] = LatentWorldModel(model, emb, device, compile_mode=args.compile)
    data = {b: inputs(emb, config.history, b, args.seed) for b in args.batches}
    cells = [(s, b) for s in args.steps for b in args.batches]
    failed: dict[tuple, str] = {}
    errors: dict[str, str] = {}
    peak: dict[tuple, float] = {}
    times: dict[tuple, list[float]] = {}

    def call(mode: str, steps: int, batch: int) -> float:
        history, actions = data[batch]
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        frames = modes[mode].imagine(history, actions, steps, args.seed + 1)
        sync()
        elapsed = time.perf_counter() - t
        shape = frames[emb.views[0]].shape
        assert shape == (batch, config.future_frames, emb.image_height, emb.image_width, 3), shape
        if device == "cuda":
            key = (mode, steps, batch)
            peak[key] = max(peak.get(key, 0.0), torch.cuda.max_memory_allocated() / 2**30)
        return elapsed

    def guarded(mode: str, steps: int, batch: int) -> float | None:
        key = (mode, steps, batch)
        if key in failed or mode in errors:
            return None
        try:
            return call(mode, steps, batch)
        except torch.cuda.OutOfMemoryError as exc:
            failed[key] = f"OOM: {str(exc).splitlines()[0][:200]}"
        except Exception as exc:  # a compile mode that does not work here: report it, keep the others
            if mode == "eager":
                raise
            errors[mode] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if device == "cuda":
            torch.cuda.empty_cache()
        return None

    warm_s: dict[str, float] = {}
    breakdown: dict = {}
    agreement: dict = {}

    def table_rows() -> list[dict]:
        rows = []
        for mode in modes:
            for steps, batch in cells:
                key = (mode, steps, batch)
                row = {"mode": mode, "num_steps": steps, "batch": batch}
                if key in times:
                    a = np.asarray(times[key])
                    med = float(np.median(a))
                    row.update(median_s=med, min_s=float(a.min()), max_s=float(a.max()), n=len(a),
                               s_per_chunk=med / batch, chunks_per_s=batch / med, peak_gib=peak.get(key))
                    if steps == 25 and batch in REFERENCE_S_PER_CHUNK and args.tier == "paper":
                        row["reference_s_per_chunk"] = REFERENCE_S_PER_CHUNK[batch]
                        row["speedup_vs_reference"] = REFERENCE_S_PER_CHUNK[batch] / (med / batch)
                else:
                    row["error"] = failed.get(key) or errors.get(mode) or "no timed calls"
                rows.append(row)
        return rows

    def save(stage: str) -> None:
        """Rewrite the JSON after every stage: a run cut short (a lease's time limit) keeps what it measured."""
        if not args.out:
            return
        args.out.write_text(json.dumps({
            "stage": stage, "tier": args.tier, "device": gpu, "dtype": args.dtype, "compile": args.compile,
            "repeats": args.repeats, "warmup": args.warmup, "parameters": counts,
            "sequence_tokens": config.sequence_length, "build_s": build_s, "warmup_s": warm_s,
            "compile_errors": errors, "agreement_with_eager": agreement, "torch": torch.__version__,
            "cuda": torch.version.cuda, "commit": commit,
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rows": table_rows(),
            "breakdown_s": {str(b): p for b, p in breakdown.items()}}, indent=2) + "\n")

    for mode in modes:  # warm-up (and compilation) per mode, cell by cell
        t = time.perf_counter()
        for steps, batch in cells:
            for _ in range(args.warmup):
                guarded(mode, steps, batch)
        warm_s[mode] = time.perf_counter() - t
        print(f"warm-up {mode}: {warm_s[mode]:.1f} s" + (f" (failed: {errors[mode]})" if mode in errors else ""),
              flush=True)
        save(f"warm-up {mode}")

    # The compiled path must imagine what eager does: same inputs and seed, fewest steps, per batch.
    for mode in [m for m in modes if m != "eager" and m not in errors]:
        for batch in args.batches:
            history, actions = data[batch]
            try:
                ref = modes["eager"].imagine(history, actions, min(args.steps), args.seed + 1)
                out = modes[mode].imagine(history, actions, min(args.steps), args.seed + 1)
            except torch.cuda.OutOfMemoryError:
                continue
            diff = np.concatenate([np.abs(out[v].astype(np.int16) - ref[v].astype(np.int16)).ravel() for v in emb.views])
            agreement[f"{mode} batch {batch}"] = {"mean_abs_uint8": float(diff.mean()), "max_abs_uint8": int(diff.max()),
                                                  "share_within_2": float((diff <= 2).mean())}
            print(f"{mode} vs eager, batch {batch}, {min(args.steps)} steps: {agreement[f'{mode} batch {batch}']}", flush=True)

    rng = random.Random(args.seed)
    jobs = [(mode, s, b) for mode in modes for s, b in cells]
    for r in range(args.repeats):
        rng.shuffle(jobs)
        for job in jobs:
            elapsed = guarded(*job)
            if elapsed is not None:
                times.setdefault(job, []).append(elapsed)
        print(f"round {r + 1}/{args.repeats} done", flush=True)
        save(f"round {r + 1}/{args.repeats}")

    if not args.no_breakdown:
        breakdown.update(pieces(world, model, emb, config, data, args, sync, torch))
    rows = table_rows()
    save("done")

    print(f"\nimagine, tier {args.tier}, {len(emb.views)} views {config.height}x{config.width}, history {config.history} -> "
          f"{config.future_frames} frames, {config.sequence_length} tokens; {args.dtype} on {gpu}; "
          f"{args.repeats} interleaved rounds after {args.warmup} warm-up calls per cell")
    header = f"{'mode':32} {'steps':>5} {'batch':>5} {'median s':>9} {'min s':>8} {'s/chunk':>8} {'chunks/s':>9} {'peak GiB':>9} {'vs ref':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:32} {r['num_steps']:5d} {r['batch']:5d}  {r['error']}")
            continue
        vs = f"{r['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in r else ""
        pk = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        print(f"{r['mode']:32} {r['num_steps']:5d} {r['batch']:5d} {r['median_s']:9.3f} {r['min_s']:8.3f} "
              f"{r['s_per_chunk']:8.3f} {r['chunks_per_s']:9.2f} {pk:>9} {vs:>7}")
    if breakdown:
        print("\neager pieces, timed alone (median s per call):")
        for batch, parts in breakdown.items():
            print(f"  batch {batch}: " + ", ".join(f"{k} {v:.4f}" for k, v in parts.items()))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def pieces(world, model, emb, config, data, args, sync, torch) -> dict:
    """Median seconds of the eager pieces alone, per batch: history encode, one velocity call, future decode."""
    out = {}
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=world._autocast)
    for batch in args.batches:
        history, actions = data[batch]
        try:
            with torch.inference_mode(), autocast:
                frames = torch.from_numpy(np.stack([history[v] for v in emb.views], axis=1)).to(world.device)
                pixels = model.frames_to_pixels(frames)
                hist = model.encode_history(pixels)
                tokens = model.encode_actions(model.normalize_actions(torch.from_numpy(actions).to(world.device)))
                shape = (batch, len(emb.views), config.autoencoder.latent_channels, config.future_latent_frames,
                         config.latent_height, config.latent_width)
                future = torch.randn(shape, device=world.device, dtype=hist.dtype)
                t = torch.full((batch,), 500.0, device=world.device)
                fns = {"vae_encode_history_s": lambda: model.encode_history(pixels),
                       "action_encoder_s": lambda: model.encode_actions(model.normalize_actions(torch.from_numpy(actions).to(world.device))),
                       "transformer_step_s": lambda: model.velocity(hist, future, t, tokens),
                       "vae_decode_future_s": lambda: model.decode_future(future)}
                parts = {}
                for name, fn in fns.items():
                    samples = []
                    for i in range(args.warmup + max(3, args.repeats)):
                        sync()
                        t0 = time.perf_counter()
                        fn()
                        sync()
                        if i >= args.warmup:
                            samples.append(time.perf_counter() - t0)
                    parts[name] = float(np.median(samples))
                out[batch] = parts
        except torch.cuda.OutOfMemoryError:
            out[batch] = {"error_oom": float("nan")}
            torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    sys.exit(main())
