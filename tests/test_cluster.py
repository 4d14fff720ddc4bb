"""Offline checks of the cluster launch files in cluster/: no credentials, no network, no Ray cluster.

* cluster/aws.yaml, cluster/gcp.yaml -- ray's own (private) prepare_config + validate_config, as
  `ray up` runs them, plus what ray does not check: CPU-0 head, a GPU worker type, the project install.
* cluster/rayjob.yaml -- KubeRay RayJob shape, versions matching the installed ray, and the
  entrypoint's sparsefold overrides validated by sparsefold's own config code.
* cluster/runtime_env.yaml -- ray's RuntimeEnv validation.
* every file under cluster/ -- no W&B key, no importable Python.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
RAY_VERSION = re.match(r"\d+\.\d+\.\d+", ray.__version__).group(0)
CONTAINER_HOME = PurePosixPath("/home/ray")  # HOME of the rayproject/ray images (user ray, uid 1000)


def load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def rayjob_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()) if d]


def rayjob() -> dict:
    jobs = [d for d in rayjob_docs() if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, "cluster/rayjob.yaml must hold exactly one RayJob"
    return jobs[0]


def entrypoint() -> tuple[str, list[str]]:
    """(config path, overrides) of the RayJob's `sparsefold train CONFIG key=value...` entrypoint."""
    tokens = shlex.split(rayjob()["spec"]["entrypoint"])
    assert tokens[:2] == ["sparsefold", "train"], tokens
    assert len(tokens) >= 3 and "=" not in tokens[2], "entrypoint: a config path must follow `sparsefold train`"
    overrides = tokens[3:]
    assert overrides and all("=" in t for t in overrides), overrides
    return tokens[2], overrides


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def key_values(obj, key: str):
    """Values of every mapping entry named ``key`` in a parsed YAML tree."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from key_values(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from key_values(v, key)


def walk_strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk_strings(k)
            yield from walk_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk_strings(v)


# ------------------------------------------------------------------------------------------------
# ray up configs


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_ray_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(name)
    prepared = prepare_config(copy.deepcopy(raw))  # merges ray's defaults.yaml; validate needs it first
    validate_config(prepared)
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "max_workers",
                "idle_timeout_minutes", "docker", "file_mounts", "setup_commands"):
        assert key in raw, f"{name}: missing {key}"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_head_cpu0_and_gpu_workers(name):
    raw = load(name)
    types = raw["available_node_types"]
    head = raw["head_node_type"]
    assert types[head]["resources"] == {"CPU": 0}, "the head must advertise CPU 0 (no Train workers/trials there)"
    gpu = {n: t for n, t in types.items() if n != head and t["resources"].get("GPU", 0) >= 1}
    assert any(t.get("max_workers", 0) >= 1 for t in gpu.values()), f"{name}: no usable GPU worker type"
    assert all(t.get("min_workers", 0) == 0 for t in gpu.values()), "GPU workers should scale from zero"
    assert raw["max_workers"] >= max(t.get("max_workers", 0) for t in gpu.values())


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_installs_the_synced_checkout(name):
    raw = load(name)
    mounts = raw["file_mounts"]
    assert mounts.get("~/sparsefold") == ".", "the checkout `ray up` runs from is synced to ~/sparsefold"
    cmds = raw["setup_commands"]
    torch = [i for i, c in enumerate(cmds) if "pip install" in c and "torch" in c]
    project = [i for i, c in enumerate(cmds) if "pip install" in c and "sparsefold" in c]
    assert torch and project and torch[0] < project[0], cmds
    assert any("$HOME/sparsefold" in cmds[i] and " -e " in f" {cmds[i]} " for i in project), cmds
    # rsync must not ship outputs, data or local environments
    for pattern in (".venv", "runs", "wandb", "*.tar"):
        assert pattern in raw["rsync_exclude"], pattern


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_images_and_token_auth(name):
    raw = load(name)
    docker = raw["docker"]
    assert docker["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    assert docker["head_image"] == f"rayproject/ray:{RAY_VERSION}-py311"
    assert raw["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in raw[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), (key, start)
    assert "--head" in " ".join(raw["head_start_ray_commands"])


@pytest.mark.parametrize("name", LAUNCHER)
def test_validate_config_rejects_unknown_keys(name):
    """The validation above can fail: a typo at the top level or in a node type is rejected."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    top = prepare_config(copy.deepcopy(load(name)))
    top["setup_comands"] = []
    with pytest.raises(jsonschema.ValidationError, match="Additional properties are not allowed"):
        validate_config(top)
    raw = load(name)
    worker = next(n for n in raw["available_node_types"] if n != raw["head_node_type"])
    raw["available_node_types"][worker]["max_worker"] = 2
    with pytest.raises(jsonschema.ValidationError, match="Additional properties are not allowed"):
        validate_config(prepare_config(raw))


