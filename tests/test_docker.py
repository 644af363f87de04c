"""Static checks of the container setup: no Docker engine or cluster needed, fully offline, fast.

hadolint lints docker/Dockerfile; check-jsonschema validates docker/compose.yaml against the Compose spec and
docker/pytorchjob.yaml (multi-node training on Kubernetes) against docker/pytorchjob.schema.json; both tools come
with the `test` extra and sit next to the interpreter running the tests.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
TPU_DOCKERFILE = ROOT / "docker" / "Dockerfile.tpu"
COMPOSE = ROOT / "docker" / "compose.yaml"
PYTORCHJOB = ROOT / "docker" / "pytorchjob.yaml"
PYTORCHJOB_SCHEMA = ROOT / "docker" / "pytorchjob.schema.json"
BIN = Path(sys.executable).parent

SUBSTITUTION = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?:(?::?[-?+])[^}]*)?\}$")
SECRET_KEY = re.compile(r"pass(word)?|secret|token|api_?key", re.IGNORECASE)
URI_USERINFO = re.compile(r"://[^/:@\s]+:(?P<password>[^@\s]+)@")


def tool(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable} (install the `test` extra)")
    return path


def run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip() if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def env_items(service: dict):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env.items()


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, TPU_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    proc = run(tool("hadolint"), dockerfile)
    assert proc.returncode == 0, f"hadolint failed:\n{proc.stdout}{proc.stderr}"


def test_the_tpu_image_holds_the_xla_lock_and_runs_on_the_tpu():
    text = TPU_DOCKERFILE.read_text()
    steps = instructions(text)
    final = steps[max(i for i, (kw, _) in enumerate(steps) if kw == "FROM"):]
    assert "--no-deps -r requirements-xla.lock" in text and "requirements.lock" not in text.replace("-xla.lock", "")
    assert any(kw == "ENV" and "PJRT_DEVICE=TPU" in arg for kw, arg in final)
    assert ("ENTRYPOINT", '["effnet"]') in final


def test_compose_matches_the_compose_spec():
    proc = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", COMPOSE)
    assert proc.returncode == 0, f"check-jsonschema failed:\n{proc.stdout}{proc.stderr}"


def test_compose_holds_no_literal_secrets(compose):
    checked = 0
    for name, service in compose["services"].items():
        for key, value in env_items(service):
            if value is None:
                continue
            value = str(value)
            if SECRET_KEY.search(key):
                assert SUBSTITUTION.match(value), f"{name}: {key} must be a ${{...}} substitution, not {value!r}"
                checked += 1
            for match in URI_USERINFO.finditer(value):
                assert SUBSTITUTION.match(match["password"]), f"{name}: {key} embeds a literal password"
                checked += 1
    assert checked, "expected the postgres password to be set from the environment"
    postgres_env = dict(env_items(compose["services"]["postgres"]))
    assert postgres_env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")


def test_compose_services_and_wiring(compose):
    services = compose["services"]
    assert {"postgres", "mlflow", "prefect-server", "prefect-worker"} <= set(services)
    for name in ("postgres", "mlflow", "prefect-server"):
        assert "healthcheck" in services[name], name
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    worker_env = dict(env_items(services["prefect-worker"]))
    assert worker_env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "effnet-gpu" in services["prefect-worker"]["entrypoint"]
    assert services["prefect-worker"]["build"]["dockerfile"] == "docker/Dockerfile"


def test_worker_requests_an_nvidia_gpu(compose):
    devices = compose["services"]["prefect-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices


def test_dockerfile_runs_as_non_root_with_effnet_entrypoint():
    steps = instructions(DOCKERFILE.read_text())
    final = steps[max(i for i, (kw, _) in enumerate(steps) if kw == "FROM"):]
    users = [arg for kw, arg in final if kw == "USER"]
    assert users, "the final stage must set USER"
    assert users[-1].split(":")[0] not in {"root", "0"}, users[-1]
    assert ("ENTRYPOINT", '["effnet"]') in final
    assert ("CMD", '["--help"]') in final
    assert any(kw == "WORKDIR" for kw, _ in final)
    froms = [arg for kw, arg in steps if kw == "FROM"]
    assert any("CUDA_IMAGE" in f for f in froms)
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:1[23]\.\d+\.\d+-runtime-ubuntu\d", DOCKERFILE.read_text())
    assert "--no-deps -r requirements.lock" in DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def job() -> dict:
    return yaml.safe_load(PYTORCHJOB.read_text())


def test_pytorchjob_matches_its_schema():
    proc = run(tool("check-jsonschema"), "--schemafile", PYTORCHJOB_SCHEMA, PYTORCHJOB)
    assert proc.returncode == 0, f"check-jsonschema failed:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("path, value", [
    (("spec", "pytorchReplicaSpecs", "Worker", "replica"), 1),  # a typo of replicas
    (("spec", "pytorchReplicaSpecs", "Master", "restartPolicy"), "Sometimes"),
    (("spec", "nprocPerNode"), 8),  # a string in the operator's API
    (("spec", "pytorchReplicaSpecs", "Master", "template", "spec", "containers", 0, "resources", "limits",
      "nvidia.com/gpu"), "eight"),
])
def test_the_pytorchjob_schema_rejects_what_the_operator_would(job, path, value):
    import copy

    import jsonschema
    bad = copy.deepcopy(job)
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    schema = json.loads(PYTORCHJOB_SCHEMA.read_text())
    assert not list(jsonschema.Draft7Validator(schema).iter_errors(job))
    assert list(jsonschema.Draft7Validator(schema).iter_errors(bad))


def test_pytorchjob_runs_effnet_train_under_torchrun_in_the_shape_its_params_say(job):
    """Every pod runs `torchrun -m effnet train ...` (torchrun takes the node count, rank and rendezvous from the
    operator's PET_* variables) with train.num_nodes = pods, train.devices = nprocPerNode = GPUs per pod, the
    shared workspace and a shared-memory /dev/shm; the params it sets are valid ones."""
    from effnet import cli, config
    replicas = job["spec"]["pytorchReplicaSpecs"]
    pods = sum(r.get("replicas", 1) for r in replicas.values())
    for spec in replicas.values():
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"] == ["torchrun", "-m", "effnet"] and container["name"] == "pytorch"
        args = cli.parser().parse_args(container["args"])
        assert args.command == "train"
        sets = dict(o.split("=", 1) for o in args.overrides)
        assert int(sets["train.num_nodes"]) == pods
        assert int(sets["train.devices"]) == int(job["spec"]["nprocPerNode"]) == container["resources"]["limits"][
            "nvidia.com/gpu"]
        config.load(ROOT / "params.yaml", args.overrides)  # known keys, valid values
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "persistentVolumeClaim" in volumes[mounts[container["workingDir"]]]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
