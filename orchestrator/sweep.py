"""Hyperparameter sweeps where one trial is one whole task sequence (`vlcl sweep SWEEP.yaml`).

Every trial runs `run_sequence` (a Ray Train TorchTrainer over all tasks) inside a Ray Tune
function trainable; the trainer's per-task reports reach Tune through a Train callback that also
computes the sweep's objective. ASHA compares trials at task boundaries (`time_attr="task"`), and
stop rules end trials whose forgetting or zero-shot drop passes a bound. MLflow: the sweep is a
parent run, each trial a child run; the parent ends with the leaderboard, the best config and a
plot of the objective per task for every trial.

A sweep file:

    base: configs/digits.yaml        # a run config path (relative to this file) or an inline mapping
    space:                           # merged over tune_spaces/<method>.yaml's `space`
      train.lr: {type: loguniform, lower: 1.0e-5, upper: 1.0e-2}
      label_smoothing: null          # drop a default key
    search: {algorithm: random, num_samples: 8, seed: 0}
    objective: {name: weighted, accuracy_weight: 1.0, forgetting_weight: 0.5}
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
    stop: [{metric: cl/forgetting, max: 0.3, after_task: 2}]
    resources: {workers: 1, cpus_per_worker: 4, use_gpu: true}
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.config import (PER_TASK_TRAIN_FIELDS, ConfigError, RunConfig, as_data, read_yaml_mapping, to_yaml,
                                 with_overrides)

TUNE_SPACES_DIR = Path(__file__).resolve().parents[1] / "tune_spaces"
SWEEP_STATE_FILE = "vlcl_sweep.json"
RUN_CONFIG_SECTIONS = set(RunConfig.model_fields)
# Tune reports carry the trainer's metrics plus these two, computed per task by the callback.
OBJECTIVE_KEY = "objective"
ZERO_SHOT_DROP_KEY = "zero_shot_drop"


class SweepConfigError(ConfigError):
    """A sweep file that cannot be run; the message names the file and the field."""


class SweepError(ConfigError):
    """A sweep that cannot start or continue (e.g. nothing to resume); the message says what to do."""


# ---- configuration ---------------------------------------------------------------------------

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
    type: Literal["asha", "pbt", "none"] = Field(
        "asha", description="asha: successive halving at task boundaries; pbt: population-based training, where at "
                            "a task boundary a weak trial continues from a strong trial's whole state with "
                            "perturbed hyperparameters")
    grace_period: int = Field(1, ge=1, description="asha: tasks every trial trains before ASHA may stop it")
    reduction_factor: float = Field(2.0, gt=1, description="asha: keeps the top 1/reduction_factor at each rung")
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
    from orchestrator.config import load_run_config

    try:
        if isinstance(config.base, str):
            base_path = Path(config.base)
            if not base_path.is_absolute() and relative_to is not None:
                base_path = relative_to / base_path
            if not base_path.is_file():
                raise SweepConfigError(f"{source}: base: run config {base_path} does not exist")
            base = load_run_config(base_path)
        else:
            base = RunConfig(**config.base)
        return with_overrides(base, config.resources.train_overrides())
    except ValidationError as err:
        raise SweepConfigError(_format_validation(err, source, prefix="base.")) from None
    except (ConfigError, KeyError, ValueError) as err:
        if isinstance(err, SweepConfigError):
            raise
        raise SweepConfigError(f"{source}: base: {err}") from None


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


def pbt_mutations(plan: SweepPlan) -> dict[str, Any]:
    """PBT's explore step per key: a `choice` moves to a neighbouring value (or resamples), a range
    scales the value by 0.8 or 1.2 (or resamples)."""
    space = tune_param_space(plan)
    return {dotted: list(plan.space[dotted].values) if plan.space[dotted].type == "choice" else space[dotted]
            for dotted in pbt_keys(plan)}


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


def tune_param_space(plan: SweepPlan) -> dict[str, Any]:
    """The Tune search space: dotted run-config keys -> Tune domains (or grid_search lists)."""
    from ray import tune

    space: dict[str, Any] = {}
    grid = plan.config.search.algorithm == "grid"
    for dotted, spec in plan.space.items():
        if not isinstance(spec, ParamSpec):
            space[dotted] = spec
        elif spec.type == "choice":
            space[dotted] = tune.grid_search(list(spec.values)) if grid else tune.choice(list(spec.values))
        elif spec.type == "uniform":
            space[dotted] = tune.uniform(spec.lower, spec.upper)
        elif spec.type == "loguniform":
            space[dotted] = tune.loguniform(spec.lower, spec.upper)
        else:
            space[dotted] = tune.randint(int(spec.lower), int(spec.upper))
    return space


# ---- objective and stopping ------------------------------------------------------------------

def _finite(value, default: float = math.nan) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return default
    return value if not math.isnan(value) else default


def derived_metrics(metrics: dict, objective: ObjectiveSettings) -> dict[str, float]:
    """The objective and the zero-shot drop of one per-task report.

    Forgetting is undefined after the first task (nothing learned before to forget): it counts as 0.
    """
    forgetting = _finite(metrics.get("cl/forgetting"), 0.0)
    seen_avg = _finite(metrics.get("cl/seen_avg"))
    if objective.name == "avg":
        value = _finite(metrics.get("cl/avg"))
    elif objective.name == "last":
        value = _finite(metrics.get("cl/last"))
    elif objective.name == "seen_avg":
        value = seen_avg
    elif objective.name == "neg_forgetting":
        value = -forgetting
    else:
        value = objective.accuracy_weight * seen_avg - objective.forgetting_weight * forgetting
    zero_shot_drop = _finite(metrics.get("cl/zero_shot")) - _finite(metrics.get("cl/last"))
    return {OBJECTIVE_KEY: value, ZERO_SHOT_DROP_KEY: zero_shot_drop}


def _stop_rule_stopper(rules: list[StopRule]):
    from ray import tune

    class StopRuleStopper(tune.Stopper):
        """Ends a trial when any stop rule is violated; the others keep running."""

        def __init__(self, stop_rules: list[StopRule]):
            self.stop_rules = stop_rules

        def __call__(self, trial_id: str, result: dict) -> bool:
            return any(rule.violated(result) for rule in self.stop_rules)

        def stop_all(self) -> bool:
            return False

    return StopRuleStopper(rules)


def _objective_report_callback(objective: ObjectiveSettings, num_tasks: int, reports):
    """A Train callback that hands each per-task report, with the objective added, and its task
    checkpoint to the trial (through the `reports` queue), which reports both to Tune.

    Run by Ray Train's controller after every `ray.train.report`. Ray's own TuneReportCallback
    forwards only the metrics (the checkpoint's path as one of them), so Tune would hold no
    checkpoint of the trial, and PBT could copy nothing at a task boundary."""
    from ray.train.v2.api.callback import UserCallback

    class ObjectiveReportCallback(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = dict(metrics[0])
            first.update(derived_metrics(first, objective))
            # The last task ends the trial: Tune consults no scheduler on a result marked done (PBT
            # would pause and perturb a trial with nothing left to train).
            first["done"] = first.get("task", 0) >= num_tasks
            reports.put((first, checkpoint.path if checkpoint else None))  # blocks until the trial took the last

    return ObjectiveReportCallback()


def _orphaned_reservation_releaser():
    """A Tune callback that frees the training workers' reservations of trials Tune has ended
    (see `orchestrator.runtime.release_orphaned_placement_groups`), checked about once a second
    and before a trial starts, so a stopped, paused or exploiting trial's cores go to the next one."""
    import time

    from ray import tune

    from orchestrator.runtime import release_orphaned_placement_groups

    class OrphanedReservationReleaser(tune.Callback):
        def __init__(self):
            self.checked_at = 0.0

        def _release(self) -> None:
            self.checked_at = time.monotonic()
            release_orphaned_placement_groups()

        def on_step_begin(self, iteration, trials, **info):
            if time.monotonic() - self.checked_at > 1.0:
                self._release()

        def on_trial_start(self, iteration, trials, trial, **info):
            self._release()

    return OrphanedReservationReleaser()


def run_trial(trial_params: dict, *, base: dict, objective: dict, num_tasks: int, sweep_id: str,
              parent_run_id: str) -> None:
    """The Tune function trainable: one whole task sequence with this trial's hyperparameters."""
    import threading

    from ray import tune
    from ray.util.queue import Queue

    from orchestrator.trainer import run_sequence

    context = tune.get_context()
    trial_id = context.get_trial_id()
    config = with_overrides(RunConfig(**base), dict(trial_params))
    tags = {"vlcl.sweep_id": sweep_id, "vlcl.trial_id": trial_id}
    checkpoint = tune.get_checkpoint()
    resume_from, own = None, False
    if checkpoint is not None:
        # PBT restarts a trial from a task checkpoint: its own (after a pause: it continues its MLflow
        # run) or a stronger trial's (an exploit: a new run, tagged with where its state came from).
        resume_from = checkpoint.to_directory()
        source_folder = Path(checkpoint.path).parent.name
        own = source_folder == Path(context.get_trial_dir()).name
        if not own:
            donor = re.search(r"[0-9a-f]{5}_\d{5}", source_folder)
            tasks_done = json.loads((Path(resume_from) / "progress.json").read_text())["tasks_done"]
            tags |= {"vlcl.exploited_from": donor.group(0) if donor else source_folder,
                     "vlcl.exploited_after_task": str(tasks_done)}
    # The sequence runs in a thread; this one (Tune's) reports each task's metrics and checkpoint.
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    failure: list[BaseException] = []

    def run() -> None:
        try:
            run_sequence(config, resume=own, resume_from=resume_from, parent_run_id=parent_run_id,
                         run_name_suffix=f"-{trial_id}", extra_tags=tags,
                         ray_callbacks=[_objective_report_callback(ObjectiveSettings(**objective), num_tasks, reports)])
        except BaseException as err:  # re-raised in Tune's thread below
            failure.append(err)
        finally:
            reports.put(None)

    sequence = threading.Thread(target=run, name="vlcl-trial-sequence", daemon=True)
    sequence.start()
    while (item := reports.get()) is not None:
        metrics, checkpoint_path = item
        tune.report(metrics, checkpoint=tune.Checkpoint(checkpoint_path) if checkpoint_path else None)
    sequence.join()
    if failure:
        raise failure[0]


# ---- resources -------------------------------------------------------------------------------

def trial_resources(plan: SweepPlan, cluster_has_gpus: bool) -> dict[str, float]:
    """What one trial holds at once: its own process plus its training workers."""
    train = plan.base.train
    use_gpu = cluster_has_gpus if train.use_gpu == "auto" else bool(train.use_gpu)
    return {"CPU": plan.config.resources.trial_cpus + train.num_workers * train.cpus_per_worker,
            "GPU": float(train.num_workers) if use_gpu else 0.0}


def trial_process_resources(trial_cpus: float) -> dict[str, float]:
    """What the trial's own process reserves. Tune refuses an all-zero reservation, so a trial that
    holds no CPU reserves one byte of memory instead: on a 2-core machine Ray Data needs both cores
    (a read task and a decoding actor) before the trial's training workers start."""
    return {"CPU": trial_cpus} if trial_cpus > 0 else {"memory": 1.0}


def derive_max_concurrent_trials(per_trial: dict[str, float], cluster: dict[str, float]) -> int:
    """How many trials the cluster holds side by side (at least one: an autoscaler adds nodes)."""
    fits = [cluster.get(kind, 0.0) / need for kind, need in per_trial.items() if need > 0]
    return max(1, int(math.floor(min(fits) + 1e-9))) if fits else 1


# ---- running ---------------------------------------------------------------------------------

@dataclass
class TrialOutcome:
    trial_id: str
    params: dict[str, Any]
    objective_per_task: list[float]
    tasks_trained: int
    status: str  # completed / stopped (rule) / stopped (asha) / error
    last_metrics: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    task_settings: list[dict] = field(default_factory=list)  # what each task trained with, inherited ones included
    matrix: list[list[float]] = field(default_factory=list)  # the accuracy matrix at its last checkpoint
    exploited_from: str | None = None  # PBT: the trial whose state this one continued from (its last exploit)

    @property
    def final_objective(self) -> float:
        return self.objective_per_task[-1] if self.objective_per_task else math.nan


@dataclass
class SweepResult:
    sweep_id: str
    parent_run_id: str
    experiment_id: str
    num_tasks: int
    trials: list[TrialOutcome]
    best: TrialOutcome | None
    best_config: RunConfig | None

    @property
    def trial_tasks_trained(self) -> int:
        return sum(t.tasks_trained for t in self.trials)


def _sweep_state_dir(plan: SweepPlan, resume: bool) -> tuple[str, Path]:
    storage = Path(plan.config.storage_path).expanduser().resolve()
    if resume:
        candidates = sorted(p for p in storage.glob(f"{plan.name}-*") if (p / SWEEP_STATE_FILE).is_file())
        if not candidates:
            raise SweepError(f"--resume: no sweep named {plan.name!r} under {storage} to continue; "
                             f"run it once without --resume")
        return candidates[-1].name, candidates[-1]
    sweep_id = f"{plan.name}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    return sweep_id, storage / sweep_id


def _start_parent_run(plan: SweepPlan, sweep_id: str, stream, uri: str) -> tuple[str, str]:
    from orchestrator import tracking

    experiment_id = tracking.ensure_experiment(uri, plan.base.tracking.experiment or stream.name)
    mlflow_client = tracking.client(uri)
    objective = plan.config.objective.describe()
    tags = {
        "mlflow.runName": sweep_id,
        "mlflow.note.content": (f"Sweep of {plan.base.method.name} on {stream.name} ({len(stream.tasks)} tasks): "
                                f"{plan.config.search.algorithm} search, objective {objective}"),
        "vlcl.kind": "sweep", "vlcl.sweep_id": sweep_id, "vlcl.method": plan.base.method.name,
        "vlcl.stream": stream.name, "vlcl.model": plan.base.model.name, "vlcl.objective": objective,
        "vlcl.git_commit": tracking.git_commit(),
    }
    run = mlflow_client.create_run(experiment_id, run_name=sweep_id, tags=tags)
    from mlflow.entities import Param

    params = {
        "sweep.objective": objective,
        "sweep.search": plan.config.search.algorithm,
        "sweep.num_samples": str(plan.config.search.num_samples),
        "sweep.seed": str(plan.config.search.seed),
        "sweep.scheduler": plan.config.scheduler.type,
        "sweep.stop": json.dumps([r.model_dump() for r in plan.config.stop]),
        "sweep.space": json.dumps({k: (v.model_dump(exclude_none=True) if isinstance(v, ParamSpec) else v)
                                   for k, v in plan.space.items()}, default=str)[:6000],
    }
    mlflow_client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    mlflow_client.log_text(run.info.run_id, yaml.safe_dump(plan.config.model_dump(), sort_keys=False), "sweep.yaml")
    mlflow_client.log_text(run.info.run_id, to_yaml(plan.base), "base_config.yaml")
    return experiment_id, run.info.run_id


def run_sweep(plan: SweepPlan, *, resume: bool = False, address: str | None = None,
              quiet: bool = False) -> SweepResult:
    """Run (or continue) the sweep and log its leaderboard to the parent MLflow run."""
    import ray
    from ray import tune

    from orchestrator import tracking
    from orchestrator.runtime import ensure_ray
    from streams.builtin import open_stream

    ensure_ray(address)
    _, stream = open_stream(plan.base.stream, plan.base.data.root)
    num_tasks = len(stream.tasks)
    uri = tracking.resolve_tracking_uri(plan.base)
    tracking.check_reachable(uri)
    sweep_id, state_dir = _sweep_state_dir(plan, resume)
    if resume:
        state = json.loads((state_dir / SWEEP_STATE_FILE).read_text())
        experiment_id, parent_run_id = state["experiment_id"], state["parent_run_id"]
        tracking.client(uri).update_run(parent_run_id, status="RUNNING")
    else:
        experiment_id, parent_run_id = _start_parent_run(plan, sweep_id, stream, uri)
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / SWEEP_STATE_FILE).write_text(json.dumps(
            {"sweep_id": sweep_id, "experiment_id": experiment_id, "parent_run_id": parent_run_id,
             "tracking_uri": uri}))

    # Trials run in other processes (and folders): give them the resolved store, not "./mlflow.db".
    base = with_overrides(plan.base, {"tracking.uri": uri})
    trainable = tune.with_parameters(run_trial, base=as_data(base), objective=plan.config.objective.model_dump(),
                                     num_tasks=num_tasks, sweep_id=sweep_id, parent_run_id=parent_run_id)
    per_trial = trial_resources(plan, ray.cluster_resources().get("GPU", 0) > 0)
    trainable = tune.with_resources(trainable, trial_process_resources(plan.config.resources.trial_cpus))
    max_concurrent = plan.config.resources.max_concurrent_trials or derive_max_concurrent_trials(
        per_trial, ray.cluster_resources())

    callbacks = [_orphaned_reservation_releaser()]
    if resume:
        tuner = tune.Tuner.restore(str(state_dir / "tune"), trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(trainable, param_space=tune_param_space(plan),
                           tune_config=_tune_config(plan, num_tasks, max_concurrent),
                           run_config=tune.RunConfig(name="tune", storage_path=str(state_dir),
                                                     stop=_stop_rule_stopper(plan.config.stop) if plan.config.stop else None,
                                                     callbacks=callbacks,
                                                     verbose=0 if quiet else 1))
    results = tuner.fit()
    trial_states = _trial_states(results)
    trials = [_outcome(result, plan, num_tasks, trial_states) for result in results]
    _attach_child_runs(uri, experiment_id, parent_run_id, trials)
    ranked = rank_trials(trials)
    best = ranked[0] if ranked and not math.isnan(ranked[0].final_objective) else None
    best_config = None
    if best is not None:
        best_config = (schedule_config(plan.base, best.params, best.task_settings, pbt_keys(plan))
                       if plan.config.scheduler.type == "pbt" else with_overrides(plan.base, best.params))
        (state_dir / "best_config.yaml").write_text(to_yaml(best_config))
    _log_leaderboard(uri, parent_run_id, plan, ranked, best_config, num_tasks)
    return SweepResult(sweep_id=sweep_id, parent_run_id=parent_run_id, experiment_id=experiment_id,
                       num_tasks=num_tasks, trials=ranked, best=best, best_config=best_config)


def _tune_config(plan: SweepPlan, num_tasks: int, max_concurrent: int):
    from ray import tune

    settings = plan.config
    scheduler = None
    if settings.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="task", max_t=num_tasks,
                                  grace_period=min(settings.scheduler.grace_period, num_tasks),
                                  reduction_factor=settings.scheduler.reduction_factor)
    elif settings.scheduler.type == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        # synch: trials are compared after the same number of tasks (an objective after task 3 is
        # not comparable with one after task 2: more tasks, more to forget). A trial that reaches a
        # boundary first waits, paused, for the rest of the population.
        scheduler = PopulationBasedTraining(
            time_attr="task", perturbation_interval=settings.scheduler.perturbation_interval,
            hyperparam_mutations=pbt_mutations(plan), quantile_fraction=settings.scheduler.quantile_fraction,
            resample_probability=settings.scheduler.resample_probability, synch=True)
    search_alg = None
    if settings.search.algorithm in ("random", "grid"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores max_concurrent_trials for a BasicVariantGenerator it did not build itself.
        search_alg = BasicVariantGenerator(random_state=settings.search.seed, max_concurrent=max_concurrent)
    elif settings.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=settings.search.seed)
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        search_alg = HyperOptSearch(random_state_seed=settings.search.seed)
    limit_by_tune = settings.search.algorithm not in ("random", "grid")
    return tune.TuneConfig(metric=OBJECTIVE_KEY, mode="max", scheduler=scheduler, search_alg=search_alg,
                           num_samples=settings.search.num_samples,
                           max_concurrent_trials=max_concurrent if limit_by_tune else None)


