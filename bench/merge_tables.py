"""One success table from `bench/paper_table.py` runs made apart: other tasks, or other training
seeds, run side by side (one per core) or on other machines.

    .venv/bin/python bench/merge_tables.py runs/table-push-seed1/state.json runs/table-push-seed2/state.json \\
        --out runs/table-push-seeds

Every input's stages keep their results; a stage of a seed that is not the merged table's first
moves to `<task>/seed<N>/<stage>`, where `paper_table.py --seeds` keeps it. Inputs must share
the config that shapes the stages (data, steps, evaluation layouts); what each ran (methods,
sweeps, curves) is united. Writes `<out>/state.json` and the table and plots `paper_table.py` writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer

from paper_table import LEGACY_CONFIG, METHODS, State, stage_config, stage_key, write_table

app = typer.Typer(add_completion=False)
KEY = re.compile(r"^(?P<task>[^/]+)/(?:seed(?P<seed>\d+)/)?(?P<stage>[^/]+)$")


def merge_states(states: list[dict]) -> dict:
    """The inputs' `state.json` contents as one; raises ValueError on a config mismatch or a stage
    two inputs both hold."""
    configs = [{**LEGACY_CONFIG, **s["config"]} for s in states]
    for config in configs[1:]:  # every key that shapes the stages but the seeds, which are what differs
        if (diff := sorted(k for k in stage_config(config).keys() | stage_config(configs[0]).keys()
                           if k != "seeds" and config.get(k) != configs[0].get(k))):
            raise ValueError(f"the tables were run with other configs: {', '.join(diff)} differ "
                             f"({ {k: configs[0].get(k) for k in diff} } vs { {k: config.get(k) for k in diff} })")
    seeds = list(dict.fromkeys(seed for c in configs for seed in c["seeds"]))
    merged_methods = {m for c in configs for m in c["methods"]}
    config = {**configs[0], "seeds": seeds,
              "methods": [m for m in METHODS if m in merged_methods],
              "offline_ratios": sorted({r for c in configs for r in c["offline_ratios"]}),
              "guidance_scales": sorted({g for c in configs for g in c["guidance_scales"]}),
              "curve_episodes": max(c["curve_episodes"] for c in configs)}
    merged = {"config": config}
    for state, own in zip(states, configs):
        for key, value in state.items():
            if key == "config":
                continue
            if not (match := KEY.match(key)):
                raise ValueError(f"unexpected stage key {key!r}")
            task, stage = match["task"], match["stage"]
            seed = int(match["seed"]) if match["seed"] else own["seeds"][0]
            if stage == "collect":  # one dataset per task, whatever the seed
                merged.setdefault(f"{task}/collect", value)
                continue
            target = stage_key(task, seed, seeds, stage)
            if target in merged:
                raise ValueError(f"two tables hold {target} (seed {seed}): merge tables of other seeds or tasks")
            merged[target] = value
    return merged


@app.command()
def main(states: list[Path] = typer.Argument(..., help="The tables' state.json files; the first seed listed leads."),
         out: Path = typer.Option(..., help="Folder for the merged state.json, table.md/json and plots.")) -> None:
    try:
        merged = merge_states([json.loads(p.read_text()) for p in states])
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    out.mkdir(parents=True, exist_ok=True)
    (out / "state.json").write_text(json.dumps(merged, indent=2) + "\n")
    state = State(out / "state.json")
    tasks = list(dict.fromkeys(KEY.match(k)["task"] for k in merged if k != "config"))
    print(write_table(out, tasks, state, merged["config"]))


if __name__ == "__main__":
    app()
