"""Does looking further ahead make imagined advantages rank chunks by what they lead to? (issue 7)

RISE scores a proposed chunk by the value gain its imagined frames show. On push, one 8-tick chunk
moves the value little: the policy's chunks from one start differ in gain by a quarter of the
spread between starts, and RL on those rankings did not beat the RECAP policy, even with the
simulator as the world model. `rollout.lookahead_chunks` lets the policy go on in imagination
for D more chunks before scoring. This measures, with the simulator as the world model (so
world-model error is out of the picture), whether rankings at depth D predict the real outcome:

    the trainer's own rollout round (Rollouts, lookahead D_max, groups of G chunks per start,
    the simulator as dynamics, the value service)    -> value gain of each chunk at depth 0..D_max
    for each chunk, in the simulator: restore the start, run the chunk, then the same policy
    (prompted bin 10, noise shared by the group: a group's futures differ only by its first
    chunk) until success or the episode's 200 steps, K times with different noise
                                                         -> the chunk's success rate

and reports whether the first chunk changes success at all (a permutation test that keeps the
shared-noise pairing of the K runs), and per depth: within-start / between-start spread of the
gains, the correlation of the group-relative advantage with the group-relative outcome and its
permutation p, and the success of the chunk each depth ranks best vs worst in groups whose chunks
did not all end alike.

    .venv/bin/python bench/lookahead_signal.py --store runs/table-push/push/store \
        --data runs/table-push/push/data --task push --policy v0002 --value v0001 --continuations 4

Writes bench/lookahead_signal.json, .png and .npz (the rows: starts, chunks, values, outcomes).
Afterwards, without the simulator: --from-saved (summary again), --pool (runs on other starts as
one), --compare (runs side by side in one plot); --outcomes-from reuses a run's outcomes to score
the same chunks with another value model.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, ServiceProcesses, machine, pearson  # noqa: E402


ROW_KEYS = ("sim_state", "actions", "value_current", "value_imagined")  # one per proposed chunk, saved in the .npz


async def imagined_gains(urls: dict, registry, data: Path, policy: str, value: str, oracle: str, starts: int,
                         group: int, lookahead: int, workers: int, seed: int) -> dict:
    """The trainer's rollout rounds (first chunks from real starts only) -> per row: the start's
    simulator state, the proposed chunk, the value now and at every imagined frame."""
    from rise.data.loading import load_episodes_in_memory
    from rise.embodiment import PRESETS
    from services.trainer.config import RolloutConfig, ServicesConfig
    from services.trainer.replay import decode_sample
    from services.trainer.rollout import Rollouts, dynamics_shape, open_clients, start_states

    emb = PRESETS["metaworld"]
    begin = start_states(load_episodes_in_memory([data], emb), dynamics_shape(registry, oracle, emb.chunk_length))
    config = RolloutConfig(workers=workers, group_size=group, max_chain=1, lookahead_chunks=lookahead,
                           policy_version=policy, dynamics_version=oracle, value_version=value)
    services = ServicesConfig(policy=urls["policy"], value=urls["value"], dynamics=urls["dynamics"], timeout_s=600)
    clients = await open_clients(services)
    rows = {k: [] for k in ROW_KEYS}
    try:
        rollouts = Rollouts(config, services, clients, begin, "lookahead-signal", seed=seed, log=lambda *a: None)
        while len(rows["actions"]) < starts * group:
            sim_states = [w.sim_state.copy() for w in rollouts.workers]  # max_chain 1: every round starts anew
            for sample, sim_state in zip(map(decode_sample, await rollouts.round(frame_encoding="raw")), sim_states):
                rows["sim_state"].append(sim_state)
                rows["actions"].append(sample.actions)
                rows["value_current"].append(sample.value_current)
                rows["value_imagined"].append(sample.value_imagined)
            print(f"  imagined {len(rows['actions'])}/{starts * group} chunks", file=sys.stderr)
    finally:
        for client in clients:
            await client.close()
    return {k: np.stack(v)[:starts * group] for k, v in rows.items()}


async def outcomes(url: str, task: str, rows: dict, policy: str, group: int, max_steps: int, seed: int,
                   batch_groups: int = 8) -> np.ndarray:
    """Each row's chunk run in the simulator from its start, then the policy until success or
    `max_steps` -> success [rows] (bool). A group's continuations share their noise (act_groups)."""
    from rise.embodiment import PRESETS
    from rise.sim.metaworld_sim import MetaWorldSim, task_text
    from rise.transport import connect_policy
    from services.trainer.rollout import act_groups

    emb = PRESETS["metaworld"]
    sim = MetaWorldSim(task, emb, max_steps=max_steps)
    text = task_text(task)
    n = len(rows["actions"])
    states, frames, success, done = list(rows["sim_state"]), [None] * n, np.zeros(n, bool), np.zeros(n, bool)

    def run(i: int, actions: np.ndarray) -> None:  # row i: restore, step, keep the last frame and state
        frame = sim.set_state(states[i], render=False)
        if sim.done:  # a start at the episode's last step: nothing left to run
            frame.views = frame.views or sim.render()
        for k, action in enumerate([] if sim.done else actions):
            frame = sim.step(np.clip(action, -1.0, 1.0), render=k == len(actions) - 1 or sim.steps + 1 >= max_steps)
            if frame.success or sim.done:
                if not frame.views:
                    frame.views = sim.render()
                break
        frames[i], states[i], success[i], done[i] = frame, sim.get_state(), frame.success, frame.success or sim.done

    for i in range(n):
        run(i, rows["actions"][i])
    async with connect_policy(url) as pol:
        decision = 0
        while not done.all():
            decision += 1
            for first in range(0, n, batch_groups * group):  # whole groups per call, so each shares a noise
                rows_ = range(first, min(n, first + batch_groups * group))
                if done[first:rows_.stop].all():
                    continue
                views = {v: np.stack([frames[i].views[v] for i in rows_]) for v in emb.views}
                chunk = await act_groups(pol, views, np.stack([frames[i].state for i in rows_]), [text] * len(rows_),
                                         [10] * len(rows_), 0, seed * 1000 + decision, group, version=policy,
                                         timeout_s=600)
                for j, i in enumerate(rows_):
                    if not done[i]:
                        run(i, chunk.actions[j])
            print(f"  outcomes: decision {decision}, {int(done.sum())}/{n} ended, {int(success.sum())} successes",
                  file=sys.stderr)
    sim.close()
    return success


