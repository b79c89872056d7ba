"""Deployment files: checked offline, with no Ray runtime, no cloud and no Kubernetes API.

- cluster.yaml: Ray's own cluster-launcher validation, run the way `ray up` runs it before
  it talks to AWS (prepare_config, then validate_config), plus broken copies that it must
  reject.
- deploy/kuberay-rayjob.yaml and its autoscaling variant: validated against
  deploy/rayjob-schema.json, a minimal
  subset of the KubeRay RayJob CRD (source repo, path and commit are in the schema's
  $comment). Also the entrypoint, the config it names, GPUs and shared storage, and broken
  copies that must fail.
- configs/cluster-example.yaml: recall_ray.config.build_config (pydantic), the files it
  refers to, and where its models live.
- deploy/ds_zero3.json: an explicit ZeRO-3 config that agrees with the example's finetune
  settings.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
RAYJOB_YAML = REPO / "deploy" / "kuberay-rayjob.yaml"
AUTOSCALING_YAML = REPO / "deploy" / "kuberay-rayjob-autoscaling.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
PVC_YAML = REPO / "deploy" / "shared-pvc.yaml"
RAYJOB_SCHEMA = REPO / "deploy" / "rayjob-schema.json"
EXAMPLE_CONFIG = REPO / "configs" / "cluster-example.yaml"
DS_CONFIG = REPO / "deploy" / "ds_zero3.json"

IMAGE_REPO_ROOT = "/home/ray/recall-ray"  # where the KubeRay image holds the repo
SHARED_MOUNT = "/mnt/shared"  # the shared volume that both deployments mount on every node
CRD_SOURCE = ("ray-project/kuberay", "ray-operator/config/crd/bases/ray.io_rayjobs.yaml",
              "007412988d067642eeb67f8b80c373fc9ab401dd")


def _load_yaml(path: Path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.relative_to(REPO)} must hold a YAML mapping"
    return data


@pytest.fixture(scope="module")
def cluster_cfg() -> dict:
    return _load_yaml(CLUSTER_YAML)


@pytest.fixture(scope="module", params=[RAYJOB_YAML, AUTOSCALING_YAML], ids=["fixed", "autoscaling"])
def rayjob(request) -> dict:
    return _load_yaml(request.param)


@pytest.fixture(scope="module")
def rayjob_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(RAYJOB_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def example_tree() -> dict:
    return _load_yaml(EXAMPLE_CONFIG)


@pytest.fixture(scope="module")
def ds_config() -> dict:
    return json.loads(DS_CONFIG.read_text())


# ----------------------------------------------------------------------------- cluster.yaml


def ray_up_validate(config: dict) -> dict:
    """What `ray up` does to a cluster config before any cloud call: merge in the provider's
    defaults and the setup commands (prepare_config), then check the result against Ray's
    ray-schema.json and its cross-field rules (validate_config). `ray up` then autodetects
    node resources from EC2 and bootstraps IAM, VPC and key pairs. Those steps need AWS and
    are not run here. Returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation(cluster_cfg):
    prepared = ray_up_validate(cluster_cfg)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["max_workers"] == 0
    workers = {k: v for k, v in prepared["available_node_types"].items() if k != prepared["head_node_type"]}
    assert workers, "cluster.yaml needs at least one worker node type"
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0, f"{name}: workers should scale from zero"
        assert node_type["max_workers"] >= 1, name


def _no_provider(c):
    c.pop("provider")


def _misspelt_key(c):
    c["setup_comands"] = c.pop("setup_commands")


def _unknown_head_type(c):
    c["head_node_type"] = "ray.head.missing"


def _node_type_without_resources(c):
    c["available_node_types"]["ray.worker.gpu"].pop("resources")


def _non_integer_resource(c):
    c["available_node_types"]["ray.worker.gpu"]["resources"]["GPU"] = "one"


