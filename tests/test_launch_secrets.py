"""`sparsefold launch` ships an allowlist of the checkout, never its secrets, and prints no secret value.

The staging test plants credentials into a temporary copy of the project (never into the real checkout,
which other processes share) and points the staging at that copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import sparsefold.launch as launch
from sparsefold.cli import main

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = "http://127.0.0.1:9"
SECRET = "s3cr3t-VALUE-4242"  # planted in every file and env var below; must appear nowhere in the job or output
PLANTED = [  # relative to the project copy
    ".env", ".netrc", ".aws/credentials", "id_rsa", "id_ed25519.pub", "server.pem", ".git/config",
    "runs/cscnet-1234/config.json", "wandb/latest-run/files/config.yaml", ".venv/lib/site.py",
    "notes/secrets.md", "benchmarks/local.py", "sparsefold/.env", "sparsefold/configs/.private.yaml",
    "sparsefold/configs/api_token.yaml", "models/id_rsa", "trainers/credentials.json", "cluster/.env",
    "cluster/secrets.yaml", "sparsefold/bundled/cscnet/runs/x.json",
]


@pytest.fixture
def project_copy(tmp_path, monkeypatch) -> Path:
    """A copy of the project's package folders, configs and metadata, with credentials planted in it;
    staging is pointed at it (as if sparsefold were installed from there)."""
    root = tmp_path / "project"
    folders = {"sparsefold": "sparsefold", **{f"sparsefold.{s}": s for s in launch.SUBPACKAGES}}
    for folder in [*folders.values(), "cluster"]:
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, root / name)
    for rel in PLANTED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"WANDB_API_KEY={SECRET}\naws_secret_access_key = {SECRET}\n")
    (root / "sparsefold" / "configs" / "linked.yaml").symlink_to(root / ".aws" / "credentials")
    monkeypatch.setattr(launch, "package_dirs", lambda: {n: root / f for n, f in folders.items()})
    monkeypatch.setattr(launch, "project_root", lambda: root)
    return root


def test_staged_job_holds_no_planted_secret(project_copy, tmp_path):
    dest = tmp_path / "job"
    dest.mkdir()
    where = launch.stage(dest, [project_copy / "cluster" / "cscnet.yaml"])
    assert where[(project_copy / "cluster" / "cscnet.yaml").resolve()] == "cluster/cscnet.yaml"
    staged = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    leaked = [p for p in staged if SECRET in (dest / p).read_text(errors="replace")]
    assert not leaked, leaked
    assert not [p for p in staged if any(part.startswith(".") for part in Path(p).parts)], staged
    assert {"pyproject.toml", "README.md", "sparsefold/cli.py", "sparsefold/models/cscnet.py",
            "sparsefold/configs/quickstart.yaml", "sparsefold/bundled/cscnet/model.safetensors",
            "sparsefold/sweeps/cscnet_depth_filters.yaml"} <= set(staged)
    assert not {p.split("/")[0] for p in staged} & {"runs", "wandb", "benchmarks", "notes", "models", "tests"}


def test_dry_run_prints_no_secret_value(project_copy, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    extra = tmp_path / "runtime_env.yaml"
    extra.write_text(f"env_vars: {{AWS_SECRET_ACCESS_KEY: {SECRET}, HF_TOKEN: '{SECRET}', PLAIN: visible}}\n")
    rc = main(["launch", "trainer.output_dir=/abs/runs", "wandb.group=g", "--address",
               f"http://user:{SECRET}@127.0.0.1:9", "--env", "WANDB_API_KEY", "--env", f"DB_PASSWORD={SECRET}",
               "--runtime-env", str(extra), "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert SECRET not in out + err
    env = json.loads(out.strip().splitlines()[-1])["runtime_env"]["env_vars"]
    assert env["WANDB_API_KEY"] == env["DB_PASSWORD"] == env["AWS_SECRET_ACCESS_KEY"] == env["HF_TOKEN"] == "***"
    assert env["PLAIN"] == "visible" and env["PYTHONUNBUFFERED"] == "1"


def test_submission_error_masks_the_address_password(monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert main(["launch", "trainer.output_dir=/abs/runs", "--address", f"http://user:{SECRET}@127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert "error: Ray Jobs API at http://user:***@127.0.0.1:9" in err and SECRET not in err


@pytest.mark.parametrize("text, masked", [
    ("--env WANDB_API_KEY=abc123 x=1", "--env WANDB_API_KEY=*** x=1"),
    ('{"GITHUB_TOKEN": "ghp_x y", "n": 1}', '{"GITHUB_TOKEN": "***", "n": 1}'),
    ("password: hunter2", "password: ***"),
    ("s3 https://me:pw@host/bucket", "s3 https://me:***@host/bucket"),
    ("step 10 loss=0.5 lr=1e-3", "step 10 loss=0.5 lr=1e-3"),
])
def test_mask_secrets_text(text, masked):
    assert launch.mask_secrets(text) == masked
