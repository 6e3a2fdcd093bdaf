"""`rise run`: start, follow, inspect and stop runs on a TrainerService (`rise serve trainer`).

    rise run start --trainer trainer:50054 --config run.yaml --run-id r7 --set learner.steps=500
    rise run watch r7          # progress until the run ends (Ctrl-C detaches; the run goes on)
    rise run status r7         # one status as JSON
    rise run stop r7 --wait    # stop after the current learner step (checkpointed)

The same calls drive `make demo` (`watch_run`).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

ENDED = ("stopped", "succeeded", "failed")


def state_name(status) -> str:
    """RUN_STATE_STOPPED -> "stopped"."""
    from rise.proto.v1 import trainer_pb2

    return trainer_pb2.RunState.Name(status.state).removeprefix("RUN_STATE_").lower()


def status_dict(status) -> dict[str, Any]:
    """A RunStatus as plain JSON-able values (the config left out: `rise run status --config` prints it)."""
    return {"run_id": status.run_id, "state": state_name(status),
            "learner_step": status.learner_step, "imagined_samples": status.imagined_samples,
            "policy_version": status.policy_version, "message": status.message,
            "metrics": {k: round(v, 6) for k, v in sorted(status.metrics.items())},
            "started_unix_ms": status.started_unix_ms, "updated_unix_ms": status.updated_unix_ms}


def total_steps(status) -> int | None:
    """The run's learner steps, from the config it runs with."""
    try:
        return int(yaml.safe_load(status.config_yaml)["learner"]["steps"])
    except (TypeError, KeyError, ValueError, yaml.YAMLError):
        return None