def ranking_p(adv: np.ndarray, relative_outcome: np.ndarray, group: int, permutations: int = 20000,
              seed: int = 0) -> float:
    """One-sided p of "the advantages rank a start's chunks no better than chance": their Pearson r
    with the group-relative outcomes against r after shuffling the advantages among each start's chunks."""
    rng = np.random.default_rng(seed)
    adv = adv.reshape(-1, group)
    y = relative_outcome - relative_outcome.mean()
    observed = pearson(adv.reshape(-1), relative_outcome)
    if np.isnan(observed):
        return float("nan")
    shuffled = np.stack([rng.permuted(adv, axis=1).reshape(-1) for _ in range(permutations)])
    shuffled = shuffled - shuffled.mean(axis=1, keepdims=True)
    null = shuffled @ y / (np.linalg.norm(shuffled, axis=1) * np.linalg.norm(y))
    return float((1 + (null >= observed - 1e-12).sum()) / (1 + permutations))


def by_depth(rows: dict, success: np.ndarray, group: int, frames_per_chunk: int, lookahead: int) -> list[dict]:
    """Per depth d: what the trainer's advantage with lookahead d says, against the outcomes
    (success [K, rows]: each chunk's success over K continuations)."""
    from services.trainer.rollout import advantage

    outcome = success.mean(axis=0).reshape(-1, group)  # each chunk's success rate
    mixed = outcome.std(axis=1) > 0  # groups whose chunks did not all end alike: the choice mattered
    relative_outcome = (outcome - outcome.mean(axis=1, keepdims=True)).reshape(-1)
    pick = lambda which: float(outcome[mixed, which[mixed]].mean()) if mixed.any() else float("nan")  # noqa: E731
    result = []
    for d in range(lookahead + 1):
        imagined = rows["value_imagined"][:, :frames_per_chunk * (d + 1)]
        gain = (imagined - rows["value_current"][:, None]).mean(axis=1).reshape(-1, group)
        adv, _ = advantage(rows["value_current"], imagined, 5.0, group)
        best, worst = gain.argmax(axis=1), gain.argmin(axis=1)
        result.append({
            "depth": d, "ticks_seen": frames_per_chunk * (d + 1),
            "gain_std_within_start": round(float(gain.std(axis=1).mean()), 4),
            "gain_std_between_starts": round(float(gain.mean(axis=1).std()), 4),
            "pearson_advantage_vs_outcome": round(pearson(adv, relative_outcome), 3),
            "p_advantage_ranks_no_better_than_chance": round(ranking_p(adv, relative_outcome, group), 5),
            "pearson_absolute_gain_vs_success": round(pearson(gain.reshape(-1), outcome.reshape(-1)), 3),
            "success_of_best_ranked_chunk_in_mixed_groups": round(pick(best), 3),
            "success_of_worst_ranked_chunk_in_mixed_groups": round(pick(worst), 3),
        })
    return result