def _trial_states(results) -> dict[str, tuple[str, str]]:
    """Trial folder -> (trial id, Tune's state: TERMINATED, ERROR, PENDING, PAUSED, RUNNING)."""
    analysis = getattr(results, "_experiment_analysis", None)
    return {Path(trial.path).name: (trial.trial_id, trial.status)
            for trial in getattr(analysis, "trials", None) or []}


def _outcome(result, plan: SweepPlan, num_tasks: int, trial_states: dict[str, tuple[str, str]]) -> TrialOutcome:
    history = result.metrics_dataframe
    per_task: dict[int, float] = {}
    if history is not None and "task" in history:
        for task, value in zip(history["task"], history[OBJECTIVE_KEY] if OBJECTIVE_KEY in history else []):
            per_task[int(task)] = float(value)
    last = dict(result.metrics or {})
    tasks_trained = max(per_task) if per_task else int(last.get("task", 0) or 0)
    trial_id, state = trial_states.get(Path(result.path).name, (last.get("trial_id"), "TERMINATED"))
    trial_id = trial_id or Path(result.path).name
    if result.error is not None:
        status = "error"
    elif state not in ("TERMINATED", "ERROR"):
        status = "interrupted"  # the sweep was stopped before this trial ended: --resume continues it
    elif tasks_trained >= num_tasks:
        status = "completed"
    elif any(rule.violated(last) for rule in plan.config.stop):
        status = "stopped (rule)"
    else:
        status = "stopped (asha)"
    params = {k: v for k, v in (result.config or {}).items()}
    progress = {}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as directory:
            if (Path(directory) / "progress.json").is_file():
                progress = json.loads((Path(directory) / "progress.json").read_text())
    return TrialOutcome(trial_id=str(trial_id), params=params,
                        objective_per_task=[per_task[t] for t in sorted(per_task)],
                        tasks_trained=tasks_trained, status=status, last_metrics=last,
                        task_settings=progress.get("task_settings", []), matrix=progress.get("matrix", []))


