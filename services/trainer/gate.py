"""The ground-truth gate: imagination proposes, the simulator decides.

Every M published versions the run evaluates `candidate` in the simulator (the data issue's
evaluator, on held-out layouts, the same layouts for every version) and promotes it to `stable`
only when it beats the current `stable` with the configured one-sided confidence (a pooled
two-proportion z-test). Every evaluation is kept in `<run>/gate.json`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rise.serving import ClientConfig
from services.trainer.config import GateConfig


def beats(successes: int, trials: int, base_successes: int, base_trials: int, confidence: float) -> tuple[bool, float]:
    """Is rate 1 > rate 2 at `confidence` (one-sided, pooled z-test)? -> (decision, p-value)."""
    from statistics import NormalDist

    if not trials or not base_trials:
        return False, 1.0
    p1, p2 = successes / trials, base_successes / base_trials
    pooled = (successes + base_successes) / (trials + base_trials)
    se = math.sqrt(pooled * (1 - pooled) * (1 / trials + 1 / base_trials))
    if se == 0:
        return p1 > p2, 0.0 if p1 > p2 else 1.0
    p_value = 1.0 - NormalDist().cdf((p1 - p2) / se)
    return p_value < 1.0 - confidence, p_value


class Gate:
    def __init__(self, config: GateConfig, run_dir: Path, policy: str | ClientConfig, task: str, embodiment: str,
                 log=print):
        """`policy`: the policy service's host:port, or its client settings (TLS, token)."""
        self.config, self.path, self.policy, self.task, self.embodiment, self.log = (
            config, Path(run_dir) / "gate.json", policy, task, embodiment, log)
        self.history: list[dict] = json.loads(self.path.read_text()) if self.path.exists() else []

    def evaluated(self, version: str) -> dict | None:
        return next((h for h in self.history if h["version"] == version), None)

    def evaluate(self, version: str, role: str, learner_step: int) -> dict:
        """Simulator success of `version` (blocking: call it from a worker thread)."""
        from rise.sim.evaluate import evaluate

        cfg = self.config
        started = time.perf_counter()
        report = evaluate(self.policy, self.task, cfg.episodes, version=version, seed=cfg.seed, max_steps=cfg.max_steps,
                          embodiment=self.embodiment, progress=False)
        entry = {"version": version, "role": role, "learner_step": learner_step, "task": self.task,
                 "successes": report.successes, "episodes": len(report.episodes), "success_rate": report.success_rate,
                 "wilson95": list(report.interval), "promoted": False, "p_value": None,
                 "eval_s": round(time.perf_counter() - started, 1), "unix_ms": int(time.time() * 1000)}
        self.history.append(entry)
        self._save()
        self.log(f"gate: {role} {version} at learner step {learner_step}: {report.successes}/{len(report.episodes)} "
                 f"({report.success_rate:.0%}) on {self.task}")
        return entry

    def decide(self, candidate: dict, stable: dict | None) -> bool:
        """Promote when the candidate beats stable with confidence (or there is no stable yet)."""
        if stable is None:
            promote, p_value = True, 0.0
        else:
            promote, p_value = beats(candidate["successes"], candidate["episodes"], stable["successes"],
                                     stable["episodes"], self.config.confidence)
        candidate.update(promoted=promote, p_value=p_value, compared_with=stable["version"] if stable else "")
        self._save()
        return promote

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.history, indent=2) + "\n")
        tmp.replace(self.path)
