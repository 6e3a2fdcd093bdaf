"""The `rise` command line."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

app = typer.Typer(help="RISE-serve: a self-improving robot policy as gRPC microservices.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry: versions and aliases.", no_args_is_help=True)
app.add_typer(models_app, name="models")
data_app = typer.Typer(help="Robot datasets (LeRobot v3): collect, convert, statistics.", no_args_is_help=True)
app.add_typer(data_app, name="data")
train_app = typer.Typer(help="Train a model from LeRobot datasets and publish it to the registry.", no_args_is_help=True)
app.add_typer(train_app, name="train")
worker_app = typer.Typer(help="Stateless workers that join a running trainer (scale them out freely).", no_args_is_help=True)
app.add_typer(worker_app, name="worker")
run_app = typer.Typer(help="Runs on a TrainerService (rise serve trainer): start, watch, status, stop.", no_args_is_help=True)
app.add_typer(run_app, name="run")
console = Console(stderr=True)

STORE = typer.Option(Path("model_store"), "--store", envvar="RISE_REGISTRY_ROOT", help="Model registry root.")


@app.command()
def serve(
    service: str = typer.Argument(..., help="policy | value | dynamics | trainer"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; RISE_* env vars override it."),
    port: Optional[int] = typer.Option(None, help="Override server.port."),
) -> None:
    """Run a model service until SIGTERM (then drain gracefully)."""
    from rise.config import dump_config, load_config
    from rise.serving import serve_until_signal, setup_logging
    from rise.services import service as lookup

    config_cls, start = lookup(service)
    cfg = load_config(config_cls, config, overrides={"server.port": port} if port is not None else None)
    console.print(f"[bold]rise serve {service}[/bold] with config:")
    console.print(Syntax(dump_config(cfg), "yaml"))
    setup_logging(cfg.server.log_json)

    async def main() -> None:
        running = await start(cfg)
        console.print(f"[green]serving {service} on {running.address}[/green]")
        await serve_until_signal(running)

    asyncio.run(main())


@app.command()
def health(
    address: str = typer.Argument(..., help="host:port of a server (any gRPC target)."),
    service: str = typer.Option("", help="Service to ask about, e.g. rise.v1.PolicyService; '' = the whole server."),
    timeout: float = typer.Option(5.0, min=0.1, help="Seconds to wait for the answer."),
    tls_ca: Optional[Path] = typer.Option(None, envvar="HEALTH_TLS_CA", help="CA bundle of a TLS server."),
    tls_cert: Optional[Path] = typer.Option(None, envvar="HEALTH_TLS_CERT", help="Client certificate (mutual TLS)."),
    tls_key: Optional[Path] = typer.Option(None, envvar="HEALTH_TLS_KEY", help="Client key (mutual TLS)."),
    tls_server_name: Optional[str] = typer.Option(None, envvar="HEALTH_TLS_SERVER_NAME",
                                                  help="Name in the server certificate, if not the address host."),
) -> None:
    """Ask a server's gRPC health service (grpc.health.v1): exit 0 when SERVING, 1 otherwise (container probes)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from rise.serving import ClientConfig, open_channel

    config = ClientConfig(address=address, tls_ca_file=tls_ca, tls_cert_file=tls_cert, tls_key_file=tls_key,
                          tls_server_name=tls_server_name)

    async def check() -> str:
        async with open_channel(config) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                    timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    try:
        status = asyncio.run(check())
    except Exception as exc:  # an unreachable server or an unknown service: unhealthy, with the reason
        code = exc.code().name if hasattr(exc, "code") and callable(exc.code) else type(exc).__name__
        details = exc.details() if hasattr(exc, "details") and callable(exc.details) else str(exc)
        typer.echo(f"{address}{' ' + service if service else ''}: {code}: {details}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{address}{' ' + service if service else ''}: {status}")
    raise typer.Exit(0 if status == "SERVING" else 1)


