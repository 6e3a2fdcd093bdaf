"""The value model behind NVIDIA Triton: `rise serve-triton value` (see rise/triton_binding.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from rise.errors import InvalidArgument
from rise.model_host import LoadedModel
from rise.triton_binding import BYTES, TensorSpec, TritonAdapter, TritonRequest, TritonSettings, decode_strings


class ValueTriton(TritonAdapter):
    """`ValueService.Score` as Triton tensors; one item = one frame (all views) + its task text.

      inputs   frames_<view>  UINT8 [B, H, W, 3]   every embodiment view
               task           BYTES [B, 1]         optional (empty text when absent)
      outputs  value          FP32  [B, 1]         in [-1, 1]
               version, error BYTES [B, 1]         (every adapter)

    Every kind in `services.value.server.KINDS` works (linear, the learned progress value) except the
    oracle, which scores simulator states these tensors do not carry (serve it over gRPC). Triton's
    dynamic batcher merges requests; here they are packed into model calls of at most
    `batching.max_batch_size` frames, never splitting a request, and a bad request fails alone.
    """

    service = "value"

    @classmethod
    def kinds(cls) -> dict[str, Any]:
        from services.value import oracle, server

        return {kind: load for kind, load in server.KINDS.items() if kind != oracle.KIND}

    @classmethod
    def config_class(cls) -> type:
        return _value_triton_config()

    def inputs(self) -> list[TensorSpec]:
        e = self.embodiment
        return [*(TensorSpec(f"frames_{v}", np.dtype(np.uint8), (e.image_height, e.image_width, 3), doc=f"view {v!r}: [H, W, 3]")
                  for v in e.views),
                TensorSpec("task", BYTES, (1,), optional=True, doc="task text")]

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("value", np.dtype(np.float32), (1,), doc="progress value in [-1, 1]")]

    def _decode(self, request: TritonRequest) -> tuple[dict[str, np.ndarray], list[str]]:
        e = self.embodiment
        views = {}
        for v in e.views:
            name = f"frames_{v}"
            if name not in request.inputs:
                raise InvalidArgument(f"missing input {name!r}; the value model needs views {e.views}")
            array = np.asarray(request.inputs[name])
            if array.dtype != np.uint8 or array.shape[1:] != (e.image_height, e.image_width, 3):
                raise InvalidArgument(f"{name} must be uint8 [B, {e.image_height}, {e.image_width}, 3], "
                                      f"got {array.dtype} {list(array.shape)}")
            views[v] = array
        counts = {len(a) for a in views.values()}
        if len(counts) != 1 or not counts.pop():
            raise InvalidArgument(f"every view needs the same number (>= 1) of frames; got {[len(a) for a in views.values()]}")
        batch = len(views[e.views[0]])
        tasks = decode_strings(request.inputs["task"]) if "task" in request.inputs else [""] * batch
        if len(tasks) != batch:
            raise InvalidArgument(f"task has {len(tasks)} entries for {batch} frames")
        return views, tasks

    def infer(self, loaded: LoadedModel, requests: list[TritonRequest]) -> list[dict[str, np.ndarray] | BaseException]:
        results: list[dict[str, np.ndarray] | BaseException | None] = [None] * len(requests)
        decoded: dict[int, tuple[dict[str, np.ndarray], list[str]]] = {}
        for i, request in enumerate(requests):
            try:
                decoded[i] = self._decode(request)
            except Exception as exc:  # noqa: BLE001  (this request fails alone)
                results[i] = exc
        groups: list[list[int]] = []
        size = 0
        for i in decoded:  # pack whole requests into calls of at most max_batch_size frames
            n = len(decoded[i][1])
            if not groups or size + n > self.batching.max_batch_size:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += n
        for group in groups:
            views = {v: np.concatenate([decoded[i][0][v] for i in group]) for v in self.embodiment.views}
            tasks = [t for i in group for t in decoded[i][1]]
            try:
                values = np.asarray(loaded.model.score(views, tasks), np.float32)
                if values.shape != (len(tasks),):
                    raise RuntimeError(f"model {loaded.version} returned values {list(values.shape)}, expected [{len(tasks)}]")
            except Exception as exc:  # noqa: BLE001  (the requests of this call fail, no others)
                for i in group:
                    results[i] = exc
                continue
            start = 0
            for i in group:
                n = len(decoded[i][1])
                results[i] = {"value": values[start:start + n].reshape(n, 1)}
                start += n
        return results  # type: ignore[return-value]


_VALUE_TRITON_CONFIG: list[type] = []


def _value_triton_config() -> type:
    """`rise serve-triton value` config: `rise serve value`'s plus the `triton:` section (built on first use,
    so importing this module does not import the value service)."""
    if not _VALUE_TRITON_CONFIG:
        from services.value.server import ValueConfig

        class ValueTritonConfig(ValueConfig):
            triton: TritonSettings = TritonSettings()

        _VALUE_TRITON_CONFIG.append(ValueTritonConfig)
    return _VALUE_TRITON_CONFIG[0]
