"""MetaWorld's scripted expert, served as a policy: the privileged baseline every learned policy
is measured against.

The expert reads MetaWorld's 39-d observation (object and goal positions), which no camera
gives, so it needs the simulator state each observation carries (`Observation.sim_state`,
from `MetaWorldSim.get_state`). For each observation it restores that state in a private,
non-rendering simulator of the task named by the observation's text and rolls the expert
forward `chunk_length` steps, returning the actions it took: an open-loop chunk. Because the
restore is exact, executing that chunk in the caller's simulator retraces the same states, so
without disturbances the served expert matches the closed-loop one step for step.

Views, robot state and the advantage bin are ignored. The version folder holds no weights;
the manifest's config records which MetaWorld release the expert came from.
"""

from __future__ import annotations

import threading

import numpy as np

from rise.embodiment import Embodiment
from rise.errors import FailedPrecondition, InvalidArgument
from rise.registry import VerifiedVersion

KIND = "scripted-expert"


class ScriptedExpertPolicy:
    # PolicyServicer passes `sim_states=` (one float64 array or None per observation) only to
    # models that declare this: learned policies must never see the simulator's state.
    needs_sim_state = True

    def __init__(self, embodiment: Embodiment):
        if embodiment.action_dim != 4 or embodiment.state_dim != 4:
            raise FailedPrecondition(f"the scripted expert drives MetaWorld's Sawyer (4-d state and action); embodiment "
                                     f"{embodiment.name!r} has state_dim {embodiment.state_dim}, action_dim {embodiment.action_dim}")
        from rise.sim.metaworld_sim import task_names, task_text

        self.embodiment = embodiment
        self.task_by_text = {task_text(name): name for name in task_names()}
        # One simulator and expert per task, made on first use; each has its own lock because
        # act() runs in worker threads and a simulator holds one state at a time.
        self._sims: dict[str, tuple[threading.Lock, object, object]] = {}
        self._sims_lock = threading.Lock()

    def act(self, views: dict[str, np.ndarray], state: np.ndarray, tasks: list[str], advantage_bins: np.ndarray,
            num_steps: int = 0, seed: int = 0, *, sim_states: list[np.ndarray | None]) -> np.ndarray:
        """-> float32 [B, chunk_length, 4]: the expert's next actions from each observation's sim state."""
        chunks = [self._chunk(i, text, sim_state) for i, (text, sim_state) in enumerate(zip(tasks, sim_states))]
        return np.stack(chunks)

    def _chunk(self, index: int, text: str, sim_state: np.ndarray | None) -> np.ndarray:
        task = self.task_by_text.get(text.strip())
        if task is None:
            raise InvalidArgument(f"observation {index}: task text {text!r} is not a MetaWorld task; the scripted expert "
                                  f"knows the texts of rise.sim.metaworld_sim.task_text, e.g. 'push', 'pick place', "
                                  f"'peg insert side' ({len(self.task_by_text)} tasks)")
        lock, sim, expert = self._sim(task)
        if sim_state is None:
            raise InvalidArgument(f"observation {index}: sim_state is missing; the scripted expert is a privileged policy "
                                  f"and needs the simulator state (float64 [{sim.state_size}] for {task!r}, from "
                                  "MetaWorldSim.get_state())")
        if sim_state.shape != (sim.state_size,):
            raise InvalidArgument(f"observation {index}: sim_state for {task!r} must be float64 [{sim.state_size}], "
                                  f"got {list(sim_state.shape)} (a state from another task?)")
        # float32: what the caller receives and executes, so this rollout retraces the caller's exactly.
        actions = np.empty((self.embodiment.chunk_length, 4), dtype=np.float32)
        with lock:
            # A copy: wire tensors are read-only views of the message, and MuJoCo writes into its input.
            frame = sim.set_state(sim_state)
            for t in range(len(actions)):
                # The experts emit actions outside [-1, 1]; the simulator clips them, so send what it executes.
                actions[t] = np.clip(expert.get_action(frame.raw_obs), -1.0, 1.0)
                frame = sim.step(actions[t])
        return actions

    def _sim(self, task: str):
        with self._sims_lock:
            if task not in self._sims:
                from rise.sim.metaworld_sim import MetaWorldSim, expert_policy

                # A step budget far beyond any episode: the restored step count keeps growing and
                # MetaWorld refuses to step past its limit.
                sim = MetaWorldSim(task, self.embodiment, max_steps=1_000_000, render=False)
                self._sims[task] = (threading.Lock(), sim, expert_policy(task))
            return self._sims[task]


def config() -> dict:
    """What the version's manifest records: where the expert comes from."""
    from importlib.metadata import version

    return {"source": "metaworld.policies (scripted, privileged: reads Observation.sim_state)",
            "metaworld": version("metaworld"), "mujoco": version("mujoco")}


def load(verified: VerifiedVersion, embodiment: Embodiment) -> ScriptedExpertPolicy:
    return ScriptedExpertPolicy(embodiment)
