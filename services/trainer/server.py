"""`rise serve trainer`: TrainerService (start, inspect, stop and watch RL-in-imagination runs)."""

from __future__ import annotations

import asyncio
import re
import uuid
import zlib
from pathlib import Path

import yaml
from pydantic import Field

from rise.config import ConfigError, StrictModel, dump_config
from rise.errors import FailedPrecondition, InvalidArgument, NotFound
from rise.proto.v1 import trainer_pb2, trainer_pb2_grpc
from rise.serving import RunningServer, ServerConfig, start_server
from services.trainer.config import CONFIG_DIR, RunConfig
from services.trainer.run import Status, TrainerRun

_RUN_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_STATES = {name: getattr(trainer_pb2, f"RUN_STATE_{name.upper()}") for name in
           ("pending", "running", "stopping", "stopped", "succeeded", "failed")}


class TrainerConfig(StrictModel):
    server: ServerConfig = ServerConfig(port=50054)
    # Run config used when StartRun sends none (and the base that sent YAML is laid over).
    default_run_config: Path = CONFIG_DIR / "default.yaml"
    # Runs at once (each runs a learner: on a small machine, one).
    max_active_runs: int = Field(1, ge=1)


def run_config_from(base: Path, text: str, overrides: dict[str, str]) -> RunConfig:
    """The base YAML, the request's YAML laid over it, then dotted overrides -> a validated RunConfig."""
    from rise.config import _set_path

    data = yaml.safe_load(base.read_text()) or {}
    try:
        extra = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"config_yaml is not YAML: {exc}") from None
    if not isinstance(extra, dict):
        raise InvalidArgument(f"config_yaml must be a mapping, got {type(extra).__name__}")
    _deep_update(data, extra)
    for dotted, raw in overrides.items():
        _set_path(data, dotted.split("."), yaml.safe_load(raw))
    try:
        return RunConfig.model_validate(data)
    except Exception as exc:
        raise InvalidArgument(f"invalid run config:\n{exc}") from None


def _deep_update(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def to_proto(status: Status, config: RunConfig | None = None) -> trainer_pb2.RunStatus:
    return trainer_pb2.RunStatus(
        run_id=status.run_id, state=_STATES[status.state], learner_step=status.learner_step,
        imagined_samples=status.imagined_samples, policy_version=status.policy_version, metrics=status.metrics,
        message=status.message, started_unix_ms=status.started_unix_ms, updated_unix_ms=status.updated_unix_ms,
        config_yaml=dump_config(config) if config is not None else "")


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, config: TrainerConfig):
        self.config = config
        self.runs: dict[str, TrainerRun] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self._plans = 0  # rollout plans handed out (varies their seeds)

    def _run(self, run_id: str) -> TrainerRun:
        if run_id not in self.runs:
            raise NotFound(f"no run {run_id!r} on this trainer; known: {sorted(self.runs)}")
        return self.runs[run_id]

    async def StartRun(self, request, context):
        run_id = request.run_id or f"run-{uuid.uuid4().hex[:8]}"
        if not _RUN_ID.match(run_id):
            raise InvalidArgument(f"run_id {run_id!r}: use lowercase letters, digits and '-' (at most 63)")
        if run_id in self.tasks and not self.tasks[run_id].done():
            raise FailedPrecondition(f"run {run_id!r} is already active")
        active = [r for r, t in self.tasks.items() if not t.done()]
        if len(active) >= self.config.max_active_runs:
            raise FailedPrecondition(f"{len(active)} run(s) active ({active}); this trainer runs at most "
                                     f"{self.config.max_active_runs} at once: stop one first")
        try:
            config = run_config_from(self.config.default_run_config, request.config_yaml, dict(request.overrides))
        except ConfigError as exc:
            raise InvalidArgument(str(exc)) from None
        run = TrainerRun(config, run_id)
        self.runs[run_id] = run
        self.tasks[run_id] = asyncio.create_task(run.run())
        await asyncio.sleep(0)  # let it enter "running"
        return to_proto(run.snapshot(), config)

    async def GetRun(self, request, context):
        run = self._run(request.run_id)
        return to_proto(run.snapshot(), run.config)

    async def StopRun(self, request, context):
        run = self._run(request.run_id)
        run.stop()
        return to_proto(run.snapshot(), run.config)

    async def WatchRun(self, request, context):
        queue = self._run(request.run_id).watch()
        while (status := await queue.get()) is not None:
            yield to_proto(status)

    async def GetRolloutPlan(self, request, context):
        from services.trainer.run import replay_key

        run = self._run(request.run_id)
        run.worker_seen(request.worker_id)
        status = run.snapshot()
        self._plans += 1
        return trainer_pb2.RolloutPlan(run=to_proto(status, run.config), replay_stream=replay_key(run.config, run.run_id),
                                       candidate_version=status.policy_version,
                                       seed=zlib.crc32(f"{run.run_id}/{request.worker_id}/{self._plans}".encode()))


async def start(config: TrainerConfig) -> RunningServer:
    servicer = TrainerServicer(config)
    running = await start_server("trainer", config.server, [(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, servicer)])
    running.servicer = servicer
    return running
