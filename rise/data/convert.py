"""`rise data convert-hdf5`: ALOHA / AgileX Piper HDF5 episode files into our LeRobot schema.

Source layout, one episode per file (as ALOHA's and AgileX's recorders write it):
    /observations/qpos              [T, state_dim] joint positions      -> observation.state
    /observations/images/<camera>   [T, H, W, 3] uint8, or T JPEG rows  -> observation.images.<view>
    /action                         [T, action_dim] joint targets       -> action
    /observations/qvel              optional; not carried (our schema has no velocity column)
    root attributes                 `sim` (optional), `success` (optional)

JPEG rows may be variable-length uint8 arrays, variable-length or fixed-width byte strings, or
zero-padded uint8 rows [T, N] (ALOHA's `compress` option); all decode with PIL, which reads the
JPEG's colours as RGB (what LeRobot's own ALOHA converter gets with OpenCV + BGR2RGB).

Images are resized with padding (letterbox: aspect kept, black bars) to the embodiment's size,
as the robot agent does at run time, so a model sees the same geometry in training and on the
robot. Success: `--success/--failure` when given, else a file's `success` attribute, else True:
teleoperated demonstrations are successes unless marked otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

# The three cameras ALOHA and the AgileX Piper recorders name, in head / left / right order:
# by default they map onto the embodiment's views in its order (piper_dual: head, left_wrist,
# right_wrist). Extra cameras in a file (ALOHA's cam_low) are ignored unless mapped.
DEFAULT_CAMERAS = ("cam_high", "cam_left_wrist", "cam_right_wrist")
QPOS_KEY = "/observations/qpos"
ACTION_KEY = "/action"
IMAGES_GROUP = "/observations/images"
ROWS_PER_READ = 64  # image rows read from HDF5 at a time: bounds memory for 640x480 sources


def camera_key(camera: str) -> str:
    return f"{IMAGES_GROUP}/{camera}"


def parse_view_map(text: str) -> dict[str, str]:
    """'cam_high=top_head,cam_left_wrist=hand_left' -> {source camera: embodiment view}."""
    from rise.data.dataset import DatasetError

    mapping: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        camera, sep, view = (s.strip() for s in pair.partition("="))
        if not sep or not camera or not view:
            raise DatasetError(f"--view-map entry {pair!r} is not CAMERA=VIEW (e.g. cam_high=head)")
        if camera in mapping:
            raise DatasetError(f"--view-map names camera {camera!r} twice")
        mapping[camera] = view
    return mapping


def check_view_map(view_map: dict[str, str] | None, embodiment) -> dict[str, str]:
    """The camera -> view map to use, checked to give every embodiment view exactly one camera."""
    from rise.data.dataset import DatasetError

    if view_map is None:
        if len(embodiment.views) != len(DEFAULT_CAMERAS):
            raise DatasetError(f"embodiment {embodiment.name!r} has {len(embodiment.views)} views {embodiment.views}; "
                               f"the default map covers 3 cameras {list(DEFAULT_CAMERAS)}: pass --view-map")
        view_map = dict(zip(DEFAULT_CAMERAS, embodiment.views))
    targets = list(view_map.values())
    unknown = sorted(set(targets) - set(embodiment.views))
    if unknown:
        raise DatasetError(f"view map targets unknown view(s) {unknown}; embodiment {embodiment.name!r} has views "
                           f"{embodiment.views}")
    twice = sorted({v for v in targets if targets.count(v) > 1})
    if twice:
        raise DatasetError(f"view map gives view(s) {twice} more than one camera")
    missing = [v for v in embodiment.views if v not in targets]
    if missing:
        raise DatasetError(f"view map gives no camera to view(s) {missing} of embodiment {embodiment.name!r}")
    return view_map


def resize_with_padding(image, height: int, width: int):
    """uint8 [h, w, 3] -> [height, width, 3]: scaled to fit, aspect kept, centred on black."""
    import numpy as np
    from PIL import Image

    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    scale = min(height / h, width / w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    out = np.zeros((height, width, 3), np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top:top + new_h, left:left + new_w] = resized
    return out


def decode_jpeg_row(row):
    """One encoded image row (bytes, vlen uint8 or zero-padded uint8) -> uint8 [H, W, 3] RGB."""
    import io

    import numpy as np
    from PIL import Image

    data = row if isinstance(row, bytes) else np.asarray(row).tobytes()
    with Image.open(io.BytesIO(data)) as image:  # trailing zero padding after the JPEG end is ignored
        return np.asarray(image.convert("RGB"))


def _is_encoded(dataset) -> bool:
    """Raw frames are [T, H, W, 3]; encoded rows are one blob per frame ([T] vlen/bytes or [T, N])."""
    return dataset.ndim in (1, 2)


def resample_indices(num_frames: int, source_fps: float, target_hz: float):
    """Source frame index for each tick at the embodiment's control rate (nearest frame).

    Only downsampling: repeating frames to reach a higher rate would invent data.
    """
    import numpy as np

    from rise.data.dataset import DatasetError

    if source_fps < target_hz - 1e-6:
        raise DatasetError(f"--fps {source_fps:g} is below the embodiment's control rate {target_hz:g} Hz; "
                           "upsampling would repeat frames: use an embodiment at the recording rate")
    count = int(np.floor((num_frames - 1) * target_hz / source_fps + 1e-9)) + 1
    return np.minimum(np.floor(np.arange(count) * source_fps / target_hz + 0.5).astype(np.int64), num_frames - 1)


def _success_attribute(value, path: Path) -> bool:
    import numpy as np

    from rise.data.dataset import DatasetError

    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode()
    if isinstance(value, str):
        if value.strip().lower() in ("true", "1", "yes", "success"):
            return True
        if value.strip().lower() in ("false", "0", "no", "failure"):
            return False
        raise DatasetError(f"{path}: attribute 'success' is {value!r}; expected a boolean")
    return bool(np.asarray(value).item())


def inspect_hdf5(path: Path, embodiment, view_map: dict[str, str]) -> dict:
    """Check one file's layout against the embodiment (metadata only) -> frames, sim, success attr."""
    import h5py

    from rise.data.dataset import DatasetError

    def need(f, key: str):
        if key not in f:
            raise DatasetError(f"{path}: missing dataset {key!r}")
        return f[key]

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DatasetError(f"{path}: not a readable HDF5 file ({exc})") from exc
    with f:
        lengths = {}
        for key, dim, field in ((QPOS_KEY, embodiment.state_dim, "state_dim"), (ACTION_KEY, embodiment.action_dim, "action_dim")):
            data = need(f, key)
            if data.ndim != 2 or data.shape[1] != dim:
                raise DatasetError(f"{path}: {key} has shape {list(data.shape)}; embodiment {embodiment.name!r} "
                                   f"needs [T, {dim}] ({field})")
            lengths[key] = data.shape[0]
        for camera in view_map:
            key = camera_key(camera)
            if key not in f:
                found = sorted(f[IMAGES_GROUP]) if IMAGES_GROUP in f else []
                raise DatasetError(f"{path}: missing dataset {key!r} (camera for view {view_map[camera]!r}); "
                                   f"cameras in the file: {found}")
            data = f[key]
            raw_ok = data.ndim == 4 and data.shape[-1] == 3 and data.dtype == "uint8"
            if not raw_ok and not _is_encoded(data):
                raise DatasetError(f"{path}: {key} has shape {list(data.shape)} {data.dtype}; expected uint8 "
                                   "[T, H, W, 3] frames or one JPEG per row")
            lengths[key] = data.shape[0]
        if len(set(lengths.values())) != 1:
            raise DatasetError(f"{path}: datasets differ in length (frames): {lengths}")
        frames = lengths[QPOS_KEY]
        if frames == 0:
            raise DatasetError(f"{path}: the episode has no frames")
        success = _success_attribute(f.attrs["success"], path) if "success" in f.attrs else None
        return {"frames": frames, "sim": bool(f.attrs.get("sim", False)), "success": success}


