"""The run config split by concern (``trainer`` / ``runtime`` / ``ray``) and the old ``trainer.*`` keys.

Older configs, command lines and checkpoints use ``trainer.use_ray``, ``trainer.workers``, ``trainer.use_gpu``,
``trainer.precision``, ``trainer.amp``, ...: they keep working under their new names, a user's file or override
says so once on stderr, a stored checkpoint config loads silently, and the run name (the folder a re-run
resumes) is the one the unsplit config gave.
"""

from __future__ import annotations

import json

import pytest

from sparsefold.config import (
    RENAMED,
    ConfigError,
    RayConfig,
    RuntimeConfig,
    TrainerConfig,
    load_config,
    run_config_from_dict,
)
from sparsefold.trainers.checkpoint import config_changes
from sparsefold.trainers.storage import default_run_name

OLD = ["trainer.use_ray=true", "trainer.workers=2", "trainer.cpus_per_worker=0.5", "trainer.max_failures=3",
       "trainer.use_gpu=true", "trainer.precision=bf16", "trainer.compile=true", "trainer.channels_last=true",
       "trainer.threads=2"]
NEW = ["ray.enabled=true", "ray.workers=2", "ray.cpus_per_worker=0.5", "ray.max_failures=3",
       "runtime.use_gpu=true", "runtime.precision=bf16", "runtime.compile=true", "runtime.channels_last=true",
       "runtime.threads=2"]


def test_each_concern_has_its_section():
    trainer, runtime, ray = (set(c.__dataclass_fields__) for c in (TrainerConfig, RuntimeConfig, RayConfig))
    assert runtime == {"use_gpu", "precision", "compile", "channels_last", "threads", "fused"}
    assert ray == {"enabled", "workers", "cpus_per_worker", "max_failures"}
    assert not trainer & (runtime | ray) and "amp" not in trainer  # amp overlapped precision: gone
    # every runtime/ray key that used to live in trainer is renamed (fused came after the split)
    assert {k.split(".")[1] for k in RENAMED} == (runtime - {"fused"}) | (ray - {"enabled"}) | {"use_ray"}


def test_old_override_keys_mean_the_new_ones_and_say_so(capsys):
    old, new = load_config(None, OLD), load_config(None, NEW)
    assert old == new and new.ray.workers == 2 and new.runtime.precision == "bf16"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(OLD)  # one line per old key, none for the new ones
    assert "[sparsefold] deprecated: trainer.use_ray is now ray.enabled" in err[0]


def test_old_keys_in_a_file(tmp_path, capsys):
    path = tmp_path / "old.yaml"
    path.write_text("trainer:\n  max_steps: 7\n  use_ray: true\n  workers: 2\n  amp: false\n")
    cfg = load_config(path)
    assert (cfg.trainer.max_steps, cfg.ray.enabled, cfg.ray.workers, cfg.runtime.precision) == (7, True, 2, "fp32")
    assert "trainer.amp=false: use runtime.precision (fp32" in capsys.readouterr().err
    assert load_config(None, ["trainer.amp=true"]).runtime.precision == "auto"  # amp=true was the default


@pytest.mark.parametrize(("text", "message"), [
    ("trainer: {use_ray: true}\nray: {enabled: false}\n", "ray.enabled: given twice, also as trainer.use_ray"),
    ("trainer: {amp: false}\nruntime: {precision: bf16}\n", "runtime.precision: given twice, also as trainer.amp"),
    ("trainer: {workers: 0, use_ray: true}\n", "ray.workers: must be >= 1"),
])
def test_a_key_given_under_both_names_or_a_bad_old_value_is_one_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_config(path)


def test_amp_false_agrees_with_an_auto_or_fp32_precision(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer: {amp: false, precision: auto}\n")
    assert load_config(path).runtime.precision == "fp32"


def old_stored(cfg_dict: dict) -> dict:
    """A config.json ``run`` of a checkpoint written before the split: everything in ``trainer``."""
    d = json.loads(json.dumps(cfg_dict))
    runtime, ray = d.pop("runtime"), d.pop("ray")
    del runtime["fused"]  # added after the split (issue 17): an old checkpoint has no such key
    d["trainer"].update(runtime, use_ray=ray["enabled"], workers=ray["workers"],
                        cpus_per_worker=ray["cpus_per_worker"], max_failures=ray["max_failures"], amp=True)
    return d


def test_an_old_checkpoint_config_loads_silently_and_its_resume_check_still_sees_precision(capsys):
    cfg = load_config(None, ["runtime.precision=bf16", "ray.enabled=true"])
    stored = old_stored(cfg.to_dict())
    assert run_config_from_dict(stored) == cfg
    assert capsys.readouterr().err == ""
    assert config_changes(stored, cfg.to_dict()) == []
    fp32 = load_config(None, ["runtime.precision=fp32", "ray.enabled=true", "runtime.threads=1"])
    assert config_changes(stored, fp32.to_dict()) == ["runtime.precision: 'bf16' -> 'fp32'"]  # threads may change


def test_the_run_name_is_the_one_the_unsplit_config_gave(monkeypatch, tmp_path):
    """Computed with the code before the split (same configs, same canonical paths): a re-run of an existing
    experiment must find its folder to resume it."""
    monkeypatch.chdir(tmp_path)
    assert default_run_name(load_config(None, [])) == "cscnet-61e36639"
    dncnn = load_config(None, ["model.name=dncnn", "noise.sigma=15", "ray.enabled=true", "ray.workers=2",
                               "runtime.precision=bf16"])
    assert default_run_name(dncnn) == "dncnn-ray-398828e3"
    # an option added since (run_name: if_set) names another experiment only when set away from its default
    assert default_run_name(load_config(None, ["model.negative_threshold=clamp"])) == "cscnet-61e36639"
    assert default_run_name(load_config(None, ["model.negative_threshold=official"])) != "cscnet-61e36639"
