"""Studies: every (method, task order, seed) of one stream, run as a Tune grid (`vlcl study FILE`).

Papers report a method as mean ± std over seeds and over task orders (MTIL's Order I and II). A
study file names the axes; each combination is one Tune trial that runs one whole task sequence
(`run_sequence`; a one-worker run in its trial's own process), on the same cluster path as
`vlcl sweep`. All runs go to one MLflow experiment (the study's name) with run names
`<method>-<stream>-<order>-s<seed>`, so `vlcl report` groups them by method and order and prints
mean ± std over the seeds.

    name: digits-orders
    base: {stream: builtin:digits, train: {max_steps_per_task: 30}}   # a run config path or mapping
    methods: [finetune, lwf]
    orders:                       # name -> order: default (the manifest's), reverse, or task names
      default: default
      reverse: reverse
    seeds: [0, 1]
    resources: {workers: 1, cpus_per_worker: 1.0}
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.config import ConfigError, RunConfig, as_data, read_yaml_mapping, with_overrides


class StudyConfigError(ConfigError):
    """A study file that cannot be run; the message names the file and the field."""


class StudyResources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workers: int | None = Field(None, ge=1, description="Ray Train workers per run (train.num_workers)")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs per training worker (train.cpus_per_worker)")
    use_gpu: bool | Literal["auto"] | None = Field(None, description="one GPU per worker (train.use_gpu)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="runs at once (default: what the cluster holds)")


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="study name = MLflow experiment (default: the file's name)")
    base: Union[str, dict[str, Any]] = Field(description="run config: a YAML path (relative to the study file) or a mapping")
    methods: list[str] = Field(min_length=1, description="method names (`vlcl methods`)")
    orders: dict[str, Union[Literal["default", "reverse"], list[str]]] = Field(
        default_factory=lambda: {"default": "default"},
        description="order name -> default (the manifest's order), reverse, or a list of task names")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="train.seed of each run")
    resources: StudyResources = Field(default_factory=StudyResources)
    storage_path: str = Field("vlcl_studies", description="where Tune keeps the study's state")

    @field_validator("orders")
    @classmethod
    def _names_fit_run_names(cls, orders: dict) -> dict:
        bad = [name for name in orders if not name or any(c in name for c in " /")]
        if bad:
            raise ValueError(f"order names {bad} must be non-empty and hold no spaces or slashes")
        return orders


@dataclass(frozen=True)
class StudyRun:
    method: str
    order: str
    seed: int
    config: RunConfig


@dataclass
class StudyPlan:
    name: str
    stream_name: str
    runs: list[StudyRun]
    settings: StudyConfig


def load_study(path: str | os.PathLike) -> StudyPlan:
    path = Path(path)
    raw = read_yaml_mapping(path, StudyConfigError, "study config", "with `base` and `methods`")
    return plan_study(raw, source=str(path), relative_to=path.parent, default_name=path.stem)


def plan_study(raw: dict, *, source: str = "study config", relative_to: Path | None = None,
               default_name: str = "study") -> StudyPlan:
    """Every run of the study as a validated RunConfig; fails before Ray starts, naming the field."""
    from orchestrator.config import load_base_config
    from orchestrator.plan import ordered_tasks
    from streams.builtin import open_stream

    try:
        settings = StudyConfig(**raw)
    except ValidationError as err:
        problems = "\n".join(f"  {'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                             for e in err.errors())
        raise StudyConfigError(f"invalid study config ({source}):\n{problems}") from None
    base = load_base_config(settings.base, source=source, relative_to=relative_to, error=StudyConfigError)
    _, stream = open_stream(base.stream, base.data.root)
    manifest_order = [t.name for t in stream.tasks]
    name = settings.name or default_name
    resources = {key: value for key, value in (("train.num_workers", settings.resources.workers),
                                               ("train.cpus_per_worker", settings.resources.cpus_per_worker),
                                               ("train.use_gpu", settings.resources.use_gpu)) if value is not None}
    runs = []
    for order_name, order in settings.orders.items():
        tasks = manifest_order if order == "default" else manifest_order[::-1] if order == "reverse" else order
        try:
            ordered_tasks(stream, tasks)
        except ConfigError as err:
            raise StudyConfigError(f"{source}: orders.{order_name}: {err}") from None
        for method in settings.methods:
            for seed in settings.seeds:
                overrides = {"method.name": method, "task_order": list(tasks), "train.seed": seed,
                             "tracking.experiment": name,
                             "tracking.run_name": f"{method}-{stream.name}-{order_name}-s{seed}", **resources}
                try:
                    config = with_overrides(base, overrides)
                except ConfigError as err:
                    raise StudyConfigError(f"{source}: method {method!r}, order {order_name!r}, seed {seed}: "
                                           f"{err}") from None
                runs.append(StudyRun(method, order_name, seed, config))
    return StudyPlan(name=name, stream_name=stream.name, runs=runs, settings=settings)


def study_trial(trial_params: dict, *, runs: list[dict]) -> None:
    """The Tune function trainable: one run of the study, in its own MLflow run."""
    from ray import tune

    from orchestrator.run import run_sequence

    run = runs[trial_params["run"]]
    result = run_sequence(RunConfig(**run["config"]), quiet=True,
                          extra_tags={"vlcl.study": run["study"], "vlcl.order": run["order"],
                                      "vlcl.trial_id": tune.get_context().get_trial_id()})
    tune.report({**result.summary, "mlflow_run_id": result.run_id})


def run_study(plan: StudyPlan, *, address: str | None = None) -> list:
    """Run every (method, order, seed) as one Tune grid; returns Tune's results. One line per
    finished run goes to the console; Ray's and Tune's own output goes to the study's log file."""
    import contextlib

    from orchestrator.console import library_logs_to
    from orchestrator.tracking import check_reachable, ensure_experiment, resolve_tracking_uri

    uri = resolve_tracking_uri(plan.runs[0].config)
    check_reachable(uri)
    storage = Path(plan.settings.storage_path).resolve()
    log_file = storage / plan.name / "vlcl.log"
    print(f"Ray, Tune and library logs: {log_file}", flush=True)
    with library_logs_to(log_file, verbose=False), open(log_file, "a") as tune_output, \
            contextlib.redirect_stdout(tune_output):  # Tune prints its tables and boxes at any verbosity
        # The store and experiment exist before trials start: runs that create a new sqlite store
        # side by side race on its tables.
        ensure_experiment(uri, plan.name)
        return _run_grid(plan, uri, storage, address)


