"""Does the learned world model give the trainer the advantages the simulator would? (issue 7)

RISE learns from A = clamp(5 * mean(V(imagined) - V(now)), -1, 1). If the learned dynamics model
imagines the wrong future, A is noise and RL in imagination cannot beat the offline policy, however
well the rest works. This measures that link directly, through the same services the trainer uses:

    for N real starts of a dataset (fixed seed):
        chunk     = policy.act(now, best bin)                          (the RL start policy)
        A_oracle  = value(oracle.imagine(chunk))     the simulator restored to the recorded state
        A_learned = value(learned.imagine(chunk))    the world model under test
        A_control = value(learned.imagine(another start's chunk))      does the model follow actions?

and reports how well A_learned tracks A_oracle (correlation, sign, bins), against the control, how
well the learned model ranks two chunks from one start like the simulator does (the action effect
A(chunk) - A(other chunk), which is what the advantage prompt needs), plus
the spread of A_oracle itself (if even perfect imagination gives near-constant advantages, the
value model or the advantage scale is the bottleneck, not the world model).

With `--group G` (the trainer's rollout.group_size) it also does what the trainer does: G policy
chunks per start, each imagined by both models, and the group-relative advantages compared
(correlation, sign, whether both models pick the same best chunk), with how much of the
simulator's value gain varies between the chunks of one start rather than between starts.

    .venv/bin/python bench/advantage_agreement.py --store runs/table/push/store \
        --data runs/table/push/data --dynamics v0001 --policy v0002 --value v0001 --starts 96

Writes bench/advantage_agreement.json and .png (scatter of A_learned and A_control vs A_oracle).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, ServiceProcesses, machine, pearson  # noqa: E402


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    rank = lambda x: np.argsort(np.argsort(x)).astype(float)  # noqa: E731  (ties are rare: continuous values)
    return pearson(rank(a), rank(b))


def agreement(oracle: np.ndarray, other: np.ndarray, oracle_bins: np.ndarray, other_bins: np.ndarray) -> dict:
    """How well `other` advantages track the oracle's."""
    moving = np.abs(oracle) >= 0.1  # sign agreement where the oracle says the chunk clearly helps or hurts
    return {"pearson": round(pearson(oracle, other), 3), "spearman": round(_spearman(oracle, other), 3),
            "sign_agreement": round(float(np.mean(np.sign(oracle[moving]) == np.sign(other[moving]))), 3)
            if moving.any() else None, "clear_oracle_signs": int(moving.sum()),
            "mean_abs_error": round(float(np.mean(np.abs(oracle - other))), 3),
            "bins_equal": round(float(np.mean(oracle_bins == other_bins)), 3),
            "bins_within_1": round(float(np.mean(np.abs(oracle_bins - other_bins) <= 1)), 3)}


def _now(starts: list) -> tuple[dict, np.ndarray, list[str]]:
    """What the policy sees at these starts: current frames, robot states, task texts."""
    views = list(starts[0].history)
    return ({v: np.stack([s.history[v][-1] for s in starts]) for v in views},
            np.stack([s.state for s in starts]).astype(np.float32), [s.task for s in starts])


def _history(starts: list, shape) -> tuple[dict, list | None]:
    """What a dynamics model gets at these starts: frame histories (and simulator states if it needs them)."""
    history = {v: np.stack([s.history[v] for s in starts]) for v in starts[0].history}
    return history, [s.sim_state for s in starts] if shape.needs_sim_state else None


