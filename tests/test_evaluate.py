"""The scripted expert served as a policy, and `rise eval` against it on a real server."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import EMB, served
from rise.baselines import publish_baseline, publish_scripted_expert
from rise.proto.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from rise.registry import Registry
from rise.serving import ServerConfig
from rise.sim.evaluate import EVAL_SEED_BASE, eval_seed, evaluate
from rise.sim.metaworld_sim import MetaWorldSim, expert_policy, task_text
from rise.sim.stats import discordant_pairs, sign_test, wilson_interval
from rise.tensors import from_tensor, to_tensor
from services.policy.server import PolicyConfig, start


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Policy server on 127.0.0.1 in its own thread and loop (so sync code such as the CLI can call it).

    Store: v0001 linear (stable), v0002 scripted expert (alias "expert").
    """
    registry = Registry(tmp_path_factory.mktemp("eval") / "store")
    registry.set_alias("policy", "stable", publish_baseline(registry, "policy", EMB).version)
    registry.set_alias("policy", "expert", publish_scripted_expert(registry, EMB).version)
    config = PolicyConfig(registry_root=registry.root, preload=["stable", "expert"], server=ServerConfig(port=0, log_json=False))
    with served(start, config) as running:
        yield running


def test_wilson_interval_reference_values():
    # References: scipy.stats.binomtest(k, n).proportion_ci(method="wilson").
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert wilson_interval(17, 20) == pytest.approx((0.639581, 0.947631), abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_sign_test_reference_values():
    # References: scipy.stats.binomtest(min(b, c), b + c).pvalue (two-sided).
    assert sign_test(13, 4) == pytest.approx(0.049042, abs=1e-6)
    assert sign_test(4, 13) == sign_test(13, 4)
    assert sign_test(10, 0) == pytest.approx(0.001953, abs=1e-6)
    assert sign_test(6, 7) == sign_test(0, 0) == 1.0
    with pytest.raises(ValueError):
        sign_test(-1, 3)


def test_discordant_pairs_count_only_layouts_both_ran_and_split():
    a = [{"seed": 1, "success": True}, {"seed": 2, "success": False}, {"seed": 3, "success": True},
         {"seed": 4, "success": True}]  # layout 4: only A ran it
    b = [{"seed": 3, "success": False}, {"seed": 2, "success": True}, {"seed": 1, "success": True}]
    assert discordant_pairs(a, b) == (1, 1) and discordant_pairs(b, a) == (1, 1)
    assert discordant_pairs(a, [{"seed": 1, "success": False}]) == (1, 0)


def test_eval_seeds_are_held_out():
    assert eval_seed(0, 0) == EVAL_SEED_BASE >= 2**32  # collection seeds are uint32
    assert eval_seed(1, 0) > eval_seed(0, 99_999)


def _act(server, obs: common_pb2.Observation, version: str = "expert") -> policy_pb2.ActResponse:
    with grpc.insecure_channel(server.address) as channel:
        request = policy_pb2.ActRequest(observation=obs, model=common_pb2.ModelRef(version=version))
        return policy_pb2_grpc.PolicyServiceStub(channel).Act(request, timeout=30)


def _sim_observation(task: str, sim_state: np.ndarray, text: str | None = None) -> common_pb2.Observation:
    views = {v: to_tensor(np.zeros((EMB.image_height, EMB.image_width, 3), np.uint8)) for v in EMB.views}
    return common_pb2.Observation(views=views, state=to_tensor(np.zeros(EMB.state_dim, np.float32)),
                                  task=task_text(task) if text is None else text, sim_state=to_tensor(sim_state))


def test_served_chunk_is_the_closed_loop_expert(server):
    sim = MetaWorldSim("push", EMB, render=False)
    frame = sim.reset(eval_seed(0, 3))
    reply = _act(server, _sim_observation("push", frame.sim_state))
    assert reply.meta.version == "v0002"
    chunk = from_tensor(reply.chunk.actions, "actions", "float32", (EMB.chunk_length, EMB.action_dim))
    expert = expert_policy("push")
    for action in chunk:  # the exact restore makes the open-loop chunk what closed loop would do
        np.testing.assert_array_equal(action, np.clip(expert.get_action(frame.raw_obs), -1, 1).astype(np.float32))
        frame = sim.step(action)


def test_bad_observations_are_invalid_argument(server):
    state = MetaWorldSim("reach", EMB, render=False).reset(0).sim_state
    no_state = _sim_observation("reach", state)
    no_state.ClearField("sim_state")
    other_task = MetaWorldSim("drawer-open", EMB, render=False).reset(0).sim_state
    cases = [
        (no_state, "sim_state is missing; the scripted expert is a privileged policy"),
        (_sim_observation("reach", state, text="fold the laundry"), "task text 'fold the laundry' is not a MetaWorld task"),
        (_sim_observation("reach", other_task), f"sim_state for 'reach' must be float64 [{len(state)}], got [{len(other_task)}]"),
        (_sim_observation("reach", state.astype(np.float32)), "observation.sim_state: expected float64"),
    ]
    for obs, message in cases:
        with pytest.raises(grpc.RpcError) as err:
            _act(server, obs)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    assert _act(server, no_state, version="stable").meta.version == "v0001"  # learned policies never need it


def test_evaluate_reports_records_and_films(server, tmp_path):
    import imageio.v3 as iio

    from rise.data.dataset import open_dataset

    report = evaluate(server.address, "reach", 3, version="expert", max_steps=50, videos=1, record=tmp_path / "rollouts",
                      out=tmp_path / "out", progress=False)
    assert report.versions == {"v0002": len(report.act_ms)} and len(report.act_ms) == sum(e.calls for e in report.episodes)
    assert report.successes >= 1 and report.interval == wilson_interval(report.successes, 3)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["success_rate"] == report.successes / 3 and summary["wilson95"] == list(report.interval)
    assert "Wilson 95% interval" in (tmp_path / "out" / "summary.md").read_text()

    video = iio.imread(report.videos[0], plugin="pyav")  # every step of episode 0 plus its first frame, 3 views wide
    assert video.shape == (report.episodes[0].steps + 1, 2 * EMB.image_height, 2 * 3 * EMB.image_width, 3)

    dataset = open_dataset(tmp_path / "rollouts", EMB)
    assert dataset.num_episodes == 3 and dataset.num_frames == sum(e.steps for e in report.episodes)
    episode_index = np.asarray(dataset.hf_dataset["episode_index"])
    success = np.asarray(dataset.hf_dataset["success"]).reshape(-1)
    assert [bool(success[episode_index == i].all()) for i in range(3)] == [e.success for e in report.episodes]
    assert [bool(success[episode_index == i].any()) for i in range(3)] == [e.success for e in report.episodes]
    assert dataset[0]["task"] == "reach" and dataset[0]["observation.sim_state"].shape == (len(dataset[0]["observation.sim_state"]),)


def test_eval_command(server, tmp_path):
    from rise.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--policy", server.address, "--task", "button-press", "--episodes", "1",
                                 "--version", "expert", "--max-steps", "80", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "# Evaluation: button-press" in result.output and "answered by `v0002`" in result.output
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["episodes"] == 1
    bad = runner.invoke(app, ["eval", "--policy", server.address, "--task", "fold-laundry", "--episodes", "1"])
    assert bad.exit_code == 1 and "unknown MetaWorld task 'fold-laundry'" in bad.output
    # The guidance scale reaches the service: the scripted expert has none, and says so.
    guided = runner.invoke(app, ["eval", "--policy", server.address, "--task", "button-press", "--episodes", "1",
                                 "--version", "expert", "--guidance-scale", "2"])
    assert guided.exit_code == 1 and "classifier-free guidance" in " ".join(guided.output.split())
