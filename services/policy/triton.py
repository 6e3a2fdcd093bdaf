"""The policy behind NVIDIA Triton: `rise serve-triton policy` (see rise/triton_binding.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from rise.errors import InvalidArgument
from rise.model_host import LoadedModel
from rise.triton_binding import BYTES, TensorSpec, TritonAdapter, TritonRequest, TritonSettings, decode_strings

if TYPE_CHECKING:  # annotations only
    from rise.batching import BatchingConfig
    from rise.embodiment import Embodiment


class PolicyTriton(TritonAdapter):
    """`PolicyService.Act` as Triton tensors; one item = one observation.

      inputs   frames_<view>   UINT8 [B, H, W, 3]    every embodiment view
               state           FP32  [B, S]
               task            BYTES [B, 1]          optional (empty text when absent)
               advantage_bin   INT64 [B, 1]          optional: 0 = null (default), 1..10
               sim_state       FP64  [B, n]          optional (scripted expert): NaN-padded to the longest
               sim_state_size  INT64 [B, 1]          optional: each item's true n, -1 = none
      outputs  actions         FP32  [B, chunk, A]   unnormalised action chunk
               version, error  BYTES [B, 1]          (every adapter)
      request parameters: num_steps (Euler steps, 0 = model default), seed (0 = nondeterministic),
                          guidance_scale (classifier-free guidance, 0 = the version's default)

    Every kind in `services.policy.server.KINDS` works (linear, scripted expert, the learned
    flow-matching policy); the model call is `PolicyServicer._run`, as over gRPC. Batching matches
    `rise serve policy`: unseeded requests with the same steps and guidance share calls of at most
    `batching.max_batch_size` items (a request is never split); seeded requests and privileged
    models run alone; a bad request fails alone.
    """

    service = "policy"
    parameters = {"num_steps": "Euler steps, 0 = the model's default",
                  "seed": "sampling seed, 0 = nondeterministic; int64 or a decimal string",
                  "guidance_scale": "classifier-free guidance towards the bin, 0 = the version's default"}

    def __init__(self, embodiment: Embodiment, batching: BatchingConfig):
        super().__init__(embodiment, batching)
        from services.policy.server import PolicyServicer

        class _NoHost:  # `_run` reads only the embodiment; it never routes through a host here
            pass

        host = _NoHost()
        host.embodiment = embodiment  # type: ignore[attr-defined]
        self._servicer = PolicyServicer(host, batching)  # type: ignore[arg-type]

    @classmethod
    def kinds(cls) -> dict[str, Any]:
        from services.policy import server

        return server.KINDS

    @classmethod
    def config_class(cls) -> type:
        return _policy_triton_config()

    def inputs(self) -> list[TensorSpec]:
        e = self.embodiment
        return [*(TensorSpec(f"frames_{v}", np.dtype(np.uint8), (e.image_height, e.image_width, 3), doc=f"view {v!r}: [H, W, 3]")
                  for v in e.views),
                TensorSpec("state", np.dtype(np.float32), (e.state_dim,), doc="robot state"),
                TensorSpec("task", BYTES, (1,), optional=True, doc="task text"),
                TensorSpec("advantage_bin", np.dtype(np.int64), (1,), optional=True, doc="0 = null, 1..10 (10 best)"),
                TensorSpec("sim_state", np.dtype(np.float64), (-1,), optional=True, doc="simulator state, NaN-padded (expert)"),
                TensorSpec("sim_state_size", np.dtype(np.int64), (1,), optional=True, doc="true sim_state length, -1 = none")]

    def outputs(self) -> list[TensorSpec]:
        e = self.embodiment
        return [TensorSpec("actions", np.dtype(np.float32), (e.chunk_length, e.action_dim), doc="action chunk")]

    def _decode(self, loaded: LoadedModel, request: TritonRequest) -> tuple[list, int, int, float]:
        from rise.observations import NUM_ADVANTAGE_BINS
        from services.policy.server import _Item, check_guidance

        e, data = self.embodiment, request.inputs
        views = {}
        for v in e.views:
            name = f"frames_{v}"
            if name not in data:
                raise InvalidArgument(f"missing input {name!r}; embodiment {e.name!r} needs views {e.views}")
            array = np.asarray(data[name])
            if array.dtype != np.uint8 or array.shape[1:] != (e.image_height, e.image_width, 3):
                raise InvalidArgument(f"{name} must be uint8 [B, {e.image_height}, {e.image_width}, 3], "
                                      f"got {array.dtype} {list(array.shape)}")
            views[v] = array
        if "state" not in data:
            raise InvalidArgument(f"missing input 'state' (float32 [B, {e.state_dim}])")
        state = np.asarray(data["state"])
        if state.dtype != np.float32 or state.shape[1:] != (e.state_dim,):
            raise InvalidArgument(f"state must be float32 [B, {e.state_dim}], got {state.dtype} {list(state.shape)}")
        batch = len(state)
        if batch < 1 or any(len(a) != batch for a in views.values()):
            raise InvalidArgument(f"inputs hold different item counts (state {batch}, views {[len(a) for a in views.values()]})")
        tasks = decode_strings(data["task"]) if "task" in data else [""] * batch
        bins = np.asarray(data["advantage_bin"]).reshape(-1).astype(np.int64) if "advantage_bin" in data else np.zeros(batch, np.int64)
        if len(tasks) != batch or len(bins) != batch:
            raise InvalidArgument(f"task and advantage_bin need one entry per item ({batch})")
        bad = bins[(bins < 0) | (bins > NUM_ADVANTAGE_BINS)]
        if len(bad):
            raise InvalidArgument(f"advantage bin must be 0 (null) or 1..{NUM_ADVANTAGE_BINS}, got {int(bad[0])}")
        sim_states: list[np.ndarray | None] = [None] * batch
        if getattr(loaded.model, "needs_sim_state", False) and "sim_state" in data:
            states = np.asarray(data["sim_state"], dtype=np.float64)
            sizes = np.asarray(data["sim_state_size"]).reshape(batch).tolist() if "sim_state_size" in data else [states.shape[1]] * batch
            for b, size in enumerate(sizes):
                if size > states.shape[1]:
                    raise InvalidArgument(f"items[{b}]: sim_state_size {size} exceeds the sim_state width {states.shape[1]}")
                sim_states[b] = None if size < 0 else states[b, :size].copy()
        items = [_Item({v: views[v][b] for v in e.views}, state[b], tasks[b], int(bins[b]), sim_states[b]) for b in range(batch)]
        guidance = request.float_parameter("guidance_scale", 0.0)
        check_guidance(loaded, guidance, "request")
        return items, request.int_parameter("num_steps", 0, 0, 2**32 - 1), request.int_parameter("seed", 0), guidance

    def infer(self, loaded: LoadedModel, requests: list[TritonRequest]) -> list[dict[str, np.ndarray] | BaseException]:
        results: list[dict[str, np.ndarray] | BaseException | None] = [None] * len(requests)
        decoded: dict[int, tuple[list, int, int, float]] = {}
        for i, request in enumerate(requests):
            try:
                decoded[i] = self._decode(loaded, request)
            except Exception as exc:  # noqa: BLE001  (this request fails alone)
                results[i] = exc
        alone = getattr(loaded.model, "needs_sim_state", False)
        groups: list[list[int]] = []
        open_groups: dict[tuple, tuple[list[int], int]] = {}  # (num_steps, guidance) -> (members, items)
        for i, (items, num_steps, seed, guidance) in decoded.items():
            if seed or alone or len(items) >= self.batching.max_batch_size:
                groups.append([i])
                continue
            members, count = open_groups.get((num_steps, guidance), ([], 0))
            if members and count + len(items) > self.batching.max_batch_size:
                groups.append(members)
                members, count = [], 0
            open_groups[(num_steps, guidance)] = (members + [i], count + len(items))
        groups += [members for members, _ in open_groups.values()]
        for group in groups:
            _, num_steps, seed, guidance = decoded[group[0]]
            items = [item for i in group for item in decoded[i][0]]
            try:
                chunks = self._servicer._run(loaded, num_steps, seed, guidance, items)
            except Exception as exc:  # noqa: BLE001  (the requests of this call fail, no others)
                for i in group:
                    results[i] = exc
                continue
            start = 0
            for i in group:
                n = len(decoded[i][0])
                results[i] = {"actions": np.stack(chunks[start:start + n]).astype(np.float32)}
                start += n
        return results  # type: ignore[return-value]


_POLICY_TRITON_CONFIG: list[type] = []


def _policy_triton_config() -> type:
    """`rise serve-triton policy` config: `rise serve policy`'s plus the `triton:` section (built on first use)."""
    if not _POLICY_TRITON_CONFIG:
        from services.policy.server import PolicyConfig

        class PolicyTritonConfig(PolicyConfig):
            triton: TritonSettings = TritonSettings()

        _POLICY_TRITON_CONFIG.append(PolicyTritonConfig)
    return _POLICY_TRITON_CONFIG[0]
