"""How far apart a policy's prompted (bin 10) and unprompted (null bin) action chunks are.

Classifier-free guidance at scale w samples along v_null + w (v_bin - v_null): the wider the gap
between a policy's bin-10 and null predictions, the further a given w pushes it. This measures the
gap on real frames: for each frame, the same noise is sampled with bin 10 and with the null bin
(plain conditioning, Euler steps as served) and the chunks' mean absolute difference is reported,
in the embodiment's action units, per policy version.

    .venv/bin/python bench/guidance_gap.py --store runs/table-peg-insert-side/peg-insert-side/store \
        --version v0002 --version v0008 --data runs/table-peg-insert-side/peg-insert-side/eval-recap \
        --out bench/guidance_gap_peg_insert_side.json

`--against <version>` also measures how far each version's bin-10 chunks moved from that version's
(e.g. a RISE policy from its RECAP start) on the same frames and noise, beside the spread of that
version's own chunks under two noise draws: a move well inside the spread changes little an
evaluation could see.

`--state-lag 8` also measures how far each version's bin-10 chunks move when it reads the robot state
of 8 control ticks earlier in the same episode (what a chained imagined chunk read before
`rollout.chained_state`: the images one chunk on, the hand where the chunk started), same frames and noise.
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
         batch: int = typer.Option(25), out: Path = typer.Option(..., help="JSON to write."),
         against: str = typer.Option("", help="Also each version's bin-10 distance from this version's "
                                              "(same frames and noise), and this version's own noise spread."),
         state_lag: int = typer.Option(0, help="Also each version's shift when it reads the robot state of this "
                                                "many ticks earlier in the episode (0 = not measured).")) -> None:
    from rise.data.loading import load_episodes_in_memory
    from rise.embodiment import PRESETS
    from rise.registry import Registry
    from services.policy.model import load

    emb = PRESETS["metaworld"]
    episodes = load_episodes_in_memory(data, emb)
    picks = np.linspace(0, len(episodes) - 1, frames).astype(int)
    tasks = [episodes.tasks[i] for i in episodes.frame_task_ids[picks]]

    # The frame `state_lag` ticks earlier in each picked frame's episode (its first frame at most).
    lagged = np.maximum(picks - state_lag, episodes.episode_starts[episodes.frame_episode[picks]])

    def chunks(policy, bin_: int, noise_offset: int = 0, state_rows: np.ndarray = picks) -> np.ndarray:
        """The policy's chunks [frames, T, D] for every picked frame, prompted with `bin_`, reading the robot
        state of `state_rows`; noise seeds batch by batch."""
        parts = []
        for a in range(0, frames, batch):
            idx = picks[a:a + batch]
            views = {name: episodes.views[name][idx] for name in emb.views}
            parts.append(policy.act(views, episodes.states[state_rows[a:a + batch]], tasks[a:a + batch],
                                  np.full(len(idx), bin_), seed=a + noise_offset, guidance_scale=1.0))
        return np.concatenate(parts)

    def summary(diff: np.ndarray) -> dict:
        per_frame = np.abs(diff).mean(axis=(1, 2))
        return {"mean_abs": float(per_frame.mean()), "median": float(np.median(per_frame)),
                "p90": float(np.quantile(per_frame, 0.9)), "frames": int(len(per_frame))}

    registry = Registry(store)

    def opened(v: str):  # each version loaded once, resolved and verified as the service does
        return load(registry.open("policy", v), emb)

    against_policy = opened(against) if against else None
    reference = chunks(against_policy, 10) if against else None
    results = {}
    for v in version:
        policy = opened(v)
        prompted = chunks(policy, 10)
        gap = summary(prompted - chunks(policy, 0))
        results[v] = {"mean_abs_gap": gap.pop("mean_abs"), **gap}  # (the key earlier reports used)
        if reference is not None:
            results[v]["shift_from_" + against] = summary(prompted - reference)
        if state_lag:
            results[v][f"shift_reading_the_state_{state_lag}_ticks_earlier"] = summary(
                chunks(policy, 10, state_rows=lagged) - prompted)
        print(v, json.dumps(results[v]))
    report = {"store": str(store), "data": str(data), "versions": results}
    if reference is not None:  # the same version, the same frames, other noise: how much chunks differ by chance
        report["noise_spread_" + against] = summary(chunks(against_policy, 10, noise_offset=1_000_000) - reference)
        print(f"{against} under two noise draws", json.dumps(report["noise_spread_" + against]))
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    app()
