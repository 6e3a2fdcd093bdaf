"""The demo's machinery (rise/demo.py) and its report (rise/report.py), fast.

The whole demo is too slow for a test. What is tested: the four services start as real
`rise serve` processes, answer gRPC health, run a real (tiny) RL run through TrainerService
(StartRun + WatchRun), serve the report's inputs, and leave no process behind when stopped, also
when one of them cannot start. The report is then built from that real run folder and real
evaluations, and checked to be valid, self-contained HTML. Models are small real ones: a tiny
flow-matching policy (4 steps), the linear value baseline and the persistence dynamics baseline;
the data are a synthetic LeRobot dataset (no simulator), the evaluations run MetaWorld briefly.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import shutil
import uuid
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from conftest import EMB
from rise.demo import (DemoError, DemoOptions, Paths, ServiceGroup, delete_run_keys, imagined_samples, local_redis,
                       run_config, run_rl, service_configs, value_curves)
from rise.registry import Registry

TASK = "reach"  # the synthetic dataset carries MetaWorld's text for it, so the evaluations can run it
REDIS_URL = os.environ.get("RISE_TEST_REDIS", "redis://127.0.0.1:6379/13")
QUIET = Console(file=io.StringIO())


def _processes_mentioning(text: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A demo workdir with a synthetic dataset and a registry: tiny policy, linear value, persistence dynamics."""
    from rise.baselines import publish_baseline
    from rise.data.dataset import DatasetWriter, Episode
    from rise.sim.metaworld_sim import task_text
    from services.policy.model import load_model_config
    from services.policy.train import train

    paths = Paths(tmp_path_factory.mktemp("demo") / "work")
    paths.prepare(keep_data=False)
    data = paths.dataset(TASK)
    writer = DatasetWriter(data, EMB)
    for seed in range(4):
        rng = np.random.default_rng(seed)
        n = 20
        views = {v: rng.integers(0, 256, (n, EMB.image_height, EMB.image_width, 3), dtype=np.uint8) for v in EMB.views}
        writer.add(Episode(views=views, states=rng.normal(size=(n, EMB.state_dim)).astype(np.float32) * 0.1,
                           actions=rng.uniform(-1, 1, (n, EMB.action_dim)).astype(np.float32), task=task_text(TASK),
                           success=bool(seed % 2)))
    writer.finalize()
    registry = Registry(paths.store)
    summary = train(load_model_config("tiny", {"training.steps": 4, "training.batch_size": 8}), [data],
                    paths.train / "policy", registry=registry.root, publish=True, progress=False, log=lambda *a: None,
                    threads=1)  # 2 threads on 2 shared cores: OpenMP spin-waits made a step take 26 s instead of 0.05
    registry.set_alias("policy", "stable", summary["version"])
    for model in ("value", "dynamics"):
        registry.set_alias(model, "stable", publish_baseline(registry, model, EMB).version)
    return paths, data, registry


@pytest.fixture(scope="module")
def demo_run(store):
    """The services as processes, a tiny RL run through TrainerService, the report's inputs; then stopped."""
    import yaml

    from rise.data.loading import load_episodes_in_memory
    from rise.proto.v1 import trainer_pb2
    from rise.report import SuccessRate
    from rise.sim.evaluate import evaluate_async

    paths, data, registry = store
    o = DemoOptions(workdir=paths.root, task=TASK, rl_steps=4, max_steps=8, eval_episodes=1)
    run_id = f"test-{uuid.uuid4().hex[:8]}"
    result: dict = {"run_id": run_id}
    with ServiceGroup(paths.configs, paths.logs) as group:
        run_yaml = paths.configs / "run.yaml"
        run_yaml.write_text("{}")  # the trainer's default run config; written below, once the ports are known
        for name, config in service_configs(paths, run_yaml).items():
            group.start(name, config)
        config = run_config(o, paths, data, {name: s.url for name, s in group.services.items()}, REDIS_URL)
        config["learner"].update(batch_size=8, publish_every=2, checkpoint_every=2, replay_wait_s=5.0)
        config["replay"]["min_size_to_sample"] = 4
        config["rollout"]["workers"] = 4
        run_yaml.write_text(yaml.safe_dump(config))
        result["pids"] = {name: s.process.pid for name, s in group.services.items()}

        async def main():
            await group.wait_healthy(timeout_s=120)
            result["healthy"] = True
            # Only now: a child sampled before its exec still shows pytest's command line (a CI flake).
            result["live_while_running"] = _processes_mentioning(str(paths.configs))
            before = await evaluate_async(group.services["policy"].address, TASK, 1, version="stable", max_steps=8,
                                          progress=False)
            status = await run_rl(group.services["trainer"].address, run_yaml.read_text(), run_id, QUIET)
            after = await evaluate_async(group.services["policy"].address, TASK, 1, version=status.policy_version,
                                         max_steps=8, progress=False)
            episodes = load_episodes_in_memory([data], EMB)
            curves = await value_curves(group.services["value"].url, episodes, held_out=1)
            imagined = await imagined_samples(group.services["dynamics"].url, registry, episodes, held_out=1, count=2)
            return status, SuccessRate.from_eval("before RL", before), SuccessRate.from_eval("after RL", after), curves, imagined

        try:
            result["status"], result["before"], result["after"], result["curves"], result["imagined"] = asyncio.run(main())
        finally:
            delete_run_keys(REDIS_URL, run_id)
    result["exit_codes"] = {name: s.exit_code for name, s in group.services.items()}
    result["live_after"] = _processes_mentioning(str(paths.configs))
    result["run_dir"] = paths.runs / run_id
    result["succeeded"] = result["status"].state == trainer_pb2.RUN_STATE_SUCCEEDED
    return result


