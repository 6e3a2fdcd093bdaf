import numpy as np
import pytest

from rise.errors import InvalidArgument
from rise.proto.v1 import tensor_pb2
from rise.tensors import from_tensor, to_tensor


@pytest.mark.parametrize("dtype", ["uint8", "int32", "int64", "float16", "float32", "float64", "bool"])
def test_raw_round_trip_through_bytes(dtype):
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    wire = tensor_pb2.Tensor.FromString(to_tensor(array).SerializeToString())  # real protobuf bytes
    back = from_tensor(wire, "x", dtype, (2, 3, 4))
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_raw_decode_is_zero_copy():
    tensor = to_tensor(np.ones((64, 64, 3), np.uint8))
    back = from_tensor(tensor)
    assert not back.flags.owndata and not back.flags.writeable  # a view over the message bytes


def test_png_is_lossless_and_jpeg_is_close():
    rng = np.random.default_rng(0)
    smooth = np.clip(np.linspace(0, 255, 64)[None, :, None] + rng.normal(0, 3, (2, 64, 64, 3)), 0, 255).astype(np.uint8)
    png = to_tensor(smooth, "png")
    assert len(png.images) == 2 and not png.data
    assert np.array_equal(from_tensor(png, "v", "uint8", ("T", 64, 64, 3)), smooth)
    jpeg = from_tensor(to_tensor(smooth, "jpeg", jpeg_quality=95))
    assert np.abs(jpeg.astype(int) - smooth).mean() < 4


@pytest.mark.parametrize(
    "tensor, expect",
    [
        (to_tensor(np.zeros((64, 64, 3), np.float32)), "expected uint8 [64, 64, 3], got float32 [64, 64, 3]"),
        (to_tensor(np.zeros((64, 32, 3), np.uint8)), "expected uint8 [64, 64, 3], got uint8 [64, 32, 3]"),
        (to_tensor(np.zeros((64, 64), np.uint8)), "expected uint8 [64, 64, 3], got uint8 [64, 64]"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=[64, 64, 3], data=b"\0" * 10), "needs 12288 bytes of data, got 10"),
        (tensor_pb2.Tensor(dtype=99, shape=[64, 64, 3]), "unknown dtype 99"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=[64, 64, 3], encoding=tensor_pb2.ENCODING_JPEG,
                           images=[b"not a jpeg"]), "image 0 does not decode"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=[64, 64, 3], encoding=tensor_pb2.ENCODING_PNG),
         "needs 1 encoded images, got 0"),
    ],
)
def test_bad_tensors_name_what_was_expected(tensor, expect):
    with pytest.raises(InvalidArgument, match="views\\['head'\\]") as err:
        from_tensor(tensor, "views['head']", "uint8", (64, 64, 3))
    assert expect in str(err.value)


def test_named_dimensions_must_agree():
    dims = {}
    from_tensor(to_tensor(np.zeros((4, 8, 8, 3), np.uint8)), "a", "uint8", ("T", 8, 8, 3), dims)
    with pytest.raises(InvalidArgument, match=r"b: expected uint8 \[4, 8, 8, 3\] as \[T, 8, 8, 3\], got uint8 \[3, 8, 8, 3\]"):
        from_tensor(to_tensor(np.zeros((3, 8, 8, 3), np.uint8)), "b", "uint8", ("T", 8, 8, 3), dims)


def test_encoded_image_of_wrong_size_is_refused():
    tensor = to_tensor(np.zeros((1, 32, 32, 3), np.uint8), "png")
    tensor.shape[:] = [1, 64, 64, 3]
    with pytest.raises(InvalidArgument, match=r"decodes to \[32, 32, 3\], expected \[64, 64, 3\]"):
        from_tensor(tensor)


def test_light_imports():
    import subprocess
    import sys

    code = "import rise, rise.tensors, rise.proto, rise.serving, rise.registry, rise.model_host, sys; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
