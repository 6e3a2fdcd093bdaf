"""`rise eval-dynamics`: how well a served world model imagines, and whether it follows actions.

Samples. From held-out episodes of LeRobot datasets, start frames t are drawn without
replacement (numpy, seeded by `seed`) among the frames whose whole chunk is recorded
(t + chunk_length <= last frame of the episode). A sample holds, per view, the history frames
t - (history-1)*frame_stride, ..., t (before an episode's start LeRobot repeats its first
frame, as in training), the recorded chunk (actions t .. t+chunk-1), the task text, the
recorded simulator state at t when the dataset has one (read at full float64 precision: the
oracle restores it; learned models ignore it) and the real future: dataset frames
t+1 .. t+chunk (frame t+k is what the cameras saw after k actions).

Two Imagine calls per batch, same items, same positions, same nonzero seed (so a sampling
model draws the same noise for both and only the actions differ):
  real      the recorded chunk;
  shuffled  the "wrong action" control: the chunk recorded at another start, drawn (seeded)
            among every window of the evaluated episodes except those of the same episode that
            overlap the sample's own window (|t' - t| < chunk); it may come from another
            episode or dataset. A model that ignores actions scores the same on both.
A model returns F frames per view; F must divide chunk_length and imagined frame j (1..F) is
compared with real frame t + j*chunk_length/F (the oracle's frame_stride works this way).
The persistence floor is computed here, not served: the last history frame repeated F times.

Metrics, per sample, view and imagined frame, then aggregated (over samples, views and
frames unless a table says otherwise):
  PSNR  10 log10(255^2 / MSE) with the MSE (RGB, 0..255) averaged over the frames aggregated:
        what torchmetrics' PeakSignalNoiseRatio(data_range=255) gives when updated with those
        frames. Not a mean of per-frame PSNRs: a single exact frame (common: the scene often
        stands still for a tick, and a persistence model then hits it exactly) would make such
        a mean inf. inf here means every frame aggregated is exact;
  SSIM  torchmetrics structural_similarity_index_measure, data_range 255, Gaussian 11x11,
        sigma 1.5, per frame on RGB, then averaged;
  flow end-point error (EPE, pixels at the embodiment's resolution), dense optical flow by
        OpenCV Farneback on greyscale frames (FLOW_PARAMS), mean over pixels of
        ||flow_real - flow_imagined||_2, two ways:
          step    flow between consecutive frames: (f_{j-1} -> f_j) for j = 1..F, where f_0 is
                  the last history frame (the same frame for real and imagined);
          anchor  flow from the last history frame to each future frame (f_0 -> f_j): the
                  displacement so far, a stronger signal than the step flow when the motion per
                  frame is sub-pixel (MetaWorld at 80 Hz moves ~0.25 px per tick at 64x64 while
                  the video codec alone perturbs the flow by ~0.2-0.3 px).
  The mean magnitude of the real anchor flow (how much moves at all) is reported as a scale.

Action controllability, from the per-sample anchor EPE (mean over views and frames):
d_i = EPE_shuffled_i - EPE_real_i. `action_sensitive` is true when the shuffled chunk scores
clearly worse: mean(d) > 0, the lower end of its 95% interval (mean - 1.96 * sd / sqrt(n),
n >= 2) > 0, and EPE_shuffled >= ACTION_SENSITIVE_RATIO * EPE_real. A model that ignores its
actions (persistence) gives d = 0 and false. The mean absolute difference between the two
imagined futures (grey levels) is reported too: exactly 0 for such a model.

Ground truth. The dataset's frames went through a lossy video codec (AV1, ~3-4 grey levels of
mean error at 64x64) while the oracle renders losslessly, so even the oracle's PSNR against
the dataset is finite (about 35-40 dB) and its EPE is not 0. Where the dataset has simulator
states of a MetaWorld task, the real chunk of the first `rerender` samples (default 8: it costs
about what the oracle does, ~0.5 s a sample) is also replayed here (MetaWorldSim.set_state,
then the recorded actions) to get lossless frames: the report then
gives PSNR/SSIM of the imagined frames and of the dataset frames themselves against that
re-rendered truth (the oracle reaches inf / 1 there; the dataset row is the codec's loss).

Outputs in `out`: report.json (non-finite numbers as the strings "inf" / "nan", so the file
is strict JSON), report.md, and videos/sample_NNN.gif for the first `videos` samples: rows
real / imagined with the real chunk / imagined with the shuffled chunk, columns the views,
frame 0 the last history frame, then the F future frames (2x nearest-neighbour, 4 frames/s).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import typer

# OpenCV's sample values; winsize 15 gave the best ratio of real motion to codec noise on
# 64x64 MetaWorld frames (winsize 9 and DIS "medium" were noisier).
FLOW_PARAMS = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2, "flags": 0}
ACTION_SENSITIVE_RATIO = 1.1
VIDEO_SCALE = 2
VIDEO_FRAME_MS = 250
CONDITIONS = ("real", "shuffled", "persistence")
CONDITION_TITLES = {"real": "imagined, real actions", "shuffled": "imagined, shuffled actions (control)",
                    "persistence": "persistence: last frame repeated (floor)"}
METRICS = ("mse", "ssim", "epe_step", "epe_anchor")  # PSNR derives from the MSE


class DynamicsEvalError(RuntimeError):
    """The model could not be evaluated (unreachable, refused a request, bad output, no data)."""


# ---- episodes and samples ---------------------------------------------------------------------
def parse_episodes(spec: str | Sequence[int] | None, num_episodes: int) -> list[int]:
    """Episode indices of one dataset: None / "all", a list, or a spec like "0,3,8-11" or "last:5"."""
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "all")):
        return list(range(num_episodes))
    if isinstance(spec, str):
        spec = spec.strip()
        if spec.startswith("last:"):
            count = int(spec[5:])
            if count < 1:
                raise ValueError(f"episodes {spec!r}: need last:N with N >= 1")
            return list(range(max(0, num_episodes - count), num_episodes))
        chosen: list[int] = []
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            chosen += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    else:
        chosen = [int(e) for e in spec]
    bad = [e for e in chosen if not 0 <= e < num_episodes]
    if bad:
        raise ValueError(f"episode(s) {bad} out of range: the dataset has {num_episodes} episodes")
    return sorted(set(chosen))


class _Source:
    """One dataset: frames with history and future through LeRobot, actions and states in bulk."""

    def __init__(self, index: int, root: Path, emb, history: int, frame_stride: int, episodes):
        from rise.data.dataset import DatasetError, image_key, open_dataset

        self.index, self.root, self.emb = index, Path(root), emb
        dt = 1.0 / emb.control_hz
        past = [-(history - 1 - k) * frame_stride * dt for k in range(history)]  # oldest first, t last
        future = [k * dt for k in range(1, emb.chunk_length + 1)]  # t+1 .. t+chunk
        self.dataset = open_dataset(root, emb, return_uint8=True,
                                    delta_timestamps={image_key(v): past + future for v in emb.views})
        if abs(self.dataset.fps - emb.control_hz) > 1e-6:
            raise DatasetError(f"{root} runs at {self.dataset.fps} fps; embodiment {emb.name!r} at {emb.control_hz} Hz")
        self.history = history
        self.has_sim_state = "observation.sim_state" in self.dataset.features
        columns = self.dataset.hf_dataset.with_format("numpy").select_columns(["episode_index", "frame_index", "action"])[:]
        self.episode_of = columns["episode_index"].reshape(-1)
        self.frame_of = columns["frame_index"].reshape(-1)
        self.actions = np.asarray(columns["action"], np.float32).reshape(len(self.frame_of), emb.action_dim)
        self.episodes = parse_episodes(episodes, self.dataset.num_episodes)
        self._sim_states: dict[int, np.ndarray] = {}

    def windows(self) -> list[tuple[int, int, int, int]]:
        """(dataset, episode, start frame, row) of every start whose whole chunk is recorded."""
        chunk, out = self.emb.chunk_length, []
        for episode in self.episodes:
            rows = np.flatnonzero(self.episode_of == episode)
            rows = rows[np.argsort(self.frame_of[rows])]
            for row in rows[:max(0, len(rows) - chunk)]:  # t + chunk <= last frame
                out.append((self.index, int(episode), int(self.frame_of[row]), int(row)))
        return out

    def chunk(self, row: int) -> np.ndarray:
        chunk = self.emb.chunk_length
        rows = slice(row, row + chunk)
        episode = self.episode_of[row]
        consecutive = np.array_equal(self.frame_of[rows], self.frame_of[row] + np.arange(chunk))
        if not (np.all(self.episode_of[rows] == episode) and consecutive):
            raise DynamicsEvalError(f"{self.root}: rows {row}..{row + chunk - 1} are not one episode's consecutive frames")
        return self.actions[rows]

    def sim_state(self, episode: int, frame: int) -> np.ndarray | None:
        if not self.has_sim_state:
            return None
        if episode not in self._sim_states:
            from rise.data.loading import episode_sim_states

            self._sim_states[episode] = episode_sim_states(self.root, episode)
        return self._sim_states[episode][frame]

    def load(self, row: int) -> tuple[dict, dict, str]:
        """-> (history {view: uint8 [T, H, W, 3]}, future {view: uint8 [chunk, H, W, 3]}, task text)."""
        from rise.data.dataset import image_key

        item = self.dataset[row]
        history, future = {}, {}
        for view in self.emb.views:
            frames = item[image_key(view)].permute(0, 2, 3, 1).contiguous().numpy()
            history[view], future[view] = frames[:self.history], frames[self.history:]
        return history, future, item["task"]


@dataclass
class _Sample:
    dataset: int
    episode: int
    frame: int
    row: int
    wrong: tuple[int, int, int]  # (dataset, episode, start frame) of the shuffled chunk


# ---- metrics ----------------------------------------------------------------------------------
def _gray(frames: np.ndarray) -> list[np.ndarray]:
    import cv2

    return [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]


def _flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import cv2

    p = FLOW_PARAMS
    return cv2.calcOpticalFlowFarneback(a, b, None, p["pyr_scale"], p["levels"], p["winsize"], p["iterations"],
                                        p["poly_n"], p["poly_sigma"], p["flags"])


def _flows(anchor: np.ndarray, frames: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(step flows, anchor flows) of F frames after `anchor`, each [H, W, 2]."""
    gray = _gray(np.concatenate([anchor[None], frames]))
    return ([_flow(gray[j - 1], gray[j]) for j in range(1, len(gray))],
            [_flow(gray[0], gray[j]) for j in range(1, len(gray))])