async def measure(urls: dict, registry, data: Path, learned: str, oracle: str, policy: str, value: str, starts: int,
                  batch: int, seed: int, scale: float, group: int = 1, common_noise: bool = True,
                  exploration_noise: float = 0.0, proposal_bins: list[int] | None = None,
                  exploration_offset: float = 0.0) -> dict:
    from rise.data.loading import load_episodes_in_memory
    from rise.embodiment import PRESETS
    from rise.transport import connect_dynamics, connect_policy, connect_value
    from services.trainer.rollout import advantage, dynamics_shape, start_states

    emb = PRESETS["metaworld"]
    episodes = load_episodes_in_memory([data], emb)
    shapes = {name: dynamics_shape(registry, ref, emb.chunk_length) for name, ref in (("learned", learned), ("oracle", oracle))}
    begin = {name: start_states(episodes, shape) for name, shape in shapes.items()}
    rng = np.random.default_rng(seed)
    frames = rng.choice(len(episodes), size=starts, replace=False)
    out = {k: [] for k in ("oracle", "learned", "control", "oracle_control", "psnr")}
    async with connect_policy(urls["policy"]) as pol, connect_dynamics(urls["dynamics"]) as dyn, \
            connect_value(urls["value"]) as val:
        for i in range(0, starts, batch):
            g = [int(x) for x in frames[i:i + batch]]
            starts_by = {name: [begin[name].at(x) for x in g] for name in shapes}
            now, states, tasks = _now(starts_by["learned"])
            views = list(now)
            call_seed = int(rng.integers(1, 2**62))
            chunks = await pol.act(now, states, tasks, [10], seed=call_seed, version=policy, timeout_s=300)
            shuffled = np.roll(chunks.actions, 1, axis=0)  # each start gets its neighbour's chunk

            async def imagine(name: str, actions: np.ndarray):
                history, sims = _history(starts_by[name], shapes[name])
                return await dyn.imagine(history, actions, 0, call_seed, version=learned if name == "learned" else oracle,
                                         tasks=tasks, sim_states=sims, timeout_s=600)

            imagined = {"oracle": await imagine("oracle", chunks.actions), "learned": await imagine("learned", chunks.actions),
                        "control": await imagine("learned", shuffled), "oracle_control": await imagine("oracle", shuffled)}
            for name, result in imagined.items():
                scored = {v: np.concatenate([now[v][:, None], result.frames[v]], axis=1) for v in views}
                values = np.asarray((await val.score(scored, tasks, version=value, timeout_s=300)).values, np.float32)
                out[name].append(values)
            # image error of the learned model against the simulator, on the frames both produced (last one)
            for b in range(len(g)):
                errors = [np.mean((imagined["learned"].frames[v][b, -1].astype(float)
                                   - imagined["oracle"].frames[v][b, -1].astype(float)) ** 2) for v in views]
                out["psnr"].append(float(10 * np.log10(255.0 ** 2 / max(np.mean(errors), 1e-9))))
            print(f"  {min(i + batch, starts)}/{starts} starts", file=sys.stderr)

        if group > 1:
            await measure_groups(out, pol, dyn, val, begin, frames, shapes, learned, oracle, policy, value, group,
                                 max(1, batch // group), rng, common_noise, exploration_noise, proposal_bins or [],
                                 exploration_offset)

    adv, bins = {}, {}
    for name in ("oracle", "learned", "control", "oracle_control"):
        values = np.concatenate(out[name])
        adv[name], bins[name] = advantage(values[:, 0], values[:, 1:], scale)
    # What RL in imagination needs: which of two chunks from the same start is better. The action
    # effect is A(chunk) - A(another chunk) at one start; does the learned model's match the simulator's?
    effect = {"oracle": adv["oracle"] - adv["oracle_control"], "learned": adv["learned"] - adv["control"]}
    result = {
        "starts": starts, "advantage_scale": scale,
        "oracle_advantage": {"mean": round(float(adv["oracle"].mean()), 3), "std": round(float(adv["oracle"].std()), 3),
                             "bins": np.bincount(bins["oracle"], minlength=11)[1:].tolist()},
        "learned_advantage": {"mean": round(float(adv["learned"].mean()), 3), "std": round(float(adv["learned"].std()), 3),
                              "bins": np.bincount(bins["learned"], minlength=11)[1:].tolist()},
        "learned_vs_oracle": agreement(adv["oracle"], adv["learned"], bins["oracle"], bins["learned"]),
        "control_vs_oracle": agreement(adv["oracle"], adv["control"], bins["oracle"], bins["control"]),
        "learned_vs_control": {"pearson": round(pearson(adv["learned"], adv["control"]), 3)},
        "oracle_vs_oracle_control": {"pearson": round(pearson(adv["oracle"], adv["oracle_control"]), 3)},
        "action_effect": {"oracle_std": round(float(effect["oracle"].std()), 3),
                          "learned_std": round(float(effect["learned"].std()), 3),
                          "pearson": round(pearson(effect["oracle"], effect["learned"]), 3),
                          "sign_agreement": round(float(np.mean(np.sign(effect["oracle"]) == np.sign(effect["learned"]))), 3)},
        "psnr_learned_vs_oracle_last_frame_db": round(float(np.mean(out["psnr"])), 2),
    }
    adv["effect_oracle"], adv["effect_learned"] = effect["oracle"], effect["learned"]
    if group > 1:
        result["groups"] = group_agreement(out, group, scale)
    return result, adv


async def measure_groups(out: dict, pol, dyn, val, begin: dict, frames: np.ndarray, shapes: dict, learned: str,
                         oracle: str, policy: str, value: str, group: int, starts_per_call: int, rng,
                         common_noise: bool, exploration_noise: float, proposal_bins: list[int],
                         exploration_offset: float) -> None:
    """G policy chunks per start (as the trainer's groups), imagined by both models and scored."""
    from services.trainer.rollout import explore, imagine_groups

    out["group_oracle"], out["group_learned"] = [], []
    for i in range(0, len(frames), starts_per_call):
        g = [int(x) for x in frames[i:i + starts_per_call] for _ in range(group)]
        by = {name: [begin[name].at(x) for x in g] for name in shapes}
        now, states, tasks = _now(by["learned"])
        call_seed = int(rng.integers(1, 2**62))
        prompts = (proposal_bins or [10] * group) * (len(g) // group)  # as the trainer's rollout.proposal_bins
        chunks = await pol.act(now, states, tasks, prompts, seed=call_seed, version=policy, timeout_s=300)
        if exploration_noise or exploration_offset:  # as the trainer's rollout.exploration_noise and _offset
            chunks = chunks._replace(actions=explore(chunks.actions, rng, exploration_noise, exploration_offset))
        for name, version in (("oracle", oracle), ("learned", learned)):
            history, sims = _history(by[name], shapes[name])
            result = await imagine_groups(dyn, history, chunks.actions, 0, call_seed, group, common_noise,
                                          version=version, tasks=tasks, sim_states=sims, timeout_s=600)
            scored = {v: np.concatenate([now[v][:, None], result.frames[v]], axis=1) for v in now}
            out[f"group_{name}"].append(np.asarray((await val.score(scored, tasks, version=value, timeout_s=300)).values,
                                                   np.float32))
        print(f"  groups: {min(i + starts_per_call, len(frames))}/{len(frames)} starts", file=sys.stderr)


def group_agreement(out: dict, group: int, scale: float) -> dict:
    """The trainer's group-relative advantages from the learned model vs from the simulator."""
    from services.trainer.rollout import advantage

    values = {name: np.concatenate(out[f"group_{name}"]) for name in ("oracle", "learned")}
    rel = {name: advantage(v[:, 0], v[:, 1:], scale, group)[0] for name, v in values.items()}
    gain = {name: (v[:, 1:] - v[:, :1]).mean(axis=1).reshape(-1, group) for name, v in values.items()}
    best = {name: g.argmax(axis=1) for name, g in gain.items()}
    # Which of the simulator's ranks (0 = its best) the learned model's favourite chunk holds.
    oracle_rank = np.argsort(np.argsort(-gain["oracle"], axis=1), axis=1)
    picked_rank = oracle_rank[np.arange(len(best["learned"])), best["learned"]]
    within = gain["oracle"].std(axis=1).mean()
    return {"group_size": group, "starts": int(gain["oracle"].shape[0]),
            "relative_pearson": round(pearson(rel["oracle"], rel["learned"]), 3),
            "relative_spearman": round(_spearman(rel["oracle"], rel["learned"]), 3),
            "relative_sign_agreement": round(float(np.mean(np.sign(rel["oracle"]) == np.sign(rel["learned"]))), 3),
            "same_best_chunk": round(float(np.mean(best["oracle"] == best["learned"])), 3),
            "same_best_chunk_by_chance": round(1 / group, 3),
            "learned_pick_oracle_rank_mean": round(float(picked_rank.mean()), 3),
            "oracle_gain_std_within_start": round(float(within), 4),
            "oracle_gain_std_between_starts": round(float(gain["oracle"].mean(axis=1).std()), 4),
            "learned_gain_std_within_start": round(float(gain["learned"].std(axis=1).mean()), 4),
            # Per group position (its prompt, with proposal bins): the simulator's mean value gain and
            # how often that position's chunk was the start's best.
            "oracle_gain_by_position": [round(float(x), 4) for x in gain["oracle"].mean(axis=0)],
            "oracle_best_share_by_position": [round(float(np.mean(best["oracle"] == k)), 3) for k in range(group)]}


def plot(path: Path, adv: dict, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, name, color in ((axes[0], "learned", "tab:blue"), (axes[1], "control", "tab:gray")):
        ax.scatter(adv["oracle"], adv[name], s=12, alpha=0.7, color=color)
        ax.plot([-1, 1], [-1, 1], "k--", lw=0.8)
        r = result[f"{name}_vs_oracle"]
        ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), xlabel="A from the simulator (oracle dynamics)",
               ylabel=f"A from the learned model ({'real chunk' if name == 'learned' else 'shuffled chunk'})",
               title=f"{name}: Pearson {r['pearson']}, bins within 1: {r['bins_within_1']:.0%}")
    e = result["action_effect"]
    axes[2].scatter(adv["effect_oracle"], adv["effect_learned"], s=12, alpha=0.7, color="tab:red")
    axes[2].plot([-2, 2], [-2, 2], "k--", lw=0.8)
    axes[2].set(xlim=(-1.5, 1.5), ylim=(-1.5, 1.5), xlabel="action effect in the simulator: A(chunk) - A(other chunk)",
                ylabel="action effect in the learned model", title=f"action effects: Pearson {e['pearson']}")
    fig.suptitle(f"Imagined advantages vs the simulator's, {result['starts']} real starts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(
    store: Path = typer.Option(..., help="Registry with the RL start policy, the value model and the learned dynamics."),
    data: Path = typer.Option(..., help="LeRobot dataset with recorded simulator states (the starts)."),
    dynamics: str = typer.Option(..., help="Version (or alias) of the learned dynamics model."),
    policy: str = typer.Option("stable", help="Policy version or alias (the RL start policy)."),
    value: str = typer.Option("stable", help="Value version or alias."),
    starts: int = typer.Option(96, min=2),
    batch: int = typer.Option(8, min=1),
    seed: int = typer.Option(0),
    scale: float = typer.Option(5.0, help="The trainer's rollout.advantage_scale."),
    group: int = typer.Option(1, min=1, help="The trainer's rollout.group_size: also compare group-relative advantages."),
    common_noise: bool = typer.Option(True, help="The trainer's rollout.common_noise (a group's chunks share their noise)."),
    exploration_noise: float = typer.Option(0.0, help="The trainer's rollout.exploration_noise (groups only)."),
    exploration_offset: float = typer.Option(0.0, help="The trainer's rollout.exploration_offset (groups only)."),
    proposal_bins: str = typer.Option("", help="The trainer's rollout.proposal_bins, e.g. 10,7,4,1 (groups only; empty: all 10)."),
    out: Path = typer.Option(ROOT / "bench" / "advantage_agreement.json"),
) -> None:
    from rise.baselines import publish_oracle_dynamics
    from rise.embodiment import PRESETS
    from rise.registry import Registry
    from services.dynamics.oracle import KIND as ORACLE_KIND

    bins = [int(b) for b in proposal_bins.split(",") if b.strip()]
    if bins and len(bins) != group:
        raise typer.BadParameter(f"--proposal-bins needs one bin per group position ({group}), got {bins}")
    registry = Registry(store)
    emb = PRESETS["metaworld"]
    oracles = [v for v in registry.versions("dynamics") if registry.manifest("dynamics", v).kind == ORACLE_KIND]
    oracle = oracles[-1] if oracles else publish_oracle_dynamics(registry, emb).version
    learned, policy_v, value_v = (registry.resolve(m, r) for m, r in (("dynamics", dynamics), ("policy", policy), ("value", value)))
    info = machine()
    # Each service loads exactly the versions measured (pins: the registry's aliases stay as they are).
    services = ServiceProcesses(store, ROOT / "runs" / "advantage_agreement_logs", extra={
        "policy": f"preload: []\npin: {{measured: {policy_v}}}", "value": f"preload: []\npin: {{measured: {value_v}}}",
        "dynamics": f"preload: []\npin: {{learned: {learned}, oracle: {oracle}}}"})
    try:
        asyncio.run(services.wait_ready())
        result, adv = asyncio.run(measure(services.urls, registry, data, learned, oracle, policy_v, value_v, starts,
                                          batch, seed, scale, group, common_noise, exploration_noise, bins,
                                          exploration_offset))
    finally:
        services.stop()
    result = {"machine": info, "common_noise": common_noise, "exploration_noise": exploration_noise,
              "exploration_offset": exploration_offset, "proposal_bins": bins, "store": str(store), "data": str(data), "versions": {
        "policy": policy_v, "value": value_v, "learned_dynamics": learned, "oracle_dynamics": oracle}, **result}
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(out.with_suffix(".png"), adv, result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    typer.run(main)
