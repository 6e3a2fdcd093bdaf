"""Training views of RISE datasets, shared by the dynamics, value and policy trainers.

`TrainingFrames` concatenates one or more datasets (we collect one dataset per task) and turns
each frame into a sample:

    views          {view: uint8 [history, H, W, 3]} (float32 in [0, 1] with float_images=True):
                   the current frame and history-1 earlier ones, `frame_stride` frames apart,
                   oldest first; before an episode's start LeRobot repeats the first frame
    views_is_pad   bool [history]: which history frames are such repeats
    state          float32 [state_dim]
    action         float32 [chunk_length, action_dim]: this frame's action and the next ones
    action_is_pad  bool [chunk_length]: actions past the episode's end (repeats of its last)
    task           str, the instruction text
    task_id        int64, index into `TrainingFrames.tasks`
    success        bool: the episode's outcome
    progress       float32: frame_index / (episode_length - 1), 0 at the start, 1 at the end
    dataset_index, episode_index, frame_index: int64, where the sample came from

Images are channels-last like the simulator's frames and the gRPC observations.

`TaskBatchSampler` makes task-centric batches as the RISE reference does (2 tasks x 16
samples): every batch holds `samples_per_task` frames of each of `tasks_per_batch` different
tasks, so a task with many frames does not crowd out one with few.

Simulator states are float64 in the parquet files, but LeRobot loads them as float32, which
is too coarse to restore a scene; `episode_sim_states` reads them at full precision.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from rise.data.dataset import DatasetError, image_key, open_dataset
from rise.embodiment import Embodiment


class TrainingFrames(torch.utils.data.Dataset):
    def __init__(self, roots: str | Path | Sequence[str | Path], embodiment: Embodiment, history: int = 1,
                 frame_stride: int = 1, chunk_length: int | None = None, float_images: bool = False):
        if history < 1 or frame_stride < 1:
            raise ValueError(f"history and frame_stride must be >= 1 (got {history}, {frame_stride})")
        self.roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
        if not self.roots:
            raise ValueError("no dataset roots given")
        self.embodiment = embodiment
        self.history = history
        self.chunk_length = chunk_length or embodiment.chunk_length
        self.float_images = float_images
        dt = 1.0 / embodiment.control_hz
        past = [-(history - 1 - k) * frame_stride * dt for k in range(history)]
        delta_timestamps = {image_key(v): past for v in embodiment.views}
        delta_timestamps["action"] = [k * dt for k in range(self.chunk_length)]

        self.datasets = []
        for root in self.roots:
            dataset = open_dataset(root, embodiment, delta_timestamps=delta_timestamps, return_uint8=True)
            if abs(dataset.fps - embodiment.control_hz) > 1e-6:
                raise DatasetError(f"{root} runs at {dataset.fps} fps; embodiment {embodiment.name!r} at "
                                   f"{embodiment.control_hz} Hz")
            self.datasets.append(dataset)
        self._starts = np.cumsum([0] + [len(d) for d in self.datasets])

        # Per-frame labels for all datasets at once: the sampler and progress need them in bulk.
        self.tasks: list[str] = []
        task_ids, successes, progress = [], [], []
        for dataset in self.datasets:
            columns = dataset.hf_dataset.with_format("numpy").select_columns(
                ["episode_index", "frame_index", "task_index", "success"])[:]
            episodes = dataset.meta.episodes.with_format("numpy").select_columns(["episode_index", "length"])[:]
            lengths = dict(zip(episodes["episode_index"].tolist(), episodes["length"].tolist()))
            length = np.array([lengths[e] for e in columns["episode_index"].tolist()])
            progress.append(columns["frame_index"] / np.maximum(length - 1, 1))
            local_to_global = np.zeros(len(dataset.meta.tasks), dtype=np.int64)
            for text, local in zip(dataset.meta.tasks.index, dataset.meta.tasks["task_index"]):
                if text not in self.tasks:
                    self.tasks.append(text)
                local_to_global[local] = self.tasks.index(text)
            task_ids.append(local_to_global[columns["task_index"]])
            successes.append(columns["success"].reshape(-1))
        self.frame_task_ids = np.concatenate(task_ids)
        self.frame_success = np.concatenate(successes).astype(bool)
        self.frame_progress = np.concatenate(progress).astype(np.float32)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset index, frame index within that dataset) of a global index."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} frames")
        which = bisect.bisect_right(self._starts, index) - 1
        return which, index - int(self._starts[which])

    def __getitem__(self, index: int) -> dict:
        which, local = self.locate(int(index))
        item = self.datasets[which][local]
        views = {}
        for view in self.embodiment.views:
            frames = item[image_key(view)]
            if frames.dim() == 3:  # LeRobot squeezes a history of one frame away
                frames = frames.unsqueeze(0)
            frames = frames.permute(0, 2, 3, 1).contiguous()  # [T, 3, H, W] -> [T, H, W, 3]
            views[view] = frames.float().div_(255) if self.float_images else frames
        return {
            "views": views,
            "views_is_pad": item[f"{image_key(self.embodiment.views[0])}_is_pad"],
            "state": item["observation.state"],
            "action": item["action"],
            "action_is_pad": item["action_is_pad"],
            "task": item["task"],
            "task_id": torch.tensor(self.frame_task_ids[index]),
            "success": torch.tensor(self.frame_success[index]),
            "progress": torch.tensor(self.frame_progress[index]),
            "dataset_index": torch.tensor(which),
            "episode_index": item["episode_index"],
            "frame_index": item["frame_index"],
        }


class TaskBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of `samples_per_task` frames from each of `tasks_per_batch` distinct tasks.

    Tasks are drawn uniformly per batch; within a task, frames are drawn without replacement
    from a shuffled pass over its frames, reshuffled when used up. Each iteration (epoch) has
    `num_batches` batches (default: as many as cover the frames once) and its own seed, so runs
    are reproducible. Use as `DataLoader(frames, batch_sampler=TaskBatchSampler(frames))`.
    `frames` is anything with `tasks` (texts) and `frame_task_ids` (one id per sample), such as
    `TrainingFrames` or `EpisodesInMemory`.
    """

    def __init__(self, frames, tasks_per_batch: int = 2, samples_per_task: int = 16,
                 num_batches: int | None = None, seed: int = 0):
        task_ids = frames.frame_task_ids
        present = np.unique(task_ids)
        if tasks_per_batch < 1 or samples_per_task < 1:
            raise ValueError("tasks_per_batch and samples_per_task must be >= 1")
        if tasks_per_batch > len(present):
            raise ValueError(f"tasks_per_batch={tasks_per_batch} but the datasets hold {len(present)} task(s): "
                             f"{[frames.tasks[t] for t in present]}")
        self.task_frames = {int(t): np.flatnonzero(task_ids == t) for t in present}
        self.tasks_per_batch = tasks_per_batch
        self.samples_per_task = samples_per_task
        self.num_batches = num_batches or max(1, -(-len(task_ids) // (tasks_per_batch * samples_per_task)))
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        tasks = sorted(self.task_frames)
        queues = {t: [] for t in tasks}
        for _ in range(self.num_batches):
            batch: list[int] = []
            for task in rng.choice(tasks, size=self.tasks_per_batch, replace=False):
                queue = queues[int(task)]
                for _ in range(self.samples_per_task):
                    if not queue:
                        queue.extend(rng.permutation(self.task_frames[int(task)]).tolist())
                    batch.append(queue.pop())
            yield batch


def episode_sim_states(root: str | Path, episode_index: int) -> np.ndarray:
    """float64 [T, n] simulator states of one episode, read from the parquet files at full precision."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    data = Path(root) / "data"
    if not data.is_dir():
        raise DatasetError(f"no LeRobot data files under {data}")
    try:
        table = pads.dataset(data, format="parquet").to_table(
            columns=["frame_index", "observation.sim_state"], filter=pc.field("episode_index") == episode_index)
    except Exception as exc:  # pyarrow's errors name the file but not what we were after
        raise DatasetError(f"cannot read simulator states of episode {episode_index} from {data}: {exc}") from exc
    if table.num_rows == 0:
        raise DatasetError(f"{root}: no frames for episode {episode_index}")
    table = table.sort_by("frame_index")
    # A copy: Arrow's buffers are read-only, and MuJoCo's mj_setState refuses read-only arrays.
    states = np.array(table.column("observation.sim_state").combine_chunks().flatten(), dtype=np.float64)
    return states.reshape(table.num_rows, -1)


# ---- Whole episodes in memory ---------------------------------------------------------------
# `TrainingFrames` decodes video per sample through LeRobot: right for large datasets, but on
# a CPU most of a small model's training step would go to decoding. `EpisodesInMemory` decodes
# every video file once (PyAV, sequentially) and keeps all frames as uint8 arrays, so trainers
# can cut windows (frame history, future frames, action chunks) from memory. Sized for the
# laptop tier: 64x64 views cost 12 KiB per view per frame (15k frames x 3 views ~ 550 MiB).


class EpisodesInMemory:
    """Every frame of one or more datasets, decoded once; frames are concatenated over episodes.

    views          {view: uint8 [N, H, W, 3]}
    actions        float32 [N, action_dim];  states float32 [N, state_dim]
    episode_starts int64 [E] (first global frame of each episode), episode_lengths int64 [E]
    frame_episode  int64 [N] (global episode number), frame_index int64 [N] (index within it)
    frame_task_ids int64 [N] (into `tasks`), frame_success bool [N]; episode_dataset int64 [E]

    It has `tasks` and `frame_task_ids` like `TrainingFrames`, so `TaskBatchSampler` batches it.
    """

    def __init__(self, views: dict[str, np.ndarray], actions: np.ndarray, states: np.ndarray,
                 episode_lengths: Sequence[int], episode_tasks: Sequence[int], episode_success: Sequence[bool],
                 episode_dataset: Sequence[int], tasks: list[str], roots: list[Path]):
        self.views, self.actions, self.states = views, actions, states
        self.episode_lengths = np.asarray(episode_lengths, np.int64)
        self.episode_starts = np.concatenate([[0], np.cumsum(self.episode_lengths)[:-1]]).astype(np.int64)
        self.episode_dataset = np.asarray(episode_dataset, np.int64)
        self.tasks, self.roots = tasks, roots
        self.frame_episode = np.repeat(np.arange(len(self.episode_lengths)), self.episode_lengths)
        self.frame_index = np.arange(len(self.frame_episode)) - self.episode_starts[self.frame_episode]
        self.frame_task_ids = np.asarray(episode_tasks, np.int64)[self.frame_episode]
        self.frame_success = np.asarray(episode_success, bool)[self.frame_episode]

    def __len__(self) -> int:
        return len(self.frame_episode)

    @property
    def num_episodes(self) -> int:
        return len(self.episode_lengths)


def _decode_video_file(path: Path, fps: float) -> np.ndarray:
    """uint8 [n, H, W, 3]: every frame of a video file, placed by its presentation time."""
    import av

    frames: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            index = round(float(frame.pts * stream.time_base) * fps) if frame.pts is not None else len(frames)
            frames[index] = frame.to_ndarray(format="rgb24")
    if not frames or sorted(frames) != list(range(len(frames))):
        raise DatasetError(f"{path}: decoded frame times are not contiguous (got {len(frames)} frames)")
    return np.stack([frames[i] for i in range(len(frames))])


def load_episodes_in_memory(roots: str | Path | Sequence[str | Path], embodiment: Embodiment,
                            show_progress: bool = False) -> EpisodesInMemory:
    """Decode every episode of the datasets at `roots` into memory (see `EpisodesInMemory`)."""
    from rich.progress import Progress

    roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
    if not roots:
        raise ValueError("no dataset roots given")
    views: dict[str, list[np.ndarray]] = {v: [] for v in embodiment.views}
    actions, states, lengths, episode_tasks, episode_success, episode_dataset = [], [], [], [], [], []
    tasks: list[str] = []
    with Progress(disable=not show_progress, transient=True) as progress:
        for which, root in enumerate(roots):
            dataset = open_dataset(root, embodiment)
            if abs(dataset.fps - embodiment.control_hz) > 1e-6:
                raise DatasetError(f"{root} runs at {dataset.fps} fps; embodiment {embodiment.name!r} at "
                                   f"{embodiment.control_hz} Hz")
            table = dataset.hf_dataset.with_format("numpy").select_columns(
                ["episode_index", "frame_index", "task_index", "success", "action", "observation.state"])[:]
            local_tasks = list(dataset.meta.tasks.index)
            for text in local_tasks:
                if text not in tasks:
                    tasks.append(text)
            meta = dataset.meta.episodes.with_format("numpy")[:]
            bar = progress.add_task(f"decoding {root.name}", total=len(meta["episode_index"]) * len(embodiment.views))
            decoded: dict[Path, np.ndarray] = {}  # a video file holds many episodes: decode it once
            for row, episode in enumerate(meta["episode_index"].tolist()):
                rows = np.flatnonzero(table["episode_index"] == episode)
                rows = rows[np.argsort(table["frame_index"][rows])]
                length = int(meta["length"][row])
                if len(rows) != length:
                    raise DatasetError(f"{root}: episode {episode} has {len(rows)} rows, its metadata says {length}")
                for view in embodiment.views:
                    key = image_key(view)
                    path = dataset.root / dataset.meta.get_video_file_path(episode, key)
                    if path not in decoded:
                        decoded[path] = _decode_video_file(path, dataset.fps)
                    start = round(float(meta[f"videos/{key}/from_timestamp"][row]) * dataset.fps)
                    clip = decoded[path][start:start + length]
                    if len(clip) != length:
                        raise DatasetError(f"{path}: episode {episode} needs frames {start}..{start + length - 1}, "
                                           f"the file has {len(decoded[path])}")
                    views[view].append(clip)
                    progress.advance(bar)
                actions.append(np.stack(table["action"][rows]).astype(np.float32))
                states.append(np.stack(table["observation.state"][rows]).astype(np.float32))
                lengths.append(length)
                episode_tasks.append(tasks.index(local_tasks[int(table["task_index"][rows[0]])]))
                episode_success.append(bool(np.asarray(table["success"][rows[0]]).reshape(-1)[0]))
                episode_dataset.append(which)
    return EpisodesInMemory({v: np.concatenate(f) for v, f in views.items()}, np.concatenate(actions),
                            np.concatenate(states), lengths, episode_tasks, episode_success, episode_dataset, tasks, roots)
