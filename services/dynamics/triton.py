"""The dynamics model behind Triton: named tensors for `imagine`, served by `rise.triton_binding`.

Works for every kind in `services.dynamics.server.KINDS` (persistence, oracle, the learned model
once it registers there) through the same code as the gRPC service: requests are checked here,
then `DynamicsServicer._imagine` makes the model call and validates what the model returned.

Tensors (first dimension = the request's items; B below):

  inputs   history_<view>       UINT8 [B, T, H, W, 3]   every embodiment view, one T per request
           actions              FP32  [B, chunk, A]     unnormalised, as the policy outputs them
           task                 BYTES [B, 1]            optional; the oracle needs it
           sim_state            FP64  [B, n]            optional (oracle): NaN-padded to the longest
           sim_state_size       INT64 [B, 1]            optional: each item's true n, -1 = none
  outputs  frames_<view>        UINT8 [B, F, H, W, 3]
           next_sim_state       FP64  [B, n]            the oracle's state after the chunk (NaN-padded;
                                                        [B, 1] of NaN for models without one)
           next_sim_state_size  INT64 [B, 1]            -1 where the model returns no state
           next_state           FP32  [B, state_dim]    the robot state after the chunk (oracle); NaN where
                                                        the model does not imagine it
           version, error       BYTES [B, 1]            (every adapter; see rise.triton_binding)
  request parameters: num_steps (denoising steps, 0 = model default), seed (0 = nondeterministic;
           int64, or a decimal string for seeds past int64 as the gRPC API's uint64 allows)

Batching matches `rise serve dynamics`: Triton's dynamic batcher merges requests; here unseeded
requests with the same history length and steps share model calls of at most
`batching.max_batch_size` items (a request is never split), and a seeded request runs alone,
so a seed gives the same frames whatever else is in flight, over either transport.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from rise.errors import InvalidArgument
from rise.model_host import LoadedModel
from rise.triton_binding import (BYTES, PythonBackendModel, TensorSpec, TritonAdapter, TritonRequest, TritonSettings,
                                 decode_strings)
from services.dynamics.server import DynamicsConfig, DynamicsServicer, _Item

SERVICE = "dynamics"


def history_input(view: str) -> str:
    return f"history_{view}"


def frames_output(view: str) -> str:
    return f"frames_{view}"


class DynamicsTritonConfig(DynamicsConfig):
    """`rise serve-triton dynamics` config: `rise serve dynamics`'s, plus the `triton:` section.

    Used from it: registry_root, model_name, embodiment, default_alias, preload (which aliases get
    a Triton model name), batching (merge limits; max_wait_ms is Triton's queue delay).
    """

    triton: TritonSettings = TritonSettings()


class _Decoded(NamedTuple):
    items: list[_Item]
    num_steps: int
    seed: int
    history_length: int


class _NoHost:
    """The servicer's `_imagine` reads only the embodiment; it never routes through a host here."""

    def __init__(self, embodiment):
        self.embodiment = embodiment


class DynamicsTriton(TritonAdapter):
    service = SERVICE
    parameters = {"num_steps": "denoising steps, 0 = the model's default",
                  "seed": "sampling seed, 0 = nondeterministic; int64 or a decimal string"}

    def __init__(self, embodiment, batching):
        super().__init__(embodiment, batching)
        self._servicer = DynamicsServicer(_NoHost(embodiment), batching)

    @classmethod
    def kinds(cls) -> dict[str, Any]:
        from services.dynamics import server

        return server.KINDS

    @classmethod
    def config_class(cls) -> type:
        return DynamicsTritonConfig

    def inputs(self) -> list[TensorSpec]:
        e = self.embodiment
        return [
            *(TensorSpec(history_input(v), np.dtype(np.uint8), (-1, e.image_height, e.image_width, 3),
                         doc=f"view {v!r}: [T, H, W, 3], oldest first") for v in e.views),
            TensorSpec("actions", np.dtype(np.float32), (e.chunk_length, e.action_dim), doc="the chunk to imagine"),
            TensorSpec("task", BYTES, (1,), optional=True, doc="task text (the oracle needs it)"),
            TensorSpec("sim_state", np.dtype(np.float64), (-1,), optional=True, doc="simulator state, NaN-padded (oracle)"),
            TensorSpec("sim_state_size", np.dtype(np.int64), (1,), optional=True, doc="true sim_state length, -1 = none"),
        ]

    def outputs(self) -> list[TensorSpec]:
        e = self.embodiment
        return [
            *(TensorSpec(frames_output(v), np.dtype(np.uint8), (-1, e.image_height, e.image_width, 3),
                         doc=f"view {v!r}: [F, H, W, 3] imagined") for v in e.views),
            TensorSpec("next_sim_state", np.dtype(np.float64), (-1,), doc="simulator state after the chunk, NaN-padded (oracle)"),
            TensorSpec("next_sim_state_size", np.dtype(np.int64), (1,), doc="true next_sim_state length, -1 = none"),
            TensorSpec("next_state", np.dtype(np.float32), (e.state_dim,), doc="robot state after the chunk, NaN = not imagined"),
        ]

    # ---- requests -> model calls -----------------------------------------------------------------
    def infer(self, loaded: LoadedModel, requests: list[TritonRequest]) -> list[dict[str, np.ndarray] | BaseException]:
        results: list[dict[str, np.ndarray] | BaseException | None] = [None] * len(requests)
        decoded: dict[int, _Decoded] = {}
        for i, request in enumerate(requests):
            try:
                decoded[i] = self._decode(loaded, request)
            except Exception as exc:  # noqa: BLE001  (this request fails alone)
                results[i] = exc
        for group in self._groups(decoded):
            first = decoded[group[0]]
            items = [item for i in group for item in decoded[i].items]
            try:
                per_item = self._servicer._imagine(loaded, first.num_steps, first.seed, items)
            except Exception as exc:  # noqa: BLE001  (the requests of this call fail, no others)
                for i in group:
                    results[i] = exc
                continue
            start = 0
            for i in group:
                count = len(decoded[i].items)
                results[i] = self._encode(per_item[start:start + count])
                start += count
        return results  # type: ignore[return-value]

    def _decode(self, loaded: LoadedModel, request: TritonRequest) -> _Decoded:
        e = self.embodiment
        data = request.inputs
        history = {v: data[history_input(v)] for v in e.views if history_input(v) in data}
        missing = [history_input(v) for v in e.views if v not in history]
        if missing:
            raise InvalidArgument(f"missing input(s) {missing}; embodiment {e.name!r} needs views {e.views}")
        lengths = {v: h.shape[1] for v, h in history.items()}
        if len(set(lengths.values())) != 1:
            raise InvalidArgument(f"history lengths differ between views {lengths}; all views need the same T")
        actions = np.asarray(data["actions"], dtype=np.float32)
        batch = len(actions)
        if any(len(h) != batch for h in history.values()):
            raise InvalidArgument("inputs hold different item counts")
        privileged = getattr(loaded.model, "needs_sim_state", False)
        tasks = decode_strings(data["task"]) if "task" in data else [""] * batch
        sim_states: list[np.ndarray | None] = [None] * batch
        if privileged and "sim_state" in data:
            states = np.asarray(data["sim_state"], dtype=np.float64)
            if "sim_state_size" in data:
                sizes = np.asarray(data["sim_state_size"]).reshape(batch).tolist()
            else:
                sizes = [states.shape[1]] * batch
            for b, size in enumerate(sizes):
                if size > states.shape[1]:
                    raise InvalidArgument(f"items[{b}]: sim_state_size {size} exceeds the sim_state width {states.shape[1]}")
                sim_states[b] = None if size < 0 else states[b, :size].copy()
        num_steps = request.int_parameter("num_steps", 0, 0, 2**32 - 1)
        seed = request.int_parameter("seed", 0)
        items = [_Item({v: history[v][b] for v in e.views}, actions[b], tasks[b], sim_states[b]) for b in range(batch)]
        if privileged and hasattr(loaded.model, "check_items"):
            loaded.model.check_items(tasks, sim_states)
        return _Decoded(items, num_steps, seed, lengths[e.views[0]])

    def _groups(self, decoded: dict[int, _Decoded]) -> list[list[int]]:
        """Request indices per model call: seeded alone; others by (T, steps), packed up to max_batch_size items."""
        groups: list[list[int]] = []
        open_groups: dict[tuple[int, int], tuple[list[int], int]] = {}
        limit = self.batching.max_batch_size
        for i, d in decoded.items():
            size = len(d.items)
            if d.seed or size >= limit:
                groups.append([i])
                continue
            key = (d.history_length, d.num_steps)
            members, count = open_groups.get(key, ([], 0))
            if members and count + size > limit:
                groups.append(members)
                members, count = [], 0
            open_groups[key] = (members + [i], count + size)
        groups += [members for members, _ in open_groups.values()]
        return groups

    def _encode(self, per_item: list[tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray | None]]
                ) -> dict[str, np.ndarray]:
        out = {frames_output(v): np.stack([frames[v] for frames, _, _ in per_item]) for v in self.embodiment.views}
        out["next_state"] = np.stack([np.full(self.embodiment.state_dim, np.nan, np.float32) if state is None else state
                                      for _, _, state in per_item])
        states = [None if s is None else np.asarray(s, np.float64).reshape(-1) for _, s, _ in per_item]
        width = max((len(s) for s in states if s is not None), default=1)  # never 0: pytriton cannot send empty arrays
        padded = np.full((len(states), width), np.nan)
        for b, s in enumerate(states):
            if s is not None:
                padded[b, :len(s)] = s
        out["next_sim_state"] = padded
        out["next_sim_state_size"] = np.array([[-1 if s is None else len(s)] for s in states], dtype=np.int64)
        return out


