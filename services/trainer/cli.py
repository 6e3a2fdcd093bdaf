"""`rise train rise`: one RL-in-imagination run from the command line, with a progress display."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def run_from_cli(config_path: Path | None, run_id: str, set_items: list[str], progress: bool = True) -> dict:
    """Run to the end (Ctrl-C stops it cleanly, checkpointed); returns the final status as a dict."""
    import asyncio
    import signal
    from dataclasses import asdict

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rise.config import ConfigError
    from services.trainer.config import load_run_config
    from services.trainer.run import TrainerRun

    overrides = {}
    for item in set_items:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set {item!r}: expected KEY=VALUE, e.g. learner.steps=100")
        overrides[key] = value
    try:
        config = load_run_config(config_path, overrides)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None

    async def main():
        run = TrainerRun(config, run_id)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, run.stop)
        loop.add_signal_handler(signal.SIGTERM, run.stop)
        task = asyncio.create_task(run.run())
        queue = run.watch()
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
        with Progress(*columns, disable=not progress) as bar:
            steps = bar.add_task(f"RISE {run_id}", total=config.learner.steps, info="")
            while (status := await queue.get()) is not None:
                m = status.metrics
                bar.update(steps, completed=status.learner_step, info=(
                    f"{status.imagined_samples} imagined, {m.get('imagined_per_s', 0):.1f}/s, "
                    f"loss {m.get('loss', float('nan')):.3f}, policy {status.policy_version}, {status.state}"))
        return asdict(await task)

    return asyncio.run(main())


def register(train_app: typer.Typer) -> None:
    """Adds `rise` to the `rise train` group."""

    @train_app.command("rise")
    def rise_command(
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="Run config YAML (default: "
                                              "services/trainer/configs/default.yaml)."),
        run_id: str = typer.Option("run", "--run-id", help="Run folder name under `out`; an existing run resumes."),
        set_: list[str] = typer.Option([], "--set", help="Config override KEY=VALUE, e.g. learner.steps=100."),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """RL in imagination against running policy, dynamics and value services (and Redis)."""
        import json

        status = run_from_cli(config, run_id, set_, progress)
        typer.echo(json.dumps({k: status[k] for k in ("run_id", "state", "learner_step", "imagined_samples",
                                                      "policy_version", "message")}))
        if status["state"] == "failed":
            raise typer.Exit(1)
