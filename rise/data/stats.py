"""Dataset statistics (`rise data stats`) and the action normaliser every model builds from them.

`<dataset>/meta/rise_stats.json`:
    {"version": 1, "quantiles": [0.01, 0.99], "num_episodes": E, "num_frames": N,
     "features": {
        "observation.state" | "action": {"names", "min", "max", "mean", "std", "q01", "q99", "count"}
            per dimension, over every frame (read from the parquet data; no video is decoded);
        "observation.images.<view>": the same per RGB channel, pixel values in [0, 1] (the scale
            LeRobot hands images to models in), over frames sampled evenly across the dataset}}

Images are sampled because decoding every frame of every view costs minutes per hour of
data, while channel statistics settle after a few hundred frames (each holds ~50k pixels).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

STATS_FILE = "rise_stats.json"
STATS_VERSION = 1
DEFAULT_QUANTILES = (0.01, 0.99)
IMAGE_SAMPLE_FRAMES = 256  # per view, spread evenly over all frames of the dataset
VECTOR_FEATURES = ("observation.state", "action")


def quantile_key(q: float) -> str:
    """0.01 -> 'q01', 0.99 -> 'q99', 0.995 -> 'q99.5' (LeRobot's naming, extended to fractions)."""
    text = f"{round(q * 100, 6):g}"
    return f"q{'0' if q < 0.1 else ''}{text}"


def parse_quantiles(text: str) -> tuple[float, ...]:
    from rise.data.dataset import DatasetError

    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise DatasetError(f"--quantiles must be comma-separated numbers in (0, 1), got {text!r}") from exc
    if not values or any(not 0 < q < 1 for q in values):
        raise DatasetError(f"--quantiles must be comma-separated numbers in (0, 1), got {text!r}")
    return tuple(sorted(set(values)))


def stats_path(root: str | Path) -> Path:
    return Path(root) / "meta" / STATS_FILE


def _vector_stats(values, quantiles: tuple[float, ...]) -> dict[str, Any]:
    import numpy as np

    values = np.asarray(values, np.float64)
    stats = {"min": values.min(0), "max": values.max(0), "mean": values.mean(0), "std": values.std(0)}
    for q, row in zip(quantiles, np.quantile(values, quantiles, axis=0)):
        stats[quantile_key(q)] = row
    return {k: v.tolist() for k, v in stats.items()} | {"count": len(values)}


def _histogram_stats(histograms, quantiles: tuple[float, ...]) -> dict[str, Any]:
    """Per-channel uint8 histograms [3, 256] -> exact statistics in [0, 1] (quantiles: nearest value)."""
    import numpy as np

    levels = np.arange(256, dtype=np.float64)
    count = histograms.sum(1)
    mean = histograms @ levels / count
    std = np.sqrt(histograms @ levels**2 / count - mean**2).clip(0)
    cumulative = histograms.cumsum(1)
    stats = {"min": [np.flatnonzero(h)[0] for h in histograms], "max": [np.flatnonzero(h)[-1] for h in histograms],
             "mean": mean, "std": std}
    for q in quantiles:
        stats[quantile_key(q)] = [np.searchsorted(c, q * c[-1]) for c in cumulative]
    return {k: (np.asarray(v, np.float64) / 255).tolist() for k, v in stats.items()}


def compute_stats(root: str | Path, quantiles: tuple[float, ...] = DEFAULT_QUANTILES,
                  image_frames: int = IMAGE_SAMPLE_FRAMES, show_progress: bool = False) -> dict[str, Any]:
    """Statistics of the dataset at `root` (see the module docstring); raises DatasetError if absent."""
    import numpy as np
    from lerobot.datasets.video_utils import decode_video_frames
    from rich.progress import Progress

    from rise.data.dataset import VIDEO_BACKEND, open_dataset

    dataset = open_dataset(root)
    table = dataset.hf_dataset.with_format("numpy")
    stats: dict[str, Any] = {"version": STATS_VERSION, "quantiles": list(quantiles),
                             "num_episodes": dataset.num_episodes, "num_frames": dataset.num_frames, "features": {}}
    for key in VECTOR_FEATURES:
        names = dataset.features[key].get("names")
        stats["features"][key] = {"names": names} | _vector_stats(np.stack(table[key]), quantiles)

    episodes, timestamps = np.asarray(table["episode_index"]), np.asarray(table["timestamp"], np.float64)
    picked = np.unique(np.linspace(0, len(episodes) - 1, min(image_frames, len(episodes))).round().astype(int))
    video_keys = dataset.meta.video_keys
    with Progress(disable=not show_progress) as progress:
        bar = progress.add_task("sampling video frames", total=len(video_keys) * len(picked))
        for key in video_keys:
            histograms = np.zeros((3, 256), np.int64)
            for episode in np.unique(episodes[picked]):
                rows = picked[episodes[picked] == episode]
                start = dataset.meta.episodes[int(episode)][f"videos/{key}/from_timestamp"]
                frames = decode_video_frames(dataset.root / dataset.meta.get_video_file_path(int(episode), key),
                                             [float(start + t) for t in timestamps[rows]], dataset.tolerance_s,
                                             VIDEO_BACKEND, return_uint8=True).numpy()  # [n, 3, H, W]
                for channel in range(3):
                    histograms[channel] += np.bincount(frames[:, channel].ravel(), minlength=256)
                progress.advance(bar, len(rows))
            stats["features"][key] = {"names": ["red", "green", "blue"]} | _histogram_stats(histograms, quantiles) \
                | {"count": len(picked)}
    return stats


def save_stats(root: str | Path, stats: dict[str, Any]) -> Path:
    path = stats_path(root)
    path.write_text(json.dumps(stats, indent=2) + "\n")
    return path


def load_stats(root: str | Path) -> dict[str, Any]:
    """The dataset's saved statistics; computed and saved first if absent."""
    from rise.data.dataset import DatasetError

    root = Path(root)
    if not (root / "meta" / "info.json").is_file():
        raise DatasetError(f"no LeRobot dataset at {root}: {root / 'meta' / 'info.json'} is missing, so it has no "
                           "statistics")
    path = stats_path(root)
    if not path.is_file():
        stats = compute_stats(root)
        save_stats(root, stats)
        return stats
    try:
        stats = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc}); rerun `rise data stats {root}`") from exc
    if stats.get("version") != STATS_VERSION:
        raise DatasetError(f"{path} has version {stats.get('version')!r}, expected {STATS_VERSION}; rerun "
                           f"`rise data stats {root}`")
    return stats


