"""The system's speed in one run: every service benchmark side by side, each as a ratio to its baseline.

One registry of real `small`-tier models (policy, value, dynamics; trained for a couple of steps:
speed does not depend on the weights) is built once and shared by every part:

  policy     act, gRPC vs in-process, batch 1 and 16              bench/policy_latency.py
  dynamics   imagined chunks/s, gRPC vs in-process (learned model) bench/dynamics_speed.py
             one imagine call, gRPC vs Triton vs in-process         bench/dynamics_transport.py
             (persistence model: the transports' own cost)
  value      scores/s, gRPC vs in-process, batch 1 and 16          here
  trainer    imagined samples/s, services vs in-process            bench/trainer_throughput.py
  replay     samples/s through ReplayQueue (push + read + decode + ack) vs raw Redis commands
             on the same payloads (XADD, XREADGROUP, XACK + XDEL)  here

The scripts run as child processes with their own `--out` JSON (kept in `<workdir>/parts/`), in
sequence, so no part competes with another for this machine's cores. Every part interleaves its
own modes, so a ratio is measured side by side; absolute numbers on a shared 2-core machine move
with the load, which is recorded. Writes `bench/system.json` and `bench/system.md` (the table).

    .venv/bin/python bench/system.py                 # ~15-25 min on 2 cores
    .venv/bin/python bench/system.py --quick         # fewer calls, for a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import ServiceProcesses, build_store, machine  # noqa: E402

TASK = "pick-place"


# ---- the parts that are scripts of their own ---------------------------------------------------------
def script_parts(store: Path, data: Path, parts: Path, quick: bool) -> dict[str, list[str]]:
    """Each part's command line (its JSON goes to parts/<name>.json)."""
    py = sys.executable
    n = (lambda full, small: str(small if quick else full))  # noqa: E731
    return {
        "policy": [py, "bench/policy_latency.py", "--store", str(store), "--data", str(data), "--blocks", n(4, 2),
                   "--calls", n(15, 5), "--workdir", str(parts / "policy-work"), "--out", str(parts / "policy.json")],
        "dynamics": [py, "bench/dynamics_speed.py", "--registry", str(store), "--version", "stable", "--steps", "4",
                     "--batches", "1", "8", "--threads", "1", "--iterations", n(10, 3), "--out", str(parts / "dynamics.json")],
        "dynamics-transport": [py, "bench/dynamics_transport.py", "--iterations", n(100, 20), "--warmup", n(10, 5),
                               "--out", str(parts / "dynamics-transport.json")],
        "trainer": [py, "bench/trainer_throughput.py", "--store", str(store), "--data", str(data), "--blocks", n(2, 1),
                    "--rounds", n(6, 3), "--workdir", str(parts / "trainer-work"), "--out", str(parts / "trainer.json")],
    }