def plot(path: Path, depths: list[dict], mixed_success: float, mixed_groups: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [d["ticks_seen"] for d in depths]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(x, [d["success_of_best_ranked_chunk_in_mixed_groups"] for d in depths], "o-", label="chunk ranked best")
    a.plot(x, [d["success_of_worst_ranked_chunk_in_mixed_groups"] for d in depths], "o-", label="chunk ranked worst")
    a.axhline(mixed_success, color="grey", ls="--", label="any chunk (mean)")
    a.set(xlabel="imagined ticks before scoring", ylabel="success in the simulator",
          title=f"the {mixed_groups} starts whose chunks ended differently")
    a.legend()
    b.plot(x, [d["pearson_advantage_vs_outcome"] for d in depths], "o-")
    b.axhline(0, color="grey", lw=0.5)
    b.set(xlabel="imagined ticks before scoring", ylabel="Pearson r", title="group advantage vs group-relative outcome")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(
    store: Path = typer.Option(None, help="Registry with the RL start policy and the value model (required to measure)."),
    data: Path = typer.Option(None, help="LeRobot dataset with recorded simulator states, the starts (required to measure)."),
    task: str = typer.Option("push", help="The dataset's MetaWorld task."),
    policy: str = typer.Option("stable", help="Policy version or alias (the RL start policy)."),
    value: str = typer.Option("stable", help="Value version or alias."),
    starts: int = typer.Option(96, min=2),
    group: int = typer.Option(4, min=2, help="The trainer's rollout.group_size."),
    lookahead: int = typer.Option(3, min=0, help="Deepest rollout.lookahead_chunks measured (every depth up to it)."),
    workers: int = typer.Option(32, min=1, help="Rollout workers per round (a multiple of --group)."),
    max_steps: int = typer.Option(200, help="Episode length, as in `rise eval`."),
    continuations: int = typer.Option(1, min=1, help="Simulator runs per chunk, each with its own policy noise "
                                      "(shared by the group): a chunk's success rate, not one draw."),
    seed: int = typer.Option(0),
    out: Path = typer.Option(ROOT / "bench" / "lookahead_signal.json"),
    from_saved: bool = typer.Option(False, help="Only rewrite --out's summary from its saved .npz (no simulator)."),
    pool: list[Path] = typer.Option([], help="Saved results (.json with their .npz, repeat) of one task and setup on "
                                    "other starts (--seed): pooled into one summary at --out."),
    compare: list[Path] = typer.Option([], help="Saved results (.json, repeat) to draw side by side into --out (.png)."),
    outcomes_from: Path = typer.Option(None, help="An earlier run's .npz with the same starts and chunks (same store "
                                       "policy, seed): reuse its simulator outcomes, e.g. to compare value models."),
) -> None:
    if from_saved:
        return resummarize(out)
    if pool:
        return pool_saved(pool, out)
    if compare:
        return plot_compare([json.loads(p.read_text()) for p in compare], out)
    if store is None or data is None:
        raise typer.BadParameter("--store and --data are required to measure (--from-saved, --pool and --compare work without them)")
    from rise.baselines import publish_oracle_dynamics
    from rise.embodiment import PRESETS
    from rise.registry import Registry
    from services.dynamics.oracle import KIND as ORACLE_KIND

    registry = Registry(store)
    emb = PRESETS["metaworld"]
    oracles = [v for v in registry.versions("dynamics") if registry.manifest("dynamics", v).kind == ORACLE_KIND]
    oracle = oracles[-1] if oracles else publish_oracle_dynamics(registry, emb).version
    policy_v, value_v = registry.resolve("policy", policy), registry.resolve("value", value)
    info = machine()
    services = ServiceProcesses(store, ROOT / "runs" / "lookahead_signal_logs", extra={
        "policy": f"preload: []\npin: {{measured: {policy_v}}}", "value": f"preload: []\npin: {{measured: {value_v}}}",
        "dynamics": f"preload: []\npin: {{oracle: {oracle}}}"})
    started = time.perf_counter()
    try:
        asyncio.run(services.wait_ready())
        rows = asyncio.run(imagined_gains(services.urls, registry, data, policy_v, value_v, oracle, starts, group,
                                          lookahead, workers, seed))
        imagined_s = time.perf_counter() - started
        if outcomes_from is not None:
            success = reused_outcomes(outcomes_from, rows)
            continuations = len(success)
        else:
            success = np.stack([asyncio.run(outcomes(services.urls["policy"], task, rows, policy_v, group, max_steps,
                                                     seed * 100 + k)) for k in range(continuations)])
    finally:
        services.stop()
    np.savez_compressed(out.with_suffix(".npz"), success=success, **rows)
    outcome_summary, depths = summarize(rows, success, group, lookahead, seed)
    result = {
        "machine": info, "store": str(store), "data": str(data), "task": task,
        "versions": {"policy": policy_v, "value": value_v, "oracle_dynamics": oracle},
        "starts": starts, "group": group, "lookahead": lookahead, "continuations": continuations, "max_steps": max_steps, "seed": seed,
        "outcomes_from": str(outcomes_from) if outcomes_from else None,
        "wall_s": {"imagine": round(imagined_s, 1), "total": round(time.perf_counter() - started, 1)},
        "outcomes": outcome_summary,
        "by_depth": depths,
    }
    write(out, result)


def write(out: Path, result: dict) -> None:
    out.write_text(json.dumps(result, indent=2) + "\n")
    outcomes_ = result["outcomes"]
    plot(out.with_suffix(".png"), result["by_depth"], outcomes_["success_rate_in_mixed_groups"] or 0.0, outcomes_["groups_mixed"])
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


def summarize(rows: dict, success: np.ndarray, group: int, lookahead: int, seed: int) -> tuple[dict, list[dict]]:
    """The saved rows and outcomes (success [K, rows]) -> the outcome summary and the per-depth table."""
    continuations = len(success)
    frames_per_chunk = rows["value_imagined"].shape[1] // (lookahead + 1)  # values of 1 + lookahead chunks' frames
    rate = success.mean(axis=0).reshape(-1, group)  # each chunk's success rate over the continuations
    mixed = rate.std(axis=1) > 0
    # Does the first chunk matter? The spread of success between a start's chunks, against the binomial
    # spread of K independent runs per chunk. That figure overstates the no-effect level (a group's k-th
    # runs share their noise and end alike more often): chunk_effect_permutation is the test.
    within = float(rate.var(axis=1, ddof=1).mean())
    pooled = rate.mean(axis=1, keepdims=True)
    noise_only = float((pooled * (1 - pooled) / continuations).mean()) if continuations > 1 else float("nan")
    summary = {"success_rate": round(float(success.mean()), 3), "groups_all_success": int((rate == 1).all(axis=1).sum()),
               "groups_all_failure": int((rate == 0).all(axis=1).sum()), "groups_mixed": int(mixed.sum()),
               "success_rate_in_mixed_groups": round(float(rate[mixed].mean()), 3) if mixed.any() else None,
               "success_variance_between_a_starts_chunks": round(within, 4),
               "same_if_the_chunk_did_not_matter": round(noise_only, 4)}
    if continuations > 1:
        summary["chunk_effect_permutation"] = chunk_effect_test(success, group, seed=seed)
    return summary, by_depth(rows, success, group, frames_per_chunk, lookahead)


def chunk_effect_test(success: np.ndarray, group: int, permutations: int = 20000, seed: int = 0) -> dict:
    """Permutation test of "a start's first chunk changes its success": the statistic is the
    mean (over starts) variance of the chunks' success rates; under "the chunk does not matter" the
    chunks of a start are exchangeable within each continuation k (the k-th runs share their policy
    noise, so the shuffle keeps that pairing), so shuffling outcomes across a start's chunks within each
    k gives the statistic's null distribution. Returns the observed value, the null's mean and p."""
    runs = success.reshape(len(success), -1, group).astype(float)  # [K, starts, chunks]

    def statistic(x: np.ndarray) -> np.ndarray:  # x [..., K, starts, chunks]
        return x.mean(axis=-3).var(axis=-1, ddof=1).mean(axis=-1)

    rng = np.random.default_rng(seed)
    observed = float(statistic(runs))
    null = np.array([statistic(rng.permuted(runs, axis=2)) for _ in range(permutations)])
    return {"statistic": "mean over starts of the variance of its chunks' success rates",
            "observed": round(observed, 5), "null_mean": round(float(null.mean()), 5),
            "excess_over_null": round(observed - float(null.mean()), 5),
            "p_chunk_does_not_matter": round(float((1 + (null >= observed - 1e-12).sum()) / (1 + permutations)), 5),
            "permutations": permutations}


def plot_compare(results: list[dict], path: Path) -> None:
    """Several runs (tasks, value models) side by side: per depth, the success of the chunk ranked best
    and worst (the legend gives the chunk effect's p), and the ranking's p."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, result in enumerate(results):
        depths, o = result["by_depth"], result["outcomes"]
        x = [d["ticks_seen"] for d in depths]
        name = f"{result['task']} (value {result['versions']['value']}, {result['starts']} starts)"
        p_chunk = o.get("chunk_effect_permutation", {}).get("p_chunk_does_not_matter", float("nan"))
        color = f"C{i}"
        a.plot(x, [d["success_of_best_ranked_chunk_in_mixed_groups"] for d in depths], "o-", color=color,
               label=f"{name}: best ranked ({o['groups_mixed']} open starts; p(chunk has no effect)={p_chunk:.2g})")
        a.plot(x, [d["success_of_worst_ranked_chunk_in_mixed_groups"] for d in depths], "s--", color=color,
               label=f"{name}: worst ranked")
        b.plot(x, [d["p_advantage_ranks_no_better_than_chance"] for d in depths], "o-", color=color, label=name)
    a.set(xlabel="imagined ticks before scoring", ylabel="success in the simulator",
          title="starts whose chunks ended differently")
    a.legend(fontsize=6)
    b.axhline(0.05, color="grey", ls="--", lw=0.8)
    b.set(xlabel="imagined ticks before scoring", ylabel="p (permutation)", yscale="log",
          title="do the group advantages rank a start's chunks? (low: yes)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reused_outcomes(npz: Path, rows: dict) -> np.ndarray:
    """The simulator outcomes of an earlier run, only if it measured the very same chunks from the
    very same starts (the value model may differ: it does not change what the policy proposes)."""
    saved = np.load(npz)
    for key in ("sim_state", "actions"):
        if saved[key].shape != rows[key].shape or not np.array_equal(saved[key], rows[key]):
            raise SystemExit(f"{npz}: its {key} differ from this run's, so its outcomes are not these chunks' "
                             "(use the same store policy, --starts, --group, --workers and --seed)")
    return saved["success"]


def pool_saved(paths: list[Path], out: Path) -> None:
    """Runs of one task and setup on other starts -> one summary over all their rows (more starts: more power)."""
    results = [json.loads(p.read_text()) for p in paths]
    same = ("task", "store", "versions", "group", "lookahead", "continuations", "max_steps")  # (one policy and value)
    if any(r[k] != results[0][k] for r in results for k in same):
        raise SystemExit(f"only runs that agree on {same} can be pooled")
    rows, success = load_saved(paths)
    first = results[0]
    summary, depths = summarize(rows, success, first["group"], first["lookahead"], seed=0)
    write(out, {**{k: first[k] for k in same}, "pooled_from": [str(p) for p in paths],
                "starts": sum(r["starts"] for r in results), "seed": [r["seed"] for r in results],
                "machine": [r["machine"] for r in results], "outcomes": summary, "by_depth": depths})


def resummarize(out: Path) -> None:
    """Rewrite out's summary from its saved .npz (the measurement itself is not rerun)."""
    result = json.loads(out.read_text())
    rows, success = load_saved([out])
    result["outcomes"], result["by_depth"] = summarize(rows, success, result["group"], result["lookahead"], result["seed"])
    write(out, result)


def load_saved(paths: list[Path]) -> tuple[dict, np.ndarray]:
    """Saved runs' rows (concatenated) and outcomes success [K, rows], from each .json's .npz."""
    saved = [np.load(p.with_suffix(".npz")) for p in paths]
    return ({k: np.concatenate([z[k] for z in saved]) for k in ROW_KEYS},
            np.concatenate([z["success"] for z in saved], axis=1))


if __name__ == "__main__":
    typer.run(main)
