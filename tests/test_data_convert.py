"""`rise data convert-hdf5` and `rise data stats` on small real HDF5 files, read back through LeRobot."""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import typer
import yaml
from PIL import Image
from typer.testing import CliRunner

from rise.data import convert, stats
from rise.data.dataset import DatasetError, image_key, open_dataset
from rise.data.stats import ActionNormalizer, compute_stats, load_stats
from rise.embodiment import PRESETS

FRAMES, RAW_H, RAW_W = 12, 48, 64
CAMERA_COLOURS = {"cam_high": 0, "cam_left_wrist": 1, "cam_right_wrist": 2}  # the RGB channel each camera lights
VIDEO_TOLERANCE = 16  # AV1 (and JPEG) are lossy: grey levels stay within this in flat regions

data_app = typer.Typer()
convert.register(data_app)
stats.register(data_app)
runner = CliRunner()


def raw_frames(camera: str) -> np.ndarray:
    """Left half: the camera's colour at 200; right half: a grey that brightens with time (40 + 10 t)."""
    frames = np.zeros((FRAMES, RAW_H, RAW_W, 3), np.uint8)
    frames[:, :, : RAW_W // 2, CAMERA_COLOURS[camera]] = 200
    frames[:, :, RAW_W // 2:] = (40 + 10 * np.arange(FRAMES, dtype=np.uint8))[:, None, None, None]
    return frames


def joints(episode: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct known values per episode; the last action dimension (a gripper) never moves."""
    t, d = np.meshgrid(np.arange(FRAMES), np.arange(14), indexing="ij")
    qpos = (100 * episode + t + 0.5 * d).astype(np.float64)
    action = qpos + 0.25
    action[:, -1] = 0.8
    return qpos, action


def write_episode(path: Path, episode: int, jpeg: bool = False, drop: str | None = None, **attrs) -> Path:
    qpos, action = joints(episode)
    with h5py.File(path, "w") as f:
        f.attrs.update(attrs)
        for key, value in {"/observations/qpos": qpos, "/observations/qvel": np.zeros_like(qpos), "/action": action}.items():
            if key != drop:
                f[key] = value
        for camera in [*CAMERA_COLOURS, "cam_low"]:  # ALOHA's cam_low is not mapped: ignored
            frames = raw_frames(camera if camera in CAMERA_COLOURS else "cam_high")
            key = f"/observations/images/{camera}"
            if key == drop:
                continue
            if jpeg:  # as some ALOHA recorders store them: one variable-length JPEG byte array per row
                rows = f.create_dataset(key, (FRAMES,), dtype=h5py.vlen_dtype(np.uint8))
                for t, frame in enumerate(frames):
                    buffer = io.BytesIO()
                    Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
                    rows[t] = np.frombuffer(buffer.getvalue(), np.uint8)
            else:
                f[key] = frames
    return path


@pytest.fixture(scope="module")
def raw_dataset(tmp_path_factory) -> Path:
    """Two raw-image episodes into piper_dual through the CLI; episode 1 is marked failed in the file."""
    folder = tmp_path_factory.mktemp("hdf5")
    write_episode(folder / "episode_0.hdf5", 0, sim=False)
    write_episode(folder / "episode_1.hdf5", 1, sim=False, success=False)
    out = folder / "converted"
    result = runner.invoke(data_app, ["convert-hdf5", str(folder), "--out", str(out), "--task", "sort the bricks"])
    assert result.exit_code == 0, result.output
    assert "wrote 2 episodes (24 frames)" in result.output
    return out


def as_uint8(image) -> np.ndarray:
    """LeRobot's float [3, H, W] in [0, 1] -> uint8-scale [H, W, 3] floats."""
    return image.numpy().transpose(1, 2, 0) * 255


def test_raw_images_are_letterboxed_and_joints_exact(raw_dataset):
    dataset = open_dataset(raw_dataset, PRESETS["piper_dual"])
    assert dataset.num_episodes == 2 and dataset.num_frames == 2 * FRAMES and dataset.fps == 30
    # 48x64 scales by 3.5 to 168x224: 28 black rows above and below the content.
    for index, (episode, t) in enumerate((e, t) for e in range(2) for t in range(FRAMES)):
        if t not in (0, 5, 11):
            continue
        item = dataset[index]
        qpos, action = joints(episode)
        np.testing.assert_array_equal(item["observation.state"].numpy(), qpos[t].astype(np.float32))
        np.testing.assert_array_equal(item["action"].numpy(), action[t].astype(np.float32))
        assert item["task"] == "sort the bricks"
        assert bool(item["success"]) is (episode == 0)  # no attribute: success; attribute False: failure
        for camera, view in zip(CAMERA_COLOURS, ["head", "left_wrist", "right_wrist"]):
            image = as_uint8(item[image_key(view)])
            assert image.shape == (224, 224, 3)
            assert image[:22].max() < VIDEO_TOLERANCE and image[-22:].max() < VIDEO_TOLERANCE, "pad rows are black"
            coloured = np.zeros(3)
            coloured[CAMERA_COLOURS[camera]] = 200
            np.testing.assert_allclose(image[36:188, 8:104].mean((0, 1)), coloured, atol=VIDEO_TOLERANCE)
            np.testing.assert_allclose(image[36:188, 120:216].mean((0, 1)), [40 + 10 * t] * 3, atol=VIDEO_TOLERANCE)


def test_jpeg_rows_view_renaming_failure_flag_and_downsampling(tmp_path):
    embodiment = PRESETS["piper_dual"].model_dump() | {"name": "aloha_names", "views": ["top_head", "hand_left", "hand_right"],
                                                       "image_height": 96, "image_width": 96}
    (tmp_path / "aloha.yaml").write_text(yaml.safe_dump(embodiment))
    source = write_episode(tmp_path / "jpeg.hdf5", 0, jpeg=True, success=True)
    out = tmp_path / "converted"
    result = runner.invoke(data_app, [
        "convert-hdf5", str(source), "--out", str(out), "--task", "pack the backpack", "--embodiment",
        str(tmp_path / "aloha.yaml"), "--view-map", "cam_high=top_head,cam_left_wrist=hand_left,cam_right_wrist=hand_right",
        "--failure", "--fps", "60"])
    assert result.exit_code == 0, result.output
    dataset = open_dataset(out)
    assert dataset.num_frames == FRAMES // 2, "60 Hz recording downsampled to the 30 Hz control rate"
    qpos, _ = joints(0)
    for index in (0, 5):
        item = dataset[index]
        np.testing.assert_array_equal(item["observation.state"].numpy(), qpos[2 * index].astype(np.float32))
        assert item["task"] == "pack the backpack" and not bool(item["success"]), "--failure beats the attribute"
        for camera, view in zip(CAMERA_COLOURS, ["top_head", "hand_left", "hand_right"]):
            image = as_uint8(item[image_key(view)])  # 48x64 scales by 1.5 to 72x96: 12 black rows each side
            assert image.shape == (96, 96, 3)
            assert image[:9].max() < VIDEO_TOLERANCE and image[-9:].max() < VIDEO_TOLERANCE
            assert image[16:80, 4:44].mean((0, 1)).argmax() == CAMERA_COLOURS[camera], f"{view} shows {camera}"
            np.testing.assert_allclose(image[16:80, 52:92].mean(), 40 + 20 * index, atol=VIDEO_TOLERANCE)


def test_every_jpeg_row_layout_decodes(tmp_path):
    """Zero-padded uint8 rows (ALOHA's compress option), fixed-width byte strings, opaque blobs."""
    frames = raw_frames("cam_high")
    jpegs = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
        jpegs.append(buffer.getvalue())
    width = max(map(len, jpegs))
    layouts = {
        "padded": np.stack([np.frombuffer(j.ljust(width, b"\0"), np.uint8) for j in jpegs]),
        "fixed": np.array(jpegs, dtype=f"S{width}"),
        "opaque": np.array([j.ljust(width, b"\0") for j in jpegs], dtype=f"V{width}"),
    }
    emb = PRESETS["piper_dual"].model_copy(update={"image_height": RAW_H, "image_width": RAW_W})
    for name, rows in layouts.items():
        path = write_episode(tmp_path / f"{name}.hdf5", 0, drop="/observations/images/cam_high")
        with h5py.File(path, "a") as f:
            f["/observations/images/cam_high"] = rows
        view_map = convert.check_view_map(None, emb)
        assert convert.inspect_hdf5(path, emb, view_map)["frames"] == FRAMES
        episode = convert.read_hdf5_episode(path, emb, view_map, "task", True, 30.0)
        error = np.abs(episode.views["head"].astype(int) - frames).mean()
        assert error < 3, f"{name}: JPEG rows decode to the frames (mean error {error:.1f})"


@pytest.mark.parametrize("drop, words", [
    ("/action", ["missing dataset '/action'", "broken.hdf5"]),
    ("/observations/images/cam_left_wrist", ["missing dataset '/observations/images/cam_left_wrist'",
                                             "view 'left_wrist'", "broken.hdf5"]),
])
def test_missing_key_names_the_key_and_file(tmp_path, drop, words):
    source = write_episode(tmp_path / "broken.hdf5", 0, drop=drop)
    with pytest.raises(DatasetError) as error:
        convert.convert_hdf5([source], tmp_path / "out", PRESETS["piper_dual"], "task", show_progress=False)
    assert all(w in str(error.value) for w in words), str(error.value)
    assert not (tmp_path / "out").exists(), "nothing is written when a file is bad"


def test_mismatched_lengths_and_dims_are_clear(tmp_path):
    source = write_episode(tmp_path / "short.hdf5", 0)
    with h5py.File(source, "a") as f:
        del f["/action"]
        f["/action"] = np.zeros((FRAMES - 1, 14))
    with pytest.raises(DatasetError, match=r"short.hdf5: datasets differ in length.*'/action': 11"):
        convert.convert_hdf5([source], tmp_path / "out", PRESETS["piper_dual"], "task", show_progress=False)
    with h5py.File(source, "a") as f:
        del f["/observations/qpos"]
        f["/observations/qpos"] = np.zeros((FRAMES, 7))
    with pytest.raises(DatasetError, match=r"/observations/qpos has shape \[12, 7\]; embodiment 'piper_dual' needs \[T, 14\]"):
        convert.convert_hdf5([source], tmp_path / "out", PRESETS["piper_dual"], "task", show_progress=False)
    result = runner.invoke(data_app, ["convert-hdf5", str(source), "--out", str(tmp_path / "out"), "--task", "t",
                                      "--view-map", "cam_high=top_head"])
    assert result.exit_code == 1 and "unknown view(s) ['top_head']" in result.output


def test_stats_known_values_and_cli(raw_dataset):
    computed = compute_stats(raw_dataset)
    features = computed["features"]
    qpos = np.concatenate([joints(e)[0] for e in range(2)]).astype(np.float32)
    action = np.concatenate([joints(e)[1] for e in range(2)]).astype(np.float32)
    for key, values in (("observation.state", qpos), ("action", action)):
        entry = features[key]
        np.testing.assert_allclose(entry["min"], values.min(0))
        np.testing.assert_allclose(entry["max"], values.max(0))
        np.testing.assert_allclose(entry["q01"], np.quantile(values.astype(np.float64), 0.01, axis=0))
        np.testing.assert_allclose(entry["q99"], np.quantile(values.astype(np.float64), 0.99, axis=0))
        assert entry["count"] == 2 * FRAMES and entry["names"][0] == "left_joint1"
    assert features["observation.state"]["min"][0] == 0 and features["observation.state"]["max"][0] == 111
    head = features[image_key("head")]  # red camera: black bars, red at 200/255, a grey ramp
    assert head["count"] == 2 * FRAMES and head["min"] == [0, 0, 0]
    assert abs(head["max"][0] - 200 / 255) < VIDEO_TOLERANCE / 255 and head["q99"][0] > head["q99"][1]

    result = runner.invoke(data_app, ["stats", str(raw_dataset), "--quantiles", "0.05,0.5,0.95"])
    assert result.exit_code == 0, result.output
    saved = json.loads((raw_dataset / "meta" / "rise_stats.json").read_text())
    assert {"q05", "q50", "q95"} <= set(saved["features"]["action"]) and saved == load_stats(raw_dataset)


def test_load_stats_computes_once_and_missing_dataset_is_clear(tmp_path, raw_dataset):
    (raw_dataset / "meta" / "rise_stats.json").unlink(missing_ok=True)
    first = load_stats(raw_dataset)
    assert (raw_dataset / "meta" / "rise_stats.json").is_file() and load_stats(raw_dataset) == first
    with pytest.raises(DatasetError, match="no LeRobot dataset at .*nowhere"):
        load_stats(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="no LeRobot dataset"):
        compute_stats(tmp_path / "nowhere")


def test_action_normalizer_round_trip_and_constant_dimension(raw_dataset):
    import torch

    computed = load_stats(raw_dataset)
    normalizer = ActionNormalizer.from_stats(computed)
    action = np.concatenate([joints(e)[1] for e in range(2)]).astype(np.float32)
    normalized = normalizer.normalize(action)
    assert normalized.dtype == np.float32
    np.testing.assert_allclose(normalized[:, :-1].min(0), -1, atol=1e-6)
    np.testing.assert_allclose(normalized[:, :-1].max(0), 1, atol=1e-6)
    assert normalizer.constant.tolist() == [False] * 13 + [True]
    assert np.all(normalized[:, -1] == 0), "a constant gripper maps to 0, not NaN or inf"
    np.testing.assert_allclose(normalizer.unnormalize(normalized), action, rtol=1e-5, atol=1e-4)

    chunk = torch.tensor(action[:8])[None]  # [batch, chunk, dim] tensors stay tensors
    back = normalizer.unnormalize(normalizer.normalize(chunk))
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float32
    torch.testing.assert_close(back, chunk, rtol=1e-5, atol=1e-4)

    robust = ActionNormalizer.from_stats(computed, mode="quantile")
    assert robust.normalize(action)[:, 0].min() < -1, "values beyond q01 fall outside [-1, 1], unclipped"
    restored = ActionNormalizer.from_dict(json.loads(json.dumps(robust.to_dict())))
    np.testing.assert_array_equal(restored.normalize(action), robust.normalize(action))
    with pytest.raises(ValueError, match=r"expected actions \[\.\.\., 14\], got shape \[2, 7\]"):
        normalizer.normalize(np.zeros((2, 7)))
    with pytest.raises(ValueError, match="unknown normalisation mode"):
        ActionNormalizer.from_stats(computed, mode="z_score")