def rank_trials(trials: list[TrialOutcome]) -> list[TrialOutcome]:
    """Completed trials first, by final objective; then the rest by tasks reached and objective."""
    def key(t: TrialOutcome):
        objective = t.final_objective if not math.isnan(t.final_objective) else -math.inf
        return (t.status == "completed", t.tasks_trained, objective)

    return sorted(trials, key=key, reverse=True)


def _attach_child_runs(uri: str, experiment_id: str, parent_run_id: str, trials: list[TrialOutcome]) -> None:
    """Find each trial's child run; mark runs of stopped trials (the trial process was ended)."""
    from orchestrator import tracking

    mlflow_client = tracking.client(uri)
    children = mlflow_client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                         max_results=5000, order_by=["attributes.start_time ASC"])
    latest: dict[str, Any] = {}
    for run in children:
        trial_id = run.data.tags.get("vlcl.trial_id")
        if trial_id:
            if trial_id in latest and latest[trial_id].info.status == "RUNNING":
                # An interrupted attempt of a trial that was restarted on --resume.
                mlflow_client.set_terminated(latest[trial_id].info.run_id, status="KILLED")
            latest[trial_id] = run
    for trial in trials:
        run = latest.get(trial.trial_id)
        if run is None:
            continue
        trial.run_id = run.info.run_id
        trial.exploited_from = run.data.tags.get("vlcl.exploited_from")
        mlflow_client.set_tag(run.info.run_id, "vlcl.trial_status", trial.status)
        if trial.status == "interrupted":
            continue
        # Tune ends a trial's process at its last report (ASHA's max_t) or when it stops it, often
        # before run_sequence closes the run itself, or while fit() is unwinding, which then marks the
        # run FAILED. The trial's outcome, not that race, decides how its run ends.
        final = {"completed": "FINISHED", "error": "FAILED"}.get(trial.status, "KILLED")
        if run.info.status != final:
            mlflow_client.set_terminated(run.info.run_id, status=final)


