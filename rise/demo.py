"""`make demo`: the whole RISE loop on one machine, small enough for a 2-core laptop CPU.

    1. redis      a Redis for the replay stream (started here when none answers at REDIS_URL)
    2. collect    MetaWorld episodes from the scripted expert with action noise and random-action
                  bursts, so that the data hold successes and failures
    3. train      policy imitation warm-up, value model, offline advantage labels, the RECAP-style
                  advantage-conditioned policy (-> `stable`), dynamics model; all published to the
                  demo's registry. The dynamics model trains in a second process beside the others
    4. serve      policy, value, dynamics and trainer services as local processes (`rise serve`)
    5. improve    simulator success of `stable`; RL in imagination through TrainerService
                  (StartRun, then WatchRun until it ends); simulator success of the run's newest
                  policy version, on the same held-out layouts
    6. report     `<workdir>/report.html`: success before/after, imagined vs real rollouts, value
                  curves, advantages, throughput, stage timings

Every service runs in its own process group and is stopped on the way out (normal end, error or
Ctrl-C); on Linux each child is also tied to this process (PR_SET_PDEATHSIG), so not even a killed
demo leaves services behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import yaml
from rich.console import Console
from rich.table import Table

MARKER = ".rise-demo"  # a workdir holding this file belongs to the demo and may be cleared
REPLAY_PREFIX = "rise-demo"  # the demo's Redis keys: f"{REPLAY_PREFIX}:{run_id}..."
SERVICES = ("policy", "value", "dynamics", "trainer")


class DemoError(RuntimeError):
    """A stage could not run; the message says what to do."""


@dataclass
class DemoOptions:
    workdir: Path = Path(".demo")
    # reach: the scripted expert with noise 0.5, random-action bursts in half the episodes and at
    # most 80 steps succeeds in about 3 of 4 episodes (31/40 measured, 68 steps on average), so the
    # data hold failures, and episodes are short (collection and evaluation fit the budget).
    task: str = "reach"
    episodes: int = 30
    noise: float = 0.5
    perturb_prob: float = 0.5
    max_steps: int = 80
    collect_workers: int = 2
    tier: str = "small"
    policy_steps: int = 300  # imitation warm-up
    advantage_steps: int = 100  # RECAP-style advantage-conditioned fine-tuning (0: skip)
    value_steps: int = 300  # half progress regression, half TD
    dynamics_steps: int = 600  # a third autoencoder, the rest transformer (in parallel with the others)
    rl_steps: int = 100
    eval_episodes: int = 20
    seed: int = 0
    redis_url: str = "redis://127.0.0.1:6379/0"
    parallel: bool = True  # train the dynamics model in a second process beside the others
    reuse_data: bool = False  # keep a dataset collected by an earlier demo with the same settings


# ---- stages and their clock -------------------------------------------------------------------------
class Stages:
    """Wall time of every stage, in order; the rows add up to the demo's wall time."""

    def __init__(self, console: Console):
        self.console = console
        self.rows: list[tuple[str, float, str]] = []
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str, note: str = "") -> Iterator[dict]:
        self.console.rule(f"[bold]{name}")
        info = {"note": note}
        t0 = time.perf_counter()
        try:
            yield info
        except BaseException as exc:
            what = "interrupted" if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)) else "failed"
            self.rows.append((name, time.perf_counter() - t0, f"{what}: {info['note']}".rstrip(": ")))
            raise
        seconds = time.perf_counter() - t0
        self.rows.append((name, seconds, info["note"]))
        self.console.print(f"[dim]{name}: {seconds:.1f} s[/dim]")

    def finish(self) -> list[tuple[str, float, str]]:
        """The rows, plus one for the time outside every stage (imports, setup), so they add up to the wall time."""
        rest = time.perf_counter() - self.started - sum(s for _, s, _ in self.rows)
        return self.rows + ([("other (imports, setup between stages)", rest, "")] if rest > 0.05 else [])

    def table(self) -> Table:
        rows = self.finish()
        total = sum(s for _, s, _ in rows)
        table = Table("stage", "wall s", "share", "note", title="demo stages")
        for name, seconds, note in rows:
            table.add_row(name, f"{seconds:.1f}", f"{seconds / total:.0%}" if total else "-", note)
        table.add_row("[bold]total", f"[bold]{total:.1f}", "100%", f"{total / 60:.1f} min wall")
        return table


