"""`rise eval`: ground-truth success of a served policy, closed loop in the MetaWorld simulator.

Loop, per episode: reset the simulator to a held-out layout; at each decision point send the
observation (the embodiment's views, the robot state, the task text, a timestamp, and the
simulator state, which only privileged policies such as the scripted expert read) to
`PolicyService.Act`; execute the first `execute` actions of the returned chunk, one per
simulator step; stop at the first success (success is sticky in `MetaWorldSim`) or at
`max_steps`.

Held-out seeds: episode i of an evaluation with `seed` S uses layout seed
`EVAL_SEED_BASE + 100_000 * S + i` (2**32 + ...). Collection draws its layout seeds as uint32
(`rise.data.collect.episode_seed`, always < 2**32), so no evaluation replays a layout that
training data was collected on, and evaluations with different S never share one.

Outputs (into `out`): `summary.json` and `summary.md` (rate with its Wilson 95% interval,
per-episode steps, the versions that answered, Act latency), MP4 videos of the first `videos`
episodes (the views side by side), and with `record` the rollouts as a LeRobot dataset with
success labels (RISE's "policy rollouts" data).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import typer

EVAL_SEED_BASE = 2**32
SEEDS_PER_EVAL_SEED = 100_000
VIDEO_SCALE = 2  # 64 px views are too small to watch; nearest-neighbour keeps the pixels honest


def eval_seed(seed: int, episode: int) -> int:
    """The layout seed of `episode` in an evaluation with `seed` (see the module docstring)."""
    if not 0 <= episode < SEEDS_PER_EVAL_SEED or seed < 0:
        raise ValueError(f"need seed >= 0 and 0 <= episode < {SEEDS_PER_EVAL_SEED}, got seed {seed}, episode {episode}")
    return EVAL_SEED_BASE + SEEDS_PER_EVAL_SEED * seed + episode


class EvaluationError(RuntimeError):
    """The policy could not be evaluated (unreachable, refused a request, bad output)."""


@dataclass
class EpisodeResult:
    index: int
    seed: int
    success: bool
    steps: int
    calls: int


@dataclass
class EvalReport:
    task: str
    policy: str
    requested_version: str
    episodes: list[EpisodeResult]
    max_steps: int
    execute: int
    advantage_bin: int
    action_noise: float
    guidance_scale: float = 0.0  # 0: the served version's configured default
    versions: dict[str, int] = field(default_factory=dict)  # version that answered -> Act calls
    act_ms: list[float] = field(default_factory=list)  # client round trip per Act call
    server_ms: list[float] = field(default_factory=list)  # ResponseMeta.timing.total_ms per call
    videos: list[str] = field(default_factory=list)
    dataset: str | None = None
    wall_s: float = 0.0

    @property
    def successes(self) -> int:
        return sum(e.success for e in self.episodes)

    @property
    def success_rate(self) -> float:
        return self.successes / len(self.episodes) if self.episodes else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        from rise.sim.stats import wilson_interval

        return wilson_interval(self.successes, len(self.episodes))

    def summary(self) -> dict:
        import numpy as np

        return {
            "task": self.task, "policy": self.policy, "requested_version": self.requested_version,
            "versions": self.versions, "episodes": len(self.episodes), "successes": self.successes,
            "success_rate": self.success_rate, "wilson95": list(self.interval),
            "mean_steps": float(np.mean([e.steps for e in self.episodes])) if self.episodes else None,
            "act_calls": len(self.act_ms),
            "act_ms_mean": float(np.mean(self.act_ms)) if self.act_ms else None,
            "act_ms_p50": float(np.median(self.act_ms)) if self.act_ms else None,
            "server_ms_mean": float(np.mean(self.server_ms)) if self.server_ms else None,
            "max_steps": self.max_steps, "execute": self.execute, "advantage_bin": self.advantage_bin,
            "action_noise": self.action_noise, "guidance_scale": self.guidance_scale,
            "seed_scheme": f"{EVAL_SEED_BASE} + {SEEDS_PER_EVAL_SEED} * seed + episode",
            "videos": self.videos, "dataset": self.dataset, "wall_s": self.wall_s,
            "per_episode": [asdict(e) for e in self.episodes],
        }

    def markdown(self) -> str:
        from rise.sim.stats import format_rate

        s = self.summary()
        lines = [
            f"# Evaluation: {self.task}", "",
            f"- policy: `{self.policy}`, requested `{self.requested_version or '(default alias)'}`, answered by "
            + ", ".join(f"`{v}` ({n} calls)" for v, n in sorted(self.versions.items())),
            f"- success: **{format_rate(self.successes, len(self.episodes))}** (Wilson 95% interval)",
            f"- Act round trip: mean {s['act_ms_mean'] or 0:.2f} ms, p50 {s['act_ms_p50'] or 0:.2f} ms over "
            f"{s['act_calls']} calls (server total mean {s['server_ms_mean'] or 0:.2f} ms)",
            f"- max steps {self.max_steps}, {self.execute} actions executed per chunk, advantage bin {self.advantage_bin}, "
            f"action noise sigma {self.action_noise}, guidance scale {self.guidance_scale or 'the version default'}; "
            f"layout seeds {s['seed_scheme']}", "",
            "| episode | seed | success | steps | Act calls |", "|--:|--:|:--|--:|--:|",
            *(f"| {e.index} | {e.seed} | {'yes' if e.success else 'no'} | {e.steps} | {e.calls} |" for e in self.episodes),
        ]
        return "\n".join(lines) + "\n"


def _observation(frame, task_text: str):
    import time

    from rise.proto.v1 import common_pb2
    from rise.tensors import to_tensor

    return common_pb2.Observation(
        views={v: to_tensor(image) for v, image in frame.views.items()}, state=to_tensor(frame.state),
        task=task_text, timestamp_ns=time.time_ns(), sim_state=to_tensor(frame.sim_state))


def _write_video(path: Path, frames: list[dict], views: list[str], fps: float) -> None:
    import imageio.v3 as iio
    import numpy as np

    strip = np.stack([np.concatenate([f[v] for v in views], axis=1) for f in frames])
    strip = strip.repeat(VIDEO_SCALE, axis=1).repeat(VIDEO_SCALE, axis=2)
    iio.imwrite(path, strip, plugin="pyav", codec="libx264", fps=round(fps))
    if iio.improps(path, plugin="pyav").shape[0] != len(strip):  # a truncated file must not pass silently
        raise EvaluationError(f"video {path} reads back with the wrong frame count")


@dataclass
class _Rollouts:
    """Runs episodes against one policy stub and records every call in `report`."""

    stub: object
    sim: object
    embodiment: object
    text: str
    report: EvalReport
    version: str
    timeout_s: float

    async def act(self, frame, index: int, layout_seed: int):
        import time

        import grpc

        from rise.errors import InvalidArgument
        from rise.observations import decode_actions
        from rise.proto.v1 import common_pb2, policy_pb2

        report, steps = self.report, self.sim.steps
        request = policy_pb2.ActRequest(
            observation=_observation(frame, self.text), model=common_pb2.ModelRef(version=self.version),
            advantage_bin=report.advantage_bin, guidance_scale=report.guidance_scale,
            seed=layout_seed * 1000 + steps + 1, request_id=f"{index}:{steps}")
        start = time.perf_counter()
        try:
            reply = await self.stub.Act(request, timeout=self.timeout_s)
            chunk = decode_actions(reply.chunk.actions, self.embodiment, "reply.chunk")
        except grpc.aio.AioRpcError as exc:
            raise EvaluationError(f"policy at {report.policy} failed at episode {index}, step {steps}: "
                                  f"{exc.code().name}: {exc.details()}") from None
        except InvalidArgument as exc:
            raise EvaluationError(f"policy at {report.policy} returned a bad chunk at episode {index}: {exc}") from None
        report.act_ms.append((time.perf_counter() - start) * 1000)
        report.server_ms.append(reply.meta.timing.total_ms)
        report.versions[reply.meta.version] = report.versions.get(reply.meta.version, 0) + 1
        return chunk

    async def episode(self, index: int, layout_seed: int, keep: bool):
        """-> (result, frames kept (all, when `keep`), executed actions)."""
        import numpy as np

        sim, report = self.sim, self.report
        noise = np.random.default_rng(np.random.SeedSequence(layout_seed, spawn_key=(2,)))
        frame = sim.reset(layout_seed)
        kept, actions, calls = [frame], [], 0
        while not (frame.success or sim.done):
            if not frame.views:  # skipped while stepping; the policy needs them now
                frame.views = sim.render()
            chunk = await self.act(frame, index, layout_seed)
            calls += 1
            for action in chunk[:report.execute]:
                if report.action_noise:
                    action = action + noise.normal(0.0, report.action_noise, size=action.shape)
                actions.append(np.clip(action, -1.0, 1.0).astype(np.float32))
                frame = sim.step(actions[-1], render=keep)  # draw only frames someone keeps
                if keep:
                    kept.append(frame)
                if frame.success or sim.done:
                    break
        return EpisodeResult(index, layout_seed, frame.success, sim.steps, calls), kept, actions


async def evaluate_async(
    policy, task: str, episodes: int, *, version: str = "", seed: int = 0, max_steps: int = 200,
    execute: int | None = None, advantage_bin: int = 10, action_noise: float = 0.0, videos: int = 0,
    record: Path | None = None, out: Path | None = None, token: str = "", embodiment="metaworld",
    progress: bool = True, guidance_scale: float = 0.0,
) -> EvalReport:
    """Evaluate the policy served at `policy` (host:port or a ClientConfig) on `task`.

    Runs in the caller's event loop (a policy server may share it: the loop is free while a
    call is in flight). `execute`: actions run per chunk (default: the whole chunk).
    `action_noise`: Gaussian sigma added to every executed action (before MetaWorld's clip).
    `guidance_scale`: classifier-free guidance towards `advantage_bin` (0: the version's default).
    """
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rise.embodiment import Embodiment, load_embodiment
    from rise.proto.v1 import policy_pb2_grpc
    from rise.serving import ClientConfig, open_channel
    from rise.sim.metaworld_sim import MetaWorldSim, task_text

    emb = embodiment if isinstance(embodiment, Embodiment) else load_embodiment(embodiment)
    client = policy if isinstance(policy, ClientConfig) else ClientConfig(address=policy, token=token)
    execute = emb.chunk_length if execute is None else execute
    if not 1 <= execute <= emb.chunk_length:
        raise ValueError(f"execute must be 1..{emb.chunk_length} (the chunk length), got {execute}")
    if episodes < 1 or max_steps < 1:
        raise ValueError(f"need episodes >= 1 and max_steps >= 1, got {episodes} and {max_steps}")
    if videos and out is None:
        raise ValueError("videos need an output folder (out)")
    if record is not None and Path(record).exists():
        raise ValueError(f"{record} already exists; a recording goes to a new path")
    if out is not None:
        out = Path(out)
        (out / "videos").mkdir(parents=True, exist_ok=True)

    sim = MetaWorldSim(task, emb, max_steps=max_steps)
    report = EvalReport(sim.task, client.address, version, [], max_steps, execute, advantage_bin, action_noise,
                        guidance_scale)
    writer = None
    if record is not None:
        from rise.data.dataset import DatasetWriter

        writer = DatasetWriter(record, emb, sim_state_dim=sim.state_size)
        report.dataset = str(record)
    started = time.perf_counter()
    columns = (TextColumn("[bold]eval[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("success {task.fields[ok]}"), TimeElapsedColumn())
    try:
        async with open_channel(client) as channel:
            rollouts = _Rollouts(policy_pb2_grpc.PolicyServiceStub(channel), sim, emb, task_text(sim.task), report,
                                 version, client.timeout_s)
            with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
                job = bar.add_task(sim.task, total=episodes, ok=0)
                for index in range(episodes):
                    result, kept, actions = await rollouts.episode(index, eval_seed(seed, index),
                                                                   keep=writer is not None or index < videos)
                    report.episodes.append(result)
                    if index < videos:
                        path = out / "videos" / f"episode_{index:03d}_{'success' if result.success else 'failure'}.mp4"
                        _write_video(path, [f.views for f in kept], emb.views, emb.control_hz)
                        report.videos.append(str(path))
                    if writer is not None and actions:
                        writer.add(_episode(kept[:-1], actions, rollouts.text, result.success, emb))
                    bar.update(job, advance=1, ok=f"{report.successes}/{index + 1}")
    finally:
        sim.close()
        if writer is not None:
            writer.finalize()
    report.wall_s = time.perf_counter() - started
    if out is not None:
        (out / "summary.json").write_text(json.dumps(report.summary(), indent=2) + "\n")
        (out / "summary.md").write_text(report.markdown())
    return report


def _episode(frames, actions, text: str, success: bool, emb):
    """Frame t is the observation before action t; the observation after the last step is not stored."""
    import numpy as np

    from rise.data.dataset import Episode

    return Episode(views={v: np.stack([f.views[v] for f in frames]) for v in emb.views},
                   states=np.stack([f.state for f in frames]), actions=np.stack(actions), task=text, success=success,
                   sim_states=np.stack([f.sim_state for f in frames]))


def evaluate(policy, task: str, episodes: int, **kwargs) -> EvalReport:
    """`evaluate_async` for callers without an event loop (benchmarks, scripts)."""
    import asyncio

    return asyncio.run(evaluate_async(policy, task, episodes, **kwargs))


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        policy: str = typer.Option(..., "--policy", help="host:port of a PolicyService."),
        task: str = typer.Option(..., "--task", help="MetaWorld task name, e.g. push or pick-place."),
        episodes: int = typer.Option(20, "--episodes", min=1),
        version: str = typer.Option("", "--version", help="Version id or alias; empty: the server's default alias."),
        seed: int = typer.Option(0, "--seed", min=0, help="Evaluation seed; layouts are 2**32 + 100000 * seed + episode."),
        max_steps: int = typer.Option(200, "--max-steps", min=1),
        execute: Optional[int] = typer.Option(None, "--execute", help="Actions executed per chunk (default: all)."),
        advantage_bin: int = typer.Option(10, "--advantage-bin", min=0, max=10, help="0 = unconditioned, 10 = best."),
        action_noise: float = typer.Option(0.0, "--action-noise", min=0.0, help="Gaussian sigma added to executed actions."),
        guidance_scale: float = typer.Option(0.0, "--guidance-scale", min=0.0,
                                             help="Classifier-free guidance towards the bin; 0 = the version's default."),
        videos: int = typer.Option(0, "--videos", min=0, help="MP4s of the first K episodes (needs --out)."),
        record: Optional[Path] = typer.Option(None, "--record", help="Write the rollouts as a new LeRobot dataset here."),
        out: Optional[Path] = typer.Option(None, "--out", help="Folder for summary.json, summary.md and videos/."),
        token: str = typer.Option("", "--token", envvar="RISE_TOKEN", help="Bearer token of the policy service."),
        embodiment: str = typer.Option("metaworld", "--embodiment"),
    ) -> None:
        """Success rate of a served policy in the MetaWorld simulator, on held-out seeds."""
        from rich.console import Console

        console = Console(stderr=True)
        try:
            report = evaluate(policy, task, episodes, version=version, seed=seed, max_steps=max_steps, execute=execute,
                              advantage_bin=advantage_bin, action_noise=action_noise, videos=videos, record=record,
                              out=out, token=token, embodiment=embodiment, guidance_scale=guidance_scale)
        except (EvaluationError, ValueError) as exc:
            console.print(f"[red]rise eval: {exc}[/red]")
            raise typer.Exit(1) from None
        Console().print(report.markdown())
        if out is not None:
            console.print(f"summary, videos: {out}")