def _log_leaderboard(uri: str, parent_run_id: str, plan: SweepPlan, ranked: list[TrialOutcome],
                     best_config: RunConfig | None, num_tasks: int) -> None:
    import pandas as pd

    from orchestrator import tracking

    mlflow_client = tracking.client(uri)
    rows = []
    for rank, trial in enumerate(ranked, start=1):
        row = {"rank": rank, "trial_id": trial.trial_id, "run_id": trial.run_id or "", "status": trial.status,
               "tasks_trained": trial.tasks_trained, "objective": trial.final_objective}
        for key in ("cl/seen_avg", "cl/forgetting", "cl/last", "cl/avg", ZERO_SHOT_DROP_KEY):
            row[key] = _finite(trial.last_metrics.get(key))
        row.update({f"param/{k}": v for k, v in trial.params.items()})
        rows.append(row)
    mlflow_client.log_table(parent_run_id, pd.DataFrame(rows), "leaderboard.json")
    with tempfile.TemporaryDirectory() as tmp:
        plot_path = Path(tmp) / "objective_per_task.png"
        plot_objective_per_task(ranked, num_tasks, plan.config.objective.describe(), plot_path)
        mlflow_client.log_artifact(parent_run_id, str(plot_path))
    if best_config is not None:
        best = ranked[0]
        mlflow_client.log_text(parent_run_id, to_yaml(best_config), "best_config.yaml")
        mlflow_client.set_tag(parent_run_id, "vlcl.best_trial", best.trial_id)
        if best.run_id:
            mlflow_client.set_tag(parent_run_id, "vlcl.best_run_id", best.run_id)
        tracking.Tracker(uri, parent_run_id).log_metrics({"sweep/best_objective": best.final_objective}, step=num_tasks)
    tracking.Tracker(uri, parent_run_id).log_metrics({
        "sweep/trials": len(ranked),
        "sweep/trials_completed": sum(t.status == "completed" for t in ranked),
        "sweep/trials_stopped": sum(t.status.startswith("stopped") for t in ranked),
        "sweep/trial_tasks_trained": sum(t.tasks_trained for t in ranked),
    }, step=num_tasks)
    interrupted = any(t.status == "interrupted" for t in ranked)
    mlflow_client.set_tag(parent_run_id, "vlcl.sweep_state", "interrupted" if interrupted else "finished")
    mlflow_client.set_terminated(parent_run_id, status="KILLED" if interrupted else "FINISHED")


