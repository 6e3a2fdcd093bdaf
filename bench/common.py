"""What the benchmarks share: a throwaway registry of real small-tier models, the services as child
processes, free ports, the machine."""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("policy", "value", "dynamics")


def build_store(work: Path, data: list[Path], task: str, episodes: int, steps: int, seed: int, console: Console,
                models: tuple[str, ...] = MODELS) -> list[Path]:
    """Collect data if none was given; train `models` at the small tier for `steps` steps; publish them to work/store."""
    from rise.registry import Registry

    if not data:
        from rise.data.collect import collect

        folder = work / "data" / task
        console.print(f"collecting {episodes} MetaWorld episodes of {task} into {folder}")
        summary = collect(task, episodes, folder, workers=1, seed=seed)
        console.print(f"  {summary['frames']} frames, {summary['successes']} successes, {summary['seconds']:.0f} s")
        data = [folder]
    store = work / "store"
    registry = Registry(store)
    quiet = lambda *a, **k: None  # noqa: E731
    trained = {}
    for name in models:
        t = time.perf_counter()
        if name == "policy":
            from services.policy.model import load_model_config
            from services.policy.train import train

            overrides = {"training.steps": steps, "training.batch_size": 8, "training.eval_windows": 4}
        elif name == "value":
            from services.value.model import load_model_config
            from services.value.train import train

            overrides = {"training.progress_steps": steps, "training.td_steps": steps, "training.batch_size": 8,
                         "training.eval_episodes": 0}
        else:
            from services.dynamics.model import load_model_config
            from services.dynamics.train import train

            overrides = {"training.autoencoder.steps": steps, "training.autoencoder.batch_size": 8,
                         "training.transformer.steps": steps, "training.transformer.samples_per_task": 4,
                         "training.eval_episodes": 0, "training.eval_windows": 4}
        summary = train(load_model_config("small", overrides), data, work / "runs" / name, registry=store,
                        publish=True, threads=2, progress=False, log=quiet)
        registry.set_alias(name, "stable", summary["version"])
        if name == "policy":
            registry.set_alias(name, "candidate", summary["version"])
        trained[name] = summary["version"]
        console.print(f"  trained {name} (small, {steps} steps) -> {summary['version']} in {time.perf_counter() - t:.0f} s")
    return data


def pearson(a, b) -> float:
    """Pearson r of two 1-D arrays; NaN when either is constant (no correlation to speak of)."""
    import numpy as np

    return float(np.corrcoef(a, b)[0, 1]) if np.std(a) > 0 and np.std(b) > 0 else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict:
    import grpc
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout.splitlines()
    return {"cpu": cpu, "nproc": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": platform.python_version(),
            "torch": torch.__version__, "grpcio": grpc.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "commit": commit, "uncommitted": dirty}


class ServiceProcesses:
    """Model services (`models`) as `.venv/bin/rise serve <name> --config <yaml>` child processes,
    torch threads 1 each, on free ports of 127.0.0.1."""

    def __init__(self, store: Path, logs: Path, models: tuple[str, ...] = MODELS, extra: dict[str, str] | None = None):
        """`extra`: more YAML for a model's service config, e.g. {"dynamics": "pin: {learned: v0002}"}."""
        self.urls, self.procs, self.logs = {}, {}, logs
        if threading.current_thread() is threading.main_thread():
            # Killed with SIGTERM (kill, timeout), a benchmark unwinds through its `finally: stop()`
            # instead of leaving the servers running on their ports (seen: three orphans after a kill).
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        logs.mkdir(parents=True, exist_ok=True)
        rise = Path(sys.executable).parent / "rise"
        for name in models:
            port = free_port()
            config = logs / f"{name}.yaml"
            config.write_text(f"registry_root: {store}\ntorch_threads: 1\nserver:\n  port: {port}\n  log_json: false\n"
                              + (extra or {}).get(name, "") + "\n")
            with open(logs / f"{name}.log", "w") as log:
                self.procs[name] = subprocess.Popen([str(rise), "serve", name, "--config", str(config)], cwd=ROOT,
                                                    stdout=log, stderr=subprocess.STDOUT)
            self.urls[name] = f"grpc://127.0.0.1:{port}"

    async def wait_ready(self, timeout_s: float = 300.0) -> dict[str, dict[str, str]]:
        """Until every service answers ModelAdmin.ListVersions; returns their routed aliases."""
        from rise.transport import connect_admin

        deadline, routes = time.monotonic() + timeout_s, {}
        for name, url in self.urls.items():
            admin = connect_admin(url)
            try:
                while True:
                    if self.procs[name].poll() is not None:
                        raise RuntimeError(f"rise serve {name} exited ({self.procs[name].returncode}):\n{self.tail(name)}")
                    try:
                        routes[name] = (await admin.list_versions(timeout_s=5)).aliases
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"rise serve {name} not ready after {timeout_s:.0f} s:\n{self.tail(name)}")
                        await asyncio.sleep(0.5)
            finally:
                await admin.close()
        return routes

    def tail(self, name: str, lines: int = 30) -> str:
        return "\n".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
