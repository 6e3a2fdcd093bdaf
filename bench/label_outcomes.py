"""Do a labelled dataset's advantage bins follow the episodes' real outcomes?

RECAP (and RISE) train the policy to produce a chunk under its advantage bin and then prompt the best
bin: what the policy learns from "bin 10" is whatever the bin-10 frames have in common. This reads
datasets written by `rise label` and reports, per dataset, the bins of frames from successful and
from failed episodes, and which share of the bin-10 frames comes from successful episodes.

    .venv/bin/python bench/label_outcomes.py runs/table-push/push/data-labelled runs/table-push/push/rollouts-recap-labelled \\
        --names "expert data,RECAP rollouts" --out bench/label_outcomes_push.json

Writes the JSON and a PNG (bin histograms by outcome) next to it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

app = typer.Typer(add_completion=False)


def read_labels(root: Path) -> dict[str, np.ndarray]:
    """Per frame: episode, success (the episode's outcome), advantage and bin, from the parquet files."""
    import pyarrow.parquet as pq

    files = sorted((root / "data").glob("*/*.parquet"))
    if not files:
        raise typer.BadParameter(f"{root} holds no LeRobot parquet files")
    table = pq.read_table(files, columns=["episode_index", "success", "advantage", "advantage_bin"])
    columns = {name: np.asarray(table.column(name).to_pylist()).reshape(len(table)) for name in table.column_names}
    episode = columns["episode_index"]
    # An episode's outcome: success anywhere in it (frames before the success carry it too in our data).
    succeeded = {e: bool(columns["success"][episode == e].any()) for e in np.unique(episode)}
    return {"episode": episode, "episode_success": np.array([succeeded[e] for e in episode]),
            "advantage": columns["advantage"].astype(np.float32), "bin": columns["advantage_bin"].astype(np.int64)}


def outcome_stats(labels: dict[str, np.ndarray], bins: int = 10) -> dict:
    ok, adv, b = labels["episode_success"], labels["advantage"], labels["bin"]
    top = b == bins
    per = {}
    for name, mask in (("success", ok), ("failure", ~ok)):
        per[name] = {"episodes": int(len(np.unique(labels["episode"][mask]))), "frames": int(mask.sum()),
                     "advantage_mean": float(adv[mask].mean()) if mask.any() else None,
                     "bin_mean": float(b[mask].mean()) if mask.any() else None,
                     "share_top_bin": float(np.mean(b[mask] == bins)) if mask.any() else None,
                     "bin_counts": np.bincount(b[mask], minlength=bins + 1)[1:].tolist()}
    return {**per, "top_bin_frames": int(top.sum()),
            "top_bin_from_successes": float(ok[top].mean()) if top.any() else None,
            "frames_from_successes": float(ok.mean())}


@app.command()
def main(
    datasets: list[Path] = typer.Argument(..., help="Datasets written by `rise label`."),
    names: str = typer.Option("", help="Comma-separated display names (default: folder names)."),
    out: Path = typer.Option(Path("bench/label_outcomes.json")),
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rich.console import Console
    from rich.table import Table

    titles = names.split(",") if names else [d.name for d in datasets]
    if len(titles) != len(datasets):
        raise typer.BadParameter(f"{len(titles)} names for {len(datasets)} datasets")
    results = {t: {"dataset": str(d), **outcome_stats(read_labels(d))} for t, d in zip(titles, datasets)}

    table = Table(title="advantage bins by episode outcome")
    for col in ("dataset", "episodes ok/failed", "mean bin ok/failed", "bin 10 share ok/failed", "bin-10 frames from successes"):
        table.add_column(col)
    for t, r in results.items():
        s, f = r["success"], r["failure"]
        fmt = lambda v, p=".2f": "-" if v is None else format(v, p)  # noqa: E731
        table.add_row(t, f"{s['episodes']}/{f['episodes']}", f"{fmt(s['bin_mean'])} / {fmt(f['bin_mean'])}",
                      f"{fmt(s['share_top_bin'], '.3f')} / {fmt(f['share_top_bin'], '.3f')}",
                      f"{fmt(r['top_bin_from_successes'], '.2f')} (all frames {r['frames_from_successes']:.2f})")
    Console().print(table)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
    for ax, (t, r) in zip(axes[0], results.items()):
        x = np.arange(1, 11)
        for name, offset in (("success", -0.2), ("failure", 0.2)):
            ax.bar(x + offset, r[name]["bin_counts"], width=0.4, label=f"{name} episodes ({r[name]['episodes']})")
        ax.set_title(f"{t}: bin-10 frames {r['top_bin_from_successes']:.0%} from successes")
        ax.set_xlabel("advantage bin (10 = best)")
        ax.set_ylabel("frames")
        ax.set_xticks(x)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    app()
