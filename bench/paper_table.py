"""The success table: imitation vs RECAP-style vs RISE, per MetaWorld task, measured in the simulator.

One command, resumable (every finished stage is recorded in `<out>/state.json` and skipped on
the next start), one config for every task (`--set` applies to all of them):

    .venv/bin/python bench/paper_table.py --tasks push,pick-place,peg-insert-side --out runs/table

Tables run apart (other tasks or `--seeds`, one per core or machine) become one with
`bench/merge_tables.py`.

Per task, the same data and evaluation seeds for every method:
  collect     scripted expert + noise: successes and failures (`rise data collect`)
  imitation   flow-matching policy, null bin, all data                      (`rise train policy`)
  value       progress then TD value model                                   (`rise train value`)
  label       chunk advantages -> bins                                       (`rise label`)
  recap       advantage-conditioned fine-tune of the imitation policy on the labelled data
  recap-rollouts  one more RECAP round on real experience: the RECAP policy's own simulator rollouts
              (`--rollout-episodes`, layouts of evaluation seed `eval_seed + 1`), labelled by the value
              model, added to the labelled data; RECAP fine-tuned `recap_steps` more on both. What RISE
              would learn if its imagination were the real world, episode-long.
  recap-rollouts-outcome  the same, the rollouts labelled by their real outcome (`rise label --outcome`:
              bin 10 success, bin 1 failure) instead of the value model: is the value model's labelling the limit?
  recap-continued  the control for recap-rollouts: the same `recap_steps` more on the labelled data only
  dynamics    the learned world model at the tier's own config                 (`rise train dynamics`)
  rise        RL in imagination from the RECAP policy through the services, learned world model;
              `--offline-ratios 0.1,0.3,0.6,0.9` adds one run per ratio (methods `rise-offline10`, ...)
  rise-oracle the same with the simulator as the world model (the upper bound for learned
              imagination: separates world-model error from the rest); it returns the frames the
              learned model predicts (the tier's `frame_stride`), so both are scored on the same ticks
  rise-oracle-judge  the simulator as the world model and as the judge: MetaWorld's shaped reward
              (`services/value/oracle.py`) scores each chunk's end state instead of the value model
              (separates value-model error from what the improvement step itself can do)
  eval        every policy through `rise eval` on held-out layouts, prompted with the best bin;
              Wilson 95% intervals
  curve       with `--curve-episodes N`: every version a RISE run published, N episodes each
              (success vs RL steps)
  guided      with `--guidance-scales 2,3`: every advantage-conditioned policy evaluated again with
              classifier-free guidance towards bin 10 at each scale (methods `recap-cfg2`, `rise-cfg2`, ...)
`--seeds 0,1,2` repeats every training stage per seed (the data and evaluation layouts stay the
same); cells then pool the seeds' episodes and list each seed's rate.

Writes `<out>/table.md` (the success table, then every later method paired with RECAP on the same
layouts, with an exact sign test), `<out>/table.json`, `<out>/success.png` and (with curves) `<out>/curve.png`.

A RISE ablation starts from the very RECAP policy of another table with `--fork-from <table>`: the new
table begins as a copy of every stage `--set` does not shape (data, imitation, value, labels, RECAP, the
RECAP rollouts and their evaluations), so only the RISE runs are trained again, under the new `--set`:

    .venv/bin/python bench/paper_table.py --tasks peg-insert-side --methods imitation,recap,rise-oracle \
        --fork-from runs/table --set learner.ema_decay=0.98 --out runs/table-ema98
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from pathlib import Path

import typer

app = typer.Typer(add_completion=False)
METHODS = ("imitation", "recap", "recap-rollouts", "recap-rollouts-outcome", "recap-continued", "rise",
           "rise-oracle", "rise-oracle-judge")
# The evaluations whose rollouts are written as LeRobot datasets.
RECORDED_EVALS = ("imitation", "recap")
# Keys added to the run config after runs were made: their values for an older state.json.
LEGACY_CONFIG = {"offline_ratios": [], "seeds": [0], "curve_episodes": 0, "guidance_scales": [],
                 "rollout_episodes": 50, "record_evals": True}
# What to run may grow on a resumed table (every stage is keyed by its own name, so finished ones
# stay valid), and a fork records where its first stages came from; every other config key shapes the
# stages and must match.
WHAT_TO_RUN = ("methods", "offline_ratios", "curve_episodes", "guidance_scales", "record_evals", "forked_from")


def stage_config(cfg: dict) -> dict:
    """The config keys that shape the stages (an older state.json's filled in): they must match."""
    return {k: v for k, v in {**LEGACY_CONFIG, **cfg}.items() if k not in WHAT_TO_RUN}


def stage_key(task: str, seed: int, seeds: list[int], stage: str) -> str:
    """A stage's key in state.json. The first seed keeps the plain layout (`<task>/<stage>`), so runs
    made before seeds existed resume; the others' stages sit under `<task>/seed<N>/`."""
    return f"{task}/{stage}" if seed == seeds[0] else f"{task}/seed{seed}/{stage}"


def shaped_by_set(stage: str) -> bool:
    """Whether `--set` (the trainer's config) shapes a stage or a stage folder: the RISE runs and every
    evaluation of their policies (`rise`, `rise-oracle`, `rise-offline10`, `eval-rise-cfg2`, `curve-rise`, ...)."""
    name = stage.rsplit("/", 1)[-1]
    for prefix in ("eval-", "curve-"):
        name = name.removeprefix(prefix)
    return name == "rise" or name.startswith("rise-")


def fork_table(source: Path, out: Path, cfg: dict) -> None:
    """Start `out` as a copy of `source`'s stages that `--set` does not shape, with their folders; every
    other config key must match (the same data, seeds and step counts), so the copied stages are the
    ones this table would have trained. Paths inside the stages' results are moved to `out`. The copied
    model store keeps the source's RISE versions (unused: the stages record which version each method is)."""
    import shutil

    old = State(source / "state.json")
    if (before := old.done("config")) is None:
        raise typer.BadParameter(f"--fork-from {source}: no state.json with a config there")
    if {**stage_config(before), "set": {}} != {**stage_config(cfg), "set": {}}:
        raise typer.BadParameter(f"--fork-from {source} was run with another config than this table's apart from "
                                 f"--set ({stage_config(before)}); only the RISE runs may differ")
    stage_folders = {source / key.rsplit("/", 1)[0] for key in old.data if "/" in key}

    def skip(folder: str, names: list[str]) -> list[str]:  # a RISE run's folder, not the files inside a model
        return [n for n in names if Path(folder) in stage_folders and shaped_by_set(n)]
    for task in {key.split("/", 1)[0] for key in old.data if "/" in key}:
        shutil.copytree(source / task, out / task, ignore=skip)
    kept = {k: v for k, v in old.data.items() if "/" in k and not shaped_by_set(k)}  # (stages: "<task>/...")
    moved = json.loads(json.dumps(kept).replace(f"{source.resolve()}/", f"{out.resolve()}/"))
    (out / "state.json").write_text(json.dumps({"config": cfg, **moved}, indent=2) + "\n")


class State:
    """`state.json`: finished stages and their results, written after each stage."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def done(self, key: str) -> dict | None:
        return self.data.get(key)

    def record(self, key: str, value: dict) -> dict:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)
        return value


class PolicyServer:
    """A policy service on the task's registry, on an event loop in a background thread."""

    def __init__(self, registry_root: Path, preload: list[str], port: int = 0):
        from rise.serving import ServerConfig
        from services.policy.server import PolicyConfig, start

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        config = PolicyConfig(registry_root=registry_root, torch_threads=1, preload=preload,
                              server=ServerConfig(port=port, log_json=False))
        self.running = asyncio.run_coroutine_threadsafe(start(config), self.loop).result(300)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(0), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)


