"""Sweep specs: one YAML file = a base training config + a search space + a searcher/scheduler + a budget.

    name: cscnet_depth_filters            # sweep dir <storage>/<name>; W&B group = name
    storage: runs/sweeps
    base:                                 # a training config: a file (+ overrides) or inline sections
      config: cscnet_bsd432.yaml          # relative to the spec, the cwd, or sparsefold/configs/
      overrides: {noise.sigma: 25, trainer.max_steps: 600}
    space:                                # dotted run-config keys -> one Ray Tune domain each
      model.depth: {grid: [4, 8, 12]}     # grid: every value (cross product over grid keys)
      loss.kind: {choice: [mse, l1]}      # choice / uniform / loguniform [lo, hi] / randint [lo, hi]
    search: {kind: grid}                  # grid | random | optuna (TPE); num_samples, metric, mode, seed
    scheduler: {kind: asha, time_attr: validations, grace_period: 1, reduction_factor: 3}
    resources: {workers: 1, cpus_per_worker: 1.0, gpus_per_worker: 0}
    max_concurrent_trials: 2

Time attribute of the scheduler: ``validations`` counts a trial's validation reports, k = ⌈step /
trainer.val_every⌉ (computed from the step, so it survives a resumed trial); ``steps`` is the optimizer
step of the report. ASHA compares trials at the first report at or after each rung (grace_period ·
reduction_factorⁱ) and ``max_t`` is the trial length in that unit (0: derived from the base config; it
must equal the length of every trial). ``randint`` bounds are inclusive.

Everything is checked before Ray starts: a bad key or value raises :class:`ConfigError` with one line
naming the field (``space.model.depth: value 0 gives an invalid run config (model.depth: must be >= 1,
got 0)``), and every point of the space (all grid/choice values, both bounds and an interior point of
continuous ranges, crossed) must build a valid :class:`RunConfig`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sparsefold.config import (
    SECTIONS,
    ConfigError,
    RunConfig,
    apply_overrides,
    check,
    dataclass_from_dict,
    to_dict,
)

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
METRICS = ("val_psnr", "val/ssim")
SET_BY_SWEEP = {"ray.enabled", "ray.workers", "ray.cpus_per_worker", "runtime.use_gpu", "trainer.output_dir",
                "trainer.use_ray", "trainer.workers", "trainer.cpus_per_worker", "trainer.use_gpu",  # their old names
                "trainer.run_name", "trainer.progress", "trainer.resume", "wandb.group"}
SPEC_KEYS = ("name", "storage", "base", "space", "search", "scheduler", "resources",
             "max_concurrent_trials", "max_failures")
SPEC_FILE = "sweep_spec.json"  # the resolved spec, saved in the sweep dir (read back by the report and resume)
MAX_PROBES = 4096  # crossed probe points checked; above that each key is checked alone


@dataclass(frozen=True, kw_only=True)
class Dim:
    """One searched key: ``grid``/``choice`` values, or ``uniform``/``loguniform``/``randint`` [lo, hi]."""

    key: str
    kind: str
    values: tuple

    def __post_init__(self) -> None:
        name = f"space.{self.key}"
        check(len(self.key.split(".")) == 2 and all(self.key.split(".")), name, "keys look like section.field")
        check(self.key not in SET_BY_SWEEP, name, "is set by the sweep itself (see resources / name)")
        check(self.kind in KINDS, name, f"unknown domain {self.kind!r} (valid: {', '.join(KINDS)})")
        check(len(self.values) >= 1 and all(isinstance(v, (str, int, float, bool)) for v in self.values),
              name, f"{self.kind} needs a non-empty list of scalars, got {list(self.values)}")
        if self.kind in ("uniform", "loguniform", "randint"):
            lo_hi = self.values
            check(len(lo_hi) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in lo_hi)
                  and lo_hi[0] < lo_hi[1], name, f"{self.kind} needs [lo, hi] numbers with lo < hi, got {list(lo_hi)}")
            check(self.kind != "loguniform" or lo_hi[0] > 0, name, f"loguniform needs lo > 0, got {lo_hi[0]}")
            check(self.kind != "randint" or all(float(v).is_integer() for v in lo_hi), name,
                  f"randint needs integer bounds, got {list(lo_hi)}")

    def probes(self) -> list:
        """Values checked before Ray starts: every grid/choice value; bounds plus an interior point."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        lo, hi = self.values
        if self.kind == "randint":
            return [int(lo), int(hi)]
        inner = math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) / math.pi) if self.kind == "loguniform" \
            else lo + (hi - lo) / math.pi  # a non-round interior value: catches an int field searched by uniform
        return [float(lo), float(hi), inner]

    def domain(self) -> Any:
        """The Ray Tune search domain."""
        from ray import tune

        lo, hi = (self.values + (None,))[:2]
        return {"grid": lambda: tune.grid_search(list(self.values)), "choice": lambda: tune.choice(list(self.values)),
                "uniform": lambda: tune.uniform(lo, hi), "loguniform": lambda: tune.loguniform(lo, hi),
                "randint": lambda: tune.randint(int(lo), int(hi) + 1)}[self.kind]()  # tune's upper is exclusive


