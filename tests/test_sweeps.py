"""Sweeps: spec validation before Ray starts (fast), Tune objects, Pareto/ASHA accounting, and ONE tiny
real sweep (3 trials × 12 steps, ASHA, 2 at a time on a 2-CPU local cluster; one trial fails at run
time) followed by its report and a resume that must not re-train anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparsefold.config import ConfigError
from sparsefold.sweeps.report import compute_savings, pareto_front, pareto_plot
from sparsefold.sweeps.spec import load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def tiny_spec(storage: Path, cache_dir: Path, **extra) -> dict:
    """3 trials of a tiny CSCNet on the builtin photos; batch 64 > the 13 training photos fails at run time
    (no batch in an epoch) although it is a valid config."""
    overrides = {
        "model.name": "cscnet", "model.depth": 3, "model.filters": 12, "model.kernel_size": 7, "model.stride": 2,
        "data.train": "builtin:skimage", "data.val": "builtin:skimage", "data.val_images": 2, "data.patch_size": 40,
        "data.num_workers": 0, "data.cache_dir": str(cache_dir), "trainer.max_steps": 12, "trainer.val_every": 4,
        "trainer.log_every": 4, "wandb.mode": "offline", "optim.lr": 2e-3, "optim.schedule": "constant",
    }
    spec = {"name": "tiny", "storage": str(storage), "base": {"overrides": overrides},
            "space": {"data.batch_size": {"grid": [2, 4, 64]}},
            "search": {"kind": "grid"},
            "scheduler": {"kind": "asha", "time_attr": "validations", "grace_period": 1, "reduction_factor": 2},
            "resources": {"workers": 1, "cpus_per_worker": 0.9}, "max_concurrent_trials": 2}
    spec.update(extra)
    return spec


# ------------------------------------------------------------------ validation, before Ray (fast)
@pytest.mark.parametrize("change, field", [
    ({"space": {"model.depth": {"grid": [0, 4]}}}, "space.model.depth: value 0"),
    ({"space": {"model.dept": {"grid": [2]}}}, "space.model.dept:"),
    ({"space": {"depth": {"grid": [2]}}}, "space.depth:"),
    ({"space": {"model.depth": {"between": [2, 4]}}}, "space.model.depth: unknown domain"),
    ({"space": {"optim.lr": {"loguniform": [0, 1e-2]}}}, "space.optim.lr:"),
    ({"space": {"model.depth": {"uniform": [2, 6]}}, "search": {"kind": "random"}}, "space.model.depth:"),
    ({"space": {"ray.workers": {"grid": [1, 2]}}}, "space.ray.workers:"),
    ({"space": {"model.kernel_size": {"grid": [1]}}}, "space: point"),  # stride 2 > kernel 1: an interaction
    ({"space": {"loss.kind": {"grid": ["mse", "hinge"]}}}, "space.loss.kind: value 'hinge'"),
    ({"search": {"kind": "optuna", "num_samples": 4}}, "space.data.batch_size:"),  # optuna takes no grid
    ({"search": {"kind": "tpe"}}, "search.kind:"),
    ({"search": {"num_samples": 3}}, "search.num_samples:"),
    ({"search": {"metric": "loss"}}, "search.metric:"),
    ({"scheduler": {"kind": "asha", "max_t": 5}}, "scheduler.max_t:"),
    ({"scheduler": {"kind": "asha", "grace_period": 3}}, "scheduler.grace_period:"),
    ({"scheduler": {"kind": "asha", "reduction_factor": 1}}, "scheduler.reduction_factor:"),
    ({"scheduler": {"kind": "asha", "time_attr": "epochs"}}, "scheduler.time_attr:"),
    ({"space": {"trainer.max_steps": {"grid": [8, 12]}}}, "scheduler.max_t:"),  # unequal trial lengths
    ({"resources": {"cpus_per_worker": 0}}, "resources.cpus_per_worker:"),
    ({"resources": {"driver_cpus": 0}}, "resources.driver_cpus:"),
    ({"max_concurrent_trials": 0}, "max_concurrent_trials:"),
    ({"name": "a/b"}, "name:"),
    ({"storage": "s3://bucket/sweeps"}, "storage:"),
    ({"schedular": {}}, "schedular:"),
])
def test_spec_errors_name_the_field(tmp_path, change, field):
    d = tiny_spec(tmp_path, tmp_path)
    d.update(change)
    with pytest.raises(ConfigError) as e:
        spec_from_dict(d)
    assert str(e.value).startswith(field), str(e.value)
    assert "\n" not in str(e.value)


def test_base_errors_name_the_field(tmp_path):
    d = tiny_spec(tmp_path, tmp_path)
    d["base"]["overrides"]["trainer.max_steps"] = 0
    with pytest.raises(ConfigError, match=r"^base\.trainer\.max_steps: must be >= 1"):
        spec_from_dict(d)
    d = tiny_spec(tmp_path, tmp_path)
    d["base"]["overrides"]["data.val_images"] = 0
    with pytest.raises(ConfigError, match=r"^base\.data\.val_images:"):
        spec_from_dict(d)


def test_cli_rejects_a_bad_spec_before_ray_is_even_imported(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tmp_path, tmp_path)))
    code = ("import sys; from sparsefold.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, "sweep", str(spec), "scheduler.grace_period=7", "--dry-run"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.stdout.split() == ["2", "False"], out
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line
    assert out.stderr.startswith("config error: scheduler.grace_period:")


def test_overrides_go_to_the_base_or_the_spec(tmp_path):
    spec = spec_from_dict(tiny_spec(tmp_path, tmp_path), None,
                          ["trainer.max_steps=16", "scheduler.grace_period=2", "search.seed=3",
                           "space.model.filters={grid: [8, 16]}", "max_concurrent_trials=1"])
    assert spec.base["trainer"]["max_steps"] == 16 and spec.max_t == 4  # 16 steps / val_every 4
    assert spec.scheduler.grace_period == 2 and spec.search.seed == 3 and spec.max_concurrent_trials == 1
    assert spec.num_trials == 6
    with pytest.raises(ConfigError, match=r"^bogus: unknown key"):
        spec_from_dict(tiny_spec(tmp_path, tmp_path), None, ["bogus=1"])


def test_packaged_specs_validate_and_make_trial_configs(tmp_path):
    spec = load_spec("cscnet_depth_filters", [f"storage={tmp_path}"])
    assert spec.num_trials == 9 and spec.max_t == 8 and spec.scheduler.metric_key == "validation"
    cfg = spec.trial_config({"model.depth": 12, "model.filters": 128}, "abc_00001")
    assert (cfg.model.depth, cfg.model.filters, cfg.noise.sigma) == (12, 128, 25.0)
    assert cfg.ray.enabled and cfg.ray.workers == 1 and cfg.ray.cpus_per_worker == 0.95
    assert Path(cfg.trainer.output_dir) == tmp_path / "cscnet_depth_filters" / "trials"
    assert cfg.trainer.run_name == "cscnet_depth_filters-abc_00001" and cfg.wandb.group == "cscnet_depth_filters"
    assert Path(cfg.data.train).is_absolute() and Path(cfg.data.val).is_absolute()  # trial workers chdir
    loss = load_spec(ROOT / "sweeps" / "cscnet_depth_dict_loss.yaml", [f"storage={tmp_path}"])
    assert loss.search.kind == "optuna" and loss.num_trials == 24
    task = load_spec("pgnet_task_depth_dict_loss", [f"storage={tmp_path}", "task.kind=deblur", "name=deblur"])
    cfg = task.trial_config({"model.depth": 4, "model.filters": 16, "loss.kind": "l1"}, "abc_00002")
    assert (cfg.model.name, cfg.task.kind, cfg.loss.kind, cfg.wandb.group) == ("pgnet", "deblur", "l1", "deblur")
    with pytest.raises(ConfigError, match=r"^space.loss.kind: value .multilayer."):  # pgnet: no layers
        load_spec("pgnet_task_depth_dict_loss", [f"storage={tmp_path}", "space.loss.kind={choice: [mse, multilayer]}"])


def test_tuner_parts_use_ray_tune_searchers_and_asha(tmp_path):
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from sparsefold.sweeps.runner import tuner_parts

    d = tiny_spec(tmp_path, tmp_path, search={"kind": "optuna", "num_samples": 5, "seed": 1},
                  space={"optim.lr": {"loguniform": [1e-4, 1e-2]}, "model.depth": {"randint": [2, 4]},
                         "loss.kind": {"choice": ["mse", "l1"]}})
    space, tune_config, run_config = tuner_parts(spec_from_dict(d))
    assert isinstance(tune_config.search_alg, OptunaSearch) and tune_config.num_samples == 5
    assert (space["model.depth"].lower, space["model.depth"].upper) == (2, 5)  # inclusive spec, exclusive tune
    assert space["optim.lr"].lower == 1e-4 and space["loss.kind"].categories == ["mse", "l1"]
    asha = tune_config.scheduler
    assert isinstance(asha, ASHAScheduler) and asha._time_attr == "validation" and asha._max_t == 3
    assert (tune_config.metric, tune_config.mode, tune_config.max_concurrent_trials) == ("val_psnr", "max", 2)
    _, grid_config, _ = tuner_parts(spec_from_dict(tiny_spec(tmp_path, tmp_path)))
    assert grid_config.search_alg.max_concurrent == 2  # BasicVariantGenerator limits concurrency itself
    assert run_config.name == "tiny" and run_config.storage_path == str(tmp_path)


def test_pareto_front_and_savings():
    costs, psnr = [10, 20, 30, 40, 20], [27.0, 28.0, 27.5, 29.0, 28.0]
    assert pareto_front(costs, psnr) == [True, True, False, True, True]  # equal points do not dominate
    trials = [{"status": "done", "steps": 12, "max_steps": 12, "train_s": 30.0},
              {"status": "stopped", "steps": 4, "max_steps": 12, "train_s": 14.0, "last_iter_s": 4.0, "last_iter_steps": 2},
              {"status": "error", "steps": 0, "max_steps": 12}, {"status": "pending", "steps": 0, "max_steps": 12}]
    s = compute_savings(trials)
    assert (s["steps_trained"], s["steps_budget"], s["saved_fraction"]) == (16, 24, round(1 - 16 / 24, 4))
    assert (s["finished"], s["stopped_early"], s["errored"], s["unfinished"]) == (2, 1, 1, 1)
    # the stopped trial's 8 remaining steps at its last pace (2 steps per 4 s) would have taken 16 s more
    assert (s["trial_seconds"], s["trial_seconds_without_asha"], s["saved_seconds_fraction"]) == (44.0, 60.0, round(16 / 60, 4))


def test_pareto_plot_with_two_trials_of_one_configuration(tmp_path):
    """Optuna sampled (depth 12, filters 32, ssim_mixed) twice in a real 12-trial sweep; identical training
    gave identical scores, and sorting the front's (cost, PSNR, row) tuples then compared the rows (dicts)."""
    row = {"n_params": 1000, "cpu_ms": 5.0, "test_psnr": 27.6, "status": "done", "params": {"model.depth": 12}}
    rows = [{**row, "trial": "a"}, {**row, "trial": "b"}, {**row, "n_params": 500, "cpu_ms": 2.0, "test_psnr": 27.0}]
    pareto_plot(rows, "test_psnr", {}, "tie", tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 0


# ------------------------------------------------------------------ one real sweep on a local cluster
@pytest.fixture(scope="module")
def finished_sweep(ray_cluster, tmp_path_factory, cache_dir):
    from sparsefold.cli import main

    tmp = tmp_path_factory.mktemp("sweep")
    spec_file = tmp / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(tmp / "sweeps", cache_dir)))
    rc = main(["sweep", str(spec_file)])
    sweep_dir = tmp / "sweeps" / "tiny"
    return spec_file, sweep_dir, rc, json.loads((sweep_dir / "summary.json").read_text())


