"""Rollout workers: imagined episodes driven through the policy, dynamics and value services.

Each worker holds one imagined episode. A round moves every worker one chunk forward with one
batched call per service (the services see batches, not a trickle of single requests):

    policy.act(current frames, state, task, best bin)        -> chunk          (alias `candidate`;
                                                                 `proposal_bins`: a bin per group position)
    dynamics.imagine(frame history, chunk)                    -> imagined frames
    (lookahead_chunks > 0: the policy goes on in imagination from the chunk's last frame)
    value.score([current frame, imagined frames])             -> V
    (the oracle value, MetaWorld's shaped reward: [current, last imagined] with their simulator states)
    A = clamp(5 * mean(V(imagined) - V(current)), -1, 1), bin = digitize(A)   -> replay stream

Workers come in groups of `group_size` that start from the same real state; with groups, a
chunk's advantage is its value gain relative to the other chunks of its group (see `advantage`).
A worker chains at most `max_chain` imagined chunks (errors pile up in generated video), then
restarts from a real frame of the offline data. `produce` pushes a round to the replay stream:
the trainer's own rollout loop (run.py) and the fleet's workers (`rise worker rollout`,
worker.py) both go through it. A chained step reads the robot state the world model says the
last chunk ended in (`rollout.chained_state`); a model that does not imagine robot states (the
learned one, so far) leaves it at the real start's (an approximation: the images move, the
state does not).
"""

from __future__ import annotations

import asyncio
import copy
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from rise.data.loading import EpisodesInMemory
from rise.transport import Imagination, call_with_retries
from services.dynamics.oracle import KIND as ORACLE_KIND
from services.trainer.config import RolloutConfig, ServicesConfig
from services.trainer.replay import encode_sample

BIN_EDGES = np.linspace(-1.0, 1.0, 11)[:-1]  # the reference's 10 uniform bins on [-1, 1]


