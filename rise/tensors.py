"""numpy <-> rise.v1.Tensor, and the one place where tensors from the wire are validated.

Decoding raw tensors is zero-copy (`np.frombuffer` over the message bytes, read-only).
Validation happens on the header (dtype, shape, byte count) before any decoding, and every
failure is an `InvalidArgument` whose message names what was expected.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np

from rise.errors import InvalidArgument
from rise.proto.v1 import tensor_pb2 as pb

_TO_NUMPY = {
    pb.DTYPE_UINT8: np.dtype("<u1"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_BOOL: np.dtype("?"),
}
_FROM_NUMPY = {dt.newbyteorder("="): code for code, dt in _TO_NUMPY.items()}
_ENCODINGS = {"raw": pb.ENCODING_RAW, "jpeg": pb.ENCODING_JPEG, "png": pb.ENCODING_PNG}

# A shape spec: an int must match exactly, a str names a dimension that must agree wherever the
# same name appears in one request (bound in `dims`), None accepts any size.
Dim = int | str | None


def dtype_name(code: int) -> str:
    return _TO_NUMPY[code].name if code in _TO_NUMPY else f"unknown dtype {code}"


def to_tensor(array: np.ndarray, encoding: str = "raw", jpeg_quality: int = 90) -> pb.Tensor:
    """Encode an array. `encoding="jpeg"|"png"` compresses uint8 [..., H, W, C] images."""
    array = np.asarray(array)
    code = _FROM_NUMPY.get(array.dtype.newbyteorder("="))
    if code is None:
        raise InvalidArgument(f"dtype {array.dtype} has no wire type; use one of {sorted(d.name for d in _TO_NUMPY.values())}")
    tensor = pb.Tensor(dtype=code, shape=array.shape, encoding=_ENCODINGS[encoding])
    if encoding == "raw":
        tensor.data = np.ascontiguousarray(array, dtype=_TO_NUMPY[code]).tobytes()
        return tensor
    if array.dtype != np.uint8 or array.ndim < 3:
        raise InvalidArgument(f"{encoding} needs uint8 [..., H, W, C] images, got {array.dtype} {list(array.shape)}")
    from PIL import Image  # imported here: only image encoders pay for it

    fmt = "JPEG" if encoding == "jpeg" else "PNG"
    for image in array.reshape(-1, *array.shape[-3:]):
        buffer = io.BytesIO()
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        pil.save(buffer, format=fmt, **({"quality": jpeg_quality} if fmt == "JPEG" else {"compress_level": 1}))
        tensor.images.append(buffer.getvalue())
    return tensor


def _describe(dtype: str, shape: Sequence[Dim], dims: dict[str, int]) -> str:
    parts = [str(dims.get(d, d)) if isinstance(d, str) else ("*" if d is None else str(d)) for d in shape]
    return f"{dtype} [{', '.join(parts)}]"


def from_tensor(
    tensor: pb.Tensor,
    name: str = "tensor",
    dtype: str | None = None,
    shape: Sequence[Dim] | None = None,
    dims: dict[str, int] | None = None,
) -> np.ndarray:
    """Decode a tensor, checking it against an expected dtype and shape first.

    `dims` collects named dimensions across several calls, so that e.g. every view of one
    request must have the same history length "T".
    """
    dims = {} if dims is None else dims
    got_shape = [int(s) for s in tensor.shape]
    got = f"{dtype_name(tensor.dtype)} {got_shape}"
    if tensor.dtype not in _TO_NUMPY:
        raise InvalidArgument(f"{name}: unknown dtype {tensor.dtype}; expected {dtype or 'a known dtype'}")
    np_dtype = _TO_NUMPY[tensor.dtype]
    if shape is not None:
        expected = _describe(dtype or np_dtype.name, shape, dims)
        ok = dtype is None or np_dtype.name == dtype
        ok = ok and len(got_shape) == len(shape)
        if ok:
            for want, size in zip(shape, got_shape):
                if isinstance(want, int) and want != size:
                    ok = False
                elif isinstance(want, str):
                    if dims.setdefault(want, size) != size:
                        ok = False
        if not ok:
            names = "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"
            legend = f" as {names}" if names not in expected else ""
            raise InvalidArgument(f"{name}: expected {expected}{legend}, got {got}")
    elif dtype is not None and np_dtype.name != dtype:
        raise InvalidArgument(f"{name}: expected dtype {dtype}, got {got}")
    if any(s < 0 for s in got_shape):
        raise InvalidArgument(f"{name}: negative dimension in shape {got_shape}")

    if tensor.encoding == pb.ENCODING_RAW:
        want_bytes = math.prod(got_shape) * np_dtype.itemsize
        if len(tensor.data) != want_bytes:
            raise InvalidArgument(f"{name}: {got} needs {want_bytes} bytes of data, got {len(tensor.data)}")
        return np.frombuffer(tensor.data, dtype=np_dtype).reshape(got_shape)
    return _decode_images(tensor, name, got_shape, got)


def _decode_images(tensor: pb.Tensor, name: str, shape: list[int], got: str) -> np.ndarray:
    if tensor.dtype != pb.DTYPE_UINT8 or len(shape) < 3:
        raise InvalidArgument(f"{name}: encoded images must be uint8 [..., H, W, C], got {got}")
    count = math.prod(shape[:-3])
    if len(tensor.images) != count:
        raise InvalidArgument(f"{name}: shape {shape} needs {count} encoded images, got {len(tensor.images)}")
    from PIL import Image, UnidentifiedImageError

    frame_shape = tuple(shape[-3:])
    out = np.empty(shape, dtype=np.uint8).reshape(count, *frame_shape)
    for i, blob in enumerate(tensor.images):
        try:
            image = np.asarray(Image.open(io.BytesIO(blob)))
        except (UnidentifiedImageError, OSError) as exc:
            raise InvalidArgument(f"{name}: image {i} does not decode: {exc}") from None
        if image.ndim == 2:
            image = image[..., None]
        if image.shape != frame_shape:
            raise InvalidArgument(f"{name}: image {i} decodes to {list(image.shape)}, expected {list(frame_shape)}")
        out[i] = image
    return out.reshape(shape)
