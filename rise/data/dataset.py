"""The one LeRobot schema every RISE dataset uses, and the one way to write and open one.

Columns (per frame, at the embodiment's control rate):
    observation.images.<view>   video, uint8 [H, W, 3] per embodiment view
    observation.state           float32 [state_dim]
    observation.sim_state       float64 [n], simulated robots only: full simulator state
                                (restores the exact scene; see rise.sim.metaworld_sim)
    action                      float32 [action_dim]: the command executed at this frame
    success                     bool [1]: the episode's outcome, repeated on every frame
    task                        the instruction text (LeRobot's task column)

A dataset's `meta/info.json` is LeRobot's; we add nothing to it. Normalisation statistics
(`rise data stats`) live beside it in `meta/rise_stats.json`.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rise.embodiment import Embodiment

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # datasets are local; never reach for a hub

# torchcodec needs system FFmpeg libraries; PyAV bundles its own, so it works everywhere.
VIDEO_BACKEND = "pyav"


class DatasetError(ValueError):
    """A dataset path that is missing, corrupt or does not match the expected schema."""


def image_key(view: str) -> str:
    return f"observation.images.{view}"


def features(embodiment: Embodiment, sim_state_dim: int | None) -> dict[str, dict[str, Any]]:
    """LeRobot feature spec for an embodiment (sim_state_dim None: a real robot, no sim state)."""
    spec: dict[str, dict[str, Any]] = {
        image_key(v): {"dtype": "video", "shape": (embodiment.image_height, embodiment.image_width, 3),
                       "names": ["height", "width", "channels"]}
        for v in embodiment.views
    }
    spec["observation.state"] = {"dtype": "float32", "shape": (embodiment.state_dim,), "names": embodiment.state_names or None}
    spec["action"] = {"dtype": "float32", "shape": (embodiment.action_dim,), "names": embodiment.action_names or None}
    if sim_state_dim is not None:
        spec["observation.sim_state"] = {"dtype": "float64", "shape": (sim_state_dim,), "names": None}
    spec["success"] = {"dtype": "bool", "shape": (1,), "names": None}
    return spec


@dataclass
class Episode:
    """One episode in memory, ready to be written."""

    views: dict[str, np.ndarray]  # view -> uint8 [T, H, W, 3]
    states: np.ndarray  # float32 [T, state_dim]
    actions: np.ndarray  # float32 [T, action_dim]
    task: str
    success: bool
    sim_states: np.ndarray | None = None  # float64 [T, n]

    def __len__(self) -> int:
        return len(self.states)


@contextmanager
def _keeping_scheduling():
    """Run video encoding without it changing any thread's scheduling.

    SVT-AV1 (LeRobot's AV1 encoder, through PyAV) switches the thread that opens an encoder to
    SCHED_FIFO priority 99 when the process runs as root (containers, this lab's machines), and
    leaves it there; threads started meanwhile (decoder workers, thread pools) inherit it. A
    process that once wrote a dataset then starves every other process on the machine, the robot
    agent's control loop included (measured on a 2-core machine: RL learner steps 10x slower, the
    agent's watchdog late). After each episode every thread gets its old policy back, and threads
    born during the encode get the caller's. The caller is reset through pthread_setschedparam:
    glibc remembers the policy SVT set through it and gives it to every thread the caller starts
    later, whatever the kernel says (a plain sched_setscheduler left pytriton's threads FIFO).
    """
    before = _thread_policies()
    caller_tid = threading.get_native_id()
    caller = before[caller_tid]
    try:
        yield
    finally:
        _pthread_setschedparam_self(*caller)
        for tid, policy in _thread_policies().items():
            wanted = before.get(tid, caller)
            if tid != caller_tid and policy[0] != wanted[0]:
                try:
                    os.sched_setscheduler(tid, wanted[0], os.sched_param(wanted[1]))
                except (ProcessLookupError, PermissionError):
                    pass  # the thread ended meanwhile, or is not ours to change


def _pthread_setschedparam_self(policy: int, priority: int) -> None:
    import ctypes

    class SchedParam(ctypes.Structure):
        _fields_ = [("sched_priority", ctypes.c_int)]

    libc = ctypes.CDLL(None)
    libc.pthread_self.restype = ctypes.c_void_p
    libc.pthread_setschedparam.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(SchedParam)]
    error = libc.pthread_setschedparam(libc.pthread_self(), policy, ctypes.byref(SchedParam(priority)))
    if error:
        raise OSError(error, f"pthread_setschedparam: {os.strerror(error)}")


def _thread_policies() -> dict[int, tuple[int, int]]:
    """Every thread of this process: native id -> (scheduling policy, priority)."""
    policies = {}
    for task in os.listdir("/proc/self/task"):
        try:
            policies[int(task)] = (os.sched_getscheduler(int(task)), os.sched_getparam(int(task)).sched_priority)
        except ProcessLookupError:
            pass  # ended between listing and asking
    return policies


class DatasetWriter:
    """Writes episodes into a new LeRobot dataset at `root` (which must not exist yet)."""

    def __init__(self, root: str | Path, embodiment: Embodiment, sim_state_dim: int | None = None,
                 robot_type: str = "", repo_id: str | None = None):
        from lerobot.datasets.lerobot_dataset import LeRobotDataset

        self.root = Path(root)
        if self.root.exists():
            raise DatasetError(f"{self.root} already exists; choose a new path (datasets are written once)")
        self.embodiment = embodiment
        self.sim_state_dim = sim_state_dim
        fps = round(embodiment.control_hz)
        if abs(fps - embodiment.control_hz) > 1e-6:
            raise DatasetError(f"LeRobot needs an integer fps; embodiment {embodiment.name} runs at {embodiment.control_hz} Hz")
        self.dataset = LeRobotDataset.create(
            repo_id or f"local/{self.root.name}", fps=fps, features=features(embodiment, sim_state_dim), root=self.root,
            robot_type=robot_type or embodiment.name, use_videos=True, video_backend=VIDEO_BACKEND)

    def add(self, episode: Episode) -> None:
        for t in range(len(episode)):
            frame = {image_key(v): episode.views[v][t] for v in self.embodiment.views}
            frame["observation.state"] = np.asarray(episode.states[t], np.float32)
            frame["action"] = np.asarray(episode.actions[t], np.float32)
            if self.sim_state_dim is not None:
                frame["observation.sim_state"] = np.asarray(episode.sim_states[t], np.float64)
            frame["success"] = np.array([episode.success])
            frame["task"] = episode.task
            self.dataset.add_frame(frame)
        # Sequential encoding: LeRobot's parallel mode forks a process pool from this (threaded)
        # process, which deadlocked `rise data collect --workers 2` once (fork after threads).
        with _keeping_scheduling():
            self.dataset.save_episode(parallel_encoding=False)

    def finalize(self) -> None:
        self.dataset.finalize()


def open_dataset(root: str | Path, embodiment: Embodiment | None = None, **kwargs):
    """Open a local LeRobot dataset with a clear error when it is missing, corrupt or mismatched.

    kwargs go to `LeRobotDataset` (e.g. `delta_timestamps`, `episodes`).
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = Path(root)
    if not (root / "meta" / "info.json").is_file():
        raise DatasetError(f"no LeRobot dataset at {root}: {root / 'meta' / 'info.json'} is missing")
    try:
        dataset = LeRobotDataset(f"local/{root.name}", root=root, video_backend=VIDEO_BACKEND, **kwargs)
    except Exception as exc:  # lerobot raises many kinds; the user needs the path and the cause
        raise DatasetError(f"cannot open the LeRobot dataset at {root}: {type(exc).__name__}: {exc}") from exc
    if embodiment is not None:
        want = features(embodiment, None)
        for key, spec in want.items():
            got = dataset.features.get(key)
            if got is None or tuple(got["shape"]) != tuple(spec["shape"]):
                raise DatasetError(f"{root}: column {key!r} is {got and list(got['shape'])}, embodiment "
                                   f"{embodiment.name!r} needs {list(spec['shape'])}")
    return dataset
