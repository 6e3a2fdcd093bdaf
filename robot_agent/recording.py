"""Executed episodes -> a LeRobot dataset through RISE's one dataset writer (rise.data.dataset).

One frame per control tick of the policy phase: the newest view of every camera, the measured
state, and the command that was actually sent (after the safety layer), so that policy rollouts
and human corrections enter RISE's offline data as what the robot did. Writing needs the `data`
extra (LeRobot, which brings torch); it is imported only here, when an episode is saved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rise.embodiment import Embodiment


class EpisodeRecorder:
    def __init__(self, embodiment: Embodiment):
        self.embodiment = embodiment
        self.views: dict[str, list[np.ndarray]] = {v: [] for v in embodiment.views}
        self.states: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []

    def add(self, views: dict[str, np.ndarray], state: np.ndarray, action: np.ndarray) -> None:
        """Called by the control loop: keeps references only (camera threads make a new array per frame)."""
        for view in self.embodiment.views:
            self.views[view].append(views[view])
        self.states.append(np.asarray(state, np.float32))
        self.actions.append(np.asarray(action, np.float32))

    def __len__(self) -> int:
        return len(self.states)

    def save(self, root: str | Path, task: str, success: bool) -> Path:
        """Write the episode as a new LeRobot dataset at `root`."""
        from rise.data.dataset import DatasetWriter, Episode

        if not self.states:
            raise ValueError("nothing recorded: the policy phase executed no tick")
        episode = Episode(views={v: np.stack(frames) for v, frames in self.views.items()}, states=np.stack(self.states),
                          actions=np.stack(self.actions), task=task, success=success)
        writer = DatasetWriter(root, self.embodiment)
        writer.add(episode)
        writer.finalize()
        return Path(root)
