"""One RL-in-imagination run: rollouts and learner side by side, the gate now and then.

    rollouts (asyncio, this process)  --Redis stream-->  learner (a thread: torch)
         ^ policy `candidate` <-- publish every K steps (registry + ModelAdmin) --'
                                   gate: simulator success every M versions -> `stable`

Everything a run writes lives in `<out>/<run_id>/`: the learner checkpoint, `metrics.jsonl`,
TensorBoard events, `gate.json`, `status.json`. Starting a run id that exists resumes it.

Scaled out: under torchrun this is rank 0 (its learner one of N, see distributed.py) and the
other ranks run `learn_on_rank`; rollout workers elsewhere (`rise worker rollout`, worker.py)
push to the same stream. Policy replicas: every replica is told of a new candidate, one by one.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rise.config import dump_config
from services.trainer.config import RunConfig

@dataclass
class Status:
    run_id: str
    state: str = "pending"
    learner_step: int = 0
    imagined_samples: int = 0
    policy_version: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""
    started_unix_ms: int = 0
    updated_unix_ms: int = 0


def replay_key(config: RunConfig, run_id: str) -> str:
    """The run's Redis stream (its counters: `<key>:counters`)."""
    return f"{config.replay.stream}:{run_id}"


def make_learner(config: RunConfig, run_id: str, registry, episodes, embodiment, world=None, log=print):
    """The run's learner (on this rank) with its replay queue: the same on rank 0 and on the others."""
    from services.trainer.learner import Learner
    from services.trainer.replay import ReplayQueue

    replay = ReplayQueue(config.replay, replay_key(config, run_id))
    replay.ensure_group()
    return Learner(config.learner, Path(config.out) / run_id, registry, replay, episodes, embodiment,
                   f"learner-{run_id}", log=log, world=world)


def learn_on_rank(config: RunConfig, run_id: str, world, stop: threading.Event, log=print) -> int:
    """A learner rank other than 0: train its share until the run's last step or a stop (from any rank)."""
    from rise.data.loading import load_episodes_in_memory
    from rise.embodiment import load_embodiment
    from rise.registry import Registry

    embodiment = load_embodiment(config.embodiment)
    episodes = load_episodes_in_memory(config.data, embodiment)
    learner = make_learner(config, run_id, Registry(config.registry_root), episodes, embodiment, world, log)
    learner.run(stop, on_publish=lambda version: None, on_step=lambda metrics: None)
    return learner.step


