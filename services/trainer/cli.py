"""`rise train rise`: one RL-in-imagination run from the command line, with a progress display."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def run_from_cli(config_path: Path | None, run_id: str, set_items: list[str], progress: bool = True,
                 serve_port: int | None = None) -> dict:
    """Run to the end (Ctrl-C stops it cleanly, checkpointed); returns the final status as a dict.

    Under torchrun (`torchrun --nproc-per-node N -m rise.cli train rise ...`) rank 0 runs the
    whole run and the other ranks only their share of the learner (services/trainer/distributed.py).
    With `serve_port`, rank 0 also serves this run over TrainerService (status, stop, and the
    rollout plan that fleet workers join with).
    """
    import asyncio
    import signal
    from dataclasses import asdict

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rise.config import ConfigError, parse_overrides
    from services.trainer.config import load_run_config
    from services.trainer.distributed import init_world, shutdown_world
    from services.trainer.run import Status, TrainerRun, learn_on_rank

    try:
        config = load_run_config(config_path, parse_overrides(set_items))
    except (ConfigError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None

    world = init_world(config.learner.distributed)
    if not world.is_main:
        import threading

        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            step = learn_on_rank(config, run_id, world, stop)
        finally:
            shutdown_world(world)
        return asdict(Status(run_id, state="stopped" if stop.is_set() else "succeeded", learner_step=step,
                             message=f"learner rank {world.rank} of {world.size}"))

    async def main():
        run = TrainerRun(config, run_id, world=world)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, run.stop)
        loop.add_signal_handler(signal.SIGTERM, run.stop)
        task = asyncio.create_task(run.run())
        queue = run.watch()
        served = None
        if serve_port is not None:
            from rise.serving import ServerConfig
            from services.trainer.server import TrainerConfig, start

            served = await start(TrainerConfig(server=ServerConfig(host="0.0.0.0", port=serve_port, log_json=False)))
            served.servicer.runs[run_id], served.servicer.tasks[run_id] = run, task
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
        with Progress(*columns, disable=not progress) as bar:
            steps = bar.add_task(f"RISE {run_id}", total=config.learner.steps, info="")
            while (status := await queue.get()) is not None:
                m = status.metrics
                bar.update(steps, completed=status.learner_step, info=(
                    f"{status.imagined_samples} imagined, {m.get('imagined_per_s', 0):.1f}/s, "
                    f"loss {m.get('loss', float('nan')):.3f}, policy {status.policy_version}, {status.state}"))
        final = asdict(await task)
        if served is not None:
            await served.stop(5)
        return final

    try:
        return asyncio.run(main())
    finally:
        shutdown_world(world)


def register(train_app: typer.Typer) -> None:
    """Adds `rise` to the `rise train` group."""

    @train_app.command("rise")
    def rise_command(
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="Run config YAML (default: "
                                              "services/trainer/configs/default.yaml)."),
        run_id: str = typer.Option("run", "--run-id", help="Run folder name under `out`; an existing run resumes."),
        set_: list[str] = typer.Option([], "--set", help="Config override KEY=VALUE, e.g. learner.steps=100."),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
        serve_port: Optional[int] = typer.Option(None, "--serve-port", help="Also serve this run over TrainerService on "
                                                 "this port (rank 0), e.g. for `rise worker rollout` to join."),
    ) -> None:
        """RL in imagination against running policy, dynamics and value services (and Redis).

        Several learner ranks: `torchrun --nproc-per-node N -m rise.cli train rise ...`."""
        import json

        status = run_from_cli(config, run_id, set_, progress, serve_port)
        typer.echo(json.dumps({k: status[k] for k in ("run_id", "state", "learner_step", "imagined_samples",
                                                      "policy_version", "message")}))
        if status["state"] == "failed":
            raise typer.Exit(1)

    @train_app.command("rise-export")
    def export_command(
        checkpoint: Path = typer.Argument(..., help="A run folder (its newest checkpoint) or one checkpoint folder "
                                          "(<run>/checkpoints/step-N) written by learner ranks."),
        out: Path = typer.Argument(..., help="Folder to write the plain policy into (weights, config, normalizers)."),
        which: str = typer.Option("ema", help="ema (what the run publishes) or model (the raw learner weights)."),
        store: Path = typer.Option(Path("model_store"), "--store", envvar="RISE_REGISTRY_ROOT",
                                   help="Registry holding the run's initial policy version (its architecture)."),
    ) -> None:
        """A distributed (torch.distributed.checkpoint) learner checkpoint -> the folder the policy service loads."""
        from rise.registry import Registry
        from services.policy.model import KIND
        from services.trainer.distributed import export_checkpoint

        if which not in ("ema", "model"):
            raise typer.BadParameter("--which: ema or model")
        folder = export_checkpoint(checkpoint, out, Registry(store), which)
        typer.echo(f"wrote {folder}; publish it with `rise models publish policy {folder} --kind {KIND}`")