async def watch_run(stub, run_id: str, console=None, label: str = "RL in imagination"):
    """Follow the run with a progress bar until its stream ends; -> its final RunStatus."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rise.proto.v1 import trainer_pb2

    if console is None:  # stdout stays machine-readable (the final status as JSON)
        from rich.console import Console

        console = Console(stderr=True)
    first = await stub.GetRun(trainer_pb2.GetRunRequest(run_id=run_id), timeout=30)
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console) as bar:
        job = bar.add_task(run_id, total=total_steps(first), info="starting")
        async for status in stub.WatchRun(trainer_pb2.WatchRunRequest(run_id=run_id)):
            m = status.metrics
            bar.update(job, completed=status.learner_step, info=(
                f"{status.imagined_samples} imagined ({m.get('imagined_per_s', 0.0):.1f}/s), "
                f"loss {m.get('loss', float('nan')):.3f}, policy {status.policy_version or '-'}, {state_name(status)}"))
    return await stub.GetRun(trainer_pb2.GetRunRequest(run_id=run_id), timeout=30)


async def stop_run(stub, run_id: str, wait_s: float = 0.0):
    """StopRun, then (with `wait_s`) poll until the run has ended or the time is up; -> the last status."""
    import time

    from rise.proto.v1 import trainer_pb2

    status = await stub.StopRun(trainer_pb2.StopRunRequest(run_id=run_id), timeout=10)
    deadline = time.monotonic() + wait_s
    while state_name(status) not in ENDED and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        status = await stub.GetRun(trainer_pb2.GetRunRequest(run_id=run_id), timeout=10)
    return status


# ---- the command line ------------------------------------------------------------------------------
def _call(trainer: str, tls_ca: Path | None, token_file: Path | None, work) -> Any:
    """Run `work(stub)` on a channel to the trainer; gRPC errors become one clear line and exit 1."""
    import grpc

    from rise.proto.v1 import trainer_pb2_grpc
    from rise.serving import ClientConfig, open_channel

    config = ClientConfig(address=trainer, tls_ca_file=tls_ca, token_file=token_file)

    async def main():
        async with open_channel(config) as channel:
            return await work(trainer_pb2_grpc.TrainerServiceStub(channel))

    try:
        return asyncio.run(main())
    except grpc.aio.AioRpcError as exc:
        typer.echo(f"{trainer}: {exc.code().name}: {exc.details()}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:  # watching stops here; the run goes on on the trainer
        typer.echo("detached: the run goes on (rise run watch / status / stop)", err=True)
        raise typer.Exit(130) from None


def register(run_app: typer.Typer) -> None:
    """Adds start / watch / status / stop to the `rise run` group."""
    trainer_option = typer.Option("127.0.0.1:50054", "--trainer", envvar="RISE_TRAINER",
                                  help="host:port of the TrainerService (rise serve trainer).")
    tls_option = typer.Option(None, "--tls-ca", envvar="RISE_TRAINER_TLS_CA", help="CA bundle of a TLS trainer.")
    token_option = typer.Option(None, "--token-file", envvar="RISE_TRAINER_TOKEN_FILE",
                                help="File whose first line is the bearer token.")

    def finish(status) -> None:
        typer.echo(json.dumps(status_dict(status)))
        if state_name(status) == "failed":
            raise typer.Exit(1)

    @run_app.command("start")
    def start_command(
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="Run config YAML (default: the server's)."),
        run_id: str = typer.Option("", "--run-id", help="Run id ([a-z0-9-]+); empty = generated; an existing one resumes."),
        set_: list[str] = typer.Option([], "--set", help="Config override KEY=VALUE, e.g. learner.steps=100."),
        watch: bool = typer.Option(True, "--watch/--no-watch", help="Follow the run until it ends (Ctrl-C detaches)."),
        trainer: str = trainer_option, tls_ca: Optional[Path] = tls_option, token_file: Optional[Path] = token_option,
    ) -> None:
        """Start (or resume) a run on the trainer; the config is validated there before anything starts."""
        from rise.config import parse_overrides
        from rise.proto.v1 import trainer_pb2

        try:
            overrides = parse_overrides(set_)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        config_yaml = config.read_text() if config else ""

        async def work(stub):
            started = await stub.StartRun(trainer_pb2.StartRunRequest(run_id=run_id, config_yaml=config_yaml,
                                                                      overrides=overrides), timeout=60)
            typer.echo(f"started run {started.run_id} on {trainer}", err=True)
            return await watch_run(stub, started.run_id) if watch else started

        finish(_call(trainer, tls_ca, token_file, work))

    @run_app.command("watch")
    def watch_command(run_id: str = typer.Argument(...), trainer: str = trainer_option,
                      tls_ca: Optional[Path] = tls_option, token_file: Optional[Path] = token_option) -> None:
        """Follow a run with a progress bar until it ends; prints its final status."""
        finish(_call(trainer, tls_ca, token_file, lambda stub: watch_run(stub, run_id)))

    @run_app.command("status")
    def status_command(
        run_id: str = typer.Argument(...),
        show_config: bool = typer.Option(False, "--config", help="Print the config the run runs with instead."),
        trainer: str = trainer_option, tls_ca: Optional[Path] = tls_option, token_file: Optional[Path] = token_option,
    ) -> None:
        """One status of a run, as JSON (exit 1 for a failed run)."""
        from rise.proto.v1 import trainer_pb2

        status = _call(trainer, tls_ca, token_file,
                       lambda stub: stub.GetRun(trainer_pb2.GetRunRequest(run_id=run_id), timeout=30))
        if show_config:
            typer.echo(status.config_yaml)
            return
        finish(status)

    @run_app.command("stop")
    def stop_command(
        run_id: str = typer.Argument(...),
        wait: float = typer.Option(0.0, "--wait", min=0.0, help="Seconds to wait for the run to end (it checkpoints first)."),
        trainer: str = trainer_option, tls_ca: Optional[Path] = tls_option, token_file: Optional[Path] = token_option,
    ) -> None:
        """Ask a run to stop after its current learner step."""
        finish(_call(trainer, tls_ca, token_file, lambda stub: stop_run(stub, run_id, wait)))