def read_hdf5_episode(path: Path, embodiment, view_map: dict[str, str], task: str, success: bool,
                      source_fps: float):
    """One checked file -> an Episode at the embodiment's rate and image size."""
    import h5py
    import numpy as np

    from rise.data.dataset import Episode

    with h5py.File(path, "r") as f:
        keep = resample_indices(f[QPOS_KEY].shape[0], source_fps, embodiment.control_hz)
        views = {}
        for camera, view in view_map.items():
            data = f[camera_key(camera)]
            frames = np.empty((len(keep), embodiment.image_height, embodiment.image_width, 3), np.uint8)
            for start in range(0, len(keep), ROWS_PER_READ):
                rows = data[keep[start:start + ROWS_PER_READ]]
                for i, row in enumerate(rows):
                    image = decode_jpeg_row(row) if _is_encoded(data) else row
                    frames[start + i] = resize_with_padding(image, embodiment.image_height, embodiment.image_width)
            views[view] = frames
        return Episode(views=views, states=np.asarray(f[QPOS_KEY][:][keep], np.float32),
                       actions=np.asarray(f[ACTION_KEY][:][keep], np.float32), task=task, success=success)


def expand_sources(sources: list[Path]) -> list[Path]:
    """Files as given; a folder stands for its *.hdf5 / *.h5 files in natural order (episode_2 < episode_10)."""
    from rise.data.dataset import DatasetError

    def natural(p: Path):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]

    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            found = sorted((p for p in source.iterdir() if p.suffix in (".hdf5", ".h5")), key=natural)
            if not found:
                raise DatasetError(f"{source}: folder holds no .hdf5 / .h5 files")
            files += found
        elif source.is_file():
            files.append(source)
        else:
            raise DatasetError(f"{source}: no such file or folder")
    return files