class TrainerRun:
    def __init__(self, config: RunConfig, run_id: str, log=print, world=None):
        self.config, self.run_id, self.log, self.world = config, run_id, log, world
        self.run_dir = Path(config.out) / run_id
        self.status = Status(run_id, started_unix_ms=int(time.time() * 1000))
        self._stop = threading.Event()  # seen by the learner thread and the rollout loop
        self._stop_requested = False  # by a user (StopRun, Ctrl-C), not by the run's own end
        self._watchers: list[asyncio.Queue] = []
        self._ended = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gate_lock = asyncio.Lock()
        self._fleet: dict[str, float] = {}  # rollout worker id -> when it last asked for the plan (monotonic s)

    # ---- status -------------------------------------------------------------------------------
    def snapshot(self) -> Status:
        self.status.updated_unix_ms = int(time.time() * 1000)
        return Status(**{**asdict(self.status), "metrics": dict(self.status.metrics)})

    def watch(self) -> asyncio.Queue:
        """Statuses as they change, then None when the run has ended (at once for an ended run)."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=64)
        queue.put_nowait(self.snapshot())
        if self._ended:
            queue.put_nowait(None)
        else:
            self._watchers.append(queue)
        return queue

    def _changed(self) -> None:
        """Called on the event loop: wake the watchers, keep status.json current."""
        snap = self.snapshot()
        for queue in self._watchers:
            if queue.full():
                queue.get_nowait()  # a slow watcher loses intermediate states, never the last
            queue.put_nowait(snap)
        if self.run_dir.exists():  # replaced whole, so a reader never sees half a file
            tmp = self.run_dir / ".status.json.tmp"
            tmp.write_text(json.dumps(asdict(snap), indent=2) + "\n")
            tmp.replace(self.run_dir / "status.json")

    def _from_thread(self, fn, *args) -> None:
        self._loop.call_soon_threadsafe(fn, *args)

    def worker_seen(self, worker_id: str) -> None:
        """A fleet rollout worker asked for the plan (server.py's GetRolloutPlan)."""
        self._fleet[worker_id or "?"] = time.monotonic()

    def fleet_workers(self, window_s: float = 30.0) -> int:
        """Fleet workers heard from in the last `window_s` seconds."""
        now = time.monotonic()
        return sum(now - seen <= window_s for seen in list(self._fleet.values()))

    def stop(self) -> None:
        """Ask the run to stop after the learner's current step (it checkpoints first)."""
        self._stop_requested = True
        if self.status.state in ("pending", "running"):
            self.status.state = "stopping"
            self._changed()
        self._stop.set()

    # ---- the run --------------------------------------------------------------------------------
    async def run(self) -> Status:
        self._loop = asyncio.get_running_loop()
        self.status.state = "running"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(self.config))
        self._changed()
        clients = []
        try:
            clients = await self._run()
            self.status.state = "stopped" if self._stop_requested else "succeeded"
        except Exception as exc:  # the run fails, the process (a TrainerService) lives on
            import traceback

            self.log(f"run {self.run_id} failed:\n{traceback.format_exc()}")
            self.status.state, self.status.message = "failed", f"{type(exc).__name__}: {exc}"
            self._stop.set()
        finally:
            for client in clients:
                await client.close()
            self._changed()
            self._ended = True
            for queue in self._watchers:
                if queue.full():
                    queue.get_nowait()  # the final status just queued stays; an older one goes
                queue.put_nowait(None)  # end of stream
        return self.snapshot()

    async def _run(self) -> list:
        from torch.utils.tensorboard import SummaryWriter

        from rise.data.loading import load_episodes_in_memory
        from rise.embodiment import load_embodiment
        from rise.registry import Registry
        from rise.sim.metaworld_sim import task_names
        from rise.transport import parse_url
        from services.trainer.gate import Gate
        from services.trainer.rollout import Rollouts, dynamics_shape, open_clients, run_start_states, value_reads_sim_state

        cfg = self.config
        if not cfg.data:
            raise ValueError("no offline data: set `data:` to one or more LeRobot dataset folders")
        embodiment = load_embodiment(cfg.embodiment)
        registry = Registry(cfg.registry_root)
        episodes = await asyncio.to_thread(load_episodes_in_memory, cfg.data, embodiment)
        shape = dynamics_shape(registry, cfg.rollout.dynamics_version, embodiment.chunk_length)
        learner = await asyncio.to_thread(make_learner, cfg, self.run_id, registry, episodes, embodiment, self.world, self.log)
        replay = learner.replay
        policy, dynamics, value = await open_clients(cfg.services)
        clients = [policy, dynamics, value]
        await self._make_candidate(registry, learner.version)
        self.status.policy_version = learner.version
        self.status.learner_step = learner.step

        task = cfg.gate.task or episodes.tasks[0]
        gate_task = _sim_task(task, task_names())
        gate = Gate(cfg.gate, self.run_dir, cfg.services.client(parse_url(cfg.services.policy_admin or cfg.services.policy).address),
                    gate_task, cfg.embodiment, log=self.log) if cfg.gate.every_versions else None
        if gate is not None and cfg.gate.evaluate_initial and gate.evaluated(learner.init_version) is None:
            async with self._gate_lock:
                entry = await asyncio.to_thread(gate.evaluate, learner.init_version, "initial", learner.step)
            if not registry.aliases("policy").get("stable"):
                await self._promote(registry, learner.init_version)
            gate.decide(entry, None)

        writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        prometheus = _Prometheus(cfg.metrics_port, self.run_id) if cfg.metrics_port is not None else None
        metrics_file = open(self.run_dir / "metrics.jsonl", "a")
        starts = await asyncio.to_thread(run_start_states, cfg, episodes, embodiment, shape)
        rollouts = Rollouts(cfg.rollout, cfg.services, (policy, dynamics, value), starts, self.run_id,
                            seed=cfg.learner.seed + learner.step, log=self.log,
                            value_reads_sim_state=value_reads_sim_state(registry, cfg.rollout.value_version))
        self.status.imagined_samples = int((await asyncio.to_thread(replay.stats))["inserted"])
        gates: list[asyncio.Task] = []

        async def after_publish(version: str) -> None:
            await self._make_candidate(registry, version)
            self.status.policy_version = version
            self._changed()
            number = len(learner.published) - 1
            if gate is not None and number % cfg.gate.every_versions == 0:
                gates.append(asyncio.create_task(self._gate(gate, registry, version, learner.step)))

        def on_publish(version: str) -> None:  # learner thread: wait until the service serves it
            asyncio.run_coroutine_threadsafe(after_publish(version), self._loop).result()

        def on_step(metrics: dict) -> None:  # learner thread
            stats = replay.stats()
            row = {"step": learner.step, "unix_ms": int(time.time() * 1000), **metrics,
                   **{f"replay_{k}": float(v) for k, v in stats.items()},
                   "imagined_samples": self.status.imagined_samples,
                   # this process's rollouts (fleet workers add to replay_inserted, not to these)
                   "imagined_per_s": rollouts.pushed / max(1e-9, rollouts.seconds),
                   "push_share": rollouts.timing_s["push"] / max(1e-9, rollouts.seconds),
                   "fleet_workers": float(self.fleet_workers()),
                   **{f"time_{k}_s": v for k, v in rollouts.timing_s.items()}}
            for key, value in row.items():
                if key not in ("step", "unix_ms"):
                    writer.add_scalar(f"trainer/{key}", value, learner.step)
            if learner.bins_seen and learner.step % 10 == 0:
                writer.add_histogram("trainer/advantage_bin", np.asarray(learner.bins_seen), learner.step)
            if prometheus is not None:
                prometheus.update(row, learner.bins_seen)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

            def update() -> None:
                self.status.learner_step = learner.step
                # every sample in the run's stream: this process's rollouts and the fleet's workers
                self.status.imagined_samples = max(self.status.imagined_samples, int(stats["inserted"]))
                self.status.metrics = {k: float(v) for k, v in row.items() if k not in ("step", "unix_ms")}
                self._changed()
            self._from_thread(update)

        async def rollout_loop() -> None:
            limit = cfg.rollout.max_samples
            while not self._stop.is_set() and not learner_done.done():
                if limit and self.status.imagined_samples >= limit:
                    return
                if not await asyncio.to_thread(replay.wait_inserter, cfg.rollout.workers, timeout_s=1.0, stop=self._stop.is_set):
                    continue
                self.status.imagined_samples += await rollouts.produce(
                    replay, cfg.replay.frame_encoding, cfg.replay.jpeg_quality,
                    limit=limit - self.status.imagined_samples if limit else 0)
                (self.run_dir / "advantages.json").write_text(json.dumps(rollouts.advantages[-2048:]))

        learner_done = asyncio.ensure_future(asyncio.to_thread(learner.run, self._stop, on_publish, on_step))
        roller = asyncio.create_task(rollout_loop())
        try:
            await asyncio.wait([learner_done, roller], return_when=asyncio.FIRST_EXCEPTION)
            if roller.done() and roller.exception():
                self._stop.set()
            await learner_done
            self._stop.set()
            await roller
            if gate is not None and learner.version != learner.init_version and gate.evaluated(learner.version) is None \
                    and not self._stop_requested:
                gates.append(asyncio.create_task(self._gate(gate, registry, learner.version, learner.step)))
            await asyncio.gather(*gates)
        finally:
            self._stop.set()
            roller.cancel()
            writer.close()
            metrics_file.close()
            if prometheus is not None:
                prometheus.close()
        self.status.learner_step = learner.step
        return clients

    # ---- versions ---------------------------------------------------------------------------------
    async def _make_candidate(self, registry, version: str) -> None:
        """Registry alias first (a replica starting now preloads it), then every live replica (no restart needed)."""
        registry.set_alias("policy", "candidate", version)
        await self._set_alias("candidate", version)

    async def _promote(self, registry, version: str) -> None:
        registry.set_alias("policy", "stable", version)
        await self._set_alias("stable", version)
        self.log(f"gate: policy/{version} is now stable")

    async def _set_alias(self, alias: str, version: str) -> None:
        """SetAlias (loading the version) on each policy replica the URL names now (re-resolved every
        time: replicas come and go). A side effect, so never re-sent blindly after a failure
        (`ensure_alias` reads the routing back first)."""
        from rise.transport import connect_admins, ensure_alias

        s = self.config.services
        for admin in connect_admins(s.policy_admin or s.policy, s.client()):
            async with admin:
                await ensure_alias(admin, alias, version, attempts=s.retry_attempts, backoff_s=s.retry_backoff_s,
                                   max_backoff_s=s.retry_max_backoff_s, log=self.log)

    async def _gate(self, gate, registry, version: str, step: int) -> None:
        async with self._gate_lock:
            stable_version = registry.aliases("policy").get("stable", "")
            entry = await asyncio.to_thread(gate.evaluate, version, "candidate", step)
            stable = gate.evaluated(stable_version) if stable_version else None
            if stable_version and stable is None:
                stable = await asyncio.to_thread(gate.evaluate, stable_version, "stable", step)
            if gate.decide(entry, stable):
                await self._promote(registry, version)
            self.status.metrics["gate_success_rate"] = entry["success_rate"]
            self._changed()