@dataclass(frozen=True, kw_only=True)
class SearchSpec:
    kind: str = "grid"  # grid: every grid point once | random: num_samples draws | optuna: TPE
    num_samples: int = 1
    metric: str = "val_psnr"
    mode: str = "max"
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.kind in ("grid", "random", "optuna"), "kind", f"unknown search {self.kind!r} (grid, random, optuna)")
        check(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        check(self.metric in METRICS, "metric", f"must be one of {', '.join(METRICS)}, got {self.metric!r}")
        check(self.mode in ("max", "min"), "mode", f"must be max or min, got {self.mode!r}")


@dataclass(frozen=True, kw_only=True)
class SchedulerSpec:
    kind: str = "none"  # none | asha (Ray Tune's ASHAScheduler)
    time_attr: str = "validations"  # validations | steps
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int = 0  # 0: the trial length in time_attr units, from the base config

    def __post_init__(self) -> None:
        check(self.kind in ("none", "asha"), "kind", f"unknown scheduler {self.kind!r} (none, asha)")
        check(self.time_attr in ("validations", "steps"), "time_attr", f"must be validations or steps, got {self.time_attr!r}")
        check(self.grace_period >= 1, "grace_period", f"must be >= 1, got {self.grace_period}")
        check(self.reduction_factor > 1, "reduction_factor", f"must be > 1, got {self.reduction_factor}")
        check(self.max_t >= 0, "max_t", f"must be >= 0 (0: derived), got {self.max_t}")

    @property
    def metric_key(self) -> str:
        """The reported metric ASHA reads as time (see ForwardToTune in runner.py)."""
        return {"validations": "validation", "steps": "step"}[self.time_attr]

    def length(self, cfg: RunConfig) -> int:
        """Length of a trial of ``cfg`` in ``time_attr`` units (the loop also validates at the last step)."""
        t = cfg.trainer
        return t.max_steps if self.time_attr == "steps" else math.ceil(t.max_steps / t.val_every)


@dataclass(frozen=True, kw_only=True)
class ResourceSpec:
    workers: int = 1  # Ray Train workers per trial (DDP when > 1)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # fractions share a GPU between small trials
    driver_cpus: float = 0.01  # the Tune trial driver that launches the TorchTrainer (0 is invalid in Tune)

    def __post_init__(self) -> None:
        check(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        check(self.cpus_per_worker > 0, "cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        check(self.gpus_per_worker >= 0, "gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        check(self.driver_cpus > 0, "driver_cpus", f"must be > 0 (Tune rejects 0), got {self.driver_cpus}")

    @property
    def cpus_per_trial(self) -> float:
        return self.driver_cpus + self.workers * self.cpus_per_worker


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    name: str
    storage: str  # absolute local (or shared-filesystem) path; the sweep dir is storage/name
    base: dict  # the resolved base run config (absolute data paths)
    space: tuple[Dim, ...]
    search: SearchSpec = field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    max_concurrent_trials: int = 2
    max_failures: int = 0  # Tune retries of a failed trial (the Train run resumes from its checkpoint)

    def __post_init__(self) -> None:
        check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}", self.name)), "name",
              f"letters, digits, '_', '-', '.' (at most 48), got {self.name!r}")
        check("://" not in self.storage, "storage", "a local or shared-filesystem path (trial runs write there)")
        check(len(self.space) >= 1, "space", "needs at least one searched key")
        check(len({d.key for d in self.space}) == len(self.space), "space", "a key appears twice")
        check(self.max_concurrent_trials >= 1, "max_concurrent_trials", f"must be >= 1, got {self.max_concurrent_trials}")
        check(self.max_failures >= -1, "max_failures", f"must be >= -1 (-1 retries forever), got {self.max_failures}")
        grid = [d.key for d in self.space if d.kind == "grid"]
        if self.search.kind == "grid":
            other = [d.key for d in self.space if d.kind != "grid"]
            check(not other, f"space.{other[0] if other else ''}", "search.kind=grid takes only grid keys (use random)")
            check(self.search.num_samples == 1, "search.num_samples", "grid runs each point once (use kind: random)")
        if self.search.kind == "optuna":
            check(not grid, f"space.{grid[0] if grid else ''}", "optuna cannot search a grid (use choice)")
        base = self.base_config()
        check(base.data.val_images >= 1 and bool(base.data.val), "base.data.val_images",
              f"{self.search.metric} needs validation images (data.val_images >= 1)")
        self._check_points()

    # ------------------------------------------------------------------ trial configs
    @property
    def sweep_dir(self) -> Path:
        return Path(self.storage) / self.name

    def base_config(self) -> RunConfig:
        try:
            return RunConfig.from_dict(self.base)
        except ConfigError as e:
            raise ConfigError(f"base.{e}") from None

    def trial_config(self, point: dict[str, Any], trial_id: str) -> RunConfig:
        """The RunConfig of one trial: base + the point's values + what the sweep fixes (Ray Train run
        ``<sweep dir>/trials/<name>-<trial_id>``, resumable; resources; W&B group)."""
        keys = sorted(point, key=lambda k: k != "model.name")  # a new model.name resets the model section first
        d = apply_overrides(self.base, [f"{k}={json.dumps(point[k])}" for k in keys])
        r = self.resources
        d = apply_overrides(d, [
            "ray.enabled=true", f"ray.workers={r.workers}", f"ray.cpus_per_worker={r.cpus_per_worker}",
            f"runtime.use_gpu={str(r.gpus_per_worker > 0).lower()}", f"trainer.output_dir={json.dumps(str(self.sweep_dir / 'trials'))}",
            f"trainer.run_name={self.name}-{trial_id}", "trainer.progress=false", "trainer.resume=true",
            f"wandb.group={self.name}"])
        return RunConfig.from_dict(d)

    def _check_points(self) -> None:
        probes = [d.probes() for d in self.space]
        if math.prod(len(p) for p in probes) <= MAX_PROBES:
            points = list(itertools.product(*probes))
        else:  # each key alone, the others at their first probe
            points = [tuple(v if j == i else p[0] for j, p in enumerate(probes)) for i, d in enumerate(self.space)
                      for v in d.probes()]
        lengths = set()
        for values in points:
            point = {d.key: v for d, v in zip(self.space, values)}
            try:
                cfg = self.trial_config(point, "probe")
            except ConfigError as e:
                field_name = str(e).split(":", 1)[0]
                bad = next((d for d in self.space if d.key == field_name), None)
                if bad is not None:
                    hint = " (uniform draws non-integers: use randint)" if bad.kind in ("uniform", "loguniform") \
                        and "integer" in str(e) else ""
                    raise ConfigError(f"space.{bad.key}: value {point[bad.key]!r} gives an invalid run config "
                                      f"({e}){hint}") from None
                raise ConfigError(f"space: point {point} gives an invalid run config ({e})") from None
            lengths.add(self.scheduler.length(cfg))
        if self.scheduler.kind == "asha":
            s, unit = self.scheduler, self.scheduler.time_attr
            check(len(lengths) == 1, "scheduler.max_t", f"trials differ in length ({sorted(lengths)} {unit}); ASHA "
                  "compares trials at equal time: keep trainer.max_steps / val_every out of the space")
            (length,) = lengths
            check(s.max_t in (0, length), "scheduler.max_t", f"must equal the trial length, {length} {unit} "
                  f"(trainer.max_steps / val_every), or 0 to derive it; got {s.max_t}")
            check(s.grace_period < length, "scheduler.grace_period",
                  f"must be below the trial length ({length} {unit}), got {s.grace_period}")

    @property
    def max_t(self) -> int:
        return self.scheduler.max_t or self.scheduler.length(self.base_config())

    @property
    def num_trials(self) -> int:
        grid = math.prod(len(d.values) for d in self.space if d.kind == "grid")
        return self.search.num_samples * (grid if self.search.kind != "optuna" else 1)

    def to_dict(self) -> dict[str, Any]:
        """The spec in its YAML shape with the base inline (saved in the sweep dir; reloadable)."""
        out = {k: getattr(self, k) for k in ("name", "storage", "base", "max_concurrent_trials", "max_failures")}
        out["space"] = {d.key: {d.kind: list(d.values)} for d in self.space}
        out.update({k: to_dict(getattr(self, k)) for k in ("search", "scheduler", "resources")})
        return json.loads(json.dumps(out))


# ------------------------------------------------------------------ loading
def _abs_data_path(spec: str) -> str:
    """Make the local paths of a data spec absolute (trial workers chdir); keep URLs and builtin sets."""
    def one(p: str) -> str:
        p = p.strip()
        return p if not p or re.match(r"^[a-z][a-z0-9+]*:", p) else os.path.abspath(os.path.expanduser(p))
    for sep in ("|", "::"):
        if sep in spec:
            return sep.join(one(p) for p in spec.split(sep))
    return one(spec)


def _find(name: str, root: Path | None) -> Path:
    """A base config: relative to the spec's folder, the cwd, or a packaged config (sparsefold/configs)."""
    packaged = Path(str(resources.files("sparsefold") / "configs" / name))
    for p in ([root / name] if root else []) + [Path(name), packaged]:
        if p.is_file():
            return p
    raise ConfigError(f"base.config: no such file {name!r}")


def resolve_base(base: Any, root: Path | None, extra: list[str]) -> dict[str, Any]:
    """``base``: a config path, or {config: path, overrides: {dotted: value} | [k=v], <section>: {...}}."""
    base = {"config": base} if isinstance(base, str) else base
    check(isinstance(base, dict), "base", f"a config path or a mapping, got {base!r}")
    d: dict[str, Any] = {}
    if base.get("config"):
        path = _find(str(base["config"]), root)
        d = yaml.safe_load(path.read_text()) or {}
    for k, v in base.items():
        if k not in ("config", "overrides"):
            check(k in SECTIONS or k == "model", f"base.{k}", f"unknown section (valid: model, {', '.join(SECTIONS)})")
            check(isinstance(v, dict), f"base.{k}", "expected a mapping")
            d[k] = {**(d.get(k) or {}), **v} if not (k == "model" and "name" in v) else dict(v)
    ov = base.get("overrides") or {}
    ov = [f"{k}={json.dumps(v)}" for k, v in ov.items()] if isinstance(ov, dict) else list(ov)
    try:
        d = apply_overrides(d, ov + extra)
    except ConfigError as e:
        raise ConfigError(f"base.overrides: {e}") from None
    data = d.setdefault("data", {})
    for key in ("train", "val", "cache_dir"):
        if isinstance(data.get(key), str) and data[key]:
            data[key] = _abs_data_path(data[key])
    return d


def spec_from_dict(d: dict[str, Any], root: Path | None = None, overrides: list[str] | tuple = ()) -> SweepSpec:
    """Build and validate a spec; ``overrides`` are ``key=value``: run-config keys (``trainer.max_steps=50``)
    go to the base, spec keys (``scheduler.grace_period=2``, ``name=x``) to the spec."""
    check(isinstance(d, dict), "spec", "must hold a mapping")
    d = json.loads(json.dumps(d, default=str))
    base_ov = []
    for item in overrides:
        check("=" in item, item, "overrides look like key=value")
        key, raw = item.split("=", 1)
        head = key.split(".")[0]
        if head in SECTIONS or head == "model":
            base_ov.append(item)
        elif head in SPEC_KEYS and head != "base":
            value = yaml.safe_load(raw) if raw else ""
            if head == "space":
                d.setdefault("space", {})[key.split(".", 1)[1]] = value
            elif "." in key:
                d.setdefault(head, {})[key.split(".", 1)[1]] = value
            else:
                d[head] = value
        else:
            raise ConfigError(f"{key}: unknown key (spec: {', '.join(SPEC_KEYS)}; run config: model, {', '.join(SECTIONS)})")
    unknown = sorted(set(d) - set(SPEC_KEYS))
    check(not unknown, unknown[0] if unknown else "", f"unknown key (valid: {', '.join(SPEC_KEYS)})")
    check("name" in d and "base" in d and "space" in d, "spec", "needs name, base and space")
    space = d["space"]
    check(isinstance(space, dict), "space", "expected a mapping of dotted keys to {grid|choice|...: values}")
    dims = []
    for key, dom in space.items():
        check(isinstance(dom, dict) and len(dom) == 1, f"space.{key}", f"expected one of {{{', '.join(KINDS)}: [...]}}, got {dom!r}")
        ((kind, values),) = dom.items()
        check(isinstance(values, list), f"space.{key}", f"{kind} takes a list, got {values!r}")
        if key in ("data.train", "data.val", "data.cache_dir") and kind in ("grid", "choice"):
            values = [_abs_data_path(v) if isinstance(v, str) else v for v in values]  # trial workers chdir
        dims.append(Dim(key=key, kind=kind, values=tuple(values)))
    sections = {k: dataclass_from_dict(cls, d.get(k) or {}, k)
                for k, cls in (("search", SearchSpec), ("scheduler", SchedulerSpec), ("resources", ResourceSpec))}
    simple = dataclass_from_dict(_Simple, {k: d[k] for k in ("max_concurrent_trials", "max_failures") if k in d}, "spec")
    storage = str(d.get("storage") or "runs/sweeps")
    check("://" not in storage, "storage", "a local or shared-filesystem path (trial runs write there)")
    storage = os.path.abspath(os.path.expanduser(storage))
    return SweepSpec(name=str(d["name"]), storage=storage, base=resolve_base(d["base"], root, base_ov),
                     space=tuple(dims), max_concurrent_trials=simple.max_concurrent_trials,
                     max_failures=simple.max_failures, **sections)


@dataclass(frozen=True, kw_only=True)
class _Simple:
    max_concurrent_trials: int = 2
    max_failures: int = 0


def load_spec(ref: str | Path, overrides: list[str] | tuple = ()) -> SweepSpec:
    """A spec file, or the name of a packaged spec (``cscnet_depth_filters``), plus ``key=value`` overrides."""
    p = Path(ref)
    if not p.is_file():
        packaged = Path(str(resources.files("sparsefold.sweeps") / f"{p.stem}.yaml"))
        check(packaged.is_file() and p.parent == Path("."), "spec", f"no such file {str(ref)!r}")
        p = packaged
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"spec: {p} is not valid YAML ({str(e).splitlines()[0]})") from None
    return spec_from_dict(d, p.resolve().parent, overrides)


def saved_spec(sweep_dir: Path) -> SweepSpec:
    """The resolved spec a sweep dir was started with."""
    f = Path(sweep_dir) / SPEC_FILE
    if not Path(sweep_dir).is_dir():
        raise ConfigError(f"sweep_dir: no such directory {str(sweep_dir)!r}")
    if not f.is_file():
        raise ConfigError(f"sweep_dir: {sweep_dir} has no {SPEC_FILE} (not a sparsefold sweep)")
    return spec_from_dict(json.loads(f.read_text()))
