"""`sparsefold launch`: what a Ray Job ships, validation before submission, and one real job.

The last test starts its own local head (`ray start --head --block`, in its own process session, its own
--temp-dir and free ports, so no other Ray instance on the machine is touched or picked up by `ray.init()`),
submits one tiny Ray Train run whose output_dir is a `file://` URL, follows it to SUCCEEDED, and stops the
head by signalling that session only (`ray stop` would kill every Ray process of the user on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sparsefold.cli import main
from sparsefold.config import ConfigError
from sparsefold.launch import SUBPACKAGES, runtime_env, stage

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = "http://127.0.0.1:9"  # discard port: a submission attempt fails with exit 1, not 2


def test_subpackages_are_pyprojects_packages():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(packages) == sorted(["sparsefold", *(f"sparsefold.{s}" for s in SUBPACKAGES)])


def test_stage_ships_the_import_package_not_the_checkout_folders(tmp_path):
    outside = tmp_path / "outside.yaml"
    outside.write_text("trainer: {max_steps: 2}\n")
    inside = ROOT / "cluster" / "cscnet.yaml"
    dest = tmp_path / "job"
    dest.mkdir()
    where = stage(dest, [outside, inside])
    assert where[inside.resolve()] == "cluster/cscnet.yaml" and (dest / "cluster" / "cscnet.yaml").is_file()
    assert where[outside.resolve()] == "launch/outside.yaml" and (dest / "launch" / "outside.yaml").is_file()
    top = {p.name for p in dest.iterdir()}
    assert not top & {"models", "datasets", "trainers", "sweeps", ".git", "runs", ".venv", "wandb"}, top
    assert not list(dest.rglob("__pycache__")) and not list(dest.rglob("*.egg-info"))
    assert (dest / "sparsefold" / "models" / "cscnet.py").is_file()
    assert list((dest / "sparsefold" / "bundled").rglob("model.safetensors"))
    assert (dest / "sparsefold" / "configs" / "quickstart.yaml").is_file()
    # a fresh interpreter without site-packages (so without the editable finder) imports it all from dest
    names = ["sparsefold", "sparsefold.cli", "sparsefold.launch", *(f"sparsefold.{s}" for s in SUBPACKAGES)]
    code = ("import importlib.util as u, sys; sys.path.insert(0, sys.argv[1]); "
            "print('\\n'.join(u.find_spec(n).origin for n in sys.argv[2:]))")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(dest), *names], capture_output=True, text=True,
                         check=True).stdout.split()
    assert len(out) == len(names) and all(Path(o).is_relative_to(dest) for o in out), out


def test_bad_input_exits_2_before_anything_is_submitted(capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # keep the token lookup out of this process's env
    good = ["trainer.output_dir=/abs/runs", "--address", UNREACHABLE]
    assert main(["launch", "trainer.bogus=1", *good]) == 2
    assert "config error: trainer.bogus: unknown key" in capsys.readouterr().err
    assert main(["launch", "model.stride=99", *good]) == 2
    assert "model.stride" in capsys.readouterr().err
    assert main(["launch", "trainer.max_steps=2", "--address", UNREACHABLE]) == 2  # output_dir: runs (relative)
    assert "trainer.output_dir: 'runs' is relative" in capsys.readouterr().err
    assert main(["launch", "trainer.output_dir=s3://bucket/runs", "--address", UNREACHABLE]) == 2  # plain path
    assert "ray.enabled=true" in capsys.readouterr().err
    assert main(["launch", "trainer.output_dir=/abs/runs"]) == 2  # no address
    assert "--address" in capsys.readouterr().err
    # a valid config does go to the cluster: here an unreachable one, one line and exit 1
    assert main(["launch", *good]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: Ray Jobs API at {UNREACHABLE}")


def test_dry_run_entrypoints(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["launch", "cluster/cscnet.yaml", "trainer.max_steps=5", "--address", UNREACHABLE, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["entrypoint"] == "python -m sparsefold train cluster/cscnet.yaml trainer.max_steps=5"
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({
        "name": "s", "storage": str(tmp_path / "sweeps"),
        "base": {"model": {"name": "cscnet", "depth": 2, "filters": 8, "kernel_size": 5, "stride": 1},
                 "data": {"train": "builtin:skimage", "val": "builtin:skimage", "val_images": 1}},
        "space": {"model.depth": {"grid": [2, 3]}}}))
    assert main(["launch", "--sweep", str(spec), "trainer.max_steps=4", "--address", UNREACHABLE, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["entrypoint"] == "python -m sparsefold sweep launch/spec.yaml trainer.max_steps=4"
    assert main(["launch", "--sweep", str(spec), "storage=rel/sweeps", "--address", UNREACHABLE, "--dry-run"]) == 2
    assert "storage: 'rel/sweeps' is relative" in capsys.readouterr().err


def test_runtime_env_layers(tmp_path, monkeypatch):
    from ray.runtime_env import RuntimeEnv

    extra = tmp_path / "env.yaml"
    extra.write_text("pip: [torch==2.13.0]\nworking_dir: /elsewhere\n"
                     "env_vars: {A: '1', RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: '1'}\n")
    monkeypatch.setenv("MY_SECRET", "s3cr3t")
    env = runtime_env(tmp_path, ["MY_SECRET", "A=2"], str(extra))
    assert env["working_dir"] == str(tmp_path) and env["pip"] == ["torch==2.13.0"]
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
                               "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600", "A": "2", "MY_SECRET": "s3cr3t"}
    RuntimeEnv(**env)  # Ray's own validation
    monkeypatch.delenv("MY_SECRET")
    with pytest.raises(ConfigError, match="--env: MY_SECRET is not set"):
        runtime_env(tmp_path, ["MY_SECRET"], None)


# ------------------------------------------------------------------------------------------------
# one real job on a local head


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head(tmp_path):
    """A local head with the dashboard (Jobs API); yields its address. Stopped by signalling its session."""
    port, dash, agent, agent_grpc, client, metrics, env_agent = free_ports(7)
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 bytes
    log = tmp_path / "ray-start.log"
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus=2",
           f"--port={port}", f"--dashboard-port={dash}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--ray-client-server-port={client}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={env_agent}", f"--temp-dir={temp}", "--disable-usage-stats"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address, deadline = f"http://127.0.0.1:{dash}", time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"ray start exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no dashboard after 240 s:\n{log.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=5)
                up = True
            except urllib.error.HTTPError:  # 401 with token auth: the server answers
                up = True
            except OSError:
                up = False
            if up and "Ray runtime started" in log.read_text():
                break
            time.sleep(2)
        yield address
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # our session only: the head and everything it started
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what did not stop on SIGTERM
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray
def test_launch_follows_a_ray_train_job_to_url_storage(ray_head, tiny_overrides, tmp_path):
    """`sparsefold launch ... --follow` as a user runs it: job id first, the job's logs, its exit status; the
    checkpoint lands in a file:// storage URL (the same code path as s3://), config.json beside it."""
    from sparsefold.trainers.checkpoint import load_model

    store = tmp_path / "store"
    overrides = tiny_overrides + [
        f"trainer.output_dir={store.as_uri()}", "ray.enabled=true", "ray.cpus_per_worker=1",
        "trainer.max_steps=2", "trainer.val_every=2", "trainer.run_name=launched", "data.val_images=1"]
    cmd = [sys.executable, "-m", "sparsefold", "launch", *overrides, "--address", ray_head, "--follow",
           "--env", f"SPARSEFOLD_CACHE={tmp_path / 'node-cache'}"]  # the node-local staging dir: not ~/.cache
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{r.stderr[-3000:]}\n{r.stdout[-3000:]}"
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("raysubmit_")
    assert f"job {lines[0]}: SUCCEEDED" in r.stderr
    result = json.loads(next(x for x in reversed(lines) if x.startswith("{") and '"steps"' in x))
    assert result["steps"] == 2
    assert result["checkpoint"] == f"{store.as_uri()}/launched/step_0000002"
    assert result["run_dir"] == f"{store.as_uri()}/launched"
    model, meta = load_model(store / "launched" / "step_0000002")
    assert meta["state"]["step"] == 2
    assert json.loads((store / "launched" / "config.json").read_text())["trainer"]["run_name"] == "launched"
    assert (tmp_path / "node-cache" / "runs" / "launched" / "config.json").is_file()  # staged on the node
