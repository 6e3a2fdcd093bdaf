"""Any MetaWorld v3 task by name, rendered into the embodiment's views, with savable state.

Why not `env.render`: it renders one camera per env at 11-15 frames/s; one raw
`mujoco.Renderer` with shadows and reflections off draws every view at 50-60 frames/s.
The corner cameras are mounted upside down in MetaWorld's scene, so they are turned 180 deg.

Episodes are reproducible: the episode seed draws the task layout (MetaWorld's "rand vec":
object and goal positions), instead of MT1's 50 pre-sampled layouts.

The full simulator state is one float64 vector (`get_state` / `set_state`): the layout, the
step count, MetaWorld's previous-observation buffers and MuJoCo's integration state (time,
qpos, qvel, actuator and mocap state, warm start). Restoring it and stepping the same actions
reproduces the same frames exactly, which the oracle world model relies on.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported: headless rendering

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from rise.embodiment import Embodiment  # noqa: E402

UPSIDE_DOWN_CAMERAS = {"corner", "corner2", "corner3", "corner4"}
_STATE_KIND = mujoco.mjtState.mjSTATE_INTEGRATION


def task_names() -> list[str]:
    import metaworld

    return sorted(name.removesuffix("-v3") for name in metaworld.ALL_V3_ENVIRONMENTS)


def _env_name(task: str) -> str:
    name = task if task.endswith("-v3") else f"{task}-v3"
    import metaworld

    if name not in metaworld.ALL_V3_ENVIRONMENTS:
        raise ValueError(f"unknown MetaWorld task {task!r}; known: {', '.join(task_names())}")
    return name


def task_text(task: str) -> str:
    """The instruction text that goes with a task in datasets and requests."""
    return task.removesuffix("-v3").replace("-", " ")


def task_for_request(index: int, text: str) -> str:
    """The task item `index` of a request names by `text` (its instruction text, as in datasets, or the
    task name itself); InvalidArgument when it names none."""
    from rise.errors import InvalidArgument

    task = _tasks_by_text().get(text.strip())
    if task is None:
        raise InvalidArgument(f"items[{index}].task: {text!r} is not a MetaWorld task; the oracle knows the texts of "
                              f"rise.sim.metaworld_sim.task_text, e.g. 'push', 'pick place', 'peg insert side' "
                              f"({len(task_names())} tasks)")
    return task


@functools.cache
def _tasks_by_text() -> dict[str, str]:
    names = task_names()
    return {**{n: n for n in names}, **{task_text(n): n for n in names}}


def expert_policy(task: str):
    """The scripted expert MetaWorld ships for `task` (reads the 39-d observation)."""
    import metaworld.policies as policies

    def norm(s: str) -> str:
        return s.lower().replace("-", "").replace("_", "")

    # Class names follow task names except one: peg-insert-side -> PegInsertionSide.
    wanted = norm(_env_name(task).removesuffix("-v3")).replace("peginsertside", "peginsertionside")
    for name in dir(policies):
        if name.startswith("Sawyer") and name.endswith("V3Policy") and norm(name[6:-8]) == wanted:
            return getattr(policies, name)()
    raise ValueError(f"no scripted expert for {task!r}")


@dataclass
class Frame:
    """What the simulator shows after a reset or a step."""

    views: dict[str, np.ndarray]  # view -> uint8 [H, W, 3]
    state: np.ndarray  # float32 [4]: hand xyz (m), gripper opening (normalised 0..1)
    raw_obs: np.ndarray  # float64 [39]: MetaWorld's observation, what the scripted expert reads
    success: bool
    sim_state: np.ndarray  # float64 [state_size]


def _make_env(name: str):
    """One environment with MT1's settings (goal visible in the observation), built directly.

    `metaworld.MT1` pre-samples 50 layouts from an unseeded generator and asserts they are
    distinct, which now and then fails ("Only generated 48 unique goals"); we draw layouts
    ourselves at reset anyway, so one deterministic layout is all the task needs.
    """
    from metaworld import _encode_task
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS, ML1_ARGS_KWARGS

    cls = ALL_V3_ENVIRONMENTS[name]
    kwargs = {k: v for k, v in ML1_ARGS_KWARGS[name]["kwargs"].items() if k != "task_id"}
    env = cls()
    env._freeze_rand_vec, env._set_task_called = False, True
    env._set_task_inner(**kwargs)
    env.reset(seed=0)  # seeds the env's generator: the same first layout in every process
    env.set_task(_encode_task(name, dict(kwargs, rand_vec=env._last_rand_vec.copy(), env_cls=cls, partially_observable=False)))
    return env


class MetaWorldSim:
    def __init__(self, task: str, embodiment: Embodiment, max_steps: int = 200, render: bool = True):
        self.task = _env_name(task).removesuffix("-v3")
        self.embodiment = embodiment
        self.max_steps = max_steps
        name = _env_name(task)
        self.env = _make_env(name)
        self.env.max_path_length = max_steps
        self.layout_size = len(self.env._last_rand_vec)
        self.mj_state_size = mujoco.mj_stateSize(self.env.model, _STATE_KIND)
        self.state_size = self.layout_size + self._HEAD + self.mj_state_size
        self.renderer = None
        if render:
            self.renderer = mujoco.Renderer(self.env.model, embodiment.image_height, embodiment.image_width)
            self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
            self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        self._success = False
        self._shown_prev = np.zeros(18)  # the "previous" part of the last observation returned

    # ---- episodes --------------------------------------------------------------------------
    def reset(self, seed: int, render: bool = True) -> Frame:
        """A new episode whose layout is drawn from `seed`.

        MetaWorld draws the layout itself (its `seeded_rand_vec` mode, from a generator seeded
        with `seed`): for about 20 tasks its reset redraws the layout while objects are too close,
        a rejection loop that never ends when the layout is frozen. The accepted layout is then
        frozen for restores.
        """
        env = self.env
        env._freeze_rand_vec, env.seeded_rand_vec = False, True
        env.np_random = np.random.default_rng(seed)
        try:
            env.reset()
        finally:
            env.seeded_rand_vec = False
        return self._reset_with_layout(env._last_rand_vec.copy(), render)

    def _reset_with_layout(self, layout: np.ndarray, render: bool = True) -> Frame:
        self.env._freeze_rand_vec = True
        self.env._last_rand_vec = np.array(layout, dtype=np.float64)
        raw, _ = self.env.reset()
        self._success = False
        return self._frame(raw, render)

    def step(self, action: np.ndarray, render: bool = True) -> Frame:
        """One control tick. Actions are clipped to MetaWorld's [-1, 1] box.

        render=False skips drawing the views (about 90% of a step's cost): `Frame.views` is empty.
        """
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        raw, _, _, _, info = self.env.step(action)
        self._success = self._success or bool(info["success"])  # success is sticky within an episode
        return self._frame(raw, render)

    @property
    def steps(self) -> int:
        return int(self.env.curr_path_length)

    @property
    def done(self) -> bool:
        return self.steps >= self.max_steps

    def _frame(self, raw: np.ndarray, render: bool = True) -> Frame:
        self._shown_prev = raw[18:36].copy()
        views = self.render() if render and self.renderer else {}
        return Frame(views, raw[:4].astype(np.float32), raw, self._success, self.get_state())

    # The gripper command the reward is computed with: MetaWorld's reward also reads the action (its gripper
    # effort), and a state alone has none; "closing" credits a caged object as held.
    _REWARD_ACTION = np.array([0.0, 0.0, 0.0, 1.0])

    def shaped_reward(self, raw_obs: np.ndarray) -> float:
        """MetaWorld's own shaped reward for the current state and its observation `raw_obs`, in [0, 10]:
        10 once the episode has succeeded (the sticky flag), else the task's reward with the gripper closing."""
        if self._success:
            return 10.0
        reward, _ = self.env.evaluate_state(raw_obs, self._REWARD_ACTION)
        return float(reward)

    def render(self) -> dict[str, np.ndarray]:
        views = {}
        for view in self.embodiment.views:
            self.renderer.update_scene(self.env.data, camera=view)
            image = self.renderer.render()
            views[view] = np.ascontiguousarray(image[::-1, ::-1]) if view in UPSIDE_DOWN_CAMERAS else image
        return views

    # ---- state -------------------------------------------------------------------------------
    # Layout of the state vector after the task layout: step count, sticky success flag, MetaWorld's
    # previous-observation buffer, the "previous" part of the last observation shown, MuJoCo state.
    _HEAD = 1 + 1 + 18 + 18

    def get_state(self) -> np.ndarray:
        env = self.env
        mj_state = np.empty(self.mj_state_size, dtype=np.float64)
        mujoco.mj_getState(env.model, env.data, mj_state, _STATE_KIND)
        head = [env.curr_path_length, float(self._success), *env._prev_obs, *self._shown_prev]
        return np.concatenate([env._last_rand_vec, head, mj_state]).astype(np.float64)

    def set_state(self, state: np.ndarray, render: bool = True) -> Frame:
        """Restore a state from `get_state` (same task); returns the frame it shows."""
        state = np.array(state, dtype=np.float64)  # a copy: MuJoCo refuses read-only wire buffers
        if state.shape != (self.state_size,):
            raise ValueError(f"{self.task}: sim state must be float64 [{self.state_size}], got {list(state.shape)}")
        env = self.env
        layout, head, mj_state = np.split(state, [self.layout_size, self.layout_size + self._HEAD])
        if env._last_rand_vec is None or not np.array_equal(layout, env._last_rand_vec):
            self._reset_with_layout(layout, render=False)  # the layout also sets the goal and reward bookkeeping
        env.curr_path_length = int(head[0])
        self._success = bool(head[1])
        env._prev_obs = head[2:20].copy()
        mujoco.mj_setState(env.model, env.data, mj_state, _STATE_KIND)
        mujoco.mj_forward(env.model, env.data)
        mujoco.mj_setState(env.model, env.data, mj_state, _STATE_KIND)  # mj_forward overwrote the warm start
        for site in env._target_site_config:
            env._set_pos_site(*site)
        raw = np.hstack([env._get_curr_obs_combined_no_goal(), head[20:38], env._get_pos_goal()])
        return self._frame(np.clip(raw, env.sawyer_observation_space.low, env.sawyer_observation_space.high), render)

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None
        self.env.close()