# ---- workdir ----------------------------------------------------------------------------------------
@dataclass
class Paths:
    root: Path

    def __post_init__(self):
        self.root = self.root.resolve()
        self.data = self.root / "data"
        self.train = self.root / "train"
        self.store = self.root / "model_store"
        self.configs = self.root / "configs"
        self.logs = self.root / "logs"
        self.runs = self.root / "runs"
        self.report = self.root / "report.html"

    def dataset(self, task: str) -> Path:
        return self.data / task

    def prepare(self, keep_data: bool) -> None:
        """Clear what an earlier demo left here (only in a demo workdir), then make the folders."""
        root = self.root
        if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
            raise DemoError(f"{root} is not empty and was not made by the demo (no {MARKER} file): choose another "
                            "--workdir or empty it")
        if root.exists():
            for child in root.iterdir():
                if child.name == MARKER or (keep_data and child == self.data):
                    continue
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        for folder in (self.data, self.train, self.store, self.configs, self.logs, self.runs):
            folder.mkdir(parents=True, exist_ok=True)
        (root / MARKER).write_text("made by `rise demo`; the next demo run with this --workdir clears this folder\n")


# ---- child processes --------------------------------------------------------------------------------
# Runs in the child before exec: ask the kernel to SIGTERM it when its parent dies (Linux), so a
# demo killed outright still leaves no service behind; the flag survives exec.
_TIE_TO_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except (AttributeError, OSError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('parent gone before start')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def spawn(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `command` in its own process group (Ctrl-C in the terminal reaches only us; we stop it),
    tied to this process, with stdout and stderr to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-c", _TIE_TO_PARENT, str(os.getpid()), *command],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})})


def stop_process(process: subprocess.Popen, grace_s: float = 15.0, terminate: bool = True) -> int | None:
    """SIGTERM the process group (unless the caller did), SIGKILL it after `grace_s`; returns the
    exit code (reaped). A second SIGTERM is never sent: it would kill a process that is past its
    graceful shutdown and tearing down. A reaped process is left alone (its pid may be reused)."""
    if process.returncode is not None:
        return process.returncode
    if terminate:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)
    return process.returncode


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---- 1. Redis ----------------------------------------------------------------------------------------
def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping())
    except Exception:
        return False


@contextlib.contextmanager
def local_redis(url: str, log_path: Path, console: Console) -> Iterator[tuple[str, str]]:
    """(url, note): the Redis at `url`, or one started here on its port (stopped on the way out)."""
    if _redis_answers(url):
        yield url, f"using the Redis at {url}"
        return
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise DemoError(f"no Redis answers at {url}, and it is not on this machine: start it, or set REDIS_URL "
                        "to a running server (or to redis://127.0.0.1:PORT/0 to let the demo start one)")
    binary = shutil.which("redis-server")
    if binary is None:
        raise DemoError(f"no Redis answers at {url} and redis-server is not installed: `sudo apt-get install "
                        "redis-server` (the demo then starts one itself), or set REDIS_URL to a running server")
    process = spawn([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], log_path)
    try:
        deadline = time.monotonic() + 15
        while not _redis_answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"redis-server did not start on port {port}:\n{log_tail(log_path)}")
            time.sleep(0.1)
        console.print(f"started redis-server on port {port} (pid {process.pid})")
        yield url, f"started redis-server on port {port}"
    finally:
        stop_process(process, 5)


