"""deploy/: the Dockerfile copies only files that exist (and that .dockerignore keeps), and the
KubeRay RayService manifest is one this project and KubeRay accept: its serveConfigV2 is a
valid app (AppArgs), each model fits on one GPU worker pod, HF_TOKEN comes from a Secret, and
Prometheus finds every pod's metrics port. No docker daemon or Kubernetes here: these read
the files."""

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from deployments.placement import unplaceable_models
from serve_app.config import AppArgs

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
RAYSERVICE = REPO_ROOT / "deploy" / "rayservice.yaml"
TGI_IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.6"


# --- Dockerfile ---------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each Dockerfile line, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def copy_sources() -> list[str]:
    """The build-context sources of every COPY/ADD (multi-stage --from copies excluded)."""
    sources = []
    for instruction, args in instructions(DOCKERFILE):
        if instruction in ("COPY", "ADD"):
            words = args.split()
            if any(w.startswith("--from") for w in words):
                continue
            sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


def dockerignored(source: str) -> bool:
    patterns = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]  # fmt: skip
    parts = Path(source).parts
    return any(fnmatch.fnmatch(source, p) or fnmatch.fnmatch(parts[0], p) for p in patterns)


def test_the_image_is_tgis_with_its_entrypoint_cleared():
    steps = instructions(DOCKERFILE)
    assert steps[0] == ("FROM", TGI_IMAGE)
    assert ("ENTRYPOINT", "[]") in steps  # Ray gives the container its command


def test_every_copied_file_exists_and_is_not_dockerignored():
    sources = copy_sources()
    assert sources, "no COPY found"
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"


def test_every_package_and_file_pip_needs_is_copied():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(copy_sources())
    for pattern in packages:  # "engine*" -> the engine/ directory
        assert pattern.rstrip("*") in copied, f"package {pattern} is not copied"
    assert {"pyproject.toml", "requirements.lock", pyproject["project"]["readme"]} <= copied
    install = next(args for i, args in instructions(DOCKERFILE) if "pip install" in args)
    assert "requirements.lock" in install  # the pinned versions, not whatever resolves


# --- RayService -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return yaml.safe_load(RAYSERVICE.read_text())


@pytest.fixture(scope="module")
def serve_config(rayservice) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def pod_specs(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster["workerGroupSpecs"]})
    return groups


def test_kind_and_ray_version_match_the_image(rayservice):
    assert (rayservice["apiVersion"], rayservice["kind"]) == ("ray.io/v1", "RayService")
    lock = (REPO_ROOT / "requirements.lock").read_text()
    ray_version = re.search(r"^ray==(\S+)$", lock, re.M)[1]
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray_version


def test_serve_config_is_serve_config_yaml_app_on_gpus_with_the_real_launcher(serve_config):
    local = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())["applications"][0]
    (app,) = serve_config["applications"]
    assert app["import_path"] == local["import_path"]
    assert app["route_prefix"] == local["route_prefix"]
    args = AppArgs.model_validate(app["args"])  # what build_app validates at deploy time
    for model in args.models:
        assert model.engine == "tgi"
        assert model.resources.num_gpus >= 1
    # Inside a pod the proxy must listen beyond localhost for the Kubernetes service.
    assert serve_config["http_options"]["host"] == "0.0.0.0"


def test_each_model_fits_on_one_gpu_worker_pod(rayservice, serve_config):
    (app,) = serve_config["applications"]
    args = AppArgs.model_validate(app["args"])
    for name, group in pod_specs(rayservice).items():
        if name == "head":
            continue
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        node = {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}
        # The same check build_app makes against a live cluster's nodes.
        assert unplaceable_models(args.models, [node]) == []
        assert container["resources"]["requests"] == limits
    # Autoscaled GPU workers may not exist yet when the app deploys.
    assert args.check_placement is False
    head = pod_specs(rayservice)["head"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # replicas stay off the head


def test_hf_token_comes_from_a_secret_only(rayservice):
    for name, group in pod_specs(rayservice).items():
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            if name != "head":  # the pods that run replicas and their launchers
                assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
                    "name": "hf-token", "key": "HF_TOKEN"}  # fmt: skip
            assert "value" not in env.get("HF_TOKEN", {})
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", RAYSERVICE.read_text())  # no token pasted


def test_prometheus_scrapes_each_pods_ray_metrics_port(rayservice):
    for group in pod_specs(rayservice).values():
        annotations = group["template"]["metadata"]["annotations"]
        port = group["rayStartParams"]["metrics-export-port"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == port
        assert annotations["prometheus.io/path"] == "/metrics"
        (container,) = group["template"]["spec"]["containers"]
        assert int(port) in {p["containerPort"] for p in container["ports"]}


def test_ray_start_params_and_annotations_are_strings_as_kubernetes_requires(rayservice):
    for group in pod_specs(rayservice).values():
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert all(
            isinstance(v, str) for v in group["template"]["metadata"]["annotations"].values()
        )


def test_pods_run_the_image_and_workers_have_gpus_shm_and_a_hub_cache(rayservice):
    cluster_yaml = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    assert cluster_yaml["docker"]["image"] == "ray-tgi:0.1.0"  # `ray up` runs the same image
    for name, group in pod_specs(rayservice).items():
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        assert container["image"] == "ray-tgi:0.1.0"  # deploy/Dockerfile's tag in README
        if name == "head":
            continue
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"  # NCCL
        assert mounts["/data"] in volumes  # HF_HOME of TGI's image: the node's Hub cache
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