def run_task(task: str, seed: int, out: Path, state: State, cfg: dict, log) -> dict:
    from rise.baselines import publish_oracle_dynamics, publish_oracle_value
    from rise.data.collect import collect
    from rise.embodiment import PRESETS
    from rise.registry import Registry
    from rise.sim.evaluate import evaluate
    from services.dynamics.model import load_model_config as load_dynamics_config
    from services.dynamics.train import train as train_dynamics
    from services.policy.model import load_model_config
    from services.policy.train import train as train_policy
    from services.value.label import label
    from services.value.model import load_model_config as load_value_config
    from services.value.train import train as train_value

    folder = out / stage_key(task, seed, cfg["seeds"], "")  # (the same layout as the stages' keys)
    registry = Registry(folder / "store")
    emb = PRESETS["metaworld"]
    key = lambda stage: stage_key(task, seed, cfg["seeds"], stage)  # noqa: E731

    def stage(name: str, fn) -> dict:
        if (done := state.done(key(name))) is not None:
            log(f"[{task} seed {seed}] {name}: done before, skipped")
            return done
        log(f"[{task} seed {seed}] {name} ...")
        started = time.perf_counter()
        result = fn()
        result["wall_s"] = round(time.perf_counter() - started, 1)
        log(f"[{task} seed {seed}] {name}: {result.get('version', '')} in {result['wall_s']} s")
        return state.record(key(name), result)

    data, labelled = out / task / "data", folder / "data-labelled"
    if (collected := state.done(f"{task}/collect")) is None:  # one dataset per task, shared by the seeds
        log(f"[{task}] collect ...")
        started = time.perf_counter()
        collected = {"summary": collect(task, cfg["episodes"], data, noise=cfg["noise"], workers=1, seed=cfg["seed"],
                                        progress=True), "wall_s": 0.0}
        collected["wall_s"] = round(time.perf_counter() - started, 1)
        state.record(f"{task}/collect", collected)
    imitation = stage("imitation", lambda: train_policy(
        load_model_config(cfg["tier"], {"training.steps": cfg["policy_steps"], "training.mode": "imitation",
                                        "training.seed": seed}),
        [data], folder / "imitation", resume=_started(folder / "imitation"), registry=registry.root, publish=True,
        threads=1))
    value = stage("value", lambda: train_value(
        load_value_config(cfg["tier"], {"training.progress_steps": cfg["value_steps"] // 2,
                                        "training.td_steps": cfg["value_steps"] - cfg["value_steps"] // 2,
                                        "training.seed": seed}),
        [data], folder / "value", resume=_started(folder / "value"), registry=registry.root, publish=True, threads=1))
    stage("label", lambda: label(str(Path(value["model"])), data, labelled))

    def recap_training(datasets: list[Path], run: str, init: dict) -> dict:  # RECAP's recipe: `recap_steps` on labels
        return train_policy(
            load_model_config(cfg["tier"], {"training.steps": cfg["recap_steps"], "training.mode": "advantage",
                                            "training.seed": seed}),
            datasets, folder / run, init=Path(init["model"]), resume=_started(folder / run), registry=registry.root,
            publish=True, threads=1)
    recap = stage("recap", lambda: recap_training([labelled], "recap", init=imitation))
    versions = {"imitation": imitation["version"], "recap": recap["version"]}

    if {"recap-rollouts", "recap-rollouts-outcome"} & set(cfg["methods"]):
        rollouts = folder / "rollouts-recap"

        def roll_out() -> dict:
            registry.set_alias("policy", "recap", recap["version"])
            server = PolicyServer(registry.root, preload=["recap"])
            try:  # layouts of the next evaluation seed: never the held-out ones, never the data's
                return evaluate(server.running.address, task, cfg["rollout_episodes"], version="recap",
                                seed=cfg["eval_seed"] + 1, advantage_bin=10, record=_fresh(rollouts),
                                progress=True).summary()
            finally:
                server.close()
        stage("rollouts", roll_out)
        rollout_labels = (("recap-rollouts", "label-rollouts", "rollouts-recap-labelled", False),
                          ("recap-rollouts-outcome", "label-rollouts-outcome", "rollouts-recap-outcome", True))
        for method, label_stage, labelled_name, outcome in rollout_labels:
            if method in cfg["methods"]:  # (each stage runs its function at once: the loop variables are current)
                rollouts_labelled = folder / labelled_name
                stage(label_stage, lambda: label(str(Path(value["model"])), rollouts, _fresh(rollouts_labelled),
                                                 outcome=outcome))
                versions[method] = stage(method, lambda: recap_training([labelled, rollouts_labelled], method,
                                                                        init=recap))["version"]
    if "recap-continued" in cfg["methods"]:
        versions["recap-continued"] = stage("recap-continued", lambda: recap_training([labelled], "recap-continued",
                                                                                      init=recap))["version"]

    rise_runs = rise_methods(cfg)
    if any(dyn == "learned" for dyn, _ in rise_runs.values()):
        dynamics = stage("dynamics", lambda: train_dynamics(
            load_dynamics_config(cfg["tier"], {"training.seed": seed}), [data], folder / "dynamics",
            resume=_started(folder / "dynamics"), registry=registry.root, publish=True, threads=1))
    for method, (dyn, ratio) in rise_runs.items():
        def rise_run(method=method, dyn=dyn, ratio=ratio) -> dict:
            registry.set_alias("policy", "stable", recap["version"])
            registry.set_alias("value", "stable", value["version"])
            # The oracle returns the ticks the learned model predicts (every frame_stride-th), so the value
            # gain is averaged over the same frames and the two runs differ by world-model error alone.
            world = dynamics["version"] if dyn == "learned" else publish_oracle_dynamics(
                registry, emb, frame_stride=load_dynamics_config(cfg["tier"]).frame_stride).version
            registry.set_alias("dynamics", "stable", world)
            overrides = {"learner.offline_ratio": ratio} if ratio is not None else {}
            if method == "rise-oracle-judge":
                overrides["rollout.value_version"] = publish_oracle_value(registry, emb).version
            return run_rise(task, method, seed, folder, registry, labelled, cfg, overrides, log)
        versions[method] = stage(method, rise_run)["version"]

    for method, version in versions.items():  # each method's version under its own alias, served at once
        registry.set_alias("policy", method, version)
    curves = {m: published_chain(registry, versions[m], recap["version"]) for m in rise_runs} if cfg["curve_episodes"] else {}
    for version in {v for chain in curves.values() for v in chain}:  # the server preloads aliases only
        registry.set_alias("policy", f"curve-{version}", version)
    server = PolicyServer(registry.root, preload=list(versions) + [f"curve-{v}" for chain in curves.values() for v in chain])
    try:
        results = {}
        for method in versions:
            # Imitation's and RECAP's rollouts are kept as datasets (held-out data for `value-ranking` and
            # `bench/guidance_gap.py`); nothing reads the others', and recording made an evaluation about four
            # times slower (2026-11-28, AMD: 1,054-1,175 s recorded vs 209-257 s not, 50 episodes).
            record = folder / f"eval-{method}"
            results[method] = stage(f"eval-{method}", lambda: evaluate(
                server.running.address, task, cfg["eval_episodes"], version=method, seed=cfg["eval_seed"],
                advantage_bin=0 if method == "imitation" else 10,
                record=_fresh(record) if method in RECORDED_EVALS and cfg["record_evals"] else None,
                progress=True).summary())
        for scale in cfg["guidance_scales"]:  # the same versions and layouts, prompted harder
            for method in [m for m in versions if m != "imitation"]:
                results[guided(method, scale)] = stage(f"eval-{guided(method, scale)}", lambda: evaluate(
                    server.running.address, task, cfg["eval_episodes"], version=method, seed=cfg["eval_seed"],
                    advantage_bin=10, guidance_scale=scale, progress=True).summary())
        for method, chain in curves.items():  # success vs RL steps: recap's version is step 0
            def curve(chain=chain) -> dict:
                points = []
                for version in [recap["version"], *chain]:
                    step = registry.manifest("policy", version).metrics.get("learner_step", 0.0)
                    alias = "recap" if version == recap["version"] else f"curve-{version}"
                    s = evaluate(server.running.address, task, cfg["curve_episodes"], version=alias,
                                 seed=cfg["eval_seed"], advantage_bin=10, progress=True).summary()
                    points.append({"version": version, "learner_step": step, "successes": s["successes"],
                                   "episodes": s["episodes"], "success_rate": s["success_rate"], "wilson95": s["wilson95"]})
                return {"points": points}
            results[f"curve-{method}"] = stage(f"curve-{method}", curve)
    finally:
        server.close()
    if not (folder / "eval-imitation").exists():  # (`--no-record-evals`: no held-out rollouts to rank)
        return {"value": value["metrics"], **results}
    ranking = stage("value-ranking", lambda: value_ranking(Path(value["model"]), folder / "eval-imitation", emb))
    return {"value": value["metrics"], "value_ranking": ranking, **results}


