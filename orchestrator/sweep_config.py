"""The sweep file (`vlcl sweep SWEEP.yaml`): its schema, its validation against the base run config,
and the search space it resolves to. Everything here runs before Ray starts, so a bad sweep file
fails naming its key."""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.config import (PER_TASK_TRAIN_FIELDS, ConfigError, RunConfig, as_data, read_yaml_mapping,
                                 with_overrides)

TUNE_SPACES_DIR = Path(__file__).resolve().parents[1] / "tune_spaces"

RUN_CONFIG_SECTIONS = set(RunConfig.model_fields)


class SweepConfigError(ConfigError):
    """A sweep file that cannot be run; the message names the file and the field."""


class SweepError(ConfigError):
    """A sweep that cannot start or continue (e.g. nothing to resume); the message says what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamSpec(_Section):
    """One search dimension, in the format of tune_spaces/*.yaml."""

    type: Literal["choice", "uniform", "loguniform", "randint"]
    values: list[Any] | None = Field(None, description="the candidates of a `choice`")
    lower: float | None = Field(None, description="lower bound of uniform / loguniform / randint")
    upper: float | None = Field(None, description="upper bound (randint: exclusive)")

    @model_validator(mode="after")
    def _fields_for_type(self):
        if self.type == "choice":
            if not self.values:
                raise ValueError("type choice needs a non-empty `values` list")
        elif self.lower is None or self.upper is None or not self.lower < self.upper:
            raise ValueError(f"type {self.type} needs `lower` < `upper`")
        elif self.type == "loguniform" and self.lower <= 0:
            raise ValueError("type loguniform needs `lower` > 0")
        return self

    def candidates(self) -> list[Any]:
        """Values to validate against the run config: every choice, or both bounds."""
        if self.type == "choice":
            return list(self.values)
        if self.type == "randint":
            return [int(self.lower), int(self.upper) - 1]
        return [self.lower, self.upper]


class SearchSettings(_Section):
    algorithm: Literal["random", "grid", "optuna", "hyperopt"] = Field(
        "random", description="random / grid (built in); optuna / hyperopt when that package is installed")
    num_samples: int = Field(8, ge=1, description="trials to sample (grid: repeats of the whole grid)")
    seed: int | None = Field(0, description="seeds the sampler so a sweep file always draws the same trials")

    @field_validator("algorithm")
    @classmethod
    def _searcher_installed(cls, algorithm: str) -> str:
        if algorithm in ("optuna", "hyperopt") and importlib.util.find_spec(algorithm) is None:
            raise ValueError(f"{algorithm} needs the `{algorithm}` package, which is not installed "
                             f"(pip install {algorithm}); use random or grid otherwise")
        return algorithm


class ObjectiveSettings(_Section):
    """What a trial is ranked by, computed after every task from the partial accuracy matrix."""

    name: Literal["avg", "last", "seen_avg", "neg_forgetting", "weighted"] = Field(
        "seen_avg", description="avg / last / seen_avg: cl/* accuracy; neg_forgetting: -cl/forgetting; "
                                "weighted: accuracy_weight * seen_avg - forgetting_weight * forgetting")
    accuracy_weight: float = Field(1.0, ge=0, description="a in weighted = a * seen_avg - b * forgetting")
    forgetting_weight: float = Field(1.0, ge=0, description="b in weighted = a * seen_avg - b * forgetting")

    def describe(self) -> str:
        if self.name == "weighted":
            return f"{self.accuracy_weight:g}*seen_avg - {self.forgetting_weight:g}*forgetting"
        return self.name


class SchedulerSettings(_Section):
    type: Literal["asha", "halving", "pbt", "none"] = Field(
        "asha", description="asha: asynchronous successive halving at task boundaries (Ray's ASHA: a trial that "
                            "reaches a rung first always goes on); halving: synchronous successive halving, where "
                            "at each rung every trial waits for the others (all run at once) and only the top "
                            "1/reduction_factor go on; pbt: population-based training, where at a task boundary a "
                            "weak trial continues from a strong trial's whole state with perturbed hyperparameters")
    grace_period: int = Field(1, ge=1, description="asha, halving: tasks every trial trains before the first rung")
    reduction_factor: float = Field(2.0, gt=1, description="asha, halving: keep the top 1/reduction_factor at a rung; "
                                                           "rungs after grace_period * reduction_factor**k tasks")
    perturbation_interval: int = Field(1, ge=1, description="pbt: tasks between exploit/explore steps")
    quantile_fraction: float = Field(
        0.25, gt=0, le=0.5, description="pbt: the bottom fraction copies a trial of the top fraction")
    resample_probability: float = Field(
        0.25, ge=0, le=1, description="pbt: chance that an explored value is drawn anew from the space rather than "
                                      "the donor's value scaled by 0.8 or 1.2")


class StopRule(_Section):
    """End a trial once `metric` exceeds `max` after it has trained `after_task` tasks."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    metric: Literal["cl/forgetting", "zero_shot_drop"] = Field(
        description="cl/forgetting (Chaudhry) or zero_shot_drop = cl/zero_shot - cl/last (all tasks)")
    max: float = Field(description="the bound; the trial stops when the metric is above it")
    after_task: int = Field(1, ge=1, description="check from this many tasks trained on")

    def violated(self, result: dict) -> bool:
        value = result.get(self.metric)
        if value is None or result.get("task", 0) < self.after_task:
            return False
        value = float(value)
        return not math.isnan(value) and value > self.max


class ResourceSettings(_Section):
    """Resources of one trial; unset fields keep the base run config's train.* values."""

    workers: int | None = Field(None, ge=1, description="Ray Train workers per trial (train.num_workers)")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs per training worker (train.cpus_per_worker)")
    use_gpu: bool | Literal["auto"] | None = Field(None, description="one GPU per worker (train.use_gpu)")
    trial_cpus: float = Field(
        0.0, ge=0, description="CPUs held by the trial's own process; it mostly waits on its trainer, and Ray Data "
                               "needs the cores to decode each task before the training workers start")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="trials at once; default: as many as the cluster's CPUs and GPUs hold")

    def train_overrides(self) -> dict[str, Any]:
        pairs = {"train.num_workers": self.workers, "train.cpus_per_worker": self.cpus_per_worker,
                 "train.use_gpu": self.use_gpu}
        return {k: v for k, v in pairs.items() if v is not None}


class SweepConfig(_Section):
    name: str | None = Field(None, description="sweep name (default: the sweep file's name)")
    base: Union[str, dict[str, Any]] = Field(description="run config: a YAML path (relative to the sweep file) or a mapping")
    space: dict[str, Any] = Field(default_factory=dict, description="search dimensions over tune_spaces/<method>.yaml")
    use_default_space: bool = Field(True, description="start from tune_spaces/<method>.yaml's space")
    search: SearchSettings = Field(default_factory=SearchSettings)
    objective: ObjectiveSettings = Field(default_factory=ObjectiveSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    stop: list[StopRule] = Field(default_factory=list, description="stop rules, e.g. forgetting above 0.3 after task 2")
    resources: ResourceSettings = Field(default_factory=ResourceSettings)
    storage_path: str = Field("vlcl_sweeps", description="where Tune keeps the sweep's state (shared on a cluster)")
    share_starting_model_results: bool = Field(
        True, description="trials that start from the same model compute once per sweep what depends on that model "
                          "alone: the zero-shot row (same eval sets; runs tagged vlcl.zero_shot) and the method's "
                          "initial-model features, e.g. ZSCL's teacher features of the reference texts (same inputs; "
                          "runs tagged vlcl.initial_model_features); the first trial computes, the others take it")


@dataclass


class SweepPlan:
    """A validated sweep: the base run config, the resolved search space and the settings."""

    config: SweepConfig
    name: str
    base: RunConfig
    space: dict[str, Any]  # dotted run-config key -> ParamSpec or a fixed value
    source: str = "sweep config"


def _format_validation(err: ValidationError, source: str, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        where = prefix + ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg'].removeprefix('Value error, ')}")
    return f"invalid sweep config ({source}):\n" + "\n".join(lines)


def load_sweep_config(path: str | os.PathLike) -> SweepPlan:
    path = Path(path)
    raw = read_yaml_mapping(path, SweepConfigError, "sweep config", "with at least `base`")
    return plan_sweep(raw, source=str(path), relative_to=path.parent, default_name=path.stem)


def plan_sweep(raw: dict, *, source: str = "sweep config", relative_to: Path | None = None,
               default_name: str = "sweep") -> SweepPlan:
    """Validate a sweep mapping: settings, base run config, and every value the space can take."""
    try:
        config = SweepConfig(**raw)
    except ValidationError as err:
        raise SweepConfigError(_format_validation(err, source)) from None
    base = _load_base(config, source, relative_to)
    space = resolve_space(config, base, source)
    return SweepPlan(config=config, name=config.name or default_name, base=base, space=space, source=source)


def _load_base(config: SweepConfig, source: str, relative_to: Path | None) -> RunConfig:
    from orchestrator.config import load_base_config

    base = load_base_config(config.base, source=source, relative_to=relative_to, error=SweepConfigError)
    try:
        return with_overrides(base, config.resources.train_overrides())
    except ConfigError as err:
        raise SweepConfigError(f"{source}: resources: {err}") from None


def default_space(method: str) -> dict[str, Any]:
    path = TUNE_SPACES_DIR / f"{method}.yaml"
    if not path.is_file():
        return {}
    return dict(yaml.safe_load(path.read_text()).get("space") or {})


def run_config_key(key: str) -> str:
    """Space keys as in tune_spaces: bare = a method hyperparameter, `section.field` = run config."""
    return key if key.split(".", 1)[0] in RUN_CONFIG_SECTIONS and "." in key else f"method.hparams.{key}"


def resolve_space(config: SweepConfig, base: RunConfig, source: str = "sweep config") -> dict[str, Any]:
    """Default space of the base method, overridden key by key; every candidate value is checked
    against the run config so a bad range fails now, naming the space key, not in a trial."""
    merged = default_space(base.method.name) if config.use_default_space else {}
    merged.update(config.space)
    resolved: dict[str, Any] = {}
    problems = []
    for key, spec in merged.items():
        if spec is None:
            continue
        dotted = run_config_key(key)
        if isinstance(spec, dict):
            try:
                spec = ParamSpec(**spec)
            except ValidationError as err:
                problems.extend(f"  space.{key}: {e['msg'].removeprefix('Value error, ')}" for e in err.errors())
                continue
            candidates = spec.candidates()
        else:
            candidates = [spec]  # a fixed value for every trial
        for value in candidates:
            try:
                with_overrides(base, {dotted: value})
            except (ConfigError, ValueError) as err:
                detail = str(err).splitlines()[-1].strip()
                problems.append(f"  space.{key} (= {dotted}) value {value!r}: {detail}")
                break
        resolved[dotted] = spec
    if config.search.algorithm == "grid":
        for dotted, spec in resolved.items():
            if isinstance(spec, ParamSpec) and spec.type != "choice":
                problems.append(f"  space {dotted}: grid search needs `type: choice` with `values`, not {spec.type}")
    if config.scheduler.type in ("pbt", "halving"):
        cap, population = config.resources.max_concurrent_trials, trial_count(config, resolved)
        if cap is not None and cap < population:
            problems.append(f"  resources.max_concurrent_trials: {config.scheduler.type} compares the whole "
                            f"population at every {'task boundary' if config.scheduler.type == 'pbt' else 'rung'}, "
                            f"so all {population} trials run at once; set it to at least "
                            f"that (search.num_samples, times the grid's size for grid search) or leave it unset")
    if config.scheduler.type == "pbt":
        if config.search.algorithm not in ("random", "grid"):
            problems.append(f"  search.algorithm: pbt explores by itself; use random or grid for its starting "
                            f"population, not {config.search.algorithm}")
        if not any(isinstance(spec, ParamSpec) and per_task_key(dotted, base) for dotted, spec in resolved.items()):
            problems.append("  space: scheduler pbt changes hyperparameters between tasks, and no key of the space "
                            "can change there; search train.{" + ",".join(PER_TASK_TRAIN_FIELDS)
                            + "} or a method hyperparameter that is not fixed for the whole run")
    if not any(isinstance(spec, ParamSpec) for spec in resolved.values()):
        problems.append(f"  space: nothing to search (tune_spaces/{base.method.name}.yaml has no space, or every key "
                        f"was removed); add keys under `space`")
    if problems:
        raise SweepConfigError(f"invalid sweep config ({source}):\n" + "\n".join(problems))
    return resolved


def trial_count(config: SweepConfig, space: dict[str, Any]) -> int:
    """How many trials a sweep over `space` starts: num_samples, times every grid's size for grid search."""
    size = config.search.num_samples
    if config.search.algorithm == "grid":
        for spec in space.values():
            if isinstance(spec, ParamSpec):
                size *= len(spec.values)
    return size


def population_size(plan: SweepPlan) -> int:
    return trial_count(plan.config, plan.space)


def per_task_key(dotted: str, base: RunConfig) -> bool:
    """Whether `dotted` may differ from task to task (`per_task`), so PBT may perturb it mid-run."""
    from methods import get_method

    section, _, field_name = dotted.partition(".")
    if section == "train":
        return field_name in PER_TASK_TRAIN_FIELDS
    if section == "method" and field_name.startswith("hparams."):
        return field_name[len("hparams."):] not in get_method(base.method.name).fixed_hparams
    return False


def pbt_keys(plan: SweepPlan) -> list[str]:
    """The dimensions PBT perturbs at task boundaries: the searched keys that `per_task` can set.
    The other searched keys keep the value each trial started with (or, after an exploit, the
    donor's, which is what its copied state was trained with)."""
    return [dotted for dotted, spec in plan.space.items() if isinstance(spec, ParamSpec) and per_task_key(dotted, plan.base)]


def schedule_config(base: RunConfig, params: dict[str, Any], task_settings: list[dict],
                    mutable: list[str]) -> RunConfig:
    """A run config that replays a PBT trial: its final parameters, and for every task the values of
    the perturbed keys that task trained with (`per_task`, keyed by task name)."""
    per_task: dict[str, dict[str, Any]] = {}
    for settings in task_settings:
        values = {}
        for dotted in mutable:
            field_name = dotted.rsplit(".", 1)[-1]
            values[dotted] = settings["hparams"][field_name] if dotted.startswith("method.") else settings[field_name]
        per_task[settings["task"]] = values
    config = with_overrides(base, params)
    return RunConfig(**{**as_data(config), "per_task": per_task})