def delete_run_keys(url: str, run_id: str) -> int:
    """Remove the run's replay stream and counters from Redis."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    keys = list(client.scan_iter(match=f"{REPLAY_PREFIX}:{run_id}*", count=500))
    return client.delete(*keys) if keys else 0


# ---- 2. collect -------------------------------------------------------------------------------------
def collect_data(o: DemoOptions, paths: Paths, info: dict) -> Path:
    from rise.data.collect import collect

    out = paths.dataset(o.task)
    wanted = {"task": o.task, "episodes": o.episodes, "noise": o.noise, "workers": o.collect_workers, "seed": o.seed,
              "max_steps": o.max_steps, "perturb_prob": o.perturb_prob, "after_success": 10}
    record = out / "meta" / "rise_collect.json"
    if o.reuse_data and record.is_file():
        saved = json.loads(record.read_text())
        if {k: v for k, v in saved["args"].items() if k != "workers"} == {k: v for k, v in wanted.items() if k != "workers"}:
            s = saved["summary"]
            info["note"] = f"reused {out.name}: {s['episodes']} episodes, {s['successes']} successes"
            return out
    shutil.rmtree(out, ignore_errors=True)
    try:
        s = collect(o.task, o.episodes, out, noise=o.noise, workers=o.collect_workers, seed=o.seed,
                    max_steps=o.max_steps, perturb_prob=o.perturb_prob, after_success=10, progress=True)
    except ValueError as exc:  # an unknown task name, a bad setting: the message says which
        raise DemoError(str(exc)) from None
    info["note"] = (f"{s['episodes']} episodes, {s['frames']} frames, {s['successes']} successes "
                    f"({s['episodes_per_minute']:.1f} episodes/min)")
    if s["successes"] == 0:
        raise DemoError(f"no episode of {o.task} succeeded: the value model needs successes; lower --noise")
    return out


# ---- 3. train ---------------------------------------------------------------------------------------
def _held_out(o: DemoOptions) -> int:
    """Episodes the value and dynamics trainers keep out (the report's held-out windows and curves)."""
    return 2 if o.episodes >= 8 else 0


def _dynamics_overrides(o: DemoOptions) -> dict:
    autoencoder = max(1, o.dynamics_steps // 3)
    return {"training.autoencoder.steps": autoencoder, "training.transformer.steps": max(1, o.dynamics_steps - autoencoder),
            "training.eval_episodes": _held_out(o), "training.sample_every": 10**9}


def train_dynamics(o: DemoOptions, paths: Paths, data: Path, log) -> dict:
    from services.dynamics.model import load_model_config
    from services.dynamics.train import train

    return train(load_model_config(o.tier, _dynamics_overrides(o)), [data], paths.train / "dynamics",
                 registry=paths.store, publish=True, threads=1, progress=False, log=log)


def _dynamics_child(options: dict, data: str, log_path: str, result_path: str) -> None:
    """Entry point of the spawned process that trains the dynamics model (output to its log file)."""
    import ctypes
    import traceback

    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # die with the demo
    with open(log_path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            o = DemoOptions(**{**options, "workdir": Path(options["workdir"])})
            summary = train_dynamics(o, Paths(o.workdir), Path(data), lambda *a: print(*a, file=log))
            Path(result_path).write_text(json.dumps(summary))
        except BaseException:
            traceback.print_exc(file=log)
            raise SystemExit(1)


class DynamicsInBackground:
    """The dynamics training in a spawned process (the other trainings keep this one busy)."""

    def __init__(self, o: DemoOptions, paths: Paths, data: Path):
        import multiprocessing

        self.log_path, self.result = paths.logs / "train-dynamics.log", paths.train / "dynamics-summary.json"
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(o).items()}
        self.process = multiprocessing.get_context("spawn").Process(
            target=_dynamics_child, args=(options, str(data), str(self.log_path), str(self.result)), daemon=True)
        self.started = time.perf_counter()
        self.process.start()
        self.seconds = 0.0

    def wait(self, console: Console) -> dict:
        with console.status("dynamics training (see logs/train-dynamics.log) ...") as status:
            while self.process.is_alive():
                self.process.join(1.0)
                last = log_tail(self.log_path, 1)
                status.update(f"dynamics training: {last[-100:]}" if last else "dynamics training ...")
        self.seconds = time.perf_counter() - self.started
        if self.process.exitcode != 0 or not self.result.is_file():
            raise DemoError(f"dynamics training failed (exit {self.process.exitcode}):\n{log_tail(self.log_path)}")
        return json.loads(self.result.read_text())

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()


def _log(console: Console):
    return lambda *parts: console.print(" ".join(str(p) for p in parts), markup=False, highlight=False)


def train_models(o: DemoOptions, paths: Paths, data: Path, stages: Stages, console: Console) -> tuple[dict, Path]:
    """Train and publish everything; returns ({model: version}, the dataset the RL run mixes in)."""
    from rise.registry import Registry
    from services.policy.model import load_model_config as policy_config
    from services.policy.train import train as train_policy
    from services.value.label import label
    from services.value.model import load_model_config as value_config
    from services.value.train import train as train_value

    registry, log = Registry(paths.store), _log(console)
    versions: dict[str, str] = {}
    background = DynamicsInBackground(o, paths, data) if o.parallel else None
    try:
        note = "dynamics trains in a second process meanwhile" if background else ""
        with stages("train policy (imitation warm-up)", note) as info:
            # One task: its text embedding is a constant, so the policy takes the hashed text encoder
            # (no model to load; MiniLM, the small tier's choice, only matters across many tasks).
            s = train_policy(policy_config(o.tier, {"training.steps": o.policy_steps, "text.encoder": "hashed"}),
                             [data], paths.train / "policy",
                             registry=paths.store, publish=True, threads=1, progress=True, log=log)
            versions["policy"] = s["version"]
            info["note"] = f"{s['version']}: loss {s['metrics']['loss_first']:.3f} -> {s['metrics']['loss_last']:.3f}; {note}"
        with stages("train value") as info:
            progress_steps = (o.value_steps + 1) // 2
            s = train_value(value_config(o.tier, {"training.progress_steps": progress_steps,
                                                  "training.td_steps": o.value_steps - progress_steps,
                                                  "training.eval_episodes": _held_out(o)}),
                            [data], paths.train / "value", registry=paths.store, publish=True, threads=1,
                            progress=True, log=log)
            versions["value"] = s["version"]
            registry.set_alias("value", "stable", s["version"])
            info["note"] = (f"{s['version']}: progress ranking {s['metrics']['progress_ranking']:.2f}, success vs "
                            f"failure {s['metrics']['success_vs_failure']:.2f} (held-out)")
        labelled = paths.data / f"{data.name}-labelled"
        with stages("advantage labels") as info:
            shutil.rmtree(labelled, ignore_errors=True)
            s = label(str(paths.train / "value" / "model"), data, labelled, plots=False, log=log)
            info["note"] = f"bins 1..10: {s['bin_counts']}"
        if o.advantage_steps:
            with stages("train policy (advantage-conditioned)") as info:
                s = train_policy(policy_config(o.tier, {"training.steps": o.advantage_steps, "training.mode": "advantage",
                                                        "training.warmup_steps": min(20, o.advantage_steps // 5)}),
                                 [labelled], paths.train / "policy-advantage", init=registry.open("policy", versions["policy"]).path,
                                 registry=paths.store, publish=True, threads=1, progress=True, log=log)
                versions["policy"] = s["version"]
                info["note"] = f"{s['version']} from the warm-up: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in s["metrics"].items() if k.startswith("action_mse"))
        registry.set_alias("policy", "stable", versions["policy"])
        with stages("train dynamics (waiting for it)" if background else "train dynamics") as info:
            s = background.wait(console) if background else train_dynamics(o, paths, data, log)
            versions["dynamics"] = s["version"]
            registry.set_alias("dynamics", "stable", s["version"])
            m = s["metrics"]
            info["note"] = (f"{s['version']}: PSNR imagined {m['psnr_imagined']:.1f} dB vs persistence "
                            f"{m['psnr_persistence']:.1f} dB"
                            + (f"; trained in {background.seconds:.0f} s beside the stages above" if background else ""))
    finally:
        if background is not None:
            background.stop()
    return versions, labelled


# ---- 4. services ------------------------------------------------------------------------------------
@dataclass
class Service:
    name: str
    port: int
    process: subprocess.Popen
    log_path: Path
    exit_code: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"grpc://{self.address}"


class ServiceGroup:
    """The services as local `rise serve` processes; a context manager that always stops them."""

    def __init__(self, configs: Path, logs: Path):
        self.configs, self.logs = configs, logs
        self.services: dict[str, Service] = {}

    def start(self, name: str, config: dict, port: int | None = None) -> Service:
        port = port or free_port()
        config = {**config, "server": {**config.get("server", {}), "host": "127.0.0.1", "port": port, "log_json": False}}
        path = self.configs / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        log_path = self.logs / f"{name}.log"
        process = spawn([sys.executable, "-m", "rise.cli", "serve", name, "--config", str(path)], log_path,
                        env={"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
        self.services[name] = Service(name, port, process, log_path)
        return self.services[name]

    async def wait_healthy(self, timeout_s: float = 300.0) -> None:
        """Until every service answers gRPC health SERVING (models loaded); fails fast if one exits."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from rise.serving import open_channel

        async def one(service: Service) -> None:
            deadline = time.monotonic() + timeout_s
            async with open_channel(service.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while True:
                    if service.process.poll() is not None:
                        raise DemoError(f"the {service.name} service exited with code {service.process.returncode} "
                                        f"before it answered:\n{log_tail(service.log_path)}")
                    with contextlib.suppress(Exception):
                        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    if time.monotonic() > deadline:
                        raise DemoError(f"the {service.name} service did not become healthy in {timeout_s:.0f} s:\n"
                                        f"{log_tail(service.log_path)}")
                    await asyncio.sleep(0.25)

        tasks = [asyncio.ensure_future(one(s)) for s in self.services.values()]
        try:
            for done in asyncio.as_completed(tasks):
                await done  # the first failure ends the wait
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> dict[str, int | None]:
        """SIGTERM all (they drain gracefully) at once, then reap each; SIGKILL what is left."""
        for service in self.services.values():
            if service.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(service.process.pid, signal.SIGTERM)
        for service in self.services.values():
            service.exit_code = stop_process(service.process, terminate=False)
        return {name: s.exit_code for name, s in self.services.items()}

    def __enter__(self) -> "ServiceGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def service_configs(paths: Paths, run_config: Path) -> dict[str, dict]:
    model = {"registry_root": str(paths.store), "torch_threads": 1, "server": {"grace_seconds": 5.0}}
    return {"policy": model, "value": model, "dynamics": model,
            "trainer": {"default_run_config": str(run_config), "max_active_runs": 1, "server": {"grace_seconds": 5.0}}}


def run_config(o: DemoOptions, paths: Paths, data: Path, urls: dict[str, str], redis_url: str) -> dict:
    """The RL run: reference settings (offline ratio 0.6, 2 chained chunks, best bin prompted), laptop sizes."""
    publish_every = max(1, o.rl_steps // 4)
    return {
        "out": str(paths.runs), "registry_root": str(paths.store), "embodiment": "metaworld", "data": [str(data)],
        "services": {"policy": urls["policy"], "value": urls["value"], "dynamics": urls["dynamics"]},
        "rollout": {"workers": 8, "max_chain": 2, "policy_version": "candidate", "advantage_bin": 10},
        # Each imagined sample is read once (the stream is a queue) and the learner waits for its
        # replay share, so imagination sets the pace: about 5 samples/s on 2 cores (88% of it in the
        # dynamics service). One learner slot per insert, and batches of 16 (6-7 imagined samples
        # per step at the 0.6 offline ratio) keep 100 steps to about 2-3 minutes.
        "replay": {"url": redis_url, "stream": REPLAY_PREFIX, "min_size_to_sample": 16, "samples_per_insert": 1.0},
        "learner": {"init_policy": "stable", "steps": o.rl_steps, "batch_size": 16, "offline_ratio": 0.6,
                    "publish_every": publish_every, "checkpoint_every": min(10, publish_every),
                    # The reference's EMA (0.995) spans ~200 steps; a demo run is about that long, so the
                    # published weights would barely leave the start. Keep the horizon at a tenth of the run.
                    "ema_decay": float(min(0.995, max(0.9, 1.0 - 10.0 / max(1, o.rl_steps)))),
                    "replay_wait_s": 10.0, "torch_threads": 1},
        "gate": {"every_versions": 0},
    }


# ---- 5. RL through the TrainerService ---------------------------------------------------------------
async def run_rl(trainer_address: str, config_yaml: str, run_id: str, console: Console) -> Any:
    """StartRun, WatchRun with a progress bar until the stream ends; returns the final RunStatus."""
    import grpc

    from rise.proto.v1 import trainer_pb2, trainer_pb2_grpc
    from rise.serving import open_channel
    from services.trainer.control import stop_run, watch_run

    async with open_channel(trainer_address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        try:
            try:
                await stub.StartRun(trainer_pb2.StartRunRequest(run_id=run_id, config_yaml=config_yaml), timeout=60)
            except grpc.aio.AioRpcError as exc:
                raise DemoError(f"TrainerService.StartRun: {exc.code().name}: {exc.details()}") from None
            return await watch_run(stub, run_id, console)
        except (asyncio.CancelledError, KeyboardInterrupt):
            # Ctrl-C: ask the run to stop after its current learner step (it checkpoints) and give it
            # 10 s to get there before the services are stopped; a second Ctrl-C skips the wait.
            with contextlib.suppress(Exception):
                await stop_run(stub, run_id, wait_s=10)
            raise


# ---- 6. report inputs from the running services ----------------------------------------------------
async def value_curves(value_url: str, episodes, held_out: int, per_outcome: int = 2) -> list:
    """The value service's scores over whole real episodes: the held-out ones, plus successes and failures."""
    import numpy as np

    from rise.report import ValueCurve
    from rise.transport import connect_value

    n = episodes.num_episodes
    success = episodes.frame_success[episodes.episode_starts]
    chosen = list(range(n - held_out, n))
    for outcome in (True, False):
        chosen += [int(e) for e in np.flatnonzero(success == outcome) if e not in chosen][:per_outcome]
    curves = []
    async with connect_value(value_url) as client:
        for e in chosen:
            a, length = int(episodes.episode_starts[e]), int(episodes.episode_lengths[e])
            frames = {v: episodes.views[v][a:a + length][None] for v in episodes.views}
            task = episodes.tasks[int(episodes.frame_task_ids[a])]
            scores = await client.score(frames, [task], timeout_s=120)
            curves.append(ValueCurve(f"episode {e}", bool(success[e]), scores.values[0], held_out=e >= n - held_out))
    return curves


def held_out_windows(episodes, held_out: int, chunk: int, count: int) -> list[int]:
    """`count` window starts (global frames) spread over the last `held_out` episodes (all if 0),
    each with a whole action chunk and its future frames inside the episode."""
    import numpy as np

    n = episodes.num_episodes
    pool = [int(episodes.episode_starts[e]) + f for e in range(n - held_out if held_out else 0, n)
            for f in range(max(0, int(episodes.episode_lengths[e]) - chunk))]
    if not pool:
        raise DemoError(f"no held-out episode is longer than a chunk ({chunk} actions)")
    return [pool[i] for i in np.unique(np.linspace(0, len(pool) - 1, count).round().astype(int))]


async def imagined_samples(dynamics_url: str, registry, episodes, held_out: int, count: int = 3, seed: int = 0):
    """Held-out windows (history, real future) and the dynamics service's imagined future for them,
    shaped as the served version wants them (history length, frame stride: its manifest)."""
    import numpy as np

    from rise.embodiment import PRESETS
    from rise.report import ImaginedSamples
    from rise.transport import connect_dynamics
    from services.trainer.rollout import dynamics_shape

    emb, e = PRESETS["metaworld"], episodes
    version = registry.resolve("dynamics", "stable")
    shape = dynamics_shape(registry, version, emb.chunk_length)
    starts = np.asarray(held_out_windows(e, held_out, emb.chunk_length, count))
    first = e.episode_starts[e.frame_episode[starts]]
    history_idx = np.maximum(starts[:, None] - shape.stride * np.arange(shape.history)[::-1][None], first[:, None])
    future_idx = starts[:, None] + shape.stride * np.arange(1, emb.chunk_length // shape.stride + 1)[None]
    actions = e.actions[starts[:, None] + np.arange(emb.chunk_length)[None]]
    views = list(emb.views)
    async with connect_dynamics(dynamics_url) as client:
        out = await client.imagine({v: e.views[v][history_idx] for v in views}, actions, seed=seed + 1, version=version,
                                   timeout_s=300)
    stack = lambda frames: np.stack([frames[v] for v in views], axis=1)  # noqa: E731  view -> [B, V, T, H, W, 3]
    captions = [f"episode {int(e.frame_episode[g])}, frame {int(e.frame_index[g])}" for g in starts]
    return ImaginedSamples(views, stack({v: e.views[v][history_idx] for v in views}),
                           stack({v: e.views[v][future_idx] for v in views}), stack(out.frames), captions, out.version)


# ---- the demo -----------------------------------------------------------------------------------------
async def serve_and_improve(o: DemoOptions, paths: Paths, data: Path, redis_url: str, stages: Stages,
                            console: Console, inputs) -> None:
    from rise.data.loading import load_episodes_in_memory
    from rise.embodiment import PRESETS
    from rise.registry import Registry
    from rise.report import SuccessRate
    from rise.sim.evaluate import evaluate_async

    registry = Registry(paths.store)
    run_id = time.strftime("demo-%Y%m%d-%H%M%S")
    with ServiceGroup(paths.configs, paths.logs) as group:
        with stages("start services") as info:
            ports = {name: free_port() for name in SERVICES}
            urls = {name: f"grpc://127.0.0.1:{port}" for name, port in ports.items()}
            run_yaml = paths.configs / "run.yaml"
            run_yaml.write_text(yaml.safe_dump(run_config(o, paths, data, urls, redis_url), sort_keys=False))
            for name, config in service_configs(paths, run_yaml).items():
                group.start(name, config, ports[name])
            with console.status("waiting for the services to load their models ..."):
                await group.wait_healthy()
            info["note"] = ", ".join(f"{name} :{s.port} (pid {s.process.pid})" for name, s in group.services.items())
            console.print(f"services up: {info['note']}; logs in {paths.logs}")
        policy = group.services["policy"].address

        with stages("evaluate before RL") as info:
            before = await evaluate_async(policy, o.task, o.eval_episodes, version="stable", seed=o.seed,
                                          max_steps=o.max_steps, progress=True)
            inputs.before = SuccessRate.from_eval("before RL", before)
            info["note"] = f"{inputs.before.version}: {before.successes}/{len(before.episodes)}"

        with stages("RL in imagination") as info:
            try:
                status = await run_rl(group.services["trainer"].address, run_yaml.read_text(), run_id, console)
            finally:
                with contextlib.suppress(Exception):
                    delete_run_keys(redis_url, run_id)
            inputs.run_dir = paths.runs / run_id
            from rise.proto.v1 import trainer_pb2

            if status.state != trainer_pb2.RUN_STATE_SUCCEEDED:
                raise DemoError(f"the RL run ended {trainer_pb2.RunState.Name(status.state)}: {status.message}\n"
                                f"{log_tail(group.services['trainer'].log_path)}")
            info["note"] = (f"{status.learner_step} learner steps, {status.imagined_samples} imagined samples, "
                            f"{status.metrics.get('imagined_per_s', 0.0):.1f}/s; newest policy {status.policy_version}")

        with stages("evaluate after RL") as info:
            final = status.policy_version
            if final == inputs.before.version:
                inputs.notes.append("the run published no new policy version (rl_steps < publish_every)")
            after = await evaluate_async(policy, o.task, o.eval_episodes, version=final, seed=o.seed,
                                         max_steps=o.max_steps, progress=True)
            inputs.after = SuccessRate.from_eval("after RL", after)
            info["note"] = f"{inputs.after.version}: {after.successes}/{len(after.episodes)}"

        with stages("value curves, imagined rollouts") as info:
            episodes = await asyncio.to_thread(load_episodes_in_memory, [data], PRESETS["metaworld"])
            inputs.value_curves = await value_curves(group.services["value"].url, episodes, _held_out(o))
            inputs.imagined = await imagined_samples(group.services["dynamics"].url, registry, episodes, _held_out(o),
                                                     seed=o.seed)
            info["note"] = f"{len(inputs.value_curves)} value curves, {len(inputs.imagined.captions)} imagined windows"
        with stages("stop services") as info:
            codes = group.stop()
            info["note"] = ", ".join(f"{name} exit {code}" for name, code in codes.items())


def run_demo(workdir: Path, console: Console, options: DemoOptions | None = None) -> int:
    """Run every stage; print the stage table and where the report is. Returns the exit code."""
    import logging

    from rise.report import ReportInputs, build_report

    # Quiet the libraries under our progress display: LeRobot's dataset copy prints tqdm bars, and
    # it logs a long traceback when torchcodec cannot load before falling back to PyAV (expected here).
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("SVT_LOG", "1")
    logging.getLogger("lerobot.utils.import_utils").setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):  # FFmpeg's own notes ("Starting second pass ...") per video file
        import av

        av.logging.set_libav_level(av.logging.WARNING)
    o = options or DemoOptions(workdir=workdir)
    o.workdir = Path(workdir)
    paths = Paths(o.workdir)
    stages = Stages(console)
    inputs = ReportInputs(task=o.task, settings={k: str(v) for k, v in asdict(o).items()})
    inputs.settings["cpu cores"] = str(os.cpu_count())
    code = 0
    try:
        paths.prepare(keep_data=o.reuse_data)
        with contextlib.ExitStack() as stack:
            with stages("redis") as info:
                redis_url, info["note"] = stack.enter_context(local_redis(o.redis_url, paths.logs / "redis.log", console))
            with stages("collect data") as info:
                data = collect_data(o, paths, info)
            versions, labelled = train_models(o, paths, data, stages, console)
            inputs.settings["trained versions"] = ", ".join(f"{k} {v}" for k, v in versions.items())
            asyncio.run(serve_and_improve(o, paths, labelled, redis_url, stages, console, inputs))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every service and worker was stopped[/yellow]")
        code = 130
    except DemoError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        code = 1
    except Exception:  # unexpected: the traceback, then still the stage table (every process is stopped)
        console.print_exception()
        code = 1
    if inputs.before is not None or inputs.run_dir is not None:
        try:
            with stages("write report") as info:
                inputs.stages = stages.finish()
                build_report(inputs, paths.report)
                info["note"] = str(paths.report)
            console.print(f"report: [bold]{paths.report}[/bold]")
        except Exception as exc:
            console.print(f"[red]the report could not be written:[/red] {type(exc).__name__}: {exc}")
            code = code or 1
    Console(stderr=False).print(stages.table())
    if inputs.before is not None and inputs.after is not None:
        from rise.sim.stats import format_rate

        console.print(f"success on {o.task}: before {format_rate(inputs.before.successes, inputs.before.episodes)} "
                      f"({inputs.before.version}) -> after {format_rate(inputs.after.successes, inputs.after.episodes)} "
                      f"({inputs.after.version})")
    return code