class _Prometheus:
    """The run's scalars as gauges (rise_trainer_<name>{run=...}) and the advantage bins seen, on /metrics."""

    def __init__(self, port: int, run_id: str):
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.registry, self.run_id, self.gauges = CollectorRegistry(), run_id, {}
        self.bins = Gauge("rise_trainer_advantage_bin_samples", "Replay samples trained on, by advantage bin (recent)",
                          ["run", "bin"], registry=self.registry)
        self._gauge = lambda name: Gauge(f"rise_trainer_{name}", f"trainer metric {name}", ["run"], registry=self.registry)
        self.server, self.thread = start_http_server(port, registry=self.registry)

    def update(self, row: dict, bins: list[int]) -> None:
        for key, value in row.items():
            if key != "unix_ms" and isinstance(value, (int, float)):
                if key not in self.gauges:
                    self.gauges[key] = self._gauge(key)
                self.gauges[key].labels(self.run_id).set(value)
        for b, count in enumerate(np.bincount(np.asarray(bins, np.int64), minlength=11)[1:], start=1):
            self.bins.labels(self.run_id, str(b)).set(int(count))

    def close(self) -> None:
        self.server.shutdown()


def _sim_task(text: str, names: list[str]) -> str:
    """A dataset's task text or a task name -> the simulator's task name."""
    from rise.sim.metaworld_sim import task_text

    if text in names:
        return text
    for name in names:
        if task_text(name) == text:
            return name
    raise ValueError(f"gate.task: {text!r} is neither a MetaWorld task name nor one of their texts; set gate.task")