def guided(method: str, scale: float) -> str:
    """The table's name for `method` evaluated with classifier-free guidance `scale`."""
    return f"{method}-cfg{scale:g}"


def rise_methods(cfg: dict) -> dict[str, tuple[str, float | None]]:
    """RISE runs asked for: method -> (world model "learned" | "oracle", offline ratio or None = config's)."""
    runs = {m: ("learned" if m == "rise" else "oracle", None) for m in cfg["methods"]
            if m in ("rise", "rise-oracle", "rise-oracle-judge")}
    runs |= {f"rise-offline{round(100 * r)}": ("learned", float(r)) for r in cfg["offline_ratios"]}
    return runs


def published_chain(registry, final: str, start: str) -> list[str]:
    """The versions a RISE run published, oldest first: `final`'s parents back to `start` (excluded)."""
    chain, version = [], final
    while version and version != start:
        chain.append(version)
        version = registry.manifest("policy", version).parent
    return chain[::-1]


def _started(run: Path) -> bool:
    """A training stage stopped before it finished continues from its checkpoint (every trainer
    writes `checkpoint.pt`; they refuse to start over an existing one)."""
    return (run / "checkpoint.pt").exists()


def _fresh(path: Path) -> Path:
    """A stage re-run after a crash starts its output folder again."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    return path


def value_ranking(model: Path, rollouts: Path, emb) -> dict:
    """The value model on held-out rollouts (the imitation policy's evaluation episodes):
    does the last frame of a success score above the last frame of a failure, do values rise?"""
    import numpy as np

    from rise.data.loading import load_episodes_in_memory
    from services.value.label import local_scorer
    from services.value.train import ranking_metrics

    score, _ = local_scorer(model, emb)
    episodes = load_episodes_in_memory(rollouts, emb)
    tasks = [episodes.tasks[i] for i in episodes.frame_task_ids]
    values = np.zeros(len(episodes), np.float32)
    for ep in range(episodes.num_episodes):
        a, n = int(episodes.episode_starts[ep]), int(episodes.episode_lengths[ep])
        values[a:a + n] = score({v: episodes.views[v][a:a + n] for v in emb.views}, tasks[a:a + n])
    metrics = ranking_metrics(values, episodes, np.arange(episodes.num_episodes))
    successes = int(np.sum([episodes.frame_success[s] for s in episodes.episode_starts]))
    return {**metrics, "episodes": int(episodes.num_episodes), "successes": successes}


def run_rise(task: str, method: str, seed: int, folder: Path, registry, data: Path, cfg: dict, overrides: dict,
             log) -> dict:
    """Services on 127.0.0.1 + RL in imagination through them; returns the run's final policy version."""
    from rise.serving import ServerConfig
    from rise.services import service
    from services.trainer.config import load_run_config
    from services.trainer.run import TrainerRun

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    running = {}
    try:
        for name in ("policy", "value", "dynamics"):
            config_cls, start = service(name)
            config = config_cls(registry_root=registry.root, torch_threads=1, server=ServerConfig(port=0, log_json=False))
            running[name] = asyncio.run_coroutine_threadsafe(start(config), loop).result(300)
        overrides = {"out": str(folder / method), "registry_root": str(registry.root), "data": json.dumps([str(data)]),
                     **{f"services.{n}": f"grpc://{r.address}" for n, r in running.items()},
                     "replay.stream": f"rise-bench:{_folder_key(folder)}:{method}", "learner.steps": cfg["rl_steps"],
                     "learner.seed": seed, "gate.every_versions": 0, **trainer_overrides(cfg["set"], folder),
                     **overrides}
        run = TrainerRun(load_run_config(None, overrides), method, log=log)
        status = asyncio.run(run.run())
        if status.state != "succeeded":
            raise RuntimeError(f"RISE run ended {status.state}: {status.message}")
        return {"version": status.policy_version, "imagined_samples": status.imagined_samples,
                "metrics": status.metrics}
    finally:
        for r in running.values():
            asyncio.run_coroutine_threadsafe(r.stop(0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)


def trainer_overrides(overrides: dict[str, str], folder: Path) -> dict[str, str]:
    """`--set` values with `{folder}` replaced by this task's and seed's own folder: one table, one config, and
    each seed's RISE can start from its own recorded rollouts (`start_data=["{folder}/rollouts-recap"]`)."""
    return {k: v.replace("{folder}", str(folder)) for k, v in overrides.items()}


def _folder_key(folder: Path) -> str:
    """A run's replay stream is named after its folder: two tables (`--out`) never share one, a
    resumed table finds its own again."""
    import hashlib

    return hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]


def write_table(out: Path, tasks: list[str], state: State, cfg: dict) -> str:
    from rise.sim.stats import format_rate

    methods = [m for m in cfg["methods"] if m != "rise-oracle"] + [m for m in rise_methods(cfg) if m.startswith("rise-offline")]
    methods += ["rise-oracle"] if "rise-oracle" in cfg["methods"] else []
    methods += [guided(m, g) for g in cfg.get("guidance_scales", []) for m in methods if m != "imitation"]
    seeds = cfg["seeds"]
    key = lambda task, seed, stage: stage_key(task, seed, seeds, stage)  # noqa: E731
    lines = ["| task | " + " | ".join(methods) + " | value: success > failure (held-out) |",
             "| --- | " + " | ".join("---" for _ in methods) + " | --- |"]
    rows = {}
    for task in tasks:
        cells = []
        for method in methods:
            done = [s for seed in seeds if (s := state.done(key(task, seed, f"eval-{method}")))]
            pooled = pool(done)
            rows.setdefault(task, {})[method] = pooled
            cell = format_rate(pooled["successes"], pooled["episodes"]) if pooled else "—"
            if len(done) > 1:
                cell += " (seeds: " + ", ".join(f"{s['successes']}/{s['episodes']}" for s in done) + ")"
            cells.append(cell)
        value = state.done(f"{task}/value-ranking")
        ranking = value.get("success_vs_failure") if value else None
        cells.append(f"{ranking:.2f}" if isinstance(ranking, float) else "—")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n" + paired_table(tasks, methods, state, key, seeds)
    (out / "table.md").write_text(table)
    (out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    _plot(out / "success.png", tasks, methods, rows)
    curves = {(task, m): done for task in tasks for m in methods
              if (done := {seed: c["points"] for seed in seeds if (c := state.done(key(task, seed, f"curve-{m}")))})}
    if curves:
        _plot_curves(out / "curve.png", curves)
    return table


def paired_table(tasks: list[str], methods: list[str], state: State, key, seeds: list[int]) -> str:
    """Every method after RECAP against RECAP on the same layouts (per training seed and episode seed):
    the layouts only RECAP solved, only the method solved, and the exact sign test's p. A few episodes
    of 50 apart is noise; a paired split says whether one policy solves layouts the other does not."""
    from rise.sim.stats import discordant_pairs, sign_test

    against = [m for m in methods if m not in ("imitation", "recap")]
    if "recap" not in methods or not against:
        return ""
    lines = ["", "Paired with RECAP on the same layouts: RECAP only / method only (exact sign test p)", "",
             "| task | " + " | ".join(against) + " |", "| --- | " + " | ".join("---" for _ in against) + " |"]
    for task in tasks:
        cells = []
        for method in against:
            only_recap = only_method = 0
            pairs = [(r, m) for seed in seeds if (r := state.done(key(task, seed, "eval-recap")))
                     and (m := state.done(key(task, seed, f"eval-{method}")))]
            for recap_eval, method_eval in pairs:
                recap_wins, method_wins = discordant_pairs(recap_eval["per_episode"], method_eval["per_episode"])
                only_recap, only_method = only_recap + recap_wins, only_method + method_wins
            cells.append(f"{only_recap} / {only_method} (p {sign_test(only_recap, only_method):.2f})" if pairs else "—")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pool(summaries: list[dict]) -> dict | None:
    """Several evaluations (seeds) of one method as one: summed episodes, Wilson interval of the sum."""
    from rise.sim.stats import wilson_interval

    if not summaries:
        return None
    successes, episodes = sum(s["successes"] for s in summaries), sum(s["episodes"] for s in summaries)
    return {"successes": successes, "episodes": episodes, "success_rate": successes / episodes,
            "wilson95": list(wilson_interval(successes, episodes)), "seeds": len(summaries),
            "seed_rates": [s["successes"] / s["episodes"] for s in summaries]}


def pool_curves(curves: list[list[dict]]) -> list[dict]:
    """Several seeds' success-vs-steps curves as one: the points at each learner step pooled (the
    runs publish at the same steps; a step some seeds lack pools the ones that have it)."""
    by_step: dict[float, list[dict]] = {}
    for points in curves:
        for point in points:
            by_step.setdefault(point["learner_step"], []).append(point)
    return [{"learner_step": step, **pool(points)} for step, points in sorted(by_step.items())]


def _plot_curves(path: Path, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (task, method), by_seed in curves.items():
        points = pool_curves(list(by_seed.values()))
        steps = [p["learner_step"] for p in points]
        label = f"{task} {method}" + (f" ({len(by_seed)} seeds pooled)" if len(by_seed) > 1 else "")
        line = ax.errorbar(steps, [p["success_rate"] for p in points], marker="o", capsize=3, label=label,
                           yerr=[[p["success_rate"] - p["wilson95"][0] for p in points],
                                 [p["wilson95"][1] - p["success_rate"] for p in points]])
        if len(by_seed) > 1:  # each seed thin beside the pooled curve: pooling can hide seeds that disagree
            for marker, (seed, own) in zip(itertools.cycle("x+^svD<>"), by_seed.items()):
                ax.plot([p["learner_step"] for p in own], [p["successes"] / p["episodes"] for p in own], lw=0.8,
                        ls="--", marker=marker, alpha=0.6, color=line.lines[0].get_color(),
                        label=f"{task} {method} seed {seed}")
    ax.set_xlabel("RL learner steps (0: the RECAP policy it starts from)")
    ax.set_ylabel("success (Wilson 95%)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot(path: Path, tasks: list[str], methods: list[str], rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(2 + 2 * len(tasks), 3.5))
    width = 0.8 / len(methods)
    seed_dots = False
    for i, method in enumerate(methods):
        rates, errs = [], [[], []]
        for task in tasks:
            s = rows.get(task, {}).get(method)
            rate = s["success_rate"] if s else np.nan
            low, high = s["wilson95"] if s else (np.nan, np.nan)
            rates.append(rate)
            errs[0].append(rate - low)
            errs[1].append(high - rate)
        x = np.arange(len(tasks)) + i * width
        ax.bar(x, rates, width, yerr=errs, capsize=3, label=method)
        for j, task in enumerate(tasks):  # each training seed's own rate: their spread is the noise to beat
            own = (rows.get(task, {}).get(method) or {}).get("seed_rates", [])
            if len(own) > 1:
                ax.scatter([x[j]] * len(own), own, s=12, color="black", zorder=3,
                           label=None if seed_dots else "one training seed")
                seed_dots = True
    ax.set_xticks(np.arange(len(tasks)) + width * (len(methods) - 1) / 2, tasks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("success (Wilson 95%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@app.command()
def main(
    tasks: str = typer.Option("push,pick-place,peg-insert-side", help="Comma-separated MetaWorld tasks."),
    out: Path = typer.Option(Path("runs/table"), help="Output folder (resumable)."),
    methods: str = typer.Option(",".join(METHODS), help=f"Subset of {','.join(METHODS)}."),
    tier: str = typer.Option("small"),
    episodes: int = typer.Option(40, help="Collected episodes per task."),
    noise: float = typer.Option(0.5, help="Expert action noise (failures give the value model and RL something to learn)."),
    policy_steps: int = typer.Option(1500),
    recap_steps: int = typer.Option(750),
    value_steps: int = typer.Option(1500),
    rl_steps: int = typer.Option(300),
    rollout_episodes: int = typer.Option(50, help="recap-rollouts: the RECAP policy's simulator episodes it learns from."),
    eval_episodes: int = typer.Option(50),
    seed: int = typer.Option(0),
    eval_seed: int = typer.Option(1, help="Evaluation layouts 2**32 + 100000 * eval_seed + episode: never the data's."),
    offline_ratios: str = typer.Option("", help="RISE offline-ratio sweep, e.g. 0.1,0.3,0.6,0.9 (learned world model)."),
    seeds: str = typer.Option("0", help="Training seeds, e.g. 0,1,2 (every training stage once per seed)."),
    curve_episodes: int = typer.Option(0, help="Evaluate every published RISE version on this many episodes (0: off)."),
    guidance_scales: str = typer.Option("", help="Also evaluate each advantage-conditioned policy with classifier-free "
                                                 "guidance at these scales, e.g. 2,3."),
    set_: list[str] = typer.Option([], "--set", help="Trainer run config override KEY=VALUE (all tasks and seeds); "
                                 "`{folder}` in VALUE is each task's and seed's own folder."),
    fork_from: Path = typer.Option(None, help="Start from a copy of this table's stages that --set does not shape "
                                              "(everything up to the RISE runs): only the RISE runs train again."),
    record_evals: bool = typer.Option(True, help="Keep imitation's and RECAP's evaluation rollouts as LeRobot datasets "
                                                  "(the value-ranking column reads them; about 4x slower evaluations)."),
) -> None:
    import torch

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"tier": tier, "episodes": episodes, "noise": noise, "policy_steps": policy_steps, "recap_steps": recap_steps,
           "value_steps": value_steps, "rl_steps": rl_steps, "rollout_episodes": rollout_episodes,
           "eval_episodes": eval_episodes, "seed": seed, "eval_seed": eval_seed, "methods": methods.split(","),
           "set": dict(s.split("=", 1) for s in set_),
           "offline_ratios": [float(r) for r in offline_ratios.split(",") if r],
           "seeds": [int(x) for x in seeds.split(",")], "curve_episodes": curve_episodes,
           "guidance_scales": [float(g) for g in guidance_scales.split(",") if g], "record_evals": record_evals}
    unknown = set(cfg["methods"]) - set(METHODS)
    if unknown:
        raise typer.BadParameter(f"unknown methods {sorted(unknown)}; choose from {','.join(METHODS)}")
    if fork_from is not None and not (out / "state.json").exists():  # (a resumed fork goes on from its own state)
        fork_table(fork_from, out, {**cfg, "forked_from": str(fork_from.resolve())})
    state = State(out / "state.json")
    if (before := state.done("config")) is not None and stage_config(before) != stage_config(cfg):
        raise typer.BadParameter(f"{out} was started with another config ({before}); use a new --out")
    if before is not None and "forked_from" in before:
        cfg["forked_from"] = before["forked_from"]
    state.record("config", cfg)
    task_list = tasks.split(",")
    for task in task_list:
        for seed in cfg["seeds"]:
            run_task(task, seed, out, state, cfg, log=print)
        print(write_table(out, task_list, state, cfg))


if __name__ == "__main__":
    app()