def test_aws_specifics():
    raw = load("aws.yaml")
    assert raw["provider"]["type"] == "aws" and raw["provider"]["region"] == "us-west-2"
    assert raw["provider"]["cache_stopped_nodes"] is False
    assert raw["auth"]["ssh_user"] == "ubuntu"
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]["node_config"]
    assert "gpu" not in head["InstanceType"] and not head["InstanceType"].startswith(("g", "p"))
    gpu = types["gpu"]
    assert gpu["node_config"]["InstanceType"] == "g5.xlarge"
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 8)


def test_gcp_specifics():
    raw = load("gcp.yaml")
    p = raw["provider"]
    assert (p["type"], p["region"], p["availability_zone"]) == ("gcp", "us-central1", "us-central1-a")
    assert p["project_id"]
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["node_config"]["machineType"] == "n2-standard-8"
    gpu = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    kinds = set()
    for name, t in gpu.items():
        nc = t["node_config"]
        # GCE's scheduling is an object; ray's own gcp examples still write a list (ray#46248)
        assert isinstance(nc["scheduling"], dict), name
        assert nc["scheduling"]["onHostMaintenance"] == "TERMINATE", name
        accels = {a["acceleratorType"] for a in nc.get("guestAccelerators", [])}
        if nc["machineType"].startswith("g2-"):
            kinds.add("l4")
            assert not accels, "G2 machine types carry their L4; no guestAccelerators"
        elif "nvidia-tesla-t4" in accels:
            kinds.add("t4")
        # node-type initialization_commands replace the global list: the shared mount must be repeated
        assert raw["initialization_commands"][0] in t["initialization_commands"], name
    assert kinds == {"l4", "t4"}
    assert any(t["node_config"]["scheduling"].get("preemptible") for t in gpu.values())


# ------------------------------------------------------------------------------------------------
# KubeRay RayJob