def plot_objective_per_task(trials: list[TrialOutcome], num_tasks: int, objective: str, path: Path) -> None:
    """One line per trial: the objective after each task; stopped trials end with an x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trial in trials:
        tasks = list(range(1, len(trial.objective_per_task) + 1))
        line, = ax.plot(tasks, trial.objective_per_task, marker="o", label=f"{trial.trial_id} ({trial.status})")
        if trial.status != "completed" and tasks:
            ax.plot(tasks[-1], trial.objective_per_task[-1], marker="x", markersize=12, color=line.get_color())
    ax.set_xlabel("tasks trained")
    ax.set_ylabel(f"objective: {objective}")
    ax.set_xticks(range(1, num_tasks + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- command line ----------------------------------------------------------------------------

def add_sweep_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep", help="search hyperparameters; one trial = one whole task sequence",
        description="Run a Ray Tune sweep described by SWEEP.yaml (see examples/sweep_digits.yaml).")
    parser.add_argument("sweep_file", metavar="SWEEP.yaml")
    parser.add_argument("--resume", action="store_true",
                        help="continue the latest interrupted sweep of this name; finished trials are not re-run")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    parser.set_defaults(handler=_sweep_command)


def _sweep_command(args) -> int:
    plan = load_sweep_config(args.sweep_file)
    result = run_sweep(plan, resume=args.resume, address=args.address)
    print(format_leaderboard(result))
    from orchestrator.tracking import resolve_tracking_uri
    from orchestrator.ui import print_ui_hint

    print_ui_hint(resolve_tracking_uri(plan.base), result.experiment_id)
    return 0


def format_leaderboard(result: SweepResult) -> str:
    interrupted = sum(t.status == "interrupted" for t in result.trials)
    lines = [f"sweep {result.sweep_id}: {len(result.trials)} trials, {result.trial_tasks_trained} trial-tasks trained "
             f"(MLflow parent run {result.parent_run_id})",
             f"{'rank':>4}  {'trial':<14} {'status':<15} {'tasks':>5} {'objective':>9}  params"]
    for rank, trial in enumerate(result.trials, start=1):
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        lines.append(f"{rank:>4}  {trial.trial_id:<14} {trial.status:<15} {trial.tasks_trained:>5} "
                     f"{trial.final_objective:>9.4f}  {params}")
    if interrupted:
        lines.append(f"{interrupted} trial(s) interrupted: continue with `vlcl sweep SWEEP.yaml --resume`")
    return "\n".join(lines)
