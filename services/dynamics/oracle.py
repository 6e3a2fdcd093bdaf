"""The oracle world model: the MetaWorld simulator itself behind the dynamics API.

For each item it restores the recorded simulator state (`ImagineItem.sim_state`, from
`MetaWorldSim.get_state`) in a simulator of the task named by the item's text, executes the
chunk's actions one per control tick and renders the embodiment's views. Restoring is exact,
so the "imagined" frames are the frames the simulator itself shows: the upper bound of learned
imagination (its gap to a learned model is pure world-model error) and a test double that is
not a mock. The simulator state after the chunk comes back too, so imagined chunks can be chained,
and so does the robot state the simulator reached (what the policy reads at a chained step).

Returned frames: every `frame_stride`-th tick of the chunk (F = chunk_length / frame_stride),
the last one being the end of the chunk. History frames, robot state, steps and seed are
ignored. The version folder holds no weights; the manifest's config gives `frame_stride`.

Threads: a MuJoCo EGL context works only in the thread that made it current first, so every
task's simulator lives in a worker thread of its own (created and used only there); that also
serialises access to it. Items of different tasks run in parallel, items of one task in order.
"""

from __future__ import annotations

import atexit
import queue
import threading
from concurrent.futures import Future

import numpy as np

from rise.embodiment import Embodiment
from rise.errors import FailedPrecondition, InvalidArgument
from rise.registry import VerifiedVersion

KIND = "oracle"


class _TaskSim:
    """One rendering simulator and the one thread allowed to touch it.

    The thread is a daemon serving a job queue (not an executor, whose workers are joined before
    `atexit` runs): at exit the simulator is closed in its own thread, before MuJoCo's own
    `atexit` hook terminates the EGL display, so no renderer is freed from the wrong thread.
    """

    def __init__(self, task: str, embodiment: Embodiment):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=f"oracle-{task}", daemon=True).start()
        try:
            self.sim = self.submit(self._make, task, embodiment).result()
        except BaseException:
            self._jobs.put(None)
            raise
        atexit.register(self.close)  # after the first EGL context exists, so it runs before EGL's hook

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001  (handed to the caller)
                    future.set_exception(exc)

    @staticmethod
    def _make(task: str, embodiment: Embodiment):
        import mujoco

        from rise.sim.metaworld_sim import MetaWorldSim

        # A step budget far beyond any episode: restored step counts keep growing when chunks are
        # chained, and MetaWorld refuses to step past its limit.
        sim = MetaWorldSim(task, embodiment, max_steps=1_000_000)
        missing = [v for v in embodiment.views if mujoco.mj_name2id(sim.env.model, mujoco.mjtObj.mjOBJ_CAMERA, v) < 0]
        if missing:
            sim.close()
            raise FailedPrecondition(f"the oracle renders MetaWorld cameras; {task!r} has no camera(s) {missing} "
                                     f"that embodiment {embodiment.name!r} names")
        return sim

    def close(self) -> None:
        if self.sim is None:
            return
        atexit.unregister(self.close)
        self.submit(self.sim.close).result()
        self.sim = None
        self._jobs.put(None)


class OracleDynamics:
    # DynamicsServicer passes `tasks=` and `sim_states=` (one float64 array or None per item) only
    # to models that declare this, calls `check_items` before batching, and takes
    # `(frames, sim_states, robot states)` back from `imagine`: learned models never see the simulator's state.
    needs_sim_state = True

    def __init__(self, embodiment: Embodiment, frame_stride: int = 1):
        if embodiment.action_dim != 4:
            raise FailedPrecondition(f"the oracle drives MetaWorld's Sawyer (4-d actions); embodiment {embodiment.name!r} "
                                     f"has action_dim {embodiment.action_dim}")
        if frame_stride < 1 or embodiment.chunk_length % frame_stride:
            raise FailedPrecondition(f"oracle frame_stride {frame_stride} must divide chunk_length {embodiment.chunk_length}")
        self.embodiment = embodiment
        self.frame_stride = frame_stride
        self.future_frames = embodiment.chunk_length // frame_stride
        self._sims: dict[str, _TaskSim] = {}
        self._sims_lock = threading.Lock()

    # ---- the model interface ----------------------------------------------------------------
    def check_items(self, tasks: list[str], sim_states: list[np.ndarray | None]) -> None:
        """InvalidArgument naming the first item whose task or sim state the oracle cannot use."""
        for i, (text, state) in enumerate(zip(tasks, sim_states)):
            task = self._task(i, text)
            size = self._sim(task).sim.state_size
            if state is None:
                raise InvalidArgument(f"items[{i}].sim_state is missing; the oracle restores the simulator state: "
                                      f"float64 [{size}] for {task!r}, from MetaWorldSim.get_state()")
            if state.shape != (size,):
                raise InvalidArgument(f"items[{i}].sim_state for {task!r} must be float64 [{size}], got "
                                      f"{list(state.shape)} (a state from another task?)")

    def imagine(self, history: dict[str, np.ndarray], actions: np.ndarray, num_steps: int = 0, seed: int = 0, *,
                tasks: list[str], sim_states: list[np.ndarray | None]
                ) -> tuple[dict[str, np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """actions float32 [B, chunk, 4] -> ({view: uint8 [B, F, H, W, 3]}, B float64 simulator states and
        B float32 robot states after the chunk)."""
        self.check_items(tasks, sim_states)
        runs = []
        for b, (text, state) in enumerate(zip(tasks, sim_states)):
            task_sim = self._sim(self._task(b, text))
            runs.append(task_sim.submit(self._rollout, task_sim.sim, state, actions[b]))
        results = [run.result() for run in runs]
        frames = {v: np.stack([views[v] for views, _, _ in results]) for v in self.embodiment.views}
        return frames, [sim_state for _, sim_state, _ in results], [state for _, _, state in results]

    def close(self) -> None:
        with self._sims_lock:
            sims, self._sims = self._sims, {}
        for task_sim in sims.values():
            task_sim.close()

    # ---- inside a task's thread ----------------------------------------------------------------
    def _rollout(self, sim, state: np.ndarray, actions: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        frames: dict[str, list[np.ndarray]] = {v: [] for v in self.embodiment.views}
        sim.set_state(state, render=False)
        for tick, action in enumerate(actions, start=1):
            frame = sim.step(action, render=tick % self.frame_stride == 0)  # every frame_stride-th frame is returned
            if frame.views:
                for v in self.embodiment.views:
                    frames[v].append(frame.views[v])
        return {v: np.stack(f) for v, f in frames.items()}, sim.get_state(), frame.state

    # ---- helpers ----------------------------------------------------------------------------
    def _task(self, index: int, text: str) -> str:
        from rise.sim.metaworld_sim import task_for_request

        return task_for_request(index, text)

    def _sim(self, task: str) -> _TaskSim:
        with self._sims_lock:  # held while a simulator is made (seconds): simple, and only once per task
            if task not in self._sims:
                self._sims[task] = _TaskSim(task, self.embodiment)
            return self._sims[task]


def config(frame_stride: int = 1) -> dict:
    """What the version's manifest records: the stride and the simulator it stands for."""
    from importlib.metadata import version

    return {"frame_stride": frame_stride, "source": "MetaWorld simulator (privileged: reads ImagineItem.sim_state)",
            "metaworld": version("metaworld"), "mujoco": version("mujoco")}


def load(verified: VerifiedVersion, embodiment: Embodiment) -> OracleDynamics:
    return OracleDynamics(embodiment, int(verified.manifest.config.get("frame_stride", 1)))
