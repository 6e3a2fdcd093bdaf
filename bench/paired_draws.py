"""Two policies evaluated on the same layouts, pooled over draws: each draw is one pair of 50-episode
evaluations (a table's own evaluation, or `bench/judge_planning.py --groups 1` under another noise
seed), grouped by what the draws share (a training seed). Prints a Markdown table: every draw, each
group pooled, all pooled, with the layouts only one policy solved and the exact sign test on them.

    .venv/bin/python bench/paired_draws.py --names RECAP,RISE \\
        "seed 0=bench/paper_table_x_seed0.json:peg-insert-side/eval-recap,bench/paper_table_x_seed0.json:peg-insert-side/eval-rise-oracle" \\
        "seed 0=bench/judge_planning_x_recap_seed1.json,bench/judge_planning_x_rise_seed1.json"

A source is `FILE:STAGE` for a `paper_table.py` state file (the stage's `per_episode`) or `FILE[:ARM]`
for a `judge_planning.py` output (the arm of that group size; the only arm when there is one).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from rise.sim.stats import discordant_pairs, format_rate, sign_test

app = typer.Typer(add_completion=False)


def per_episode(source: str) -> list[dict]:
    """One evaluation's per-episode results ({"seed": layout, "success": bool}) from `FILE[:KEY]`."""
    path, _, key = source.partition(":")
    data = json.loads(Path(path).read_text())
    if "arms" in data:  # judge_planning.py: one arm per group size
        if not key and len(data["arms"]) != 1:
            raise ValueError(f"{path} has arms {sorted(data['arms'])}: name one as {path}:<arm>")
        results = data["arms"][key or next(iter(data["arms"]))]
    elif key in data:  # paper_table.py state: one entry per stage
        results = data[key]
    else:
        raise ValueError(f"{path} has no {key!r}: name a stage of " + ", ".join(k for k in data if "/eval-" in k))
    if "per_episode" not in results:
        raise ValueError(f"{source} holds no per-episode results")
    return results["per_episode"]


def pooled_row(label: str, pairs: list[tuple[list[dict], list[dict]]]) -> str:
    """One Markdown row: each policy's successes over the pairs' shared layouts, the discordant
    layouts summed over the pairs, and the sign test on them."""
    episodes = wins_a = wins_b = 0
    for a, b in pairs:
        shared = {e["seed"] for e in a} & {e["seed"] for e in b}  # as discordant_pairs counts them
        episodes += len(shared)
        wins_a += sum(e["success"] for e in a if e["seed"] in shared)
        wins_b += sum(e["success"] for e in b if e["seed"] in shared)
    only_a, only_b = map(sum, zip(*(discordant_pairs(a, b) for a, b in pairs)))
    return (f"| {label} | {format_rate(wins_a, episodes)} | {format_rate(wins_b, episodes)} | "
            f"{only_a} / {only_b} ({sign_test(only_a, only_b):.2g}) |")


def paired_table(names: tuple[str, str], draws: list[tuple[str, list[dict], list[dict]]]) -> str:
    groups: dict[str, list] = {}
    for group, a, b in draws:
        groups.setdefault(group, []).append((a, b))
    lines = [f"| draw | {names[0]} | {names[1]} | {names[0]} only / {names[1]} only (p) |", "| --- | --- | --- | --- |"]
    for group, pairs in groups.items():
        lines += [pooled_row(f"{group}, draw {i + 1}", [pair]) for i, pair in enumerate(pairs)]
    if len(groups) > 1:
        lines += [pooled_row(f"**{group}, {len(pairs)} draws**", pairs) for group, pairs in groups.items()
                  if len(pairs) > 1]
    if len(draws) > 1:
        lines.append(pooled_row(f"**all, {len(draws)} draws**", [(a, b) for _, a, b in draws]))
    return "\n".join(lines)


@app.command()
def main(pairs: list[str] = typer.Argument(..., help="GROUP=SOURCE_A,SOURCE_B per draw, sources as FILE[:KEY]."),
         names: str = typer.Option("A,B", help="The two policies' names, comma-separated.")) -> None:
    draws = []
    for pair in pairs:
        group, sep, sources = pair.rpartition("=")
        a, comma, b = sources.partition(",")
        if not (sep and comma):
            raise typer.BadParameter(f"{pair!r}: expected GROUP=SOURCE_A,SOURCE_B")
        try:
            draws.append((group, per_episode(a), per_episode(b)))
        except (OSError, ValueError, KeyError) as error:
            raise typer.BadParameter(f"{pair!r}: {error}") from error
    first, _, second = names.partition(",")
    print(paired_table((first, second or "B"), draws))


if __name__ == "__main__":
    app()