@models_app.command("list")
def models_list(store: Path = STORE, model: Optional[str] = typer.Argument(None)) -> None:
    """Versions and aliases in the registry."""
    from rise.registry import Registry

    registry = Registry(store)
    table = Table("model", "version", "kind", "embodiment", "aliases", "parent", "created", "metrics")
    for name in [model] if model else registry.models():
        aliases = registry.aliases(name)
        for version in registry.versions(name):
            m = registry.manifest(name, version)
            pointing = ", ".join(a for a, v in sorted(aliases.items()) if v == version)
            from datetime import datetime, timezone

            created = datetime.fromtimestamp(m.created_unix_ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            table.add_row(name, version, m.kind, str(m.embodiment.get("name")), pointing, m.parent, created, json.dumps(m.metrics))
    Console().print(table)


@models_app.command("publish")
def models_publish(
    model: str,
    folder: Path,
    kind: str = typer.Option(..., help="Model implementation, e.g. linear."),
    embodiment: str = typer.Option("metaworld", help="Embodiment preset or YAML path."),
    parent: str = typer.Option("", help="Version this one was trained from."),
    config: Optional[Path] = typer.Option(None, help="JSON or YAML file with the model config."),
    alias: list[str] = typer.Option([], help="Aliases to point at the new version."),
    store: Path = STORE,
) -> None:
    """Publish a folder of model files as a new immutable version."""
    import yaml

    from rise.embodiment import load_embodiment
    from rise.registry import Registry

    registry = Registry(store)
    manifest = registry.publish(model, folder, kind=kind, embodiment=load_embodiment(embodiment).model_dump(),
                                parent=parent, config=yaml.safe_load(config.read_text()) if config else None)
    for name in alias:
        registry.set_alias(model, name, manifest.version)
    typer.echo(f"published {model}/{manifest.version} ({len(manifest.files)} files)")


@models_app.command("baseline")
def models_baseline(
    model: str = typer.Argument(..., help="policy | value | dynamics | trainer"),
    embodiment: str = typer.Option("metaworld"),
    alias: list[str] = typer.Option(["stable"], help="Aliases to point at it."),
    store: Path = STORE,
) -> None:
    """Publish the untrained baseline of a model (linear policy/value, persistence dynamics)."""
    from rise.baselines import publish_baseline
    from rise.embodiment import load_embodiment
    from rise.registry import Registry

    registry = Registry(store)
    manifest = publish_baseline(registry, model, load_embodiment(embodiment))
    for name in alias:
        registry.set_alias(model, name, manifest.version)
    typer.echo(f"published {model}/{manifest.version} ({manifest.kind}); aliases: {', '.join(alias)}")


@models_app.command("alias")
def models_alias(
    model: str,
    alias: str,
    version: str,
    server: Optional[str] = typer.Option(None, help="host:port of a running service: swap it there too (ModelAdmin.SetAlias)."),
    token: str = typer.Option("", envvar="RISE_TOKEN"),
    store: Path = STORE,
) -> None:
    """Point an alias at a version, in the registry or (with --server) on a running service."""
    if server is None:
        from rise.registry import Registry

        previous = Registry(store).set_alias(model, alias, version)
        typer.echo(f"{model}: {alias} -> {version} (was {previous or 'unset'}); running services keep their routing "
                   "until told (use --server)")
        return
    from rise.proto.v1 import model_admin_pb2, model_admin_pb2_grpc
    from rise.serving import ClientConfig, open_channel

    async def call() -> None:
        async with open_channel(ClientConfig(address=server, token=token)) as channel:
            reply = await model_admin_pb2_grpc.ModelAdminStub(channel).SetAlias(
                model_admin_pb2.SetAliasRequest(alias=alias, version=version), timeout=120)
        typer.echo(f"{server}: {alias} -> {reply.version} (was {reply.previous_version or 'unset'})")

    asyncio.run(call())


from rise.demo import DemoOptions as _Demo  # noqa: E402  (light: no torch; the demo's defaults live there)


@app.command()
def demo(
    workdir: Path = typer.Option(_Demo.workdir, help="Demo folder: data, models, logs, run, report.html (cleared first)."),
    task: str = typer.Option(_Demo.task, help="MetaWorld task."),
    episodes: int = typer.Option(_Demo.episodes, min=2, help="Episodes to collect (scripted expert + noise)."),
    max_steps: int = typer.Option(_Demo.max_steps, min=10, help="Steps per episode at most, in collection and evaluation."),
    noise: float = typer.Option(_Demo.noise, min=0.0, help="Gaussian action noise of the collecting expert."),
    perturb_prob: float = typer.Option(_Demo.perturb_prob, min=0.0, max=1.0, help="Chance of a random-action burst per episode."),
    tier: str = typer.Option(_Demo.tier, help="Model tier: tiny | small."),
    policy_steps: int = typer.Option(_Demo.policy_steps, min=1, help="Policy imitation warm-up steps."),
    advantage_steps: int = typer.Option(_Demo.advantage_steps, min=0,
                                        help="Advantage-conditioned (RECAP-style) policy steps; 0: skip."),
    value_steps: int = typer.Option(_Demo.value_steps, min=2, help="Value steps (half progress, half TD)."),
    dynamics_steps: int = typer.Option(_Demo.dynamics_steps, min=2,
                                       help="Dynamics steps (a third autoencoder, the rest transformer)."),
    rl_steps: int = typer.Option(_Demo.rl_steps, min=1, help="Learner steps of RL in imagination."),
    eval_episodes: int = typer.Option(_Demo.eval_episodes, min=1, help="Simulator episodes per evaluation (before and after)."),
    workers: int = typer.Option(_Demo.collect_workers, min=1, help="Collection worker processes."),
    seed: int = typer.Option(_Demo.seed, min=0),
    redis_url: str = typer.Option(_Demo.redis_url, envvar="REDIS_URL",
                                  help="Redis for the replay stream; started here when none answers on this machine."),
    parallel: bool = typer.Option(_Demo.parallel, "--parallel/--sequential", help="Train the dynamics model in a second process."),
    reuse_data: bool = typer.Option(_Demo.reuse_data, "--reuse-data", help="Keep the dataset of an earlier demo with equal settings."),
) -> None:
    """The whole RISE loop on this machine: collect, train, serve, RL in imagination, evaluate, report."""
    from rise.demo import run_demo

    if tier not in ("tiny", "small"):
        raise typer.BadParameter(f"--tier must be tiny or small, got {tier!r}")
    options = _Demo(workdir=workdir, task=task, episodes=episodes, noise=noise, perturb_prob=perturb_prob,
                    max_steps=max_steps, collect_workers=workers, tier=tier, policy_steps=policy_steps,
                    advantage_steps=advantage_steps, value_steps=value_steps, dynamics_steps=dynamics_steps,
                    rl_steps=rl_steps, eval_episodes=eval_episodes, seed=seed, redis_url=redis_url,
                    parallel=parallel, reuse_data=reuse_data)
    raise typer.Exit(run_demo(workdir, console, options))


def _register_commands() -> None:
    """Commands that live beside their code: each module's register() adds them (imports stay lazy)."""
    import importlib

    for module, target in (("rise.data.collect", data_app), ("rise.data.convert", data_app), ("rise.data.stats", data_app),
                           ("rise.sim.evaluate", app), ("rise.triton_binding", app),
                           ("services.dynamics.evaluate", app), ("services.dynamics.train", train_app),
                           ("services.value.train", train_app), ("services.value.label", app),
                           ("services.policy.train", train_app), ("services.trainer.cli", train_app),
                           ("services.trainer.worker", worker_app), ("services.trainer.control", run_app)):
        importlib.import_module(module).register(target)


_register_commands()

if __name__ == "__main__":
    app()