def run_script(name: str, cmd: list[str], parts: Path, console: Console) -> dict:
    console.rule(f"[bold]{name}[/]: {' '.join(Path(c).name if c == sys.executable else c for c in cmd[1:3])} ...")
    t = time.perf_counter()
    with open(parts / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join((parts / f"{name}.log").read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); log {parts / f'{name}.log'}:\n{tail}")
    console.print(f"  done in {time.perf_counter() - t:.0f} s")
    return json.loads((parts / f"{name}.json").read_text())


# ---- value: scores/s through gRPC vs in-process ------------------------------------------------------
async def bench_value(store: Path, work: Path, batches: list[int], rounds: int, console: Console) -> dict:
    """Score [current, imagined...] frames as the trainer does (B items x 2 frames), both modes interleaved."""
    import torch

    from bench.trainer_throughput import LocalValue
    from rise.transport import connect_value

    torch.set_num_threads(1)  # as the server with torch_threads: 1
    console.rule("[bold]value[/]: Score through gRPC vs in-process")
    services = ServiceProcesses(store, work / "value-logs", models=("value",))
    client = None
    try:
        local = await LocalValue("value", store, "metaworld").start()
        await services.wait_ready()
        client = connect_value(services.urls["value"])
        emb = local.host.embodiment
        rng = np.random.default_rng(0)
        inputs = {b: {v: rng.integers(0, 256, (b, 2, emb.image_height, emb.image_width, 3), dtype=np.uint8)
                      for v in emb.views} for b in batches}
        tasks = {b: ["pick and place a puck to a goal"] * b for b in batches}
        modes = {"in-process": local, "grpc": client}
        for b in batches:  # warm-up: text encoder, first allocations
            for caller in modes.values():
                await caller.score(inputs[b], tasks[b])
        ms: dict[tuple[str, int], list[float]] = {}
        for r in range(rounds):
            for b in batches:
                for mode in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
                    t = time.perf_counter()
                    scores = await modes[mode].score(inputs[b], tasks[b])
                    ms.setdefault((mode, b), []).append((time.perf_counter() - t) * 1e3)
                    if np.asarray(scores.values).shape != (b, 2):
                        raise RuntimeError(f"value {mode}: got {np.asarray(scores.values).shape}, expected {(b, 2)}")
    finally:
        if client is not None:
            await client.close()
        services.stop()
    out = {}
    for (mode, b), values in ms.items():
        p50 = float(np.median(values))
        out[f"{mode} b{b}"] = {"mode": mode, "batch": b, "calls": len(values), "p50_ms": p50,
                               "p90_ms": float(np.percentile(values, 90)), "scores_per_s": 1000 * 2 * b / p50}
    return out


# ---- replay: ReplayQueue vs raw Redis on realistic payloads ------------------------------------------
def realistic_payloads(data: Path, count: int, encoding: str) -> list[bytes]:
    """Samples as the trainer writes them: a real dataset frame per view (JPEG q90 by default), state,
    an 8 x 4 chunk, values and timings; cycled over the dataset's frames."""
    from rise.data.loading import load_episodes_in_memory
    from rise.embodiment import load_embodiment
    from services.trainer.replay import encode_sample

    emb = load_embodiment("metaworld")
    episodes = load_episodes_in_memory(data, emb)
    rng = np.random.default_rng(0)
    payloads = []
    for i in range(count):
        f = int(rng.integers(len(episodes)))
        payloads.append(encode_sample(
            views={v: episodes.views[v][f] for v in emb.views}, state=episodes.states[f], task=episodes.tasks[0],
            actions=rng.uniform(-1, 1, (emb.chunk_length, emb.action_dim)), advantage=0.1, advantage_bin=6,
            policy_version="v0001", dynamics_version="v0001", value_version="v0001", chain_index=i % 2,
            value_current=0.2, value_imagined=[0.25] * emb.chunk_length,
            timing_ms={"policy": 30.0, "dynamics": 400.0, "value": 20.0}, run_id="bench", frame_encoding=encoding))
    return payloads


def bench_replay(url: str, data: Path, samples: int, batch: int, rounds: int, console: Console) -> dict:
    """push `batch` samples, read them back for one consumer, decode, ack; per mode, alternating rounds."""
    import redis

    from services.trainer.replay import FIELD, ReplayConfig, ReplayQueue, decode_sample

    console.rule("[bold]replay[/]: ReplayQueue vs raw Redis commands")
    out = {}
    r = redis.Redis.from_url(url)
    for encoding in ("jpeg", "raw"):
        payloads = realistic_payloads(data, samples, encoding)
        key = f"rise-bench:system:{uuid.uuid4().hex[:8]}"
        queue = ReplayQueue(ReplayConfig(url=url, max_length=10 * samples), f"{key}:queue")
        queue.ensure_group()
        raw_key = f"{key}:raw"
        r.xgroup_create(raw_key, "learner", id="0", mkstream=True)

        def via_queue(chunk: list[bytes]) -> int:
            queue.push(chunk)
            got = queue.read("bench", len(chunk))
            queue.ack(got.ids)
            return len(got.items)

        def via_raw(chunk: list[bytes]) -> int:
            pipe = r.pipeline()
            for p in chunk:
                pipe.xadd(raw_key, {FIELD: p}, maxlen=10 * samples, approximate=True)
            pipe.execute()
            entries = r.xreadgroup("learner", "bench", {raw_key: ">"}, count=len(chunk))[0][1]
            items = [decode_sample(fields[FIELD]) for _, fields in entries]  # the learner decodes either way
            ids = [i for i, _ in entries]
            pipe = r.pipeline()
            pipe.xack(raw_key, "learner", *ids)
            pipe.xdel(raw_key, *ids)
            pipe.execute()
            return len(items)

        modes = {"ReplayQueue": via_queue, "raw redis": via_raw}
        seconds = {m: 0.0 for m in modes}
        moved = {m: 0 for m in modes}
        try:
            for m in modes:  # warm-up
                modes[m](payloads[:batch])
            for k in range(rounds):
                for m in (list(modes) if k % 2 == 0 else list(modes)[::-1]):
                    for i in range(0, samples, batch):
                        t = time.perf_counter()
                        moved[m] += modes[m](payloads[i:i + batch])
                        seconds[m] += time.perf_counter() - t
        finally:
            queue.delete()
            r.delete(raw_key)
        kib = sum(map(len, payloads)) / len(payloads) / 1024
        for m in modes:
            out[f"{m} {encoding}"] = {"mode": m, "encoding": encoding, "samples": moved[m], "seconds": seconds[m],
                                      "samples_per_s": moved[m] / seconds[m], "payload_kib": kib, "batch": batch}
    return out


# ---- one table -------------------------------------------------------------------------------------
def rows_of(parts: dict) -> list[dict]:
    """(component, measurement, baseline, measured, ratio, overhead) rows from the parts that ran."""
    rows = []

    def row(component, what, base_label, base, label, value, unit, lower_is_better):
        ratio = value / base
        rows.append({"component": component, "measurement": what, "baseline": f"{base_label} {base:.3g} {unit}",
                     "measured": f"{label} {value:.3g} {unit}", "ratio": ratio,
                     "overhead": (ratio - 1) if lower_is_better else (1 / ratio - 1)})

    if pol := parts.get("policy", {}).get("summary"):
        for b in (1, 16):
            row("policy", f"act p50, batch {b}", "in-process", pol[f"batch {b}: in-process"]["p50_ms"],
                "gRPC ActBatch", pol[f"batch {b}: grpc ActBatch"]["p50_ms"], "ms", True)
        if "batch 1: grpc Act (raw stub)" in pol:
            row("policy", "act p50, batch 1 (a robot's unary Act)", "in-process", pol["batch 1: in-process"]["p50_ms"],
                "gRPC Act", pol["batch 1: grpc Act (raw stub)"]["p50_ms"], "ms", True)
    for r in parts.get("dynamics", {}).get("rows", []):
        if r["mode"] != "in-process":
            base = next(x for x in parts["dynamics"]["rows"] if x["mode"] == "in-process" and x["batch"] == r["batch"]
                        and x["num_steps"] == r["num_steps"])
            row("dynamics", f"learned small, {r['num_steps']} steps, batch {r['batch']}: chunks/s", "in-process",
                base["chunks_per_s"], "gRPC", r["chunks_per_s"], "chunks/s", False)
    if cells := parts.get("dynamics-transport", {}).get("results"):
        for b in (1, 8):
            for name in ("grpc", "triton"):
                if f"in-process b{b}" in cells and f"{name} b{b}" in cells:
                    row("dynamics", f"persistence model, one call, batch {b}: p50 (the transport's cost)", "in-process",
                        cells[f"in-process b{b}"]["p50_ms"], name, cells[f"{name} b{b}"]["p50_ms"], "ms", True)
    if val := parts.get("value"):
        for b in sorted({v["batch"] for v in val.values()}):
            row("value", f"Score, batch {b} x 2 frames: scores/s", "in-process", val[f"in-process b{b}"]["scores_per_s"],
                "gRPC", val[f"grpc b{b}"]["scores_per_s"], "scores/s", False)
    if t := parts.get("trainer", {}).get("summary"):
        row("trainer", "rollout loop, 8 workers: imagined samples/s", "in-process", t["in-process"]["samples_per_s"],
            "services", t["services"]["samples_per_s"], "samples/s", False)
    if rep := parts.get("replay"):
        for enc in ("jpeg", "raw"):
            row("replay", f"push + read + decode + ack, {rep[f'raw redis {enc}']['payload_kib']:.0f} KiB {enc} samples: "
                "samples/s", "raw redis", rep[f"raw redis {enc}"]["samples_per_s"], "ReplayQueue",
                rep[f"ReplayQueue {enc}"]["samples_per_s"], "samples/s", False)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| component | measurement | baseline | through the system | ratio | overhead |",
             "| --- | --- | --- | --- | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['component']} | {r['measurement']} | {r['baseline']} | {r['measured']} | "
                     f"{r['ratio']:.2f}x | {100 * r['overhead']:+.0f}% |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few calls per part (a smoke run, noisy numbers)")
    parser.add_argument("--store", type=Path, help="registry with small policy/value/dynamics aliased stable (needs --data)")
    parser.add_argument("--data", type=Path, help="a MetaWorld dataset (rollout starts, realistic replay payloads)")
    parser.add_argument("--workdir", type=Path, help="keep the store, parts' JSONs and logs here (default: a temp dir)")
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14").rsplit("/", 1)[0] + "/14")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out (e.g. dynamics-transport)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "system.json")
    args = parser.parse_args()
    if args.store and not args.data:
        parser.error("--store needs --data")

    console = Console(width=max(Console().width, 150))
    info = machine()
    started = time.perf_counter()
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="system-bench-")
    work = Path(args.workdir or tmp).resolve()
    parts_dir = work / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    try:
        store, data = args.store, args.data
        if store is None:
            data = build_store(work, [data] if data else [], TASK, 3, 2, 0, console)[0]
            store = work / "store"
        store, data = store.resolve(), data.resolve()
        parts, seconds = {}, {}
        for name, cmd in script_parts(store, data, parts_dir, args.quick).items():
            if name not in skip:
                t = time.perf_counter()
                parts[name] = run_script(name, cmd, parts_dir, console)
                seconds[name] = time.perf_counter() - t
        if "value" not in skip:
            t = time.perf_counter()
            parts["value"] = asyncio.run(bench_value(store, work, [1, 16], 10 if args.quick else 40, console))
            seconds["value"] = time.perf_counter() - t
        if "replay" not in skip:
            t = time.perf_counter()
            parts["replay"] = bench_replay(args.redis, data, 64 if args.quick else 256, 8, 2 if args.quick else 6, console)
            seconds["replay"] = time.perf_counter() - t
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    rows = rows_of(parts)

    table = Table("component", "measurement", "baseline", "through the system", "ratio", "overhead",
                  title="RISE-serve, every part against its baseline, measured side by side")
    for r in rows:
        table.add_row(r["component"], r["measurement"], r["baseline"], r["measured"], f"{r['ratio']:.2f}x",
                      f"{100 * r['overhead']:+.0f}%")
    console.print(table)
    console.print(f"machine: {info['nproc']} x {info['cpu']}, load {info['loadavg_start']} -> {info['loadavg_end']}; "
                  f"total {time.perf_counter() - started:.0f} s; parts: "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    if args.out:
        command = " ".join([".venv/bin/python", *[str(a) for a in sys.argv]])
        args.out.write_text(json.dumps({"command": command, "machine": info, "seconds": seconds, "rows": rows,
                                        "parts": parts}, indent=1, default=str) + "\n")
        md = args.out.with_suffix(".md")
        md.write_text(f"`{command}` — {info['date_utc']}, commit {info['commit']}, {info['nproc']} x {info['cpu']}, "
                      f"load {info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f}\n\n" + markdown(rows))
        console.print(f"wrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