def test_services_run_as_processes_answer_health_and_leave_no_orphans(demo_run):
    assert demo_run["healthy"]
    assert sorted(demo_run["live_while_running"]) == sorted(demo_run["pids"].values())  # one process each
    assert demo_run["live_after"] == []
    for name, pid in demo_run["pids"].items():
        assert not Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) is still there"
    assert demo_run["exit_codes"] == {name: 0 for name in demo_run["pids"]}  # SIGTERM: a graceful drain
    assert demo_run["succeeded"], demo_run["status"].message
    assert demo_run["status"].learner_step == 4
    assert demo_run["after"].version == demo_run["status"].policy_version != demo_run["before"].version


def test_the_report_is_self_contained_html_built_from_a_real_run(demo_run, store, tmp_path):
    from PIL import Image

    from rise.report import ReportInputs, build_report

    run_dir = demo_run["run_dir"]
    assert {"status.json", "metrics.jsonl", "advantages.json", "config.yaml"} <= {p.name for p in run_dir.iterdir()}
    inputs = ReportInputs(task=TASK, before=demo_run["before"], after=demo_run["after"], run_dir=run_dir,
                          imagined=demo_run["imagined"], value_curves=demo_run["curves"],
                          stages=[("collect", 1.5, ""), ("train", 2.25, "note <with> markup")],
                          settings={"tier": "tiny"}, notes=["a & b"])
    path = build_report(inputs, tmp_path / "report.html")
    text = path.read_text()

    class Checker(HTMLParser):
        VOID = {"meta", "img", "br", "hr", "link", "input"}

        def __init__(self):
            super().__init__()
            self.stack, self.sources, self.errors = [], [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            for key in ("src", "href"):
                if key in attrs:
                    self.sources.append(attrs[key])
            if tag not in self.VOID:
                self.stack.append(tag)

        def handle_endtag(self, tag):
            if not self.stack or self.stack[-1] != tag:
                self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            else:
                self.stack.pop()

    checker = Checker()
    checker.feed(text)
    checker.close()
    assert text.startswith("<!DOCTYPE html>")
    assert checker.errors == [] and checker.stack == []
    assert "<script" not in text and "note &lt;with&gt; markup" in text and "a &amp; b" in text
    # Self-contained: every image inline, and each one decodes.
    kinds = []
    for source in checker.sources:
        match = re.fullmatch(r"data:image/(png|gif);base64,([A-Za-z0-9+/=]+)", source)
        assert match, f"not an inline image: {source[:60]}"
        image = Image.open(io.BytesIO(base64.b64decode(match[2])))
        image.load()
        kinds.append(match[1])
    assert kinds.count("gif") == 1 and kinds.count("png") == 4  # success, value curves, advantages, run metrics
    assert Image.open(io.BytesIO(base64.b64decode(checker.sources[kinds.index("gif")].split(",")[1]))).n_frames > 1
    before, after = demo_run["before"], demo_run["after"]
    assert f"{before.successes}/1" in text and after.version in text and "Wilson 95%" in text
    assert "time in dynamics service calls" in text and "total" in text


def test_a_service_that_cannot_start_fails_the_group_and_nothing_is_left(store, tmp_path):
    paths, _, _ = store
    group = ServiceGroup(tmp_path, tmp_path)
    with pytest.raises(DemoError, match="value service exited"):
        with group:
            group.start("policy", {"registry_root": str(paths.store)})
            group.start("value", {"registry_root": str(paths.store), "no_such_setting": 1})
            asyncio.run(group.wait_healthy(timeout_s=120))
    assert "no_such_setting" in (tmp_path / "value.log").read_text()
    assert _processes_mentioning(str(tmp_path)) == []
    assert all(s.process.returncode is not None for s in group.services.values())


def test_redis_is_started_when_none_answers_and_stopped_after(tmp_path, monkeypatch):
    import redis

    from rise.demo import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    if shutil.which("redis-server"):
        with local_redis(url, tmp_path / "redis.log", QUIET) as (answered, note):
            assert answered == url and "started redis-server" in note
            assert redis.Redis.from_url(url).ping()
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DemoError, match="redis-server is not installed"):
        with local_redis(url, tmp_path / "redis.log", QUIET):
            pass


def test_the_workdir_is_cleared_only_when_the_demo_made_it(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(DemoError, match="not made by the demo"):
        Paths(foreign).prepare(keep_data=False)
    assert (foreign / "thesis.tex").exists()
    paths = Paths(tmp_path / "demo")
    paths.prepare(keep_data=False)
    (paths.data / "kept").mkdir()
    (paths.runs / "old").mkdir()
    paths.prepare(keep_data=True)
    assert (paths.data / "kept").exists() and not (paths.runs / "old").exists()