def convert_hdf5(sources: list[Path], out: Path, embodiment, task: str, view_map: dict[str, str] | None = None,
                 success: bool | None = None, source_fps: float | None = None, show_progress: bool = True) -> dict:
    """Convert HDF5 episode files into a new dataset at `out`; returns a summary.

    Every file is checked before anything is written, so a bad file 40 of 50 costs seconds, not
    a half-written dataset; if writing still fails, the partial dataset is removed.
    """
    import shutil

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from rise.data.dataset import DatasetError, DatasetWriter

    if not task.strip():
        raise DatasetError("--task must be the instruction text, e.g. 'put the brick in the box'")
    out = Path(out)
    if out.exists():
        raise DatasetError(f"{out} already exists; choose a new path (datasets are written once)")
    view_map = check_view_map(view_map, embodiment)
    source_fps = embodiment.control_hz if source_fps is None else source_fps
    files = expand_sources(sources)
    if not files:
        raise DatasetError("no source files given")
    infos = [inspect_hdf5(path, embodiment, view_map) for path in files]

    console = Console(stderr=True)
    writer = DatasetWriter(out, embodiment)
    frames = 0
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, disable=not show_progress) as progress:
            bar = progress.add_task("converting", total=len(files))
            for path, info in zip(files, infos):
                progress.update(bar, description=f"converting {path.name}")
                outcome = success if success is not None else info["success"] if info["success"] is not None else True
                episode = read_hdf5_episode(path, embodiment, view_map, task, outcome, source_fps)
                writer.add(episode)
                frames += len(episode)
                progress.advance(bar)
        writer.finalize()
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    sim = sum(info["sim"] for info in infos)
    if 0 < sim < len(infos):
        console.print(f"[yellow]warning: {sim} of {len(infos)} files are marked sim; the dataset mixes simulated "
                      "and real episodes[/yellow]")
    return {"episodes": len(files), "frames": frames, "sim_episodes": sim, "view_map": view_map}


def register(data_app: typer.Typer) -> None:
    @data_app.command("convert-hdf5")
    def convert_hdf5_command(
        sources: list[Path] = typer.Argument(..., help="HDF5 episode files, or folders of them (one episode per file)."),
        out: Path = typer.Option(..., "--out", help="New dataset folder (must not exist)."),
        task: str = typer.Option(..., "--task", help="Instruction text for every episode."),
        embodiment: str = typer.Option("piper_dual", help="Embodiment preset or YAML path."),
        view_map: Optional[str] = typer.Option(
            None, "--view-map", help="CAMERA=VIEW pairs, e.g. cam_high=head,cam_left_wrist=left_wrist,"
            "cam_right_wrist=right_wrist (default: those three cameras onto the embodiment's views in order)."),
        success: Optional[bool] = typer.Option(
            None, "--success/--failure", help="Episode outcome for every file (default: a file's 'success' "
            "attribute, else success: teleoperated demonstrations)."),
        fps: Optional[float] = typer.Option(
            None, help="Rate the files were recorded at (default: the embodiment's control rate); higher rates "
            "are downsampled to it (nearest frame)."),
    ) -> None:
        """Convert ALOHA / Piper HDF5 episodes into a RISE LeRobot dataset."""
        from rich.console import Console

        from rise.embodiment import load_embodiment

        try:
            target = load_embodiment(embodiment)
            summary = convert_hdf5(sources, out, target, task, parse_view_map(view_map) if view_map else None,
                                   success, fps)
        except ValueError as exc:  # DatasetError, an unknown embodiment or an invalid embodiment YAML
            Console(stderr=True).print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1)
        mapping = ", ".join(f"{c} -> {v}" for c, v in summary["view_map"].items())
        typer.echo(f"wrote {summary['episodes']} episodes ({summary['frames']} frames) to {out}; views: {mapping}")
