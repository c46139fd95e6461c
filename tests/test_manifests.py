"""The cluster manifests, checked offline: Kubernetes objects against their schemas, the KubeRay
fields we use, security settings, that each cluster can place the experiments it runs, and the
Docker build context."""

import fnmatch
import math
import os
import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from anomdiff.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
K8S_VERSION = kubernetes_validate.utils.latest_version()
# The KubeRay (ray.io/v1) fields these manifests may use; a typo or a field of another version fails.
RAY_FIELDS = {
    "RayCluster": {"rayVersion", "authOptions", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                   "workerGroupSpecs"},
    "RayJob": {"entrypoint", "runtimeEnvYAML", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
               "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec"},
    "group": {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"},
}


def manifests() -> dict[str, dict]:
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted(CLUSTER.glob("*.yaml"))
            if "apiVersion" in yaml.safe_load(path.read_text())}


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def groups(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def quantity(value) -> float:
    """A Kubernetes quantity (``"8"``, ``500m``, ``32Gi``) as a number (bytes for memory)."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    return float(match[1]) * units.get(match[2], 1)


def test_the_manifests_are_the_expected_ones():
    assert sorted(manifests()) == ["networkpolicy.yaml", "pvc.yaml", "raycluster.yaml", "rayjob.yaml"]


def test_the_volume_the_pods_mount_is_the_claim_defined_here():
    claim = manifests()["pvc.yaml"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("raycluster.yaml", "rayjob.yaml"):
        for group in groups(manifests()[name]):
            claims = {v["persistentVolumeClaim"]["claimName"] for v in group["template"]["spec"].get("volumes", [])
                      if "persistentVolumeClaim" in v}
            assert claims == {claim["metadata"]["name"]}, (name, claims)


@pytest.mark.parametrize("name", ["networkpolicy.yaml", "pvc.yaml", "raycluster.yaml", "rayjob.yaml"])
def test_every_kubernetes_object_validates_against_its_schema(name):
    doc = manifests()[name]
    if doc["apiVersion"] != "ray.io/v1":
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        return
    spec = doc["spec"]
    assert set(spec) <= RAY_FIELDS[doc["kind"]], set(spec) - RAY_FIELDS[doc["kind"]]
    if doc["kind"] == "RayJob":
        assert set(cluster_spec(doc)) <= RAY_FIELDS["RayCluster"]
    for group in groups(doc):
        assert set(group) <= RAY_FIELDS["group"], set(group)
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": group["template"]["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)  # the pod template is a core PodSpec


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_ray_pods_are_restricted_bounded_and_authenticated(name):
    doc = manifests()[name]
    assert cluster_spec(doc)["authOptions"] == {"mode": "token"}
    for group in groups(doc):
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["limits"]) and resources["limits"] == resources["requests"]
            for variable in container.get("env", []):
                if re.search("PASSWORD|TOKEN|SECRET|KEY|USERNAME", variable["name"]):
                    assert "valueFrom" in variable and "value" not in variable, variable["name"]
        for volume in pod.get("volumes", []):
            if volume.get("emptyDir", {}).get("medium") == "Memory":
                assert "sizeLimit" in volume["emptyDir"], f"{volume['name']}: an unbounded /dev/shm"
    if doc["kind"] == "RayJob":
        assert 0 < doc["spec"]["activeDeadlineSeconds"] <= 7 * 24 * 3600


def test_the_network_policy_admits_only_this_namespace_to_the_ray_pods():
    policy = manifests()["networkpolicy.yaml"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": manifests()["raycluster.yaml"]
                                                            ["metadata"]["name"]}
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {}}]  # no namespaceSelector, no ipBlock


def placeable_workers(doc: dict, cpus_per_worker: float, use_gpu: bool) -> int:
    """Training workers the cluster holds at its largest: per node the fewer of its CPUs' and GPUs'
    worth, times the node group's maximum size (the head, without GPUs, holds none that need one)."""
    total = 0
    for group in groups(doc):
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus = quantity(limits.get("nvidia.com/gpu", 0))
        if "groupName" not in group and group["rayStartParams"].get("num-gpus") == "0":
            gpus = 0
        per_node = math.floor(quantity(limits["cpu"]) / cpus_per_worker)
        if use_gpu:
            per_node = min(per_node, int(gpus))
        total += per_node * group.get("maxReplicas", group.get("replicas", 1))
    return total


def entrypoint_experiment(doc: dict) -> tuple[Path, list[str]]:
    words = shlex.split(doc["spec"]["entrypoint"])
    config = words[words.index("--config") + 1]
    return REPO / config, [w for w in words if "=" in w and not w.startswith("-")]


def test_the_rayjob_places_the_run_it_submits_and_passes_its_weights():
    doc = manifests()["rayjob.yaml"]
    config, overrides = entrypoint_experiment(doc)
    cfg = load_config(config, overrides)
    assert placeable_workers(doc, cfg.train.cpus_per_worker, cfg.train.use_gpu) >= cfg.train.num_workers
    assert cfg.model.pretrained and cfg.model.pretrained.startswith("/mnt/")  # not the Hub from a pod
    assert cfg.model.backbone.pretrained.startswith("/mnt/")
    workers = cluster_spec(doc)["workerGroupSpecs"]
    assert all(any(t["key"] == "nvidia.com/gpu" for t in g["template"]["spec"]["tolerations"]) for g in workers)


@pytest.mark.parametrize("experiment", sorted(p.name for p in (REPO / "conf" / "experiment").glob("realiad_*.yaml")))
def test_the_raycluster_at_its_largest_places_every_cluster_experiment(experiment):
    cfg = load_config(REPO / "conf" / "experiment" / experiment, ["data.path=/mnt/data/realiad"])
    doc = manifests()["raycluster.yaml"]
    assert placeable_workers(doc, cfg.train.cpus_per_worker, cfg.train.use_gpu) >= cfg.train.num_workers


def docker_context() -> set[str]:
    """The files ``docker build -f cluster/Dockerfile .`` sends: the repository minus .dockerignore's
    patterns (Docker's rules for the plain and ``**/`` patterns used there)."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(relative: str) -> bool:
        parts = relative.split("/")
        for pattern in patterns:
            bare = pattern.removeprefix("**/")
            prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
            if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
                return True
            if pattern.startswith("**/") and any(fnmatch.fnmatch(part, bare) for part in parts):
                return True
        return False

    context = set()
    for folder, subfolders, files in os.walk(REPO):
        here = Path(folder).relative_to(REPO)
        subfolders[:] = [d for d in subfolders if not ignored(str(here / d))]  # Docker skips them whole
        context |= {str(here / f) for f in files if not ignored(str(here / f))}
    return {path.removeprefix("./") for path in context}


def test_the_docker_context_leaves_the_environment_and_history_out_and_holds_what_the_image_copies():
    context = docker_context()
    for left_out in (".venv/", ".anomdiff/", ".git/", "tests/"):
        assert not any(path.startswith(left_out) for path in context), left_out
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    sources = [line.split()[-2] for line in dockerfile.splitlines() if line.startswith("COPY")]
    for source in sources:
        assert any(path == source or path.startswith(source + "/") for path in context), source
    assert "|| true" not in dockerfile and "pip install --no-cache-dir -e" not in dockerfile
    requirements = [line for line in (CLUSTER / "requirements.txt").read_text().splitlines()
                    if line and not line.startswith("#")]
    assert requirements and all(re.fullmatch(r"[\w.\[\],-]+==[\w.]+", line) for line in requirements)


def test_the_images_cuda_torch_and_pins_agree():
    """The base image's CUDA is the CUDA of the torch wheels the image installs (DeepSpeed's op build
    refuses a mismatch), and every pin is the version this test environment runs."""
    from importlib.metadata import version

    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base_cuda = re.search(r"^FROM rayproject/ray:[\d.]+-py\d+-cu(\d+)$", dockerfile, re.M).group(1)
    index_cuda = re.search(r"TORCH_INDEX=https://download.pytorch.org/whl/cu(\d+)", dockerfile).group(1)
    local_versions = set(re.findall(r"\)\+cu(\d+)\"", dockerfile))
    assert base_cuda == index_cuda and local_versions == {base_cuda}
    pins = dict(line.split("==") for line in (CLUSTER / "requirements.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    for name, pinned in pins.items():
        assert version(name.split("[")[0]).split("+")[0] == pinned, name
    # The image installs the package with --no-deps: every dependency must be pinned here.
    import tomllib

    needed = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned_names = {name.split("[")[0].lower() for name in pins}
    assert {re.split(r"[\[<>=!]", d)[0].strip().lower() for d in needed} <= pinned_names