@pytest.mark.ray
def test_tiny_sweep_survives_a_failing_trial(finished_sweep):
    from sparsefold.sweeps.report import best_checkpoint
    from sparsefold.trainers.checkpoint import load_model

    _, sweep_dir, rc, summary = finished_sweep
    assert rc == 0
    trials = {t["params"]["data.batch_size"]: t for t in summary["results"]}
    assert sorted(trials) == [2, 4, 64]
    assert trials[64]["status"] == "error" and "data.batch_size: 64 is more than data.train yields" in trials[64]["error"]
    for bs in (2, 4):
        t = trials[bs]
        assert t["status"] in ("done", "stopped"), t
        assert 4 <= t["steps"] <= 12 and (t["steps"] == 12) == (t["status"] == "done")
        assert t["validations"] == t["steps"] // 4 and t["best_val_psnr"] > 15
        run_dir = Path(t["run_dir"])
        assert run_dir.parent == sweep_dir / "trials" and run_dir.name == f"tiny-{t['trial_id']}"
        ckpt, state, last = best_checkpoint(run_dir, 4, 12)
        assert last["step"] == t["steps"] and abs(state["metrics"]["val/psnr"] - t["best_val_psnr"]) < 1e-6
        model, meta = load_model(ckpt)
        assert meta["run"]["data"]["batch_size"] == bs and meta["run"]["wandb"]["group"] == "tiny"
        assert list((run_dir / "wandb").glob("offline-run-*"))  # one W&B run per trial (rank 0)
    asha = summary["asha"]
    assert asha["finished"] == 2 and asha["errored"] == 1 and asha["steps_budget"] == 24
    assert asha["steps_trained"] == sum(trials[b]["steps"] for b in (2, 4))
    assert list((sweep_dir / "wandb").glob("offline-run-*"))  # the sweep's summary table


