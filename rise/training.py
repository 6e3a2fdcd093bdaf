"""What every `rise train <model>` command does around its model's own `train` function.

Parse `--set KEY=VALUE` overrides, load the tier config (a resumed run uses its own saved
config), check `--publish` has a registry, print the config, train, print the summary, and turn
expected failures into a one-line error and an exit code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import typer


def run_training_command(
    name: str,
    load_model_config: Callable[..., Any],
    train: Callable[..., dict],
    *,
    config: str,
    data: list[Path],
    out: Path,
    resume: bool,
    registry: Path | None,
    publish: bool,
    set_items: list[str],
    overrides: dict[str, Any],
    **train_kwargs: Any,
) -> None:
    """`overrides` are the command's own flags as dotted config keys; `--set` items win over them."""
    from rich.console import Console
    from rich.syntax import Syntax

    from rise.config import ConfigError, dump_config, parse_overrides

    console = Console(stderr=True)
    try:
        overrides = {**overrides, **parse_overrides(set_items)}
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        saved = out / "config.yaml"
        cfg = load_model_config(saved if resume and saved.is_file() else config, overrides)
    except (ConfigError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    if publish and registry is None:
        console.print("[red]error:[/red] --publish needs --registry (or RISE_REGISTRY_ROOT)")
        raise typer.Exit(2)
    console.print(f"[bold]rise train {name}[/bold] with config:")
    console.print(Syntax(dump_config(cfg), "yaml"))
    try:
        summary = train(cfg, data, out, resume=resume, registry=registry, publish=publish, log=console.print,
                        **train_kwargs)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1)
    console.print_json(json.dumps(summary))


def publish_trained(registry: Path | None, model: str, folder: Path, *, kind: str, embodiment, config, metrics: dict,
                    parent: str = "", log=print):
    """A trained model folder -> a new registry version (NaN metrics left out); returns its manifest."""
    from rise.registry import Registry

    if registry is None:
        raise ValueError("--publish needs --registry")
    manifest = Registry(registry).publish(
        model, folder, kind=kind, embodiment=embodiment.model_dump(), config=config.model_dump(mode="json"),
        parent=parent, metrics={k: float(v) for k, v in metrics.items() if not math.isnan(v)})
    log(f"published {model}/{manifest.version} to {registry}")
    return manifest