def _min_workers_above_max(c):
    c["available_node_types"]["ray.worker.gpu"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize("breakage", [
    _no_provider, _misspelt_key, _unknown_head_type, _node_type_without_resources,
    _non_integer_resource, _min_workers_above_max,
], ids=lambda f: f.__name__.lstrip("_"))
def test_ray_validation_rejects_broken_cluster_yaml(cluster_cfg, breakage):
    broken = copy.deepcopy(cluster_cfg)
    breakage(broken)
    # KeyError: prepare_config cannot even look up the provider's defaults without `provider`.
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        ray_up_validate(broken)


def test_ray_schema_requires_provider(cluster_cfg):
    """Ray's schema itself (not only a missing-key crash) rejects a config without provider."""
    from ray.autoscaler._private.util import validate_config

    prepared = ray_up_validate(cluster_cfg)
    prepared.pop("provider")
    with pytest.raises(jsonschema.ValidationError, match="provider"):
        validate_config(prepared)


def _all_commands(cfg: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    cmds = [c for k in keys for c in cfg.get(k) or []]
    for node_type in cfg["available_node_types"].values():
        cmds += node_type.get("initialization_commands") or []
        cmds += node_type.get("worker_setup_commands") or []
    return cmds


def test_cluster_yaml_syncs_and_installs_the_repo(cluster_cfg):
    assert cluster_cfg["file_mounts"] == {"~/recall-ray": "."}
    assert any(re.fullmatch(r"pip install -e ~/recall-ray/?", c.strip()) for c in cluster_cfg["setup_commands"]), \
        "setup_commands must `pip install -e ~/recall-ray` (the file-mounted checkout)"
    for cmd in _all_commands(cluster_cfg):
        # GPU nodes take torch from the image (a CUDA build); never the laptop CPU pin.
        assert "+cpu" not in cmd and "whl/cpu" not in cmd and "torch==" not in cmd, cmd


def test_cluster_yaml_gpus_and_shared_mount(cluster_cfg, example_tree):
    node_types = cluster_cfg["available_node_types"]
    head = node_types[cluster_cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head node type should be CPU-only"
    gpu_slots = sum(t["resources"].get("GPU", 0) * t.get("max_workers", 0)
                    for name, t in node_types.items() if name != cluster_cfg["head_node_type"])
    assert gpu_slots >= example_tree["finetune"]["num_workers"], \
        "cluster.yaml cannot start enough GPU workers for finetune.num_workers in the example config"
    run_options = " ".join(cluster_cfg["docker"].get("run_options", []))
    assert f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" in run_options, "the shared volume must reach the container"


# ----------------------------------------------------------------------------- RayJob


def test_rayjob_schema_names_its_source(rayjob_validator):
    schema = rayjob_validator.schema
    repo, path, commit = CRD_SOURCE
    for part in CRD_SOURCE:
        assert part in schema["$comment"]
    assert schema["x-source"] == {"repository": repo, "path": path, "commit": commit, "crdVersion": "v1"}


def test_rayjob_matches_crd_schema(rayjob, rayjob_validator):
    errors = sorted(rayjob_validator.iter_errors(rayjob), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors)


def _head(d):
    return d["spec"]["rayClusterSpec"]["headGroupSpec"]


def _worker(d):
    return d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


RAYJOB_BREAKAGES = {
    "wrong_api_version": lambda d: d.__setitem__("apiVersion", "ray.io/v1alpha2"),
    "no_metadata_name": lambda d: d["metadata"].pop("name"),
    "no_entrypoint": lambda d: d["spec"].pop("entrypoint"),
    "misspelt_spec_field": lambda d: d["spec"].__setitem__("shutdownAfterJobFinish",
                                                           d["spec"].pop("shutdownAfterJobFinishes")),
    "ttl_not_integer": lambda d: d["spec"].__setitem__("ttlSecondsAfterFinished", "10m"),
    "no_head_group": lambda d: d["spec"]["rayClusterSpec"].pop("headGroupSpec"),
    "head_without_template": lambda d: _head(d).pop("template"),
    "head_without_ray_start_params": lambda d: _head(d).pop("rayStartParams"),
    "ray_start_param_not_string": lambda d: _head(d)["rayStartParams"].__setitem__("num-cpus", 0),
    "head_container_without_name": lambda d: _head(d)["template"]["spec"]["containers"][0].pop("name"),
    "worker_without_group_name": lambda d: _worker(d).pop("groupName"),
    "worker_without_max_replicas": lambda d: _worker(d).pop("maxReplicas"),
    "worker_without_min_replicas": lambda d: _worker(d).pop("minReplicas"),
    "worker_pod_without_containers": lambda d: _worker(d)["template"]["spec"].pop("containers"),
    "gpu_limit_not_a_quantity": lambda d: _worker(d)["template"]["spec"]["containers"][0]["resources"]["limits"]
    .__setitem__("nvidia.com/gpu", "one"),
    "pvc_without_claim_name": lambda d: _worker(d)["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]
    .pop("claimName"),
}


@pytest.mark.parametrize("name", sorted(RAYJOB_BREAKAGES))
def test_rayjob_schema_rejects_broken_copy(rayjob, rayjob_validator, name):
    broken = copy.deepcopy(rayjob)
    RAYJOB_BREAKAGES[name](broken)
    assert not rayjob_validator.is_valid(broken), f"schema accepted a RayJob with {name}"


def _entrypoint_config(entrypoint: str) -> str:
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and "jobs/merge.py" in argv, f"entrypoint must run jobs/merge.py: {entrypoint!r}"
    assert (REPO / "jobs" / "merge.py").is_file()
    assert "--config" in argv and argv.index("--config") + 1 < len(argv), entrypoint
    return argv[argv.index("--config") + 1]


def test_rayjob_entrypoint_runs_merge_with_a_config_in_the_repo(rayjob):
    config_path = _entrypoint_config(rayjob["spec"]["entrypoint"])
    assert config_path.startswith(IMAGE_REPO_ROOT + "/"), \
        f"--config {config_path} should point into the repo copy in the image ({IMAGE_REPO_ROOT})"
    rel = config_path[len(IMAGE_REPO_ROOT) + 1:]
    assert (REPO / rel).is_file(), f"--config names {rel}, which is not in the repository"
    assert rel == "configs/cluster-example.yaml"
    # `jobs/merge.py` is relative: the job's working dir must be the repo.
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict), "runtimeEnvYAML must be a YAML mapping"
    assert runtime_env.get("working_dir") == IMAGE_REPO_ROOT


def test_rayjob_lifecycle_and_versions(rayjob, cluster_cfg):
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    ray_version = spec["rayClusterSpec"]["rayVersion"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", ray_version)
    pods = [_head(rayjob)["template"]] + [g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            assert ray_version in c["image"], f"image {c['image']} does not carry rayVersion {ray_version}"
    assert cluster_cfg["docker"]["image"].split(":")[1].startswith(ray_version), \
        "cluster.yaml and the RayJob should run the same Ray version"


def test_rayjob_gpus_and_shared_volume(rayjob, example_tree):
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert len(groups) >= 1
    gpu_slots = 0
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == 1
        gpu_slots += int(limits["nvidia.com/gpu"]) * group["maxReplicas"]
    assert gpu_slots >= example_tree["finetune"]["num_workers"], \
        "the RayJob cannot start enough GPU workers for finetune.num_workers in the example config"
    head_limits = _head(rayjob)["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    assert "nvidia.com/gpu" not in head_limits

    for pod in [_head(rayjob)["template"]] + [g["template"] for g in groups]:
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert SHARED_MOUNT in mounts, f"every Ray pod must mount the shared volume at {SHARED_MOUNT}"
        assert "persistentVolumeClaim" in volumes[mounts[SHARED_MOUNT]]


# ----------------------------------------------------------------------------- job config


def test_example_config_validates(example_tree):
    from recall_ray.config import RunConfig, build_config

    cfg = build_config(copy.deepcopy(example_tree))
    assert isinstance(cfg, RunConfig)
    assert cfg.finetune.use_gpu and cfg.finetune.num_workers == 4
    assert cfg.finetune.deepspeed == "deploy/ds_zero3.json"
    assert cfg.representations.dtype == "bfloat16"


@pytest.mark.parametrize("breakage", [
    lambda t: t.pop("base"),
    lambda t: t["finetune"].__setitem__("num_worker", t["finetune"].pop("num_workers")),
    lambda t: t["representations"].__setitem__("dtype", "float16"),
], ids=["no_base", "misspelt_key", "bad_dtype"])
def test_example_config_broken_copy_fails(example_tree, breakage):
    from recall_ray.config import ConfigError, build_config

    broken = copy.deepcopy(example_tree)
    breakage(broken)
    with pytest.raises(ConfigError):
        build_config(broken)


def test_example_config_files_exist_in_repo(example_tree):
    from recall_ray.config import build_config
    from recall_ray.core.templates import TEMPLATES

    cfg = build_config(copy.deepcopy(example_tree))
    # Relative paths resolve in the job's working dir, i.e. a copy of this repository.
    for rel in (cfg.finetune.deepspeed, cfg.task.data):
        assert not Path(rel).is_absolute() and (REPO / rel).is_file(), f"{rel} is not in the repository"
    assert cfg.task.template in TEMPLATES


def test_example_config_models_on_shared_volume(example_tree):
    """The example fine-tunes, which needs a run_dir on the shared volume, so its models are
    there too: on the volume that cluster.yaml and the RayJob mount on every node."""
    from recall_ray.config import build_config

    cfg = build_config(copy.deepcopy(example_tree))
    specs = [cfg.base, *cfg.experts] + ([cfg.new_model] if cfg.new_model else [])
    for spec in specs:
        assert "://" not in spec.path, f"{spec.label}: model paths must be local, not {spec.path}"
        assert spec.path.startswith(SHARED_MOUNT + "/"), f"{spec.label}: {spec.path} is not under {SHARED_MOUNT}"


# ----------------------------------------------------------------------------- DeepSpeed


def _values(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _values(v)
    elif isinstance(node, list):
        for v in node:
            yield from _values(v)
    else:
        yield node


def test_ds_zero3_config_is_explicit(ds_config):
    assert "auto" not in [v for v in _values(ds_config) if isinstance(v, str)], "no \"auto\" values"
    zero = ds_config["zero_optimization"]
    assert zero["stage"] == 3
    assert ds_config["bf16"]["enabled"] is True
    assert not ds_config.get("fp16", {}).get("enabled", False)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert isinstance(ds_config[key], int) and ds_config[key] > 0, key
    # LoRA weights must be gathered for rank 0 to save the adapter.
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    # recall_ray.finetune passes its own AdamW (finetune.learning_rate) only when the file has
    # no "optimizer"; a DeepSpeed optimizer here would silently replace it.
    assert "optimizer" not in ds_config and "scheduler" not in ds_config


def test_ds_config_agrees_with_example_finetune(ds_config, example_tree):
    from recall_ray.config import build_config

    ft = build_config(copy.deepcopy(example_tree)).finetune
    # The file's values win over the job config in recall_ray.finetune, so they must agree.
    assert ds_config["train_micro_batch_size_per_gpu"] == ft.batch_size, "micro batch != finetune.batch_size"
    assert ds_config["bf16"]["enabled"] == ft.bf16, "bf16.enabled != finetune.bf16"
    # The training loop calls engine.step() on every micro-batch: accumulation would cut the
    # number of optimizer steps below finetune.steps.
    assert ds_config["gradient_accumulation_steps"] == 1


# ------------------------------------------------------------------ image, volume, autoscaling


def _image_path(path: str) -> Path:
    """Where a path inside the image (deploy/Dockerfile copies the repository to
    IMAGE_REPO_ROOT) comes from in this repository."""
    assert path.startswith(IMAGE_REPO_ROOT + "/"), f"{path} is not inside the image's copy of the repo"
    return REPO / path[len(IMAGE_REPO_ROOT) + 1:]


def test_dockerfile_holds_the_repo_where_the_rayjobs_look(rayjob):
    text = DOCKERFILE.read_text()
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    copy_line = next(l for l in lines if l.startswith("COPY"))
    assert copy_line.split()[-2:] == [".", IMAGE_REPO_ROOT], copy_line  # the build context, at the repo root
    assert f"WORKDIR {IMAGE_REPO_ROOT}" in lines
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert _image_path(runtime_env["working_dir"] + "/jobs/merge.py").is_file()
    assert _image_path(_entrypoint_config(rayjob["spec"]["entrypoint"])).is_file()
    image = _head(rayjob)["template"]["spec"]["containers"][0]["image"]
    base = next(l for l in lines if l.startswith("FROM")).split()[1]
    assert base.startswith("rayproject/ray:" + rayjob["spec"]["rayClusterSpec"]["rayVersion"] + "-")
    assert base.split(":")[1] in image, f"the RayJob image {image} should carry the Dockerfile's tag"


def test_dockerfile_takes_a_cuda_torch_not_the_cpu_pin():
    text = DOCKERFILE.read_text()
    assert "-gpu" in next(l for l in text.splitlines() if l.startswith("FROM"))
    assert "torch==2.13.0" not in text and "download.pytorch.org/whl/cpu" not in text
    assert re.search(r"pip install[^\n]*\btorch\b", text) and "pip install --no-cache-dir -e /home/ray/recall-ray" in text


def test_shared_volume_claim_is_the_one_the_rayjobs_mount(rayjob):
    pvc = _load_yaml(PVC_YAML)
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    claims = {v["persistentVolumeClaim"]["claimName"]
              for pod in [_head(rayjob)["template"]] + [g["template"] for g in rayjob["spec"]["rayClusterSpec"]
                                                        ["workerGroupSpecs"]]
              for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {pvc["metadata"]["name"]}


def test_autoscaling_rayjob_starts_empty_and_asks_for_its_targets():
    job = _load_yaml(AUTOSCALING_YAML)
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    for group in cluster["workerGroupSpecs"]:
        assert group["replicas"] == 0 and group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    argv = shlex.split(job["spec"]["entrypoint"])
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert "ray.autoscaler=true" in sets
    from recall_ray.config import load_config

    cfg = load_config(str(_image_path(_entrypoint_config(job["spec"]["entrypoint"]))), sets)
    assert cfg.ray.autoscaler and isinstance(cfg.representations.num_actors, int) and isinstance(
        cfg.merge.num_actors, int), "an empty cluster needs numeric pool targets to ask for"