def test_rayjob_shape_and_versions():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("sparsefold train ")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    rcs = spec["rayClusterSpec"]
    assert rcs["rayVersion"] == RAY_VERSION, "rayVersion must equal the installed (pinned) ray"
    assert rcs["authOptions"]["mode"] == "token"
    head = rcs["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # a string: rayStartParams values are strings
    (head_container,) = containers(head)
    assert head_container["image"] == f"rayproject/ray:{rcs['rayVersion']}-py311"
    (workers,) = rcs["workerGroupSpecs"]
    for c in containers(workers):
        assert c["image"] == f"rayproject/ray:{rcs['rayVersion']}-py311-gpu"
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for group in (head, workers):
        for c in containers(group):
            assert c["image"].split(":", 1)[1].startswith(rcs["rayVersion"] + "-"), c["image"]
    # one GPU worker pod per Ray Train worker
    _, overrides = entrypoint()
    n_workers = int(dict(o.split("=", 1) for o in overrides)["ray.workers"])
    assert workers["replicas"] == workers["minReplicas"] == n_workers


def test_rayjob_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(rayjob()["spec"]["runtimeEnvYAML"])
    assert env["pip"] and env["env_vars"]
    RuntimeEnv(**env)  # ray's own validation (env_vars must be str -> str, ...)
    # no WANDB_MODE: wandb.mode=auto decides (online with the Secret's key); no key in the manifest
    assert "WANDB_MODE" not in env["env_vars"] and "WANDB_API_KEY" not in env["env_vars"]
    assert env["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    project = [p for p in env["pip"] if p.startswith("sparsefold")]
    assert project and all(" @ " in p for p in project), "never a bare PyPI `sparsefold` (not this project)"


def test_rayjob_wandb_key_comes_from_a_secret():
    (workers,) = rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (c,) = containers(workers)
    (var,) = [e for e in c["env"] if e["name"] == "WANDB_API_KEY"]
    assert "value" not in var
    ref = var["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"] and ref.get("optional") is True


def test_rayjob_overrides_are_valid_sparsefold_config():
    from sparsefold.config import apply_overrides, run_config_from_dict

    _, overrides = entrypoint()
    cfg = run_config_from_dict(apply_overrides({}, overrides))  # raises ConfigError on a bad override
    assert cfg.ray.enabled and cfg.runtime.use_gpu and cfg.ray.workers >= 2


def test_rayjob_config_file_and_storage(tmp_path):
    """The entrypoint's config comes from the ConfigMap mounted on the head; with the overrides it loads,
    and Ray's storage_path (trainer.output_dir) is a bucket URL or on the shared volume every pod mounts."""
    from sparsefold.config import is_url, load_config
    from sparsefold.trainers.storage import run_dir_of, storage_of

    job = rayjob()
    config_path, overrides = entrypoint()
    config_path = PurePosixPath(config_path)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    (vol,) = [n for n, p in mounts.items() if PurePosixPath(p) == config_path.parent]
    cm_name = volumes[vol]["configMap"]["name"]
    (cm,) = [d for d in rayjob_docs() if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == cm_name]
    local = tmp_path / config_path.name
    local.write_text(cm["data"][config_path.name])

    cfg = load_config(local, overrides)
    out = cfg.trainer.output_dir
    storage, name, _ = storage_of(cfg)
    assert storage == out.rstrip("/") and name == run_dir_of(cfg).name, "Ray's storage_path is trainer.output_dir"
    if is_url(out):  # a bucket: Ray Train writes there itself, nothing to mount
        assert cfg.ray.enabled
        return
    assert PurePosixPath(out).is_absolute(), "a relative output_dir would land in the job's temporary directory"
    (workers,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    for spec in (head, workers["template"]["spec"]):
        claims = {v["name"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        shared = [m["mountPath"] for c in spec["containers"] for m in c["volumeMounts"] if m["name"] in claims]
        assert any(PurePosixPath(out).is_relative_to(p) for p in shared), (out, shared)


def test_rayjob_configmap_equals_cluster_config():
    (cm,) = [d for d in rayjob_docs() if d.get("kind") == "ConfigMap"]
    assert yaml.safe_load(cm["data"]["cscnet.yaml"]) == load("cscnet.yaml"), "edit both copies"


# ------------------------------------------------------------------------------------------------
# runtime_env.yaml and docs


def test_runtime_env_file():
    from ray.runtime_env import RuntimeEnv

    env = load("runtime_env.yaml")
    assert env["pip"] and env["env_vars"]
    RuntimeEnv(**env)
    assert env["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5" and "WANDB_MODE" not in env["env_vars"]
    assert "WANDB_API_KEY" not in env["env_vars"]
    excludes = {e.strip("/") for e in env["excludes"]}
    assert {"runs", "wandb", "*.tar", ".venv"} <= excludes
    # the package folders stay out of working_dir (first on PYTHONPATH: they would shadow HF `datasets`)
    assert {"sparsefold", "models", "datasets", "trainers", "sweeps"} <= excludes
    # pip installs the checkout that ray up synced (file_mounts ~/sparsefold) inside the container
    synced = CONTAINER_HOME / next(iter(k for k in load("aws.yaml")["file_mounts"] if "sparsefold" in k))[2:]
    assert any(p.startswith("-e ") and p[3:].split("[")[0] == str(synced) for p in env["pip"]), env["pip"]


def test_readme_train_commands_are_valid():
    from sparsefold.config import load_config

    text = (CLUSTER / "README.md").read_text().replace("\\\n", " ")
    commands = re.findall(r"sparsefold (?:train|launch) (\S+)((?:\s+[a-z_]+\.[a-z_]+=\S+)*)", text)
    assert commands
    for config, overrides in commands:
        if config.startswith("cluster/"):
            load_config(ROOT / config, overrides.split())


def test_cluster_holds_no_python_and_no_secrets():
    files = sorted(p for p in CLUSTER.rglob("*") if p.is_file())
    assert files and not [p for p in files if p.suffix in (".py", ".pyc")], "no importable Python in cluster/"
    hex40 = re.compile(r"(?<![0-9A-Za-z])[0-9a-fA-F]{40}(?![0-9A-Za-z])")
    literal = re.compile(r"WANDB_API_KEY[\"']?\s*[:=]\s*[\"']?([^\s\"'#]+)")
    for p in files:
        texts = [p.read_text()]
        if p.suffix == ".yaml":
            trees = [d for d in yaml.safe_load_all(texts[0]) if d]
            for s in list(walk_strings(trees)):  # strings that are YAML themselves (runtimeEnvYAML, ConfigMap)
                if "\n" in s:
                    try:
                        trees.append(yaml.safe_load(s))
                    except yaml.YAMLError:
                        pass
            texts += list(walk_strings(trees))
            for value in key_values(trees, "WANDB_API_KEY"):
                assert not isinstance(value, str) or value.startswith("$"), f"{p.name}: literal WANDB_API_KEY"
        for t in texts:
            assert not hex40.search(t), f"{p.name}: looks like a W&B API key (40 hex characters)"
            for value in literal.findall(t):
                assert value.startswith(("$", "<")), f"{p.name}: WANDB_API_KEY with a literal value"