def advantage(values_current: np.ndarray, values_imagined: np.ndarray, scale: float,
              group_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """V [B], V [B, F] -> (A [B] in [-1, 1], bin [B] in 1..10).

    group_size 1: the reference's A = clamp(scale * mean(V(imagined) - V(current)), -1, 1).
    group_size G: rows come in groups of G chunks from one start; A is a chunk's value gain minus
    its group's mean gain, in units of the group's standard deviation (GRPO's baseline), clamped.
    The start state's own difficulty cancels out, so the bins rank actions, and no scale has to
    be tuned to a task's value-gain magnitude."""
    gain = value_gain(values_current, values_imagined)
    if group_size == 1:
        a = scale * gain
    else:
        groups = gain.reshape(-1, group_size)
        a = ((groups - groups.mean(axis=1, keepdims=True)) / (groups.std(axis=1, keepdims=True) + 1e-6)).reshape(-1)
    a = np.clip(a, -1.0, 1.0)
    return a.astype(np.float32), np.digitize(a, BIN_EDGES).astype(np.int64)


def value_gain(values_current: np.ndarray, values_imagined: np.ndarray) -> np.ndarray:
    """V [B], V [B, F] -> a chunk's mean value gain over its imagined frames [B]."""
    return (values_imagined - values_current[:, None]).mean(axis=1)


def group_best(gains: np.ndarray, group_size: int) -> np.ndarray:
    """Value gain [B] in groups of `group_size` -> the row of each group's highest gain."""
    return np.arange(0, len(gains), group_size) + gains.reshape(-1, group_size).argmax(axis=1)


async def judge(value, current: dict[str, np.ndarray], future: dict[str, np.ndarray], tasks: list[str], *,
                version: str = "", start_states: list | None = None, end_states: list | None = None,
                timeout_s: float | None = None):
    """The value service's scores of B chunks: [now, imagined frames] -> Scores [B, 1 + F].

    With simulator states (`start_states` at now, `end_states` after the chunk: the oracle value, which
    reads states, not frames) it scores [now, the chunk's end]: [B, 2]; `value_gain` is then end minus now."""
    sim_states = None
    if start_states is not None:
        future = {v: f[:, -1:] for v, f in future.items()}
        sim_states = np.stack([np.stack([start, end]) for start, end in zip(start_states, end_states)])
    scored = {v: np.concatenate([current[v][:, None], future[v]], axis=1) for v in current}
    return await value.score(scored, tasks, version=version, sim_states=sim_states, timeout_s=timeout_s)


def prompts(cfg: RolloutConfig, rows: int) -> list[int]:
    """The bin each of `rows` workers (whole groups, in order) asks the policy for."""
    return (cfg.proposal_bins or [cfg.advantage_bin] * cfg.group_size) * (rows // cfg.group_size)


def explore(actions: np.ndarray, rng: np.random.Generator, noise: float, offset: float) -> np.ndarray:
    """[B, chunk, A] + per-step noise (std `noise`) + one offset per chunk and dimension (std `offset`)."""
    b, _, a = actions.shape
    return (actions + rng.normal(0.0, noise, actions.shape) + rng.normal(0.0, offset, (b, 1, a))).astype(np.float32)


async def act_groups(policy, views: dict[str, np.ndarray], states: np.ndarray, tasks: list[str], bins: list[int],
                     num_steps: int, seed: int, group_size: int, **kwargs):
    """policy.act for rows in groups of `group_size`, every group's chunks from the same noise (one
    seeded call per position in the group: a seeded call's noise depends on the row's position), so
    a group's chunks differ only by the rows' observations."""
    if group_size == 1:
        return await policy.act(views, states, tasks, bins, num_steps, seed, **kwargs)
    parts = await asyncio.gather(*(
        policy.act({v: x[k::group_size] for v, x in views.items()}, states[k::group_size], tasks[k::group_size],
                   bins[k::group_size], num_steps, seed, **kwargs)
        for k in range(group_size)))
    actions = np.stack([part.actions for part in parts], axis=1).reshape(-1, *parts[0].actions.shape[1:])
    return parts[0]._replace(actions=actions)


async def imagine_groups(dynamics, history: dict[str, np.ndarray], actions: np.ndarray, num_steps: int, seed: int,
                         group_size: int, common_noise: bool, *, tasks: list[str] | None = None,
                         sim_states: list | None = None, **kwargs):
    """dynamics.imagine for rows in groups of `group_size` (one start each).

    common_noise: the chunks of a group are imagined from the same starting noise (one call per
    position in the group, all with one seed, sent together so the service batches them), so
    their futures differ only by what the model makes of the actions, not by sampling luck."""
    if not common_noise or group_size == 1:
        return await dynamics.imagine(history, actions, num_steps, seed, tasks=tasks, sim_states=sim_states, **kwargs)
    every = lambda values, k: None if values is None else list(values[k::group_size])  # noqa: E731
    parts = await asyncio.gather(*(
        dynamics.imagine({v: h[k::group_size] for v, h in history.items()}, actions[k::group_size], num_steps, seed,
                         tasks=every(tasks, k), sim_states=every(sim_states, k), **kwargs)
        for k in range(group_size)))
    # Back to the rows' order: start 0's chunks 0..G-1, then start 1's, ...
    frames = {v: np.stack([part.frames[v] for part in parts], axis=1).reshape(-1, *parts[0].frames[v].shape[1:])
              for v in parts[0].frames}
    sim_states = [part.sim_states[i] for i in range(len(actions) // group_size) for part in parts]
    states = None if parts[0].states is None else [part.states[i] for i in range(len(actions) // group_size)
                                                  for part in parts]
    return Imagination(frames, sim_states, parts[0].version, states)


def chained_states(states: np.ndarray, imagined: Imagination, rule: str) -> np.ndarray:
    """The robot states [B, S] after the imagined chunks: the world model's where it imagined them and
    `rule` is "imagined", else `states` (the real start's) unchanged."""
    if rule != "imagined" or imagined.states is None:
        return states
    return np.stack([s if new is None else np.asarray(new, np.float32) for s, new in zip(states, imagined.states)])


@dataclass
class ImaginedEpisode:
    history: dict[str, np.ndarray]  # view -> uint8 [T, H, W, 3], oldest first, `stride` ticks apart
    state: np.ndarray  # float32 [S]
    task: str
    sim_state: np.ndarray | None  # float64 [n] for privileged (oracle) dynamics
    chain: int = 0  # imagined chunks so far


@dataclass(frozen=True)
class DynamicsShape:
    """What the dynamics model wants: `history` frames `stride` control ticks apart (and sim states?)."""

    history: int
    stride: int
    needs_sim_state: bool


def dynamics_shape(registry, ref: str, chunk_length: int) -> DynamicsShape:
    """Read from the dynamics version's manifest (the registry the services share)."""
    manifest = registry.manifest("dynamics", registry.resolve("dynamics", ref or "stable"))
    config = manifest.config
    stride = int(config.get("frame_stride") or chunk_length // int(config.get("future_frames", chunk_length)))
    return DynamicsShape(int(config.get("history", 1)), max(1, stride), manifest.kind == ORACLE_KIND)


def value_reads_sim_state(registry, ref: str) -> bool:
    """Whether the value version (the registry the services share) is the oracle, which scores simulator states."""
    from services.value.oracle import KIND as ORACLE_VALUE_KIND

    return registry.manifest("value", registry.resolve("value", ref or "stable")).kind == ORACLE_VALUE_KIND


def start_states(episodes: EpisodesInMemory, shape: DynamicsShape) -> "StartStates":
    """Start states over `episodes`; for privileged (oracle) dynamics, with their recorded simulator states."""
    from rise.data.loading import episode_sim_states

    cache: dict[int, np.ndarray] = {}

    def sim_states(episode: int) -> np.ndarray:  # oracle dynamics restore recorded simulator states
        if episode not in cache:
            root = episodes.roots[int(episodes.episode_dataset[episode])]
            which = episodes.episode_dataset[episode]  # global episode number -> its index in its dataset
            cache[episode] = episode_sim_states(root, int(np.sum(episodes.episode_dataset[:episode] == which)))
        return cache[episode]

    return StartStates(episodes, shape, sim_states if shape.needs_sim_state else None)


def run_start_states(config, episodes: EpisodesInMemory, embodiment, shape: DynamicsShape) -> "StartStates":
    """A run's (RunConfig's) imagined starts: the frames of its offline data (`episodes`, loaded from
    `config.data`) and, when set, of `config.start_data`."""
    if config.start_data:
        from rise.data.loading import load_episodes_in_memory

        # `data` is read again (once, at start-up): the starts need one frame table over all datasets, the learner its own
        episodes = load_episodes_in_memory([*config.data, *config.start_data], embodiment)
    return start_states(episodes, shape)


class StartStates:
    """Real starting points drawn from the offline data."""

    def __init__(self, episodes: EpisodesInMemory, shape: DynamicsShape, sim_states: Callable[[int], np.ndarray] | None):
        self.episodes, self.shape, self.sim_states = episodes, shape, sim_states
        # Starts leave room for a whole chunk chain inside the episode (the value of the frames is known there).
        self.frames = np.arange(len(episodes))

    def draw(self, rng: np.random.Generator) -> ImaginedEpisode:
        return self.at(int(rng.choice(self.frames)))

    def at(self, g: int) -> ImaginedEpisode:
        """The start at global frame `g` of the offline data."""
        e, shape = self.episodes, self.shape
        episode = int(e.frame_episode[g])
        first = int(e.episode_starts[episode])
        back = np.maximum(g - np.arange(shape.history)[::-1] * shape.stride, first)
        sim_state = None
        if shape.needs_sim_state:
            sim_state = np.asarray(self.sim_states(episode)[g - first], np.float64)
        return ImaginedEpisode({v: e.views[v][back] for v in e.views}, e.states[g].copy(),
                               e.tasks[int(e.frame_task_ids[g])], sim_state)


class Rollouts:
    """Runs `config.workers` imagined episodes in lock-step rounds; `round()` returns encoded samples."""

    def __init__(self, config: RolloutConfig, services: ServicesConfig, clients, starts: StartStates, run_id: str,
                 seed: int = 0, log=print, value_reads_sim_state: bool = False):
        self.config, self.services, self.starts, self.run_id, self.log = config, services, starts, run_id, log
        # The oracle value scores simulator states, which only the oracle dynamics returns: it judges a chunk by the
        # states at its start and its end (the value gain is end minus start), not every imagined frame.
        if value_reads_sim_state and not starts.shape.needs_sim_state:
            raise ValueError("the oracle value scores simulator states: it needs the oracle dynamics (rollout.dynamics_version)")
        self.value_reads_sim_state = value_reads_sim_state
        self.policy, self.dynamics, self.value = clients
        self.rng = np.random.default_rng([seed, 7])
        self.workers = [w for _ in range(config.workers // config.group_size) for w in self._draw_group()]
        self.rounds = 0
        self.timing_s: dict[str, float] = {"policy": 0.0, "dynamics": 0.0, "lookahead": 0.0, "value": 0.0, "push": 0.0}
        self.seconds = 0.0  # in rounds and pushes (not waiting for the rate limiter)
        self.pushed = 0
        self.advantages: list[float] = []  # recent ones, for the histogram

    def _draw_group(self) -> list[ImaginedEpisode]:
        """`group_size` workers at one real start (copies: each goes on with its own imagined frames)."""
        start = self.starts.draw(self.rng)
        return [start] + [copy.deepcopy(start) for _ in range(self.config.group_size - 1)]

    async def _call(self, what: str, fn):
        s = self.services
        return await call_with_retries(fn, attempts=s.retry_attempts, backoff_s=s.retry_backoff_s,
                                       max_backoff_s=s.retry_max_backoff_s, what=what, log=self.log)

    async def produce(self, replay, frame_encoding: str = "jpeg", jpeg_quality: int = 90, limit: int = 0,
                      policy_version: str = "") -> int:
        """One round pushed to the replay stream (at most `limit` samples when > 0); -> samples pushed."""
        import asyncio

        t0 = time.perf_counter()
        payloads = await self.round(frame_encoding, jpeg_quality, policy_version)
        if limit:
            payloads = payloads[:limit]
        t1 = time.perf_counter()
        await asyncio.to_thread(replay.push, payloads)
        self.timing_s["push"] += time.perf_counter() - t1
        self.seconds += time.perf_counter() - t0
        self.pushed += len(payloads)
        return len(payloads)

    async def round(self, frame_encoding: str = "jpeg", jpeg_quality: int = 90, policy_version: str = "") -> list[bytes]:
        """Every worker one chunk forward; `policy_version` (else the config's alias) acts."""
        cfg, workers = self.config, self.workers
        self.rounds += 1
        seed = int(np.random.default_rng([self.rounds, 11]).integers(1, 2**62))
        views = list(workers[0].history)
        current = {v: np.stack([w.history[v][-1] for w in workers]) for v in views}
        states = np.stack([w.state for w in workers]).astype(np.float32)
        tasks = [w.task for w in workers]
        timeout = self.services.timeout_s

        t0 = time.perf_counter()
        chunks = await self._call("policy.act", lambda: self.policy.act(
            current, states, tasks, prompts(cfg, len(workers)), cfg.policy_steps, seed,
            version=policy_version or cfg.policy_version, timeout_s=timeout))
        if cfg.exploration_noise or cfg.exploration_offset:
            chunks = chunks._replace(actions=explore(chunks.actions, self.rng, cfg.exploration_noise,
                                                     cfg.exploration_offset))
        t1 = time.perf_counter()
        history = {v: np.stack([w.history[v] for w in workers]) for v in views}
        sim_states = [w.sim_state for w in workers] if self.starts.shape.needs_sim_state else None
        imagined = await self._call("dynamics.imagine", lambda: imagine_groups(
            self.dynamics, history, chunks.actions, cfg.dynamics_steps, seed, cfg.group_size, cfg.common_noise,
            version=cfg.dynamics_version, tasks=tasks, sim_states=sim_states, timeout_s=timeout))
        t2 = time.perf_counter()
        future, end_states = imagined.frames, imagined.sim_states
        if cfg.lookahead_chunks:
            future, end_states = await self._look_ahead(history, imagined, states, tasks, seed, policy_version)
        t_look = time.perf_counter()
        by_states = self.value_reads_sim_state
        scores = await self._call("value.score", lambda: judge(
            self.value, current, future, tasks, version=cfg.value_version, timeout_s=timeout,
            start_states=[w.sim_state for w in workers] if by_states else None, end_states=end_states))
        t3 = time.perf_counter()
        values = np.asarray(scores.values, np.float32)
        adv, bins = advantage(values[:, 0], values[:, 1:], cfg.advantage_scale, cfg.group_size)
        timing = {"policy": (t1 - t0) * 1e3, "dynamics": (t2 - t1) * 1e3, "value": (t3 - t_look) * 1e3}
        if cfg.lookahead_chunks:
            timing["lookahead"] = (t_look - t2) * 1e3
        for key, ms in timing.items():
            self.timing_s[key] += ms / 1e3
        self.advantages = (self.advantages + adv.tolist())[-4096:]

        trained = range(len(workers))
        if cfg.train_on == "best":  # only each group's pick, under the prompt's bin
            trained = group_best(value_gain(values[:, 0], values[:, 1:]), cfg.group_size)  # (A is clamped: ties at 1)
            bins[trained] = cfg.advantage_bin
        payloads = []
        for b in trained:
            w = workers[b]
            payloads.append(encode_sample(
                views={v: current[v][b] for v in views}, state=w.state, task=w.task, actions=chunks.actions[b],
                advantage=float(adv[b]), advantage_bin=int(bins[b]), policy_version=chunks.version,
                dynamics_version=imagined.version, value_version=scores.version, chain_index=w.chain,
                value_current=float(values[b, 0]), value_imagined=values[b, 1:].tolist(), timing_ms=timing,
                run_id=self.run_id, frame_encoding=frame_encoding, jpeg_quality=jpeg_quality))
        after = chained_states(states, imagined, cfg.chained_state)
        for b, w in enumerate(workers):
            # Move on: chain the imagined frames (and robot state), or (below) go back to a real start.
            w.chain += 1
            if w.chain >= cfg.max_chain:
                continue
            for v in views:
                w.history[v] = np.concatenate([w.history[v], imagined.frames[v][b]])[-self.starts.shape.history:]
            if sim_states is not None:
                w.sim_state = imagined.sim_states[b]
            w.state = after[b]
        for first in range(0, len(workers), cfg.group_size):  # a group's workers chain in step
            if workers[first].chain >= cfg.max_chain:
                workers[first:first + cfg.group_size] = self._draw_group()
        return payloads

    async def _look_ahead(self, history: dict[str, np.ndarray], imagined: Imagination, states: np.ndarray,
                          tasks: list[str], seed: int, policy_version: str) -> tuple[dict[str, np.ndarray], list]:
        """The policy goes on for `lookahead_chunks` more imagined chunks after each proposal (from the
        robot states `rollout.chained_state` gives, as in chains); -> every imagined frame, the proposal's
        first: {view: uint8 [B, F * (1 + lookahead_chunks), H, W, 3]}, and the simulator states at the
        end (oracle dynamics; else Nones)."""
        cfg, keep, timeout = self.config, self.starts.shape.history, self.services.timeout_s
        frames = {v: [f] for v, f in imagined.frames.items()}
        sim_states = imagined.sim_states if self.starts.shape.needs_sim_state else None
        bins = [cfg.advantage_bin] * len(states)
        step = imagined
        for k in range(1, cfg.lookahead_chunks + 1):
            states = chained_states(states, step, cfg.chained_state)
            history = {v: np.concatenate([h, frames[v][-1]], axis=1)[:, -keep:] for v, h in history.items()}
            step_seed = seed + k  # one seed per depth: a group's continuations share it (act_groups)
            chunks = await self._call("policy.act", lambda: act_groups(
                self.policy, {v: h[:, -1] for v, h in history.items()}, states, tasks, bins, cfg.policy_steps,
                step_seed, cfg.group_size, version=policy_version or cfg.policy_version, timeout_s=timeout))
            step = await self._call("dynamics.imagine", lambda: imagine_groups(
                self.dynamics, history, chunks.actions, cfg.dynamics_steps, step_seed, cfg.group_size, cfg.common_noise,
                version=cfg.dynamics_version, tasks=tasks, sim_states=sim_states, timeout_s=timeout))
            sim_states = step.sim_states if sim_states is not None else None
            for v in frames:
                frames[v].append(step.frames[v])
        return {v: np.concatenate(parts, axis=1) for v, parts in frames.items()}, step.sim_states


async def open_clients(services: ServicesConfig):
    """(policy, dynamics, value) clients for the configured URLs."""
    from rise.transport import connect_dynamics, connect_policy, connect_value

    client = services.client()
    return (connect_policy(services.policy, client), connect_dynamics(services.dynamics, client),
            connect_value(services.value, client))

