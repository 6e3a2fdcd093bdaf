"""`rise worker rollout`: a stateless rollout worker of the fleet (a Deployment in Kubernetes).

    rise worker rollout --trainer trainer:50054 --run-id r1 [--set services.dynamics=dns:///dynamics-headless:50053]

Any number join or leave at any time. Each round a worker asks the trainer for the run's plan
(TrainerService.GetRolloutPlan: the run's config, replay stream and candidate policy version),
runs one round of the same `Rollouts` the trainer runs in-process (rollout.py), acting with that
candidate version, and pushes the samples to the run's Redis stream, under the same
samples-per-insert limiter. It holds nothing worth saving: killed, it loses at most one round.
It stops when the run ends (or after `--max-samples`).

The worker reads the offline data (start states) and the registry (the dynamics model's history
shape) at the paths of the run's config: mount the same volumes as the trainer, or override them
with `--set data=[...]`, `--set registry_root=...`; service URLs likewise (`--set services.policy=...`).
"""

from __future__ import annotations

import asyncio
import time

import typer

_ENDED = ("stopped", "succeeded", "failed")


async def run_worker(trainer: str, run_id: str, worker_id: str = "", overrides: dict[str, str] | None = None,
                     max_samples: int = 0, log=print) -> int:
    """Roll out for `run_id` until the run ends (or `max_samples` pushed); -> samples pushed."""
    import socket

    import yaml

    from rise.config import _set_path
    from rise.data.loading import load_episodes_in_memory
    from rise.embodiment import load_embodiment
    from rise.proto.v1 import trainer_pb2, trainer_pb2_grpc
    from rise.registry import Registry
    from rise.serving import open_channel
    from rise.transport import call_with_retries, parse_url
    from services.trainer.config import RunConfig
    from services.trainer.replay import ReplayQueue
    from services.trainer.rollout import Rollouts, dynamics_shape, open_clients, run_start_states, value_reads_sim_state
    from services.trainer.server import _STATES

    worker_id = worker_id or f"{socket.gethostname()}-{id(object()) % 10_000}"
    states = {v: k for k, v in _STATES.items()}
    channel = open_channel(parse_url(trainer).address, retry_methods=("rise.v1.TrainerService/GetRolloutPlan",))
    stub = trainer_pb2_grpc.TrainerServiceStub(channel)
    request = trainer_pb2.GetRolloutPlanRequest(run_id=run_id, worker_id=worker_id)

    async def plan():  # a pure read: retried while the trainer restarts
        from rise.transport import _from_grpc

        async def call():
            import grpc

            try:
                return await stub.GetRolloutPlan(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                raise _from_grpc(exc) from None

        return await call_with_retries(call, attempts=10, backoff_s=0.5, max_backoff_s=8.0, what="trainer plan", log=log)

    clients = []
    try:
        current = await plan()
        while not current.candidate_version and states[current.run.state] not in _ENDED:
            await asyncio.sleep(0.5)  # the run is starting: no candidate on the policy service yet
            current = await plan()
        data = yaml.safe_load(current.run.config_yaml)
        for dotted, raw in (overrides or {}).items():
            _set_path(data, dotted.split("."), yaml.safe_load(raw))
        config = RunConfig.model_validate(data)
        embodiment = load_embodiment(config.embodiment)
        episodes = await asyncio.to_thread(load_episodes_in_memory, config.data, embodiment)
        registry = Registry(config.registry_root)
        shape = dynamics_shape(registry, config.rollout.dynamics_version, embodiment.chunk_length)
        clients = list(await open_clients(config.services))
        starts = await asyncio.to_thread(run_start_states, config, episodes, embodiment, shape)
        rollouts = Rollouts(config.rollout, config.services, tuple(clients), starts, run_id, seed=current.seed, log=log,
                            value_reads_sim_state=value_reads_sim_state(registry, config.rollout.value_version))
        replay = ReplayQueue(config.replay, current.replay_stream)
        await asyncio.to_thread(replay.ensure_group)
        log(f"worker {worker_id}: rolling out for run {run_id} ({states[current.run.state]}), candidate "
            f"{current.candidate_version or '-'}, {config.rollout.workers} episodes per round, stream {current.replay_stream}")
        started = time.perf_counter()
        while states[current.run.state] not in _ENDED and not (max_samples and rollouts.pushed >= max_samples):
            if await asyncio.to_thread(replay.wait_inserter, config.rollout.workers, timeout_s=1.0):
                await rollouts.produce(replay, config.replay.frame_encoding, config.replay.jpeg_quality,
                                       limit=max_samples - rollouts.pushed if max_samples else 0,
                                       policy_version=current.candidate_version)
            current = await plan()
        log(f"worker {worker_id}: {rollouts.pushed} samples in {time.perf_counter() - started:.0f} s; "
            f"run {run_id} is {states[current.run.state]}")
        return rollouts.pushed
    finally:
        for client in clients:
            await client.close()
        await channel.close()


def register(worker_app: typer.Typer) -> None:
    """Adds `rollout` to the `rise worker` group."""

    @worker_app.command("rollout")
    def rollout_command(
        trainer: str = typer.Option(..., "--trainer", help="TrainerService address (rise serve trainer), host:port."),
        run_id: str = typer.Option(..., "--run-id", help="The run to roll out for."),
        worker_id: str = typer.Option("", "--worker-id", envvar="HOSTNAME", help="Name in the run's fleet count."),
        set_: list[str] = typer.Option([], "--set", help="Override the run's config here, KEY=VALUE (paths, URLs)."),
        max_samples: int = typer.Option(0, min=0, help="Stop after pushing this many samples (0: when the run ends)."),
    ) -> None:
        """A stateless rollout worker: joins a running trainer's run and pushes imagined samples to its stream."""
        from rise.config import parse_overrides

        try:
            overrides = parse_overrides(set_)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        asyncio.run(run_worker(trainer, run_id, worker_id, overrides, max_samples))