class ActionNormalizer:
    """Per-dimension affine map of actions to [-1, 1] and back; works on numpy arrays and torch tensors.

    mode "min_max": the dataset's min/max (the reference's action_norm.json): training data lands
    exactly in [-1, 1]. mode "quantile": q01/q99 as LeRobot's QUANTILES and pi0 use: robust to rare
    outliers, which then land beyond [-1, 1] (not clipped, so unnormalize inverts exactly).
    A constant dimension (low == high) maps to 0 and back to its constant, never divides by zero.
    """

    MODES = {"min_max": ("min", "max"), "quantile": ("q01", "q99")}

    def __init__(self, low, high, mode: str = "min_max"):
        import numpy as np

        low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
        if low.ndim != 1 or low.shape != high.shape:
            raise ValueError(f"low and high must be 1-D of one length, got shapes {low.shape} and {high.shape}")
        if np.any(high < low):
            raise ValueError(f"high < low in dimension(s) {np.flatnonzero(high < low).tolist()}")
        self.low, self.high, self.mode = low, high, mode
        span = high - low
        self.constant = span <= 1e-8 * np.maximum(1.0, np.abs(low))
        self._center = (low + high) / 2
        self._half_span = np.where(self.constant, 0.0, span / 2)
        self._inverse_half_span = np.where(self.constant, 0.0, 1 / np.where(self.constant, 1.0, span / 2))

    @classmethod
    def from_stats(cls, stats: dict[str, Any], mode: str = "min_max", feature: str = "action") -> "ActionNormalizer":
        if mode not in cls.MODES:
            raise ValueError(f"unknown normalisation mode {mode!r}; use one of {sorted(cls.MODES)}")
        entry = stats.get("features", {}).get(feature)
        if entry is None:
            raise ValueError(f"statistics have no feature {feature!r}; they have {sorted(stats.get('features', {}))}")
        low_key, high_key = cls.MODES[mode]
        if low_key not in entry or high_key not in entry:
            raise ValueError(f"statistics of {feature!r} lack {low_key}/{high_key}: recompute them with "
                             "`rise data stats PATH --quantiles 0.01,0.99`")
        return cls(entry[low_key], entry[high_key], mode)

    @property
    def dim(self) -> int:
        return len(self.low)

    def _prepare(self, x):
        """x and the map's parameters in x's kind (numpy or torch), dtype and device."""
        import numpy as np

        params = (self._center, self._half_span, self._inverse_half_span)
        if hasattr(x, "new_tensor"):  # a torch tensor: no torch import needed here
            x = x if x.is_floating_point() else x.float()
            params = tuple(x.new_tensor(p) for p in params)
        else:
            x = np.asarray(x)
            x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
            params = tuple(p.astype(x.dtype) for p in params)
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected actions [..., {self.dim}], got shape {list(x.shape)}")
        return x, params

    def normalize(self, actions):
        x, (center, _, inverse_half_span) = self._prepare(actions)
        return (x - center) * inverse_half_span

    def unnormalize(self, normalized):
        y, (center, half_span, _) = self._prepare(normalized)
        return y * half_span + center

    def to_dict(self) -> dict[str, Any]:
        """What a model version stores, so it normalises as it was trained without the dataset at hand."""
        return {"mode": self.mode, "low": self.low.tolist(), "high": self.high.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ActionNormalizer":
        return cls(data["low"], data["high"], data.get("mode", "min_max"))


def register(data_app: typer.Typer) -> None:
    @data_app.command("stats")
    def stats_command(
        path: Path = typer.Argument(..., help="Dataset folder."),
        quantiles: str = typer.Option(",".join(map(str, DEFAULT_QUANTILES)), help="Quantiles to record, e.g. 0.01,0.99."),
        image_frames: int = typer.Option(IMAGE_SAMPLE_FRAMES, min=1, help="Frames sampled per view for image stats."),
    ) -> None:
        """Compute statistics (min/max/mean/std/quantiles) and write <dataset>/meta/rise_stats.json."""
        from rich.console import Console
        from rich.table import Table

        from rise.data.dataset import DatasetError

        try:
            stats = compute_stats(path, parse_quantiles(quantiles), image_frames, show_progress=True)
        except DatasetError as exc:
            Console(stderr=True).print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1)
        saved = save_stats(path, stats)
        qkeys = [quantile_key(q) for q in stats["quantiles"]]
        for key, entry in stats["features"].items():
            table = Table(*["entry", "min", "max", "mean", "std", *qkeys], title=f"{key} ({entry['count']} frames)")
            for i, name in enumerate(entry.get("names") or range(len(entry["min"]))):
                table.add_row(str(name), *(f"{entry[k][i]:.4g}" for k in ["min", "max", "mean", "std", *qkeys]))
            Console().print(table)
        typer.echo(f"wrote {saved}")
