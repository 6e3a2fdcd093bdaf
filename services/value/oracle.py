"""The oracle value model: MetaWorld's own shaped reward behind the value API.

For each instant it restores the simulator state the request sends (`ScoreItem.sim_states`,
from `MetaWorldSim.get_state`) in a simulator of the task named by the item's text and returns
the task's shaped reward / 10 (`MetaWorldSim.shaped_reward`: in [0, 1], 1 once the episode has
succeeded). The frames are ignored. It is the judge the learned value model stands in for: RISE
with the oracle dynamics and this value (`bench/paper_table.py`, method `rise-oracle-judge`)
separates the value model's error from what the improvement step itself can do. The reward is
the task designer's progress measure, not the episode's eventual success.

Nothing is rendered, so any thread may use a simulator; one lock per task serialises its use.
"""

from __future__ import annotations

import threading

import numpy as np

from rise.embodiment import Embodiment
from rise.errors import InvalidArgument
from rise.registry import VerifiedVersion

KIND = "oracle"


class OracleValue:
    # ValueServicer passes `sim_states=` (per item float64 [F, n], or None when the item sent none)
    # only to models that declare this, and calls `check_items` before the items join a batch.
    needs_sim_state = True

    def __init__(self, embodiment: Embodiment):
        self.embodiment = embodiment
        self._sims: dict[str, tuple[object, threading.Lock]] = {}
        self._sims_lock = threading.Lock()

    def check_items(self, tasks: list[str], counts: list[int], sim_states: list[np.ndarray | None]) -> None:
        """InvalidArgument naming the first item whose task or sim states the oracle cannot use."""
        from rise.sim.metaworld_sim import task_for_request

        for i, (text, count, states) in enumerate(zip(tasks, counts, sim_states)):
            task = task_for_request(i, text)
            size = self._sim(task)[0].state_size
            if states is None:
                raise InvalidArgument(f"items[{i}].sim_states is missing; the oracle value scores simulator states: "
                                      f"float64 [F={count}, {size}] for {task!r}, from MetaWorldSim.get_state()")
            if states.shape != (count, size):
                raise InvalidArgument(f"items[{i}].sim_states for {task!r} must be float64 [F={count}, {size}] (one state "
                                      f"per frame), got {list(states.shape)}")

    def score(self, views: dict[str, np.ndarray], tasks: list[str], *, sim_states: np.ndarray) -> np.ndarray:
        """N frames (ignored), N tasks, float64 [N, n] states -> float32 [N] in [0, 1]."""
        from rise.sim.metaworld_sim import task_for_request

        values = np.empty(len(tasks), np.float32)
        for i, (text, state) in enumerate(zip(tasks, sim_states)):
            sim, lock = self._sim(task_for_request(i, text))
            with lock:
                frame = sim.set_state(state, render=False)
                values[i] = sim.shaped_reward(frame.raw_obs) / 10.0
        return values

    def _sim(self, task: str):
        with self._sims_lock:  # held while a simulator is made (about a second): only once per task
            if task not in self._sims:
                from rise.sim.metaworld_sim import MetaWorldSim

                # A step budget far beyond any episode: restored step counts of chained chunks keep growing.
                self._sims[task] = (MetaWorldSim(task, self.embodiment, max_steps=1_000_000, render=False),
                                    threading.Lock())
            return self._sims[task]


def config() -> dict:
    """What the version's manifest records: the simulator it stands for."""
    from importlib.metadata import version

    return {"source": "MetaWorld shaped reward / 10 (privileged: reads ScoreItem.sim_states)",
            "metaworld": version("metaworld"), "mujoco": version("mujoco")}


def load(verified: VerifiedVersion, embodiment: Embodiment) -> OracleValue:
    return OracleValue(embodiment)