@pytest.mark.ray
def test_report_table_and_pareto_png(finished_sweep, capsys, monkeypatch):
    from sparsefold.cli import main

    _, sweep_dir, _, summary = finished_sweep
    test_dir = SHARED / "set12"
    args = ["report", str(sweep_dir), "--images", "2", "--size", "64", "--repeats", "2"]
    args += ["--test-dir", str(test_dir)] if test_dir.is_dir() else ["--no-test"]
    monkeypatch.setattr("sparsefold.cli._stderr_is_terminal", lambda: True)  # the progress bar over the trials
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "report:" in captured.err and "3/3" in captured.err, captured.err
    out = json.loads(captured.out.strip().splitlines()[-1])
    files = {k: Path(v) for k, v in out["files"].items()}
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and files["png"].stat().st_size > 10_000
    rows = json.loads(files["json"].read_text())["rows"]
    assert len(rows) == 3 and len(files["csv"].read_text().strip().splitlines()) == 4
    for r in rows:
        assert r["n_params"] == 3 * 12 * 49 + 12 and r["flops_per_pixel"] > 0 and r["cpu_ms"] > 0
        assert (r["checkpoint"] is None) == (r["status"] == "error")
    if test_dir.is_dir():
        assert out["y"] == "test_psnr" and out["references"] == {"DnCNN-S": 30.44, "BM3D": 29.97}
        assert all((r["test_psnr"] is None) == (r["status"] == "error") for r in rows)
    assert out["asha"] == summary["asha"]
    assert "Pareto front" in files["markdown"].read_text()
    assert list((files["png"].parent / "wandb").glob("offline-run-*"))  # logged to W&B (job_type report)