# ---- the cluster model repository (triton/model_repository) --------------------------------------
def repository_config(embodiment, name: str = SERVICE) -> str:
    """config.pbtxt of the example repository entry: the adapter's tensors, Python backend, CPU."""
    from rise.batching import BatchingConfig
    from rise.triton_binding import model_config_pbtxt

    defaults = BatchingConfig()
    return model_config_pbtxt(
        DynamicsTriton(embodiment, defaults), name, max_batch_size=TritonSettings().max_request_items,
        max_queue_delay_us=int(defaults.max_wait_ms * 1000), preferred_batch_size=defaults.max_batch_size,
        parameters={"rise_registry_root": "/models/registry", "rise_model": SERVICE, "rise_embodiment": embodiment.name,
                    "rise_max_batch_items": str(defaults.max_batch_size)})


MODEL_PY = """\
# Triton Python-backend entry point for a `dynamics` version: this folder's number is the registry
# version it serves (1 -> v0001), loaded from `rise_registry_root` (config.pbtxt) through the same
# kinds and adapter as `rise serve dynamics` / `rise serve-triton dynamics`. Needs the rise-serve
# package importable by the backend's Python (see triton/README.md in the rise-serve repository).
from services.dynamics.triton import TritonPythonModel  # noqa: F401
"""


def write_repository(root, embodiment, versions=(1,)) -> None:
    """Write `<root>/dynamics/config.pbtxt` and `<root>/dynamics/<N>/model.py` for each version number."""
    from pathlib import Path

    folder = Path(root) / SERVICE
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(repository_config(embodiment))
    for number in versions:
        (folder / str(number)).mkdir(exist_ok=True)
        (folder / str(number) / "model.py").write_text(MODEL_PY)


class TritonPythonModel(PythonBackendModel):
    """Cluster entry point: `triton/model_repository/dynamics/<N>/model.py` re-exports this."""

    service = SERVICE


if __name__ == "__main__":  # python -m services.dynamics.triton ROOT [EMBODIMENT] : (re)write the example repository
    import sys

    from rise.embodiment import load_embodiment

    write_repository(sys.argv[1], load_embodiment(sys.argv[2] if len(sys.argv) > 2 else "metaworld"))
