"""The learned value model (services/value): trains, ranks progress, labels a dataset, serves over gRPC.

The data are synthetic but written through the project's own DatasetWriter (a real LeRobot
dataset with AV1 video): in every view a bright square crosses the image as an episode
progresses; successful episodes finish the crossing, failed ones stall halfway and drift back.
A simulator collection that yields both outcomes needs long episodes, too slow for a unit test
(`rise data collect` makes real data for the benchmark). The tiny config is trained once for
the module, published, labelled with and served.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import EMB, served
from rise.baselines import publish_baseline
from rise.batching import BatchingConfig
from rise.proto.v1 import common_pb2, value_pb2, value_pb2_grpc
from rise.registry import Registry
from rise.serving import ServerConfig
from rise.tensors import to_tensor

TASK = "reach the goal"
LENGTH = 16


def synthetic_episode(success: bool, seed: int):
    from rise.data.dataset import Episode

    rng = np.random.default_rng(seed)
    t = np.arange(LENGTH) / (LENGTH - 1)
    position = t if success else 0.5 * np.sin(np.pi * t)  # failures stall halfway and come back
    views = {}
    for k, view in enumerate(EMB.views):
        frames = np.full((LENGTH, EMB.image_height, EMB.image_width, 3), 40 + 30 * k, np.uint8)
        frames += rng.integers(0, 12, frames.shape, dtype=np.uint8)
        for i, p in enumerate(position):
            x = int(round(p * (EMB.image_width - 16)))
            frames[i, 24:40, x:x + 16] = (230, 200, 60)
        views[view] = frames
    states = np.stack([position, position, position, np.zeros(LENGTH)], axis=1).astype(np.float32)
    actions = np.diff(states, axis=0, append=states[-1:]).astype(np.float32)
    return Episode(views=views, states=states, actions=actions, task=TASK, success=success)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from rise.data.dataset import DatasetWriter

    root = tmp_path_factory.mktemp("value-data") / "synthetic"
    writer = DatasetWriter(root, EMB)
    for i, success in enumerate([True, False, True, False, True]):
        writer.add(synthetic_episode(success, seed=i))
    writer.finalize()
    return root


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """(summary, run folder, registry): v0001 linear baseline (stable), v0002 the trained model (latest)."""
    from services.value.model import load_model_config
    from services.value.train import train

    folder = tmp_path_factory.mktemp("value-run")
    registry = Registry(folder / "store")
    registry.set_alias("value", "stable", publish_baseline(registry, "value", EMB).version)
    summary = train(load_model_config("tiny"), [dataset], folder / "run", registry=registry.root, publish=True,
                    threads=1, progress=False, log=lambda *args: None)
    return summary, folder / "run", registry


@pytest.fixture(scope="module")
def server(trained):
    from services.value.server import ValueConfig, start

    _, _, registry = trained
    config = ValueConfig(registry_root=registry.root, preload=["stable", "latest"], default_alias="latest",
                         batching=BatchingConfig(max_batch_size=8, max_wait_ms=100),
                         server=ServerConfig(port=0, log_json=False))
    with served(start, config) as running:
        yield running


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield value_pb2_grpc.ValueServiceStub(channel)


def score_item(frames: dict[str, np.ndarray], task: str = TASK) -> value_pb2.ScoreItem:
    return value_pb2.ScoreItem(frames={v: to_tensor(np.ascontiguousarray(f)) for v, f in frames.items()}, task=task)


# ---- training ----------------------------------------------------------------------------------
def test_training_ranks_late_frames_of_successes_above_early_ones(trained):
    from rise.model_host import load_by_kind
    from services.value.model import KIND
    from services.value.server import KINDS

    summary, run, registry = trained
    metrics = summary["metrics"]
    assert metrics["progress_ranking"] > 0.8, metrics
    assert metrics["late_minus_early"] > 0.3 > metrics["late_minus_early_start"], metrics
    for name in ("model.safetensors", "config.yaml"):
        assert (run / "model" / name).is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    manifest = registry.manifest("value", registry.resolve("value", "latest"))
    assert manifest.version == summary["version"] == "v0002" and manifest.kind == KIND
    assert manifest.config["tier"] == "tiny" and "progress_ranking" in manifest.metrics

    # The published version, loaded as the service loads it, on fresh episodes.
    model = load_by_kind(KINDS, "value")(registry.open("value", "latest"), EMB)
    for seed in (10, 11):
        episode = synthetic_episode(True, seed)
        values = model.score(episode.views, [TASK] * LENGTH)
        assert values.dtype == np.float32 and values.shape == (LENGTH,)
        assert np.all(np.abs(values) <= 1)
        assert values[-4:].mean() > values[:4].mean() + 0.3, values


def test_resume_refuses_an_existing_run_without_flag(trained, dataset):
    from services.value.model import load_model_config
    from services.value.train import train

    _, run, _ = trained
    with pytest.raises(FileExistsError):
        train(load_model_config("tiny"), [dataset], run, progress=False, log=lambda *a: None)


def test_advantage_formula_and_bins():
    from services.value.label import advantage_bins, chunk_advantages

    values = np.array([0.0, 0.1, 0.3, 0.2, 0.2], np.float32)
    got = chunk_advantages(values, horizon=2, scale=5.0)
    want = [5 * ((0.1 + 0.3) / 2 - 0.0), 5 * ((0.3 + 0.2) / 2 - 0.1), 5 * ((0.2 + 0.2) / 2 - 0.3), 5 * (0.2 - 0.2), 0.0]
    np.testing.assert_allclose(got, np.clip(want, -1, 1), atol=1e-6)
    assert advantage_bins(np.array([-1.0, -0.95, -0.8, 0.0, 0.79, 0.8, 1.0])).tolist() == [1, 1, 2, 6, 9, 10, 10]


# ---- labelling ---------------------------------------------------------------------------------
def test_label_through_the_service_writes_readable_lerobot_columns(trained, server, dataset, tmp_path):
    from rise.data.dataset import open_dataset
    from services.value.label import advantage_bins, chunk_advantages, label

    summary = label(server.address, dataset, tmp_path / "labelled", horizon=50, log=lambda *a: None)
    assert summary["value_version"] == trained[0]["version"]  # the service's default alias: latest

    labelled = open_dataset(tmp_path / "labelled", EMB)
    for name, dtype in (("value", "float32"), ("advantage", "float32"), ("advantage_bin", "int64")):
        assert labelled.features[name]["dtype"] == dtype and list(labelled.features[name]["shape"]) == [1]
    table = labelled.hf_dataset.with_format("numpy").select_columns(
        ["episode_index", "frame_index", "value", "advantage", "advantage_bin", "success"])[:]
    values, advantages = table["value"].reshape(-1), table["advantage"].reshape(-1)
    bins = table["advantage_bin"].reshape(-1)
    assert len(values) == 5 * LENGTH
    assert np.all(np.abs(values) <= 1) and np.all(np.abs(advantages) <= 1)
    assert bins.min() >= 1 and bins.max() <= 10
    for episode in np.unique(table["episode_index"]):
        rows = np.flatnonzero(table["episode_index"] == episode)
        rows = rows[np.argsort(table["frame_index"][rows])]
        expected = chunk_advantages(values[rows], 50, 5.0)
        np.testing.assert_allclose(advantages[rows], expected, atol=1e-5)
        assert (bins[rows] == advantage_bins(expected)).all()
    # A frame of a successful episode sees progress ahead: its early advantages are positive.
    success = table["success"].reshape(-1).astype(bool)
    early = (table["frame_index"] < LENGTH // 2)
    assert advantages[success & early].mean() > advantages[~success & early].mean()

    # The copy keeps the source's frames: one labelled frame decodes like the source's.
    source = open_dataset(dataset, EMB)
    key = f"observation.images.{EMB.views[0]}"
    assert np.array_equal(np.asarray(labelled[7][key]), np.asarray(source[7][key]))
    plots = sorted((tmp_path / "labelled" / "plots").glob("episode_*.png"))
    assert len(plots) == 5 and all(p.stat().st_size > 1000 for p in plots)
    recorded = json.loads((tmp_path / "labelled" / "meta" / "rise_labels.json").read_text())
    assert recorded["bins"] == 10 and recorded["advantage_from"] == "value"  # (the plots once overwrote the flag)


def test_label_with_a_local_run_and_refuses_an_existing_output(trained, dataset, tmp_path):
    from services.value.label import label

    _, run, _ = trained
    summary = label(str(run), dataset, tmp_path / "local", plots=False, log=lambda *a: None)
    assert summary["value_version"].startswith("local:") and sum(summary["bin_counts"]) == 5 * LENGTH
    with pytest.raises(FileExistsError):
        label(str(run), dataset, tmp_path / "local", log=lambda *a: None)


def test_label_with_outcome_gives_each_episode_its_real_result(trained, dataset, tmp_path):
    import pyarrow.parquet as pq

    from services.value.label import label

    _, run, _ = trained
    summary = label(str(run), dataset, tmp_path / "outcome", plots=False, outcome=True, log=lambda *a: None)
    assert summary["advantage_from"] == "outcome"
    table = pq.read_table(sorted((tmp_path / "outcome" / "data").glob("*/*.parquet")),
                          columns=["episode_index", "success", "advantage", "advantage_bin", "value"])
    episode = np.asarray(table.column("episode_index").to_pylist())
    success = np.asarray(table.column("success").to_pylist()).reshape(-1).astype(bool)
    advantage = np.asarray(table.column("advantage").to_pylist()).reshape(-1)
    bins = np.asarray(table.column("advantage_bin").to_pylist()).reshape(-1)
    assert success.any() and (~success).any()  # the fixture has both outcomes
    for e in np.unique(episode):
        ok = success[episode == e].any()
        assert np.all(advantage[episode == e] == (1.0 if ok else -1.0))
        assert np.all(bins[episode == e] == (10 if ok else 1))
    assert np.any(np.asarray(table.column("value").to_pylist()) != 0)  # values are still scored


# ---- the service -------------------------------------------------------------------------------
def test_service_scores_with_the_requested_version(stub, trained):
    episode = synthetic_episode(True, 20)
    request = value_pb2.ScoreRequest(items=[score_item(episode.views), score_item({v: f[:3] for v, f in episode.views.items()})])
    reply = stub.Score(request, timeout=60)
    assert reply.meta.version == trained[0]["version"]
    assert [len(r.values) for r in reply.results] == [LENGTH, 3]
    assert np.mean(reply.results[0].values[-4:]) > np.mean(reply.results[0].values[:4])
    np.testing.assert_allclose(reply.results[1].values, reply.results[0].values[:3], atol=1e-5)
    request.model.CopyFrom(common_pb2.ModelRef(version="stable"))
    reply = stub.Score(request, timeout=60)
    assert reply.meta.version == "v0001"


def test_service_merges_concurrent_requests(server, trained):
    from prometheus_client import REGISTRY

    def batch_stats():
        calls = REGISTRY.get_sample_value("rise_batch_items_count", {"batcher": "value"}) or 0
        items = REGISTRY.get_sample_value("rise_batch_items_sum", {"batcher": "value"}) or 0
        return calls, items

    async def main():
        from rise.serving import open_channel

        episode = synthetic_episode(True, 21)
        async with open_channel(server.address) as channel:
            aio_stub = value_pb2_grpc.ValueServiceStub(channel)
            requests = [value_pb2.ScoreRequest(items=[score_item({v: f[i:i + 2] for v, f in episode.views.items()})])
                        for i in range(4)]
            return await asyncio.gather(*(aio_stub.Score(r, timeout=60) for r in requests))

    calls, items = batch_stats()
    replies = asyncio.run(main())
    assert all(r.meta.version == trained[0]["version"] and len(r.results[0].values) == 2 for r in replies)
    calls_after, items_after = batch_stats()
    assert items_after - items == 4 and calls_after - calls < 4  # four requests, fewer model calls


@pytest.mark.parametrize("case", ["no items", "missing view", "wrong size", "wrong dtype", "no frames"])
def test_service_rejects_bad_inputs(stub, case):
    frames = {v: np.zeros((2, EMB.image_height, EMB.image_width, 3), np.uint8) for v in EMB.views}
    if case == "no items":
        request = value_pb2.ScoreRequest()
    else:
        if case == "missing view":
            frames.pop(EMB.views[1])
        elif case == "wrong size":
            frames[EMB.views[0]] = np.zeros((2, 32, 32, 3), np.uint8)
        elif case == "wrong dtype":
            frames[EMB.views[0]] = np.zeros((2, EMB.image_height, EMB.image_width, 3), np.float32)
        elif case == "no frames":
            frames = {v: f[:0] for v, f in frames.items()}
        request = value_pb2.ScoreRequest(items=[score_item(frames)])
    with pytest.raises(grpc.RpcError) as error:
        stub.Score(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert error.value.details()


# ---- Triton and the command line --------------------------------------------------------------
def _loaded(registry: Registry, ref: str):
    from rise.model_host import LoadedModel, load_by_kind
    from services.value.server import KINDS

    verified = registry.open("value", ref)
    return LoadedModel(verified.manifest.version, verified.manifest, load_by_kind(KINDS, "value")(verified, EMB), 0.0)


def test_triton_adapter_packs_requests_and_fails_bad_ones_alone(trained):
    from rise.triton_binding import ERROR_OUTPUT, VERSION_OUTPUT, TritonRequest, adapter_class, encode_strings

    _, _, registry = trained
    loaded = _loaded(registry, "latest")
    adapter = adapter_class("value")(EMB, BatchingConfig(max_batch_size=4))
    episode = synthetic_episode(True, 30)

    def request(a: int, b: int, task: bool = True) -> TritonRequest:
        inputs = {f"frames_{v}": f[a:b] for v, f in episode.views.items()}
        if task:
            inputs["task"] = encode_strings([TASK] * (b - a))
        return TritonRequest(inputs)

    bad = request(0, 2)
    bad.inputs[f"frames_{EMB.views[0]}"] = bad.inputs[f"frames_{EMB.views[0]}"][:, :32]
    responses = adapter.respond(loaded, [request(0, 3), bad, request(3, 6), request(6, LENGTH)])
    assert [r[ERROR_OUTPUT][0, 0] == b"" for r in responses] == [True, False, True, True]
    assert responses[1][ERROR_OUTPUT][0, 0].startswith(b"InvalidArgument")
    assert all(r[VERSION_OUTPUT][0, 0] == loaded.version.encode() for r in responses)
    values = np.concatenate([responses[i]["value"][:, 0] for i in (0, 2, 3)])
    np.testing.assert_allclose(values, loaded.model.score(episode.views, [TASK] * LENGTH), atol=1e-5)


def test_triton_serves_the_value_model_like_grpc(trained, stub):
    from rise.triton_binding import (TritonSettings, adapter_class, decode_strings, encode_strings, serve_triton,
                                     triton_unavailable_reason)

    if reason := triton_unavailable_reason():
        pytest.fail(f"Triton cannot run here, and it is part of the product: {reason}")
    import tritonclient.grpc as tc

    _, _, registry = trained
    config = adapter_class("value").config_class()(
        registry_root=registry.root, preload=["latest"], default_alias="latest",
        triton=TritonSettings(grpc_port=0, http_port=0, metrics_port=0, print_server_log=False))
    episode = synthetic_episode(True, 31)
    with serve_triton("value", config) as running:
        client = tc.InferenceServerClient(running.grpc_address)
        inputs = []
        for v, f in episode.views.items():
            tensor = tc.InferInput(f"frames_{v}", list(f.shape), "UINT8")
            tensor.set_data_from_numpy(f)
            inputs.append(tensor)
        task = tc.InferInput("task", [LENGTH, 1], "BYTES")
        task.set_data_from_numpy(encode_strings([TASK] * LENGTH))
        inputs.append(task)
        result = client.infer("value", inputs)
        client.close()
    assert decode_strings(result.as_numpy("error")) == [""] * LENGTH
    assert decode_strings(result.as_numpy("version")) == [trained[0]["version"]] * LENGTH
    reply = stub.Score(value_pb2.ScoreRequest(items=[score_item(episode.views)]), timeout=60)
    np.testing.assert_allclose(result.as_numpy("value")[:, 0], reply.results[0].values, atol=1e-5)


def test_cli_commands_register(trained, dataset, tmp_path):
    import typer
    from typer.testing import CliRunner

    from services.value import label, train

    app, train_app = typer.Typer(), typer.Typer()
    app.add_typer(train_app, name="train")
    train.register(train_app)
    label.register(app)
    runner = CliRunner()
    assert runner.invoke(app, ["train", "value", "--help"]).exit_code == 0
    result = runner.invoke(app, ["train", "value", "--config", "nope", "--data", str(dataset), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "config file not found" in result.output
    _, run, _ = trained
    result = runner.invoke(app, ["label", "--value", str(run), "--data", str(dataset), "--out", str(tmp_path / "l"),
                                 "--no-plots", "--horizon", "4"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "l" / "meta" / "rise_labels.json").read_text())["horizon"] == 4
