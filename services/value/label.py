"""`rise label`: advantage labels for every frame of a dataset, written as a new LeRobot dataset.

    V_t            the value model's score of frame t (all views + the task text)
    A_t            clamp(scale * mean_{k=1..K} (V_{t+k} - V_t), -1, 1),  K = min(horizon, steps left)
                   (scale 5, horizon 50 as the RISE reference; the last frame has K = 0: A = 0)
    advantage_bin  np.digitize(A_t, linspace(-1, 1, bins + 1)[:-1]): 1..bins, `bins` the best

`--outcome` sets A_t to the episode's real outcome instead (+1 success, -1 failure; V_t is still
scored): for simulated rollouts, whose outcome is known, the labels a perfect judge of whole
episodes would give (bin `bins` or 1).

The value comes from a running value service (`--value host:port` or `grpc://host:port`, any
served version or alias with `--version`): the product path, so labels name the exact version
that produced them, and the labeller needs no torch model code. A local run or model folder
(`--value runs/value-tiny` or its `model/`) is scored in-process instead, for offline use.

The new dataset is the source copied by LeRobot's own `dataset_tools.add_features` (parquet
rewritten with the added columns, videos copied as they are, not re-encoded) plus:
    value          float32 [1]
    advantage      float32 [1]
    advantage_bin  int64 [1]
`meta/rise_labels.json` records the value version, settings and summary; `plots/` holds one
PNG per episode with its value and advantage curves.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import typer

LABEL_COLUMNS = ("value", "advantage", "advantage_bin")
_ADDRESS = re.compile(r"^(grpc://)?[A-Za-z0-9_.\-\[\]:]+:\d+$")


# ---- the formula ------------------------------------------------------------------------------
def chunk_advantages(values: np.ndarray, horizon: int = 50, scale: float = 5.0) -> np.ndarray:
    """A_t = clamp(scale * mean_{k=1..K}(V_{t+k} - V_t), -1, 1), K = min(horizon, len - 1 - t); A_last = 0."""
    v = np.asarray(values, np.float64)
    n = len(v)
    cumulative = np.concatenate([[0.0], np.cumsum(v)])
    out = np.zeros(n, np.float64)
    for t in range(n - 1):
        k = min(horizon, n - 1 - t)
        out[t] = scale * ((cumulative[t + 1 + k] - cumulative[t + 1]) / k - v[t])
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def advantage_bins(advantages: np.ndarray, bins: int = 10) -> np.ndarray:
    """Uniform bins on [-1, 1]: 1 (worst) .. bins (best), as `np.digitize(A, linspace(-1, 1, bins + 1)[:-1])`."""
    return np.digitize(np.asarray(advantages), np.linspace(-1, 1, bins + 1)[:-1]).astype(np.int64)


# ---- scorers: frames -> values --------------------------------------------------------------------
Scorer = Callable[[dict[str, np.ndarray], list[str]], np.ndarray]


def is_address(value: str) -> bool:
    return bool(_ADDRESS.match(value)) and not Path(value).exists()


def grpc_scorer(address: str, version: str = "", token: str = "", batch: int = 64, timeout_s: float = 120.0):
    """(score function, set of versions that answered, close function) through ValueService.Score.

    The first reply's version is pinned for every later call: labels come from one version even
    when the alias asked for moves while labelling."""
    from rise.proto.v1 import common_pb2, value_pb2, value_pb2_grpc
    from rise.serving import ClientConfig, open_channel
    from rise.tensors import to_tensor
    from rise.transport import _from_grpc

    address = address.removeprefix("grpc://")
    loop = asyncio.new_event_loop()
    channel = loop.run_until_complete(_make_channel(open_channel, ClientConfig(address=address, token=token)))
    stub = value_pb2_grpc.ValueServiceStub(channel)
    served: set[str] = set()
    pinned = [version]  # after the first reply: the version it named, so an alias moving mid-run cannot mix versions

    async def call(views, tasks):
        import grpc

        # One item per run of equal task text: a request carries frames [F, H, W, 3] per item.
        items, start = [], 0
        for end in range(1, len(tasks) + 1):
            if end == len(tasks) or tasks[end] != tasks[start]:
                items.append(value_pb2.ScoreItem(frames={v: to_tensor(np.ascontiguousarray(f[start:end])) for v, f in views.items()},
                                                 task=tasks[start]))
                start = end
        try:
            reply = await stub.Score(value_pb2.ScoreRequest(items=items, model=common_pb2.ModelRef(version=pinned[0])),
                                     timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _from_grpc(exc) from None
        served.add(reply.meta.version)
        pinned[0] = reply.meta.version
        return np.concatenate([np.asarray(r.values, np.float32) for r in reply.results])

    def score(views, tasks):
        n = len(tasks)
        parts = [loop.run_until_complete(call({v: f[a:a + batch] for v, f in views.items()}, tasks[a:a + batch]))
                 for a in range(0, n, batch)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def close():
        loop.run_until_complete(channel.close())
        loop.close()

    return score, served, close


async def _make_channel(open_channel, config):
    return open_channel(config)


def local_scorer(folder: Path, embodiment):
    """(score function, name) of a value model saved by `rise train value` (run or model folder), in-process."""
    from services.value.model import WEIGHTS_FILE, LearnedValue, load_model

    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file() and (folder / "model" / WEIGHTS_FILE).is_file():
        folder = folder / "model"  # a run folder: its trained model
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"--value {folder}: neither a value service address (host:port) nor a run or "
                                f"model folder (no {WEIGHTS_FILE})")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return LearnedValue(load_model(folder, device), embodiment, device).score, f"local:{folder.resolve()}"


# ---- labelling ------------------------------------------------------------------------------------
def plot_episode(path: Path, values: np.ndarray, advantages: np.ndarray, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    t = np.arange(len(values))
    ax.plot(t, values, label="value V_t", color="tab:blue")
    ax.plot(t, advantages, label="advantage A_t", color="tab:orange")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("frame")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def label(value: str, data: Path, out: Path, *, version: str = "", token: str = "", horizon: int = 50,
          scale: float = 5.0, bins: int = 10, embodiment: str = "metaworld", plots: bool = True,
          outcome: bool = False, log=print) -> dict:
    """Score every frame of `data`, write the labelled copy at `out`; returns a summary."""
    from lerobot.datasets.dataset_tools import add_features

    from rise.data.dataset import DatasetError, open_dataset
    from rise.data.loading import load_episodes_in_memory
    from rise.embodiment import load_embodiment

    if horizon < 1 or bins < 2 or scale <= 0:
        raise ValueError(f"need horizon >= 1, bins >= 2, scale > 0 (got {horizon}, {bins}, {scale})")
    data, out = Path(data), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new path (datasets are written once)")
    emb = load_embodiment(embodiment)
    source = open_dataset(data, emb)
    clash = [c for c in LABEL_COLUMNS if c in source.meta.features]
    if clash:
        raise DatasetError(f"{data} already has column(s) {clash}: label the unlabelled source instead")

    close = None
    if is_address(value):
        score, served, close = grpc_scorer(value, version, token)
    else:
        score, name = local_scorer(Path(value), emb)
        served = {name}
    try:
        episodes = load_episodes_in_memory(data, emb)
        tasks = [episodes.tasks[i] for i in episodes.frame_task_ids]
        values = np.zeros(len(episodes), np.float32)
        for ep in range(episodes.num_episodes):  # one episode at a time: bounded requests
            a, n = int(episodes.episode_starts[ep]), int(episodes.episode_lengths[ep])
            values[a:a + n] = score({v: episodes.views[v][a:a + n] for v in emb.views}, tasks[a:a + n])
    finally:
        if close is not None:
            close()
    if len(served) != 1:  # cannot happen with the pinning above; a guard against silently mixed labels
        raise RuntimeError(f"frames were scored by several value versions {sorted(served)}")
    value_version = next(iter(served))
    advantages = np.zeros(len(episodes), np.float32)
    for ep in range(episodes.num_episodes):
        a, n = int(episodes.episode_starts[ep]), int(episodes.episode_lengths[ep])
        advantages[a:a + n] = ((1.0 if episodes.frame_success[a] else -1.0) if outcome
                               else chunk_advantages(values[a:a + n], horizon, scale))
    labels = advantage_bins(advantages, bins)

    # The parquet rows' order (what add_features walks): map each (episode, frame) to its labels.
    meta = source.meta.episodes.with_format("numpy")[:]
    episode_ids = meta["episode_index"]  # EpisodesInMemory keeps this order
    position = {(int(episode_ids[e]), int(f)): g for g, (e, f) in enumerate(zip(episodes.frame_episode, episodes.frame_index))}
    rows = _parquet_row_keys(data)
    order = np.array([position[key] for key in rows], np.int64)
    add_features(source, {
        "value": (values[order].reshape(-1, 1), {"dtype": "float32", "shape": [1], "names": None}),
        "advantage": (advantages[order].reshape(-1, 1), {"dtype": "float32", "shape": [1], "names": None}),
        "advantage_bin": (labels[order].reshape(-1, 1), {"dtype": "int64", "shape": [1], "names": None}),
    }, output_dir=out, repo_id=f"local/{out.name}")
    stats = data / "meta" / "rise_stats.json"
    if stats.is_file():  # our normalisation statistics: the frames and actions are unchanged
        shutil.copy(stats, out / "meta" / stats.name)

    plot_paths = []
    if plots:
        (out / "plots").mkdir(exist_ok=True)
        for ep in range(episodes.num_episodes):
            a, n = int(episodes.episode_starts[ep]), int(episodes.episode_lengths[ep])
            result = "success" if episodes.frame_success[a] else "failure"
            title = f"episode {int(episode_ids[ep])} ({result}) - value {value_version}"
            plot_paths.append(str(plot_episode(out / "plots" / f"episode_{int(episode_ids[ep]):06d}.png",
                                               values[a:a + n], advantages[a:a + n], title)))
    counts = np.bincount(labels, minlength=bins + 1)[1:]
    summary = {
        "source": str(data), "out": str(out), "value_version": value_version,
        "advantage_from": "outcome" if outcome else "value", "horizon": horizon, "scale": scale,
        "bins": bins, "frames": int(len(episodes)), "episodes": int(episodes.num_episodes),
        "bin_counts": counts.tolist(), "advantage_mean": float(advantages.mean()),
        "value_mean_success": float(values[episodes.frame_success].mean()) if episodes.frame_success.any() else None,
        "value_mean_failure": float(values[~episodes.frame_success].mean()) if (~episodes.frame_success).any() else None,
        "plots": len(plot_paths),
    }
    (out / "meta" / "rise_labels.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"labelled {len(episodes)} frames of {episodes.num_episodes} episodes with value {value_version}; "
        f"bins 1..{bins}: {counts.tolist()}")
    return summary


def _parquet_row_keys(root: Path) -> list[tuple[int, int]]:
    """(episode_index, frame_index) of every row, in the order `add_features` reads the parquet files."""
    import pyarrow.parquet as pq

    keys: list[tuple[int, int]] = []
    for path in sorted((root / "data").glob("*/*.parquet")):
        table = pq.read_table(path, columns=["episode_index", "frame_index"])
        keys += list(zip(table.column("episode_index").to_pylist(), table.column("frame_index").to_pylist()))
    return keys


def register(app: typer.Typer) -> None:
    """Adds the top-level `label` command."""

    @app.command("label")
    def label_command(
        value: str = typer.Option(..., "--value", help="Value service address (host:port, grpc://host:port) "
                                  "or a local `rise train value` run / model folder."),
        data: Path = typer.Option(..., "--data", help="Source LeRobot dataset folder."),
        out: Path = typer.Option(..., "--out", help="New dataset folder (must not exist)."),
        version: str = typer.Option("", "--version", help="Served version or alias (service only; default: its default alias)."),
        token: str = typer.Option("", envvar="RISE_TOKEN", help="Bearer token for the value service."),
        horizon: int = typer.Option(50, min=1, help="K: future frames averaged per advantage (fewer near the end)."),
        scale: float = typer.Option(5.0, min=0.0, help="Advantage scale before clamping to [-1, 1]."),
        bins: int = typer.Option(10, min=2, help="Uniform advantage bins on [-1, 1]."),
        embodiment: str = typer.Option("metaworld", help="Embodiment preset or YAML path."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Per-episode value/advantage PNGs in OUT/plots."),
        outcome: bool = typer.Option(False, "--outcome", help="Advantage = the episode's real outcome (+1 success, "
                                     "-1 failure) instead of value gains: for simulated rollouts."),
    ) -> None:
        """Label a dataset with values, chunk advantages and advantage bins (a new LeRobot dataset)."""
        from rich.console import Console

        from rise.errors import RiseError

        console = Console(stderr=True)
        try:
            summary = label(value, data, out, version=version, token=token, horizon=horizon, scale=scale, bins=bins,
                            embodiment=embodiment, plots=plots, outcome=outcome, log=console.print)
        except (FileExistsError, FileNotFoundError, ValueError, RiseError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1)
        console.print_json(json.dumps(summary))
