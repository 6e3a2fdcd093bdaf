"""What are the trainer's picks worth when the robot executes them? (issue 7)

RISE's improvement step can at best teach the policy to do what its judge prefers: of the chunks
the policy proposes at a state, the one whose imagined frames the value model scores highest.
This runs that preference directly, at test time, in the simulator, with the simulator as the
world model (so world-model error is out of the picture):

    at every decision of a held-out episode: the policy proposes G chunks (prompt: bin 10, one
    policy.act call, every row its own noise) -> the oracle dynamics service imagines each
    (the trainer's imagine_groups) -> the value service scores [now, imagined frames] ->
    the chunk with the highest value gain (the trainer's value_gain / group_best) is executed

G = 1 is the policy alone (no judge). Success against G = 1 on the same layouts says what the
judge's picks are worth when they are all taken, at every decision of an episode: an upper bound on
what distilling them (RISE's RL step) can add with this judge. If best-of-G is no better than the
policy alone, changing the improvement step cannot help and the judge is the limit; if it is much
better, the step is.

    .venv/bin/python bench/judge_planning.py --store runs/table-pick-place/pick-place/store --task pick-place \\
        --policy v0002 --value v0001 --groups 1,4,8 --out bench/judge_planning_pick_place.json

`--value oracle` judges by MetaWorld's own shaped reward at the chunk's end instead (services/value/oracle.py):
the same planning with no value-model error, what a perfect-by-design judge's picks are worth.

Layouts: evaluation seed 1 (`--eval-seed`), the paper table's held-out layouts. Resumable: every
finished G is kept in --out and skipped when run again. Writes --out (JSON) and a PNG next to it.
Runs with other policy-noise seeds (--seed) and tasks pool into one table and plot:

    .venv/bin/python bench/judge_planning.py --pool bench/judge_planning_pick_place.json \
        --pool bench/judge_planning_pick_place_seed1.json ... --out bench/judge_planning_pooled.json
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, ServiceProcesses, machine  # noqa: E402


class Episode:
    """One held-out episode: its simulator state, the frame the policy sees, the dynamics history."""

    def __init__(self, index: int, layout_seed: int, frame, history: int):
        self.index, self.layout_seed, self.frame = index, layout_seed, frame
        self.history = deque([frame.views] * history, maxlen=history)  # (the trainer pads with the first frame too)
        self.sim_state = frame.sim_state
        self.decisions = self.steps = 0
        self.done = False  # at the step limit
        self.gains: list[list[float]] = []  # per decision with G > 1: the group's value gains
        self.picked: list[int] = []
        self.oracle_checks: list[bool] = []  # imagined end state == executed end state, per judged decision

    @property
    def ended(self) -> bool:
        return bool(self.frame.success) or self.done


async def plan(urls: dict, shape, task: str, episodes: int, eval_seed: int, group: int, policy: str, value: str,
               oracle: str, max_steps: int, batch_rows: int, seed: int, log, value_reads_sim_state: bool = False
               ) -> list[Episode]:
    """Every episode to its end, all in lock-step decisions; best of `group` by the judge (the oracle value,
    MetaWorld's shaped reward, when `value_reads_sim_state`)."""
    from rise.embodiment import PRESETS
    from rise.sim.evaluate import eval_seed as layout_seed
    from rise.sim.metaworld_sim import MetaWorldSim, task_text
    from rise.transport import connect_dynamics, connect_policy, connect_value
    from services.trainer.rollout import group_best, imagine_groups, judge, value_gain

    emb = PRESETS["metaworld"]
    sim = MetaWorldSim(task, emb, max_steps=max_steps)
    text = task_text(task)
    eps = [Episode(i, layout_seed(eval_seed, i), sim.reset(layout_seed(eval_seed, i)), shape.history)
           for i in range(episodes)]
    pol, dyn, val = connect_policy(urls["policy"]), connect_dynamics(urls["dynamics"]), connect_value(urls["value"])
    per_call = max(1, batch_rows // group)
    try:
        decision = 0
        while active := [ep for ep in eps if not ep.ended]:
            decision += 1
            for first in range(0, len(active), per_call):
                part = active[first:first + per_call]
                rows = [ep for ep in part for _ in range(group)]
                views = {v: np.stack([ep.frame.views[v] for ep in rows]) for v in emb.views}
                states = np.stack([ep.frame.state for ep in rows]).astype(np.float32)
                step_seed = seed * 1_000_003 + decision * 1_009 + first + 1
                chunks = await pol.act(views, states, [text] * len(rows), [10] * len(rows), 0, step_seed,
                                       version=policy, timeout_s=600)
                pick = np.arange(0, len(rows), group)  # G = 1: the policy's own chunk
                gains = None
                if group > 1:
                    history = {v: np.stack([np.stack([h[v] for h in ep.history]) for ep in rows]) for v in emb.views}
                    imagined = await imagine_groups(dyn, history, chunks.actions, 0, step_seed, group, True,
                                                    version=oracle, tasks=[text] * len(rows),
                                                    sim_states=[ep.sim_state for ep in rows], timeout_s=600)
                    starts = [ep.sim_state for ep in rows] if value_reads_sim_state else None
                    values = np.asarray((await judge(val, views, imagined.frames, [text] * len(rows), version=value,
                                                     start_states=starts, end_states=imagined.sim_states,
                                                     timeout_s=600)).values, np.float32)
                    gains = value_gain(values[:, 0], values[:, 1:])
                    pick = group_best(gains, group)
                for k, ep in enumerate(part):
                    execute(sim, ep, chunks.actions[pick[k]], shape.stride)
                    if gains is not None:
                        ep.gains.append(gains[k * group:(k + 1) * group].round(5).tolist())
                        ep.picked.append(int(pick[k] - k * group))
                        if not ep.ended:  # the judge saw what the robot then did: the oracle is exact
                            ep.oracle_checks.append(bool(np.allclose(imagined.sim_states[pick[k]], ep.sim_state)))
            ended = [ep for ep in eps if ep.ended]
            log(f"G={group} decision {decision}: {len(ended)}/{episodes} ended, "
                f"{sum(bool(ep.frame.success) for ep in eps)} successes")
    finally:
        sim.close()
        for client in (pol, dyn, val):
            await client.close()
    return eps


def execute(sim, ep: Episode, actions: np.ndarray, stride: int) -> None:
    """The picked chunk in the real episode, as `rise eval` runs it (clipped, stop at success or the
    step limit); the dynamics history gets every `stride`-th tick's frame, counted back from the chunk's end."""
    sim.set_state(ep.sim_state, render=False)
    frame = ep.frame
    for k, action in enumerate(actions):
        frame = sim.step(action, render=(len(actions) - 1 - k) % stride == 0)  # (the chunk's last tick included)
        if frame.success or sim.done:
            frame.views = frame.views or sim.render()
            ep.history.append(frame.views)
            break
        if frame.views:
            ep.history.append(frame.views)
    ep.frame, ep.sim_state, ep.steps, ep.done = frame, sim.get_state(), sim.steps, sim.done
    ep.decisions += 1


def summarize_arm(eps: list[Episode], group: int, wall_s: float) -> dict:
    from rise.sim.stats import wilson_interval

    ok = [bool(ep.frame.success) for ep in eps]
    gains = [g for ep in eps for g in ep.gains]
    spread = float(np.mean([np.std(g) for g in gains])) if gains else None
    return {"group": group, "episodes": len(eps), "successes": int(sum(ok)), "success_rate": float(np.mean(ok)),
            "wilson95": list(wilson_interval(int(sum(ok)), len(eps))), "wall_s": round(wall_s, 1),
            "decisions": int(sum(ep.decisions for ep in eps)),
            "value_gain_std_within_a_decision": round(spread, 5) if spread is not None else None,
            "picked_position_counts": np.bincount([p for ep in eps for p in ep.picked], minlength=group).tolist()
            if group > 1 else None,
            "oracle_end_state_matches_executed": [int(sum(c for ep in eps for c in ep.oracle_checks)),
                                                  int(sum(len(ep.oracle_checks) for ep in eps))],
            "per_episode": [{"index": ep.index, "seed": ep.layout_seed, "success": bool(ep.frame.success),
                             "steps": ep.steps, "decisions": ep.decisions} for ep in eps]}


def paired(a: dict, b: dict) -> dict:
    """Layouts only `a` solved / only `b` solved and the exact sign test's p."""
    from rise.sim.stats import discordant_pairs, sign_test

    only_a, only_b = discordant_pairs(a["per_episode"], b["per_episode"])
    return {"only_first": only_a, "only_second": only_b, "p": round(sign_test(only_a, only_b), 4)}


def plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = sorted(result["arms"].values(), key=lambda a: a["group"])
    x = np.arange(len(arms))
    rates = [100 * a["success_rate"] for a in arms]
    low = [100 * (a["success_rate"] - a["wilson95"][0]) for a in arms]
    high = [100 * (a["wilson95"][1] - a["success_rate"]) for a in arms]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.bar(x, rates, yerr=[low, high], capsize=4, color=["grey"] + ["C0"] * (len(arms) - 1))
    ax.set_xticks(x, ["policy alone" if a["group"] == 1 else f"best of {a['group']}\nby the judge" for a in arms])
    ax.set_ylabel(f"success, {arms[0]['episodes']} held-out episodes (%)")
    ax.set_title(f"{result['task']}: the judge's picks executed\n(simulator as world model, Wilson 95%)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pool(paths: list[Path]) -> dict:
    """Runs (one per task and policy-noise seed) -> per task and G: successes over all their episodes,
    Wilson interval, and the pairs with the policy alone on the same layouts and noise seed, summed."""
    from rise.sim.stats import sign_test, wilson_interval

    tasks: dict[str, dict] = {}
    for path in paths:
        run = json.loads(path.read_text())
        task = tasks.setdefault(run["task"], {"runs": [], "arms": {}})
        task["runs"].append(str(path))
        for g, arm in run["arms"].items():
            pooled = task["arms"].setdefault(g, {"group": arm["group"], "successes": 0, "episodes": 0,
                                                 "only_policy_alone": 0, "only_best_of_g": 0})
            pooled["successes"] += arm["successes"]
            pooled["episodes"] += arm["episodes"]
            pair = run.get("paired_with_policy_alone", {}).get(g)
            if pair:
                pooled["only_policy_alone"] += pair["only_first"]
                pooled["only_best_of_g"] += pair["only_second"]
    for task in tasks.values():
        for arm in task["arms"].values():
            arm["success_rate"] = arm["successes"] / arm["episodes"]
            arm["wilson95"] = list(wilson_interval(arm["successes"], arm["episodes"]))
            if arm["group"] > 1:
                arm["sign_test_p"] = round(sign_test(arm["only_policy_alone"], arm["only_best_of_g"]), 4)
    return tasks


def plot_pooled(path: Path, tasks: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({a["group"] for t in tasks.values() for a in t["arms"].values()})
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(1.6 + 2.2 * len(tasks), 3.8))
    for i, g in enumerate(groups):
        for j, (name, task) in enumerate(sorted(tasks.items())):
            arm = task["arms"].get(str(g))
            if arm is None:
                continue
            rate = 100 * arm["success_rate"]
            err = [[rate - 100 * arm["wilson95"][0]], [100 * arm["wilson95"][1] - rate]]
            ax.bar(j + (i - (len(groups) - 1) / 2) * width, rate, width, yerr=err, capsize=3, color=f"C{i}",
                   label=("policy alone" if g == 1 else f"best of {g} by the judge") if j == 0 else None)
            ax.text(j + (i - (len(groups) - 1) / 2) * width, 1, f"{arm['successes']}/{arm['episodes']}",
                    ha="center", fontsize=7, color="white")
    ax.set_xticks(range(len(tasks)), sorted(tasks))
    ax.set_ylabel("success in the simulator (%)")
    ax.set_title("RISE's judge, its picks executed at every decision\n(simulator as world model; Wilson 95%)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(
    store: Path = typer.Option(None, help="Registry with the policy and value versions (a paper-table task's store)."),
    task: str = typer.Option("", help="MetaWorld task."),
    policy: str = typer.Option("stable", help="Policy version or alias (the RL start: the RECAP policy)."),
    value: str = typer.Option("stable", help="Value version or alias (the trainer's judge); 'oracle': MetaWorld's "
                              "shaped reward (services/value/oracle.py), published in the store if it has none."),
    groups: str = typer.Option("1,4,8", help="Chunks proposed per decision, one arm each (1 = the policy alone)."),
    episodes: int = typer.Option(50, min=1),
    eval_seed: int = typer.Option(1, help="Layouts 2**32 + 100000 * eval_seed + episode (the paper table's)."),
    max_steps: int = typer.Option(200),
    batch_rows: int = typer.Option(64, min=1, help="Rows per service call (episodes x G)."),
    tier: str = typer.Option("small", help="Dynamics tier whose frame_stride the oracle uses (as the paper table)."),
    seed: int = typer.Option(0, help="Policy noise seed."),
    out: Path = typer.Option(ROOT / "bench" / "judge_planning.json"),
    pooled: list[Path] = typer.Option([], "--pool", help="Finished runs (.json, repeat) to pool per task into --out "
                                      "(.json and .png), without the simulator."),
) -> None:
    if pooled:
        tasks = pool(pooled)
        out.write_text(json.dumps(tasks, indent=2) + "\n")
        plot_pooled(out.with_suffix(".png"), tasks)
        return print(json.dumps({t: {g: {k: a[k] for k in a if k != "wilson95"} for g, a in v["arms"].items()}
                                 for t, v in tasks.items()}, indent=2))
    if store is None or not task:
        raise typer.BadParameter("--store and --task are required to measure (--pool works without them)")
    from rise.baselines import publish_oracle_dynamics, publish_oracle_value
    from rise.embodiment import PRESETS
    from rise.registry import Registry
    from services.dynamics.model import load_model_config
    from services.dynamics.oracle import KIND as ORACLE_KIND
    from services.trainer.rollout import dynamics_shape, value_reads_sim_state

    registry = Registry(store)
    emb = PRESETS["metaworld"]
    stride = load_model_config(tier).frame_stride
    oracles = [v for v in registry.versions("dynamics") if registry.manifest("dynamics", v).kind == ORACLE_KIND
               and registry.manifest("dynamics", v).config.get("frame_stride") == stride]
    oracle = oracles[-1] if oracles else publish_oracle_dynamics(registry, emb, frame_stride=stride).version
    if value == "oracle":
        value = next((v for v in registry.versions("value") if value_reads_sim_state(registry, v)), None) \
            or publish_oracle_value(registry, emb).version
    policy_v, value_v = registry.resolve("policy", policy), registry.resolve("value", value)
    config = {"store": str(store), "task": task, "versions": {"policy": policy_v, "value": value_v, "oracle": oracle},
              "episodes": episodes, "eval_seed": eval_seed, "max_steps": max_steps, "seed": seed, "frame_stride": stride}
    result = json.loads(out.read_text()) if out.exists() else {}
    if result and result.get("config") != config:
        raise SystemExit(f"{out} holds a run with another config: {result.get('config')}; use another --out")
    result = {"config": config, "task": task, "arms": result.get("arms", {})}
    todo = [int(g) for g in groups.split(",") if g.strip() not in result["arms"]]
    if not todo:
        return plot(out.with_suffix(".png"), result)
    services = ServiceProcesses(store, ROOT / "runs" / f"judge_planning_logs_{task}", extra={
        "policy": f"preload: []\npin: {{measured: {policy_v}}}", "value": f"preload: []\npin: {{measured: {value_v}}}",
        "dynamics": f"preload: []\npin: {{oracle: {oracle}}}"})
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {task} {message}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        asyncio.run(services.wait_ready())
        shape = dynamics_shape(registry, oracle, emb.chunk_length)
        for group in todo:
            started = time.perf_counter()
            eps = asyncio.run(plan(services.urls, shape, task, episodes, eval_seed, group, policy_v, value_v, oracle, max_steps,
                                   batch_rows, seed, log, value_reads_sim_state(registry, value_v)))
            result["arms"][str(group)] = {**summarize_arm(eps, group, time.perf_counter() - started),
                                          "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            base = result["arms"].get("1")
            result["paired_with_policy_alone"] = {g: paired(base, a) for g, a in result["arms"].items()
                                                  if base is not None and g != "1"}
            out.write_text(json.dumps(result, indent=2) + "\n")
            log(f"G={group}: {result['arms'][str(group)]['successes']}/{episodes}")
    finally:
        services.stop()
    plot(out.with_suffix(".png"), result)
    print(json.dumps({g: {k: a[k] for k in ("successes", "success_rate", "wilson95", "wall_s")}
                      for g, a in result["arms"].items()} | {"paired": result.get("paired_with_policy_alone")}, indent=2))


if __name__ == "__main__":
    typer.run(main)
