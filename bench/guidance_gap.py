"""How far apart a policy's prompted (bin 10) and unprompted (null bin) action chunks are.

Classifier-free guidance at scale w samples along v_null + w (v_bin - v_null): the wider the gap
between a policy's bin-10 and null predictions, the further a given w pushes it. This measures the
gap on real frames: for each frame, the same noise is sampled with bin 10 and with the null bin
(plain conditioning, Euler steps as served) and the chunks' mean absolute difference is reported,
in the embodiment's action units, per policy version.

    .venv/bin/python bench/guidance_gap.py --store runs/table-peg-insert-side/peg-insert-side/store \
        --version v0002 --version v0008 --data runs/table-peg-insert-side/peg-insert-side/eval-recap \
        --out bench/guidance_gap_peg_insert_side.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

app = typer.Typer(add_completion=False)


@app.command()
def main(store: Path = typer.Option(..., help="Registry root holding the policy versions."),
         version: list[str] = typer.Option(..., "--version", help="Policy version id or alias (repeat)."),
         data: Path = typer.Option(..., help="LeRobot dataset whose frames are the inputs."),
         frames: int = typer.Option(200, help="Frames, spread evenly over the dataset."),
         batch: int = typer.Option(25), out: Path = typer.Option(..., help="JSON to write.")) -> None:
    from rise.data.loading import load_episodes_in_memory
    from rise.embodiment import PRESETS
    from rise.registry import Registry
    from services.policy.model import load

    emb = PRESETS["metaworld"]
    episodes = load_episodes_in_memory(data, emb)
    picks = np.linspace(0, len(episodes) - 1, frames).astype(int)
    tasks = [episodes.tasks[i] for i in episodes.frame_task_ids[picks]]
    results = {}
    for v in version:
        policy = load(Registry(store).open("policy", v), emb)  # resolved and verified as the service does
        gaps = []
        for a in range(0, frames, batch):
            idx = picks[a:a + batch]
            views = {name: episodes.views[name][idx] for name in emb.views}
            chunks = {b: policy.act(views, episodes.states[idx], tasks[a:a + batch], np.full(len(idx), b), seed=a,
                                    guidance_scale=1.0) for b in (0, 10)}
            gaps.append(np.abs(chunks[10] - chunks[0]).mean(axis=(1, 2)))
        gap = np.concatenate(gaps)
        results[v] = {"mean_abs_gap": float(gap.mean()), "median": float(np.median(gap)),
                      "p90": float(np.quantile(gap, 0.9)), "frames": int(len(gap))}
        print(v, json.dumps(results[v]))
    out.write_text(json.dumps({"store": str(store), "data": str(data), "versions": results}, indent=2) + "\n")


if __name__ == "__main__":
    app()