@pytest.mark.ray
def test_resume_reruns_only_unfinished_trials(finished_sweep):
    from sparsefold.sweeps.runner import run_sweep

    spec_file, sweep_dir, _, before = finished_sweep
    ckpts = sorted(str(p) for p in (sweep_dir / "trials").glob("*/step_*"))
    again = run_sweep(load_spec(spec_file))
    assert ckpts and sorted(str(p) for p in (sweep_dir / "trials").glob("*/step_*")) == ckpts  # nothing re-trained
    strip = lambda s: [{k: t[k] for k in ("trial_id", "status", "steps", "best_val_psnr")} for t in s["results"]]
    assert strip(again) == strip(before)  # the errored trial is not retried without --retry-errored
    with pytest.raises(ConfigError, match=r"^name: .* another spec \(scheduler\.grace_period"):
        run_sweep(load_spec(spec_file, ["scheduler.grace_period=2"]))
    # --retry-errored re-runs the errored trial only (it fails again: its data cannot make a batch)
    (err_file,) = sweep_dir.glob("trial_*/error.txt")
    t0 = err_file.stat().st_mtime
    retried = run_sweep(load_spec(spec_file), retry_errored=True)
    assert err_file.stat().st_mtime > t0
    assert sorted(str(p) for p in (sweep_dir / "trials").glob("*/step_*")) == ckpts
    assert strip(retried) == strip(before)