def _run_grid(plan: StudyPlan, uri: str, storage: Path, address: str | None) -> list:
    import sys
    import time

    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from orchestrator.run import plan_run, resolve_launch
    from orchestrator.runtime import ensure_ray
    from orchestrator.sweep_tune import derive_max_concurrent_trials, trial_reservation

    ensure_ray(address)
    # Trials run in other processes (and folders): give them the resolved store, not "./mlflow.db".
    # A one-worker run trains in its trial's process, which then holds the worker's CPUs and GPU.
    launch = resolve_launch(plan_run(plan.runs[0].config), trial=True)
    runs = [{"config": as_data(with_overrides(r.config, {"tracking.uri": uri, "train.launch": launch})),
             "study": plan.name, "order": r.order} for r in plan.runs]
    train = plan.runs[0].config.train
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 if train.use_gpu == "auto" else bool(train.use_gpu)
    per_trial = {"CPU": train.num_workers * train.cpus_per_worker, "GPU": float(train.num_workers) if use_gpu else 0.0}
    max_concurrent = plan.settings.resources.max_concurrent_trials or derive_max_concurrent_trials(
        per_trial, ray.cluster_resources())
    labels = [f"{r.method:10s} order {r.order:10s} seed {r.seed}" for r in plan.runs]

    class FinishedRunLines(tune.Callback):
        """One console line per finished run. Tune pickles its callbacks with the experiment state,
        so this holds only strings and writes to the process's real stdout (Tune's own output is
        redirected to the log file meanwhile)."""

        def __init__(self):
            self.started, self.done = time.time(), 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trial, "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "FAILED")

        def _line(self, trial, status: str) -> None:
            self.done += 1
            result = trial.last_result or {}
            scores = "  ".join(f"{k.removeprefix('cl/')} {100 * result[k]:.1f}" for k in ("cl/avg", "cl/last", "cl/bwt")
                               if isinstance(result.get(k), (int, float)))
            sys.__stdout__.write(f"run {self.done}/{len(labels)}  {labels[trial.config['run']]}  {status}  {scores}  "
                                 f"({time.time() - self.started:.0f} s)\n")
            sys.__stdout__.flush()

    trainable = tune.with_resources(tune.with_parameters(study_trial, runs=runs), trial_reservation(per_trial, launch, 0.0))
    tuner = tune.Tuner(trainable, param_space={"run": tune.grid_search(list(range(len(runs))))},
                       tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=max_concurrent)),
                       run_config=tune.RunConfig(name=plan.name, storage_path=str(storage), verbose=0,
                                                 callbacks=[FinishedRunLines()]))
    results = tuner.fit()
    failed = [plan.runs[r.config["run"]] for r in results if r.error]
    if failed:
        raise RuntimeError("study runs failed: " + ", ".join(f"{r.method}/{r.order}/s{r.seed}" for r in failed)
                           + f" (Tune's state and log: {storage / plan.name})")
    return list(results)


def add_study_commands(subparsers) -> None:
    study = subparsers.add_parser("study", help="every (method, task order, seed) of a study file, then its report")
    study.add_argument("config", help="study YAML (see orchestrator/study.py)")
    study.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    study.set_defaults(handler=command_study)


def command_study(args) -> int:
    from orchestrator.report import build_report, collect_runs, to_markdown
    from orchestrator.tracking import resolve_tracking_uri

    plan = load_study(args.config)
    print(f"study {plan.name}: {len(plan.runs)} runs on {plan.stream_name} "
          f"({len(plan.settings.methods)} methods x {len(plan.settings.orders)} orders x {len(plan.settings.seeds)} seeds)",
          flush=True)
    run_study(plan, address=args.address)
    uri = resolve_tracking_uri(plan.runs[0].config)
    experiment_id, records, left_out = collect_runs(uri, plan.name)
    print(to_markdown(build_report(plan.name, experiment_id, records, left_out)))
    print(f"`vlcl report {plan.name}` prints this table again, with its CSV and plot.")
    return 0