def _epe(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    return np.array([float(np.linalg.norm(x - y, axis=-1).mean()) for x, y in zip(a, b)])


class _TorchThreads:
    """One intra-op thread while scoring: SSIM on small frames is ~10x slower with two contended threads."""

    def __enter__(self):
        import torch

        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.before)


def _mse_ssim(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """P pairs of uint8 [F, H, W, 3] (prediction, target) -> per-frame MSE and SSIM, each [P, F]."""
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure

    pred = np.stack([p for p, _ in pairs]).astype(np.float32)
    target = np.stack([t for _, t in pairs]).astype(np.float32)
    mse = ((pred.astype(np.float64) - target) ** 2).mean(axis=(2, 3, 4))
    with _TorchThreads():
        ssim = structural_similarity_index_measure(
            torch.from_numpy(pred.reshape(-1, *pred.shape[2:])).permute(0, 3, 1, 2),
            torch.from_numpy(target.reshape(-1, *target.shape[2:])).permute(0, 3, 1, 2),
            data_range=255.0, reduction="none")
    return mse, ssim.numpy().astype(np.float64).reshape(mse.shape)


def _psnr(mse) -> float:
    """PSNR (dB) of the mean squared error over everything in `mse`: what torchmetrics'
    PeakSignalNoiseRatio(data_range=255) gives when updated with those frames (inf only if all are exact)."""
    mse = np.asarray(mse, np.float64)
    if not mse.size:
        return float("nan")
    mean = float(mse.mean())
    return float("inf") if mean == 0 else 10.0 * math.log10(255.0 ** 2 / mean)


def _score(anchors: dict, real: dict, imagined: dict[str, dict], views: list[str]) -> tuple[dict, np.ndarray]:
    """One sample: {condition: {metric: [V, F]}} and the real anchor-flow magnitude [V, F]."""
    conditions = list(imagined)
    mse, ssim = _mse_ssim([(imagined[c][v], real[v]) for c in conditions for v in views])
    scores = {c: {"mse": mse[i * len(views):(i + 1) * len(views)], "ssim": ssim[i * len(views):(i + 1) * len(views)],
                  "epe_step": [], "epe_anchor": []} for i, c in enumerate(conditions)}
    motion = []
    for v in views:
        real_step, real_anchor = _flows(anchors[v], real[v])
        motion.append([float(np.linalg.norm(f, axis=-1).mean()) for f in real_anchor])
        for c in conditions:
            step, anchored = _flows(anchors[v], imagined[c][v])
            scores[c]["epe_step"].append(_epe(real_step, step))
            scores[c]["epe_anchor"].append(_epe(real_anchor, anchored))
    for c in conditions:
        scores[c]["epe_step"], scores[c]["epe_anchor"] = np.stack(scores[c]["epe_step"]), np.stack(scores[c]["epe_anchor"])
    return scores, np.asarray(motion)


def _mean(x) -> float:
    x = np.asarray(x, np.float64)
    return float(x.mean()) if x.size else float("nan")


def _clean(value):
    """Strict JSON: non-finite floats become "inf" / "-inf" / "nan"."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def sensitivity_verdict(c: dict) -> str:
    """Which part of the rule a model fails: "ignores its actions" and "follows them too weakly"
    call for different fixes."""
    if c["action_sensitive"]:
        return "yes"
    low = c["paired_difference_ci95"][0]
    if not math.isfinite(low):
        return "NO, too few samples for the paired interval"
    if low > 0:
        return (f"NO, the real chunk beats a shuffled one (interval above 0) but by less than the rule's "
                f"{ACTION_SENSITIVE_RATIO}x: the model follows its actions too weakly")
    return "NO, a shuffled chunk scores as well as the real one: the imagined motion ignores the actions"


def _fmt(x: float, digits: int = 2) -> str:
    return "inf" if x == float("inf") else ("n/a" if not math.isfinite(x) else f"{x:.{digits}f}")


# ---- the report -------------------------------------------------------------------------------
@dataclass
class DynamicsEvalReport:
    dynamics: str
    requested_version: str
    datasets: list[str]
    episodes: dict[str, list[int]]
    views: list[str]
    history: int
    frame_stride: int
    chunk_length: int
    num_steps: int
    seed: int
    future_frames: int = 0
    samples: list[dict] = field(default_factory=list)  # where each sample came from and its scores
    # condition -> metric (METRICS) -> float [N, V, F]
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    real_motion: np.ndarray | None = None  # mean |anchor flow| of the real frames, [N, V, F]
    futures_mad: np.ndarray | None = None  # mean |imagined(real) - imagined(shuffled)| per sample, [N]
    # "dataset" / "imagined" -> "mse" / "ssim" -> [M, V, F] against re-rendered frames (M samples)
    vs_render: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    rerender_note: str = ""
    versions: dict[str, int] = field(default_factory=dict)
    imagine_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    # ---- aggregates ----
    @staticmethod
    def _value(scores: dict[str, np.ndarray], metric: str, where=...) -> float:
        """A metric over a selection of [N, V, F] (all by default); "psnr" from the mean MSE."""
        return _psnr(scores["mse"][where]) if metric == "psnr" else _mean(scores[metric][where])

    def value(self, condition: str, metric: str, where=...) -> float:
        return self._value(self.scores[condition], metric, where)

    @property
    def frame_ticks(self) -> list[int]:
        f = self.future_frames
        return [j * self.chunk_length // f for j in range(1, f + 1)] if f else []

    def controllability(self) -> dict:
        real = self.scores["real"]["epe_anchor"].mean(axis=(1, 2))
        shuffled = self.scores["shuffled"]["epe_anchor"].mean(axis=(1, 2))
        d = shuffled - real
        n = len(d)
        mean_d = float(d.mean())
        half = 1.96 * float(d.std(ddof=1)) / math.sqrt(n) if n >= 2 else float("nan")
        low, high = mean_d - half, mean_d + half
        epe_real, epe_shuffled = float(real.mean()), float(shuffled.mean())
        ratio = epe_shuffled / epe_real if epe_real > 0 else (float("inf") if epe_shuffled > 0 else 1.0)
        sensitive = bool(n >= 2 and mean_d > 0 and low > 0 and ratio >= ACTION_SENSITIVE_RATIO)
        return {
            "action_sensitive": sensitive,
            "epe_anchor_real": epe_real, "epe_anchor_shuffled": epe_shuffled, "epe_ratio": ratio,
            "paired_difference_mean": mean_d, "paired_difference_ci95": [low, high],
            "psnr_real_minus_shuffled": self.value("real", "psnr") - self.value("shuffled", "psnr"),
            "ssim_real_minus_shuffled": self.value("real", "ssim") - self.value("shuffled", "ssim"),
            "futures_mean_abs_difference": _mean(self.futures_mad),
            "identical_futures_fraction": float(np.mean(self.futures_mad == 0)),
            "rule": (f"per-sample anchor EPE d = shuffled - real: mean(d) > 0, mean(d) - 1.96 sd/sqrt(n) > 0 "
                     f"(n >= 2) and EPE_shuffled >= {ACTION_SENSITIVE_RATIO} x EPE_real"),
        }

    def _table(self, scores: dict[str, np.ndarray], metrics: Sequence[str], per_frame: bool = True) -> dict:
        table = {}
        for m in metrics:
            table[m] = {"mean": self._value(scores, m),
                        "per_view": {v: self._value(scores, m, np.s_[:, i]) for i, v in enumerate(self.views)}}
            if per_frame:
                table[m]["per_frame"] = [self._value(scores, m, np.s_[:, :, j]) for j in range(self.future_frames)]
        return table

    def summary(self) -> dict:
        shown = ("psnr", "ssim", "epe_step", "epe_anchor")
        return _clean({
            "dynamics": self.dynamics, "requested_version": self.requested_version, "versions": self.versions,
            "datasets": self.datasets, "episodes": self.episodes, "samples": len(self.samples), "views": self.views,
            "history": self.history, "frame_stride": self.frame_stride, "chunk_length": self.chunk_length,
            "future_frames": self.future_frames, "frame_ticks": self.frame_ticks, "num_steps": self.num_steps,
            "seed": self.seed,
            "metrics": {c: self._table(s, shown) for c, s in self.scores.items()},
            "real_motion_px": _mean(self.real_motion) if self.real_motion is not None else None,
            "controllability": self.controllability() if self.samples else None,
            "vs_render": {k: {**self._table(s, ("psnr", "ssim"), per_frame=False), "samples": len(s["mse"])}
                          for k, s in self.vs_render.items()},
            "rerender_note": self.rerender_note,
            "flow": {"method": "cv2.calcOpticalFlowFarneback on greyscale frames", **FLOW_PARAMS},
            "psnr_definition": "10 log10(255^2 / mean MSE over the frames aggregated)",
            "imagine_calls": len(self.imagine_ms), "imagine_ms_mean": _mean(self.imagine_ms),
            "server_ms_mean": _mean(self.server_ms), "videos": self.videos, "wall_s": self.wall_s,
            "per_sample": self.samples,
        })

    def markdown(self) -> str:
        c = self.controllability()
        val = self.value
        views = list(enumerate(self.views))
        lines = [
            f"# Dynamics evaluation: `{self.dynamics}`", "",
            f"- model: requested `{self.requested_version or '(default alias)'}`, answered by "
            + ", ".join(f"`{v}` ({n} calls)" for v, n in sorted(self.versions.items())),
            f"- data: {', '.join(f'`{d}`' for d in self.datasets)}; episodes "
            + "; ".join(f"{Path(d).name}: {_ranges(e)}" for d, e in self.episodes.items()),
            f"- {len(self.samples)} start frames (seed {self.seed}); history {self.history} frame(s) every "
            f"{self.frame_stride} tick(s); chunk {self.chunk_length}; {self.future_frames} imagined frames per view "
            f"(ticks {self.frame_ticks}); {self.num_steps or 'default'} sampling steps",
            f"- Imagine round trip mean {_fmt(_mean(self.imagine_ms), 1)} ms over {len(self.imagine_ms)} calls "
            f"(server {_fmt(_mean(self.server_ms), 1)} ms); wall {self.wall_s:.1f} s", "",
            "## Against the dataset's frames", "",
            "Over all samples, views and imagined frames. The dataset's frames are video-decoded (lossy), so even a "
            "perfect model stays below inf dB PSNR and above 0 px EPE here.", "",
            "| | PSNR dB | SSIM | step-flow EPE px | anchor-flow EPE px |", "|:--|--:|--:|--:|--:|",
            *(f"| {CONDITION_TITLES[k]} | {_fmt(val(k, 'psnr'))} | {_fmt(val(k, 'ssim'), 4)} | "
              f"{_fmt(val(k, 'epe_step'), 3)} | {_fmt(val(k, 'epe_anchor'), 3)} |" for k in CONDITIONS),
            "", f"Real motion (mean magnitude of the real anchor flow): {_fmt(_mean(self.real_motion), 3)} px.", "",
            "### Per view", "",
            "| view | PSNR real | PSNR shuffled | PSNR persistence | SSIM real | anchor EPE real | anchor EPE shuffled "
            "| anchor EPE persistence |", "|:--|--:|--:|--:|--:|--:|--:|--:|",
            *(f"| {v} | " + " | ".join(_fmt(val(k, "psnr", np.s_[:, i])) for k in CONDITIONS)
              + f" | {_fmt(val('real', 'ssim', np.s_[:, i]), 4)} | "
              + " | ".join(_fmt(val(k, "epe_anchor", np.s_[:, i]), 3) for k in CONDITIONS) + " |" for i, v in views),
            "", "### By imagined frame (tick after the start)", "",
            "| tick | PSNR real | PSNR shuffled | PSNR persistence | anchor EPE real | anchor EPE shuffled "
            "| anchor EPE persistence |", "|--:|--:|--:|--:|--:|--:|--:|",
            *(f"| {tick} | " + " | ".join(_fmt(val(k, "psnr", np.s_[:, :, j])) for k in CONDITIONS) + " | "
              + " | ".join(_fmt(val(k, "epe_anchor", np.s_[:, :, j]), 3) for k in CONDITIONS) + " |"
              for j, tick in enumerate(self.frame_ticks)),
            "", "## Action controllability", "",
            f"- anchor-flow EPE with the real chunk {_fmt(c['epe_anchor_real'], 3)} px, with a shuffled chunk "
            f"{_fmt(c['epe_anchor_shuffled'], 3)} px (x{_fmt(c['epe_ratio'], 4)}); paired difference "
            f"{_fmt(c['paired_difference_mean'], 3)} px, 95% interval [{_fmt(c['paired_difference_ci95'][0], 3)}, "
            f"{_fmt(c['paired_difference_ci95'][1], 3)}]",
            f"- PSNR real - shuffled: {_fmt(c['psnr_real_minus_shuffled'])} dB; SSIM real - shuffled: "
            f"{_fmt(c['ssim_real_minus_shuffled'], 4)}",
            f"- the imagined futures for the real and the shuffled chunk differ by {_fmt(c['futures_mean_abs_difference'], 3)} "
            f"grey levels on average and are identical in {c['identical_futures_fraction']:.0%} of the samples",
            f"- **action_sensitive: {sensitivity_verdict(c)}** "
            f"(rule: {c['rule']})", "",
            "## Against re-rendered (lossless) ground truth", "",
        ]
        if self.vs_render:
            lines += [f"The real chunk replayed in the simulator from the recorded state "
                      f"({len(self.vs_render['dataset']['mse'])} samples).", "",
                      "| | PSNR dB | SSIM |", "|:--|--:|--:|",
                      *(f"| {title} | {_fmt(self._value(self.vs_render[key], 'psnr'))} | "
                        f"{_fmt(self._value(self.vs_render[key], 'ssim'), 4)} |"
                        for key, title in (("dataset", "dataset frames (the video codec's loss)"),
                                           ("imagined", "imagined, real actions")))]
        else:
            lines += [f"Not computed: {self.rerender_note}."]
        if self.videos:
            lines += ["", "## Videos", "", "Rows: real, imagined (real chunk), imagined (shuffled chunk); columns: "
                      + ", ".join(self.views) + "; frame 0 is the last history frame.", ""]
            lines += [f"![sample {i}](videos/{Path(p).name})" for i, p in enumerate(self.videos)]
        lines += ["", "Definitions (`services/dynamics/evaluate.py`): PSNR = 10 log10(255^2 / mean MSE) over the frames "
                  "aggregated; SSIM per frame (torchmetrics, Gaussian 11, sigma 1.5), averaged; EPE = mean "
                  "||flow_real - flow_imagined|| in pixels (OpenCV Farneback); step flow between consecutive frames, "
                  "anchor flow from the last history frame to each imagined frame."]
        return "\n".join(lines) + "\n"


def _ranges(values: list[int]) -> str:
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out) or "none"


# ---- videos -----------------------------------------------------------------------------------
def _write_gif(path: Path, anchor: dict, rows: list[dict], views: list[str], labels: list[str],
               ticks: list[int]) -> None:
    """rows: {view: uint8 [F, H, W, 3]} per row; frame 0 shows `anchor` (the last history frame) in every row."""
    import cv2
    import imageio.v3 as iio

    frames = []
    num = next(iter(rows[0].values())).shape[0]
    for j in range(num + 1):
        grid = []
        for row, label in zip(rows, labels):
            tiles = [anchor[v] if j == 0 else row[v][j - 1] for v in views]
            strip = np.concatenate(tiles, axis=1).repeat(VIDEO_SCALE, axis=0).repeat(VIDEO_SCALE, axis=1)
            margin = np.full((strip.shape[0], 72, 3), 255, np.uint8)
            cv2.putText(margin, label, (4, strip.shape[0] // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
            grid.append(np.concatenate([margin, strip], axis=1))
        image = np.concatenate(grid, axis=0)
        cv2.putText(image, f"t+{ticks[j - 1]}" if j else "t", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (200, 0, 0), 1, cv2.LINE_AA)
        frames.append(image)
    iio.imwrite(path, np.stack(frames), extension=".gif", duration=VIDEO_FRAME_MS, loop=0)
    back = iio.imread(path, index=None)  # a broken file must not pass silently (Pillow may merge equal frames)
    if back.ndim != 4 or back.shape[1:3] != frames[0].shape[:2] or not 1 <= back.shape[0] <= len(frames):
        raise DynamicsEvalError(f"video {path} reads back as {back.shape}")


# ---- re-rendered ground truth -----------------------------------------------------------------
class _Renderer:
    """Replays recorded chunks in MetaWorld (one simulator per task) for lossless real frames."""

    def __init__(self, emb):
        self.emb, self.sims, self.by_text = emb, {}, None

    def render(self, task_text: str, state: np.ndarray, actions: np.ndarray, ticks: list[int]) -> dict | None:
        from rise.sim.metaworld_sim import MetaWorldSim, task_names, task_text as text_of

        if self.by_text is None:
            self.by_text = {**{n: n for n in task_names()}, **{text_of(n): n for n in task_names()}}
        task = self.by_text.get(task_text.strip())
        if task is None:
            return None
        if task not in self.sims:
            self.sims[task] = MetaWorldSim(task, self.emb, max_steps=1_000_000)
        sim = self.sims[task]
        if state.shape != (sim.state_size,):
            return None
        sim.set_state(state, render=False)
        frames = {v: [] for v in self.emb.views}
        for tick, action in enumerate(actions, start=1):
            frame = sim.step(action, render=tick in ticks)
            if tick in ticks:
                for v in self.emb.views:
                    frames[v].append(frame.views[v])
        return {v: np.stack(f) for v, f in frames.items()}

    def close(self) -> None:
        for sim in self.sims.values():
            sim.close()
        self.sims = {}


# ---- the evaluation ---------------------------------------------------------------------------
async def _call(stub, request, timeout: float):
    """Imagine through a gRPC stub or any transport object with a stub-like `Imagine` (sync or async)."""
    reply = stub.Imagine(request, timeout=timeout)
    return await reply if inspect.isawaitable(reply) else reply


async def evaluate_dynamics_async(
    dynamics: Any, dataset_roots: Sequence[str | Path], episodes: str | Sequence[int] | None = None, *,
    samples: int = 32, version: str = "", num_steps: int = 0, seed: int = 0, history: int = 1, frame_stride: int = 1,
    videos: int = 4, out: Path | None = None, batch_size: int = 8, rerender: int = 8, embodiment="metaworld",
    token: str = "", timeout_s: float = 300.0, progress: bool = True,
) -> DynamicsEvalReport:
    """Evaluate the world model served at `dynamics` on held-out episodes of `dataset_roots`.

    `dynamics`: host:port, a ClientConfig, or a transport exposing a DynamicsServiceStub-like
    `Imagine(request, timeout=)` (sync or async). `episodes`: per dataset, None/"all", a list of
    indices, or a spec such as "8-9" or "last:2". See the module docstring for the method.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rise.embodiment import Embodiment, load_embodiment
    from rise.errors import InvalidArgument
    from rise.observations import decode_views
    from rise.proto.v1 import common_pb2, dynamics_pb2, dynamics_pb2_grpc
    from rise.serving import ClientConfig, open_channel
    from rise.tensors import to_tensor

    emb = embodiment if isinstance(embodiment, Embodiment) else load_embodiment(embodiment)
    if samples < 1 or batch_size < 1 or history < 1 or frame_stride < 1 or videos < 0:
        raise ValueError("samples, batch_size, history and frame_stride must be >= 1 and videos >= 0")
    if not dataset_roots:
        raise ValueError("no dataset roots given")
    if videos and out is None:
        raise ValueError("videos need an output folder (out)")
    chunk = emb.chunk_length
    started = time.perf_counter()

    sources = [_Source(i, root, emb, history, frame_stride, episodes) for i, root in enumerate(dataset_roots)]
    windows = [w for s in sources for w in s.windows()]
    if not windows:
        raise DynamicsEvalError(f"no start frame with a whole chunk ({chunk} actions and frames) in the chosen episodes")
    pick = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    chosen = pick.choice(len(windows), size=min(samples, len(windows)), replace=False)
    shuffle = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    plan: list[_Sample] = []
    for index in chosen:
        d, e, t, row = windows[index]
        allowed = [k for k, (d2, e2, t2, _) in enumerate(windows) if not (d2 == d and e2 == e and abs(t2 - t) < chunk)]
        if not allowed:
            raise DynamicsEvalError("no chunk from another time or episode to use as the shuffled control: "
                                    "evaluate more or longer episodes")
        k = allowed[int(shuffle.integers(len(allowed)))]
        plan.append(_Sample(d, e, t, row, (windows[k][0], windows[k][1], windows[k][2])))
    wrong_rows = {(w[0], w[1], w[2]): w[3] for w in windows}

    if isinstance(dynamics, (str, ClientConfig)):
        client = (dynamics if isinstance(dynamics, ClientConfig)
                  else ClientConfig(address=dynamics, token=token, timeout_s=timeout_s))
        name, channel = client.address, open_channel(client)
        stub = dynamics_pb2_grpc.DynamicsServiceStub(channel)
    else:
        name, channel, stub = getattr(dynamics, "address", type(dynamics).__name__), None, dynamics
    report = DynamicsEvalReport(
        name, version, [str(s.root) for s in sources], {str(s.root): s.episodes for s in sources}, list(emb.views),
        history, frame_stride, chunk, num_steps, seed)
    if out is not None:
        out = Path(out)
        (out / "videos").mkdir(parents=True, exist_ok=True)
    if rerender < 0:
        raise ValueError(f"rerender must be >= 0 (samples re-rendered), got {rerender}")
    renderer = _Renderer(emb) if rerender and any(s.has_sim_state for s in sources) else None
    report.rerender_note = ("" if renderer else "disabled (rerender 0)" if not rerender
                            else "the datasets hold no simulator states")
    per: dict[str, dict[str, list]] = {c: {m: [] for m in METRICS} for c in CONDITIONS}
    render_scores: dict[str, dict[str, list]] = {k: {"mse": [], "ssim": []} for k in ("dataset", "imagined")}
    motion, mad = [], []
    columns = (TextColumn("[bold]eval dynamics[/bold]"), BarColumn(), MofNCompleteColumn(),
               TextColumn("PSNR {task.fields[psnr]}  EPE real/shuffled {task.fields[epe]}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            job = bar.add_task("samples", total=len(plan), psnr="-", epe="-")
            for first in range(0, len(plan), batch_size):
                batch = plan[first:first + batch_size]
                loaded = [sources[p.dataset].load(p.row) for p in batch]
                real_chunks = [sources[p.dataset].chunk(p.row) for p in batch]
                wrong_chunks = [sources[p.wrong[0]].chunk(wrong_rows[p.wrong]) for p in batch]
                states = [sources[p.dataset].sim_state(p.episode, p.frame) for p in batch]

                def request(chunks):
                    items = []
                    for (hist, _, task), actions, state in zip(loaded, chunks, states):
                        item = dynamics_pb2.ImagineItem(history={v: to_tensor(hist[v]) for v in emb.views},
                                                        actions=to_tensor(np.asarray(actions, np.float32)), task=task)
                        if state is not None:
                            item.sim_state.CopyFrom(to_tensor(np.asarray(state, np.float64)))
                        items.append(item)
                    # Same nonzero seed for both requests: a sampling model draws the same noise for both.
                    request_seed = int(np.random.SeedSequence([seed, first]).generate_state(1, np.uint32)[0]) + 1
                    return dynamics_pb2.ImagineRequest(items=items, model=common_pb2.ModelRef(version=version),
                                                       num_steps=num_steps, seed=request_seed)

                call_start = time.perf_counter()
                try:
                    replies = await asyncio.gather(_call(stub, request(real_chunks), timeout_s),
                                                   _call(stub, request(wrong_chunks), timeout_s))
                except Exception as exc:  # grpc errors: name the model and the cause
                    code = getattr(exc, "code", None)
                    detail = f"{code().name}: {exc.details()}" if callable(code) else f"{type(exc).__name__}: {exc}"
                    raise DynamicsEvalError(f"dynamics at {name} failed: {detail}") from None
                elapsed_ms = (time.perf_counter() - call_start) * 1000
                futures = []
                for reply in replies:
                    report.imagine_ms.append(elapsed_ms)
                    report.server_ms.append(reply.meta.timing.total_ms)
                    report.versions[reply.meta.version] = report.versions.get(reply.meta.version, 0) + 1
                    if len(reply.futures) != len(batch):
                        raise DynamicsEvalError(f"dynamics at {name} returned {len(reply.futures)} futures for "
                                                f"{len(batch)} items")
                    dims: dict[str, int] = {}
                    try:
                        futures.append([decode_views(f.frames, emb, f"futures[{i}].frames", lead=("F",), dims=dims)
                                        for i, f in enumerate(reply.futures)])
                    except InvalidArgument as exc:
                        raise DynamicsEvalError(f"dynamics at {name} returned bad frames: {exc}") from None
                    num = dims["F"]
                    if num < 1 or chunk % num or (report.future_frames and num != report.future_frames):
                        raise DynamicsEvalError(f"dynamics at {name} returned {num} frames per view: need a divisor of the "
                                                f"chunk length {chunk}, the same in every reply")
                    report.future_frames = num
                ticks = [j * chunk // report.future_frames for j in range(1, report.future_frames + 1)]

                for b, p in enumerate(batch):
                    hist, future, task = loaded[b]
                    anchors = {v: hist[v][-1] for v in emb.views}
                    real = {v: future[v][[k - 1 for k in ticks]] for v in emb.views}
                    imagined = {"real": futures[0][b], "shuffled": futures[1][b],
                                "persistence": {v: np.repeat(hist[v][-1:], len(ticks), axis=0) for v in emb.views}}
                    scores, sample_motion = _score(anchors, real, imagined, emb.views)
                    for cond in CONDITIONS:
                        for m in METRICS:
                            per[cond][m].append(scores[cond][m])
                    motion.append(sample_motion)
                    mad.append(_mean([np.abs(imagined["real"][v].astype(np.int16) - imagined["shuffled"][v]).mean()
                                      for v in emb.views]))
                    info = {"dataset": str(sources[p.dataset].root), "episode": p.episode, "frame": p.frame, "task": task,
                            "shuffled_from": {"dataset": str(sources[p.wrong[0]].root), "episode": p.wrong[1],
                                              "frame": p.wrong[2]},
                            **{f"{m}_{c}": DynamicsEvalReport._value(scores[c], m)
                               for c in CONDITIONS for m in ("psnr", "ssim", "epe_step", "epe_anchor")}}
                    if renderer is not None and states[b] is not None and first + b < rerender:
                        truth = renderer.render(task, states[b], real_chunks[b], ticks)
                        if truth is not None:
                            mse, ssim = _mse_ssim([(frames[v], truth[v]) for frames in (real, imagined["real"])
                                                   for v in emb.views])
                            for i, key in enumerate(("dataset", "imagined")):
                                part = slice(i * len(emb.views), (i + 1) * len(emb.views))
                                render_scores[key]["mse"].append(mse[part])
                                render_scores[key]["ssim"].append(ssim[part])
                            info["psnr_real_vs_render"] = _psnr(render_scores["imagined"]["mse"][-1])
                    report.samples.append(info)
                    index = first + b
                    if out is not None and index < videos:
                        path = out / "videos" / f"sample_{index:03d}.gif"
                        _write_gif(path, anchors, [real, imagined["real"], imagined["shuffled"]], emb.views,
                                   ["real", "imagined", "shuffled"], ticks)
                        report.videos.append(str(path))
                epe = [_mean(np.stack(per[k]["epe_anchor"])) for k in ("real", "shuffled")]
                bar.update(job, advance=len(batch), psnr=f"{_psnr(np.stack(per['real']['mse'])):.2f}",
                           epe=f"{epe[0]:.3f}/{epe[1]:.3f}")
    finally:
        if renderer is not None:
            renderer.close()
        if channel is not None:
            await channel.close()
    report.scores = {c: {m: np.stack(per[c][m]) for m in METRICS} for c in CONDITIONS}
    report.real_motion = np.asarray(motion)
    report.futures_mad = np.asarray(mad)
    if render_scores["dataset"]["mse"]:
        report.vs_render = {k: {m: np.stack(v) for m, v in s.items()} for k, s in render_scores.items()}
    elif renderer is not None:
        report.rerender_note = "no sample's task text names a MetaWorld task with a matching simulator state"
    report.wall_s = time.perf_counter() - started
    if out is not None:
        (out / "report.json").write_text(json.dumps(report.summary(), indent=2, allow_nan=False) + "\n")
        (out / "report.md").write_text(report.markdown())
    return report


def evaluate_dynamics(dynamics: Any, dataset_roots: Sequence[str | Path], episodes=None, **kwargs) -> DynamicsEvalReport:
    """`evaluate_dynamics_async` for callers without an event loop (the CLI, benchmarks)."""
    return asyncio.run(evaluate_dynamics_async(dynamics, dataset_roots, episodes, **kwargs))


def register(app: typer.Typer) -> None:
    @app.command("eval-dynamics")
    def eval_dynamics_command(
        dynamics: str = typer.Option(..., "--dynamics", help="host:port of a DynamicsService."),
        data: list[Path] = typer.Option(..., "--data", help="LeRobot dataset root (repeat for several)."),
        episodes: str = typer.Option("all", "--episodes",
                                     help="Held-out episodes of every dataset: all, 0,3,8-11 or last:N."),
        samples: int = typer.Option(32, "--samples", min=1, help="Start frames to imagine from."),
        version: str = typer.Option("", "--version", help="Version id or alias; empty: the server's default alias."),
        num_steps: int = typer.Option(0, "--num-steps", min=0, help="Sampling steps; 0: the model's default."),
        seed: int = typer.Option(0, "--seed", min=0, help="Draws the start frames, the shuffled chunks and sampling noise."),
        history: int = typer.Option(1, "--history", min=1, help="History frames per view (the model's)."),
        frame_stride: int = typer.Option(1, "--frame-stride", min=1, help="Ticks between history frames."),
        videos: int = typer.Option(4, "--videos", min=0, help="Side-by-side GIFs of the first K samples."),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="Items per Imagine request."),
        rerender: int = typer.Option(8, "--rerender", min=0,
                                     help="Samples also compared with frames re-rendered losslessly in MetaWorld (0: none)."),
        out: Path = typer.Option(..., "--out", help="Folder for report.json, report.md and videos/."),
        token: str = typer.Option("", "--token", envvar="RISE_TOKEN", help="Bearer token of the dynamics service."),
        timeout_s: float = typer.Option(300.0, "--timeout", help="Deadline per Imagine call, seconds."),
        embodiment: str = typer.Option("metaworld", "--embodiment"),
    ) -> None:
        """PSNR, SSIM and optical-flow EPE of a served world model on held-out episodes, with a shuffled-action control."""
        from rich.console import Console

        from rise.data.dataset import DatasetError

        console = Console(stderr=True)
        try:
            report = evaluate_dynamics(dynamics, data, episodes, samples=samples, version=version, num_steps=num_steps,
                                       seed=seed, history=history, frame_stride=frame_stride, videos=videos, out=out,
                                       batch_size=batch_size, rerender=rerender, embodiment=embodiment, token=token,
                                       timeout_s=timeout_s)
        except (DynamicsEvalError, DatasetError, ValueError) as exc:
            console.print(f"[red]rise eval-dynamics: {exc}[/red]")
            raise typer.Exit(1) from None
        typer.echo(report.markdown())  # plain: the report is Markdown, not Rich markup
        console.print(f"report, videos: {out}")
