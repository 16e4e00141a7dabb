"""Hyperparameter sweeps where one trial is one whole task sequence (`vlcl sweep SWEEP.yaml`).

Every trial runs `run_sequence` (all tasks) inside a Ray Tune function trainable: a one-worker
trial trains in that process and reports each task, with the sweep's objective, to Tune itself;
a trial with more workers drives a Ray Train worker group, whose reports reach Tune through a
Train callback. ASHA (asynchronous) and halving (synchronous: trials wait at each rung for the
others) compare trials at task boundaries (`time_attr="task"`), and
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

Modules: sweep_config (the file), sweep_objective (ranking), sweep_tune (Ray Tune), this one
(running a sweep, its MLflow record, the command line).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestrator.config import RunConfig, as_data, to_yaml, with_overrides
from orchestrator.sweep_config import (ParamSpec, SweepError, SweepPlan, load_sweep_config, pbt_keys, population_size,
                                       schedule_config)
from orchestrator.sweep_objective import (OBJECTIVE_KEY, ZERO_SHOT_DROP_KEY, TrialOutcome, finite, plot_objective_per_task,
                                        rank_trials)
from orchestrator.sweep_tune import (derive_max_concurrent_trials, orphaned_reservation_releaser, run_trial,
                                     stop_rule_stopper, trial_reservation, trial_resources, tune_trial_states,
                                     tune_config, tune_param_space)

SWEEP_STATE_FILE = "vlcl_sweep.json"
DRIVER_FILE = "vlcl_driver.json"  # the `vlcl sweep` process of the sweep's latest attempt


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


def trial_lines(num_tasks: int):
    """The console of a sweep, as a Tune callback: a line per trial per task (objective, the trial's
    values), and one when it ends. It holds only numbers and strings because Tune pickles its
    callbacks with the experiment state, and writes to the process's real stdout (Tune's own output
    goes to the log file meanwhile)."""
    from ray import tune

    class TrialLines(tune.Callback):
        def __init__(self):
            self.started = time.time()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            params = "  ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else
                               f"{k.rsplit('.', 1)[-1]}={v}" for k, v in trial.config.items())
            self._line(f"trial {trial.trial_id}  task {result.get('task', '?')}/{num_tasks}  "
                       f"objective {result.get(OBJECTIVE_KEY, math.nan):.4f}  {params}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(f"trial {trial.trial_id}  ended after task {(trial.last_result or {}).get('task', 0)}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(f"trial {trial.trial_id}  FAILED (its error: {trial.path})")

        def _line(self, text: str) -> None:
            sys.__stdout__.write(f"{text}  ({time.time() - self.started:.0f} s)\n")
            sys.__stdout__.flush()

    return TrialLines()


def _sweep_state_dir(plan: SweepPlan, resume: bool, marker: str = SWEEP_STATE_FILE,
                     option: str = "--resume") -> tuple[str, Path]:
    storage = Path(plan.config.storage_path).expanduser().resolve()
    if resume:
        candidates = sorted(p for p in storage.glob(f"{plan.name}-*") if (p / marker).is_file())
        if not candidates:
            raise SweepError(f"{option}: no sweep named {plan.name!r} under {storage}; "
                             f"run it once without {option}")
        return candidates[-1].name, candidates[-1]
    sweep_id = f"{plan.name}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    return sweep_id, storage / sweep_id


def _start_parent_run(plan: SweepPlan, sweep_id: str, stream, uri: str):
    from orchestrator.tracking import SweepTracker

    objective = plan.config.objective.describe()
    params = {
        "sweep.objective": objective,
        "sweep.search": plan.config.search.algorithm,
        "sweep.num_samples": str(plan.config.search.num_samples),
        "sweep.seed": str(plan.config.search.seed),
        "sweep.scheduler": plan.config.scheduler.type,
        "sweep.share_starting_model_results": str(plan.config.share_starting_model_results),
        "sweep.stop": json.dumps([r.model_dump() for r in plan.config.stop]),
        "sweep.space": json.dumps({k: (v.model_dump(exclude_none=True) if isinstance(v, ParamSpec) else v)
                                   for k, v in plan.space.items()}, default=str),
    }
    if plan.config.scheduler.type in ("asha", "halving"):
        scheduler = plan.config.scheduler
        params |= {f"sweep.{scheduler.type}.grace_period": str(scheduler.grace_period),
                   f"sweep.{scheduler.type}.reduction_factor": str(scheduler.reduction_factor)}
    if plan.config.scheduler.type == "pbt":
        scheduler = plan.config.scheduler
        params |= {"sweep.pbt.perturbation_interval": str(scheduler.perturbation_interval),
                   "sweep.pbt.quantile_fraction": str(scheduler.quantile_fraction),
                   "sweep.pbt.resample_probability": str(scheduler.resample_probability),
                   "sweep.pbt.perturbed": ",".join(pbt_keys(plan))}
    return SweepTracker.start_sweep(
        uri, plan.base.tracking.experiment or stream.name, sweep_id,
        description=(f"Sweep of {plan.base.method.name} on {stream.name} ({len(stream.tasks)} tasks): "
                     f"{plan.config.search.algorithm} search, {plan.config.scheduler.type} scheduler, objective {objective}"),
        tags={"vlcl.method": plan.base.method.name, "vlcl.stream": stream.name, "vlcl.model": plan.base.model.name,
              "vlcl.objective": objective},
        params=params,
        files={"sweep.yaml": yaml.safe_dump(plan.config.model_dump(), sort_keys=False),
               "base_config.yaml": to_yaml(plan.base)})


def run_sweep(plan: SweepPlan, *, resume: bool = False, address: str | None = None,
              quiet: bool = False) -> SweepResult:
    """Run (or continue) the sweep and log its leaderboard to the parent MLflow run. The console gets
    a header and one line per trial per task; Ray's, Tune's and the libraries' output goes to the
    sweep's log file."""
    from orchestrator.console import library_logs_to

    sweep_id, state_dir = _sweep_state_dir(plan, resume)
    log_file = state_dir / "vlcl.log"
    with library_logs_to(log_file, verbose=False), open(log_file, "a") as tune_output, \
            contextlib.redirect_stdout(tune_output):  # Tune prints its tables and boxes at any verbosity
        return _run_sweep(plan, sweep_id, state_dir, resume=resume, address=address, quiet=quiet)


def _run_sweep(plan: SweepPlan, sweep_id: str, state_dir: Path, *, resume: bool, address: str | None,
               quiet: bool) -> SweepResult:
    import ray
    from ray import tune

    from orchestrator import tracking
    from orchestrator.run import plan_run, resolve_launch
    from orchestrator.runtime import ensure_ray, start_shared_values, stop_owned_ray
    from streams.builtin import open_stream

    if resume:
        previous = _live_driver(state_dir)
        if previous is not None:
            raise SweepError(f"--resume: sweep {sweep_id} is still running (`vlcl sweep` process {previous.pid}); "
                             f"stop it first with `vlcl sweep {plan.source} --stop`")
        stop_owned_ray(str(state_dir))  # what a killed driver's Ray left running would hold cores and write runs
    _record_driver(state_dir)
    ensure_ray(address, owner=str(state_dir))
    manifest, stream = open_stream(plan.base.stream, plan.base.data.root)
    num_tasks = len(stream.tasks)
    uri = tracking.resolve_tracking_uri(plan.base)
    tracking.check_reachable(uri)
    if resume:
        state = json.loads((state_dir / SWEEP_STATE_FILE).read_text())
        tracker = tracking.SweepTracker(uri, state["parent_run_id"], state["experiment_id"])
        tracker.set_running()
    else:
        tracker = _start_parent_run(plan, sweep_id, stream, uri)
        tracker.log_stream_input(stream, manifest)  # the stream's dataset row exists before trials log it
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / SWEEP_STATE_FILE).write_text(json.dumps(
            {"sweep_id": sweep_id, "experiment_id": tracker.experiment_id, "parent_run_id": tracker.run_id,
             "tracking_uri": uri}))
    experiment_id, parent_run_id = tracker.experiment_id, tracker.run_id

    # Trials run in other processes (and folders): give them the resolved store, not "./mlflow.db".
    # Where they train is decided here, for the reservation to hold it: a one-worker trial trains in
    # its own process, as `vlcl run` does; more workers (or streamed data) on Ray Train workers.
    launch = resolve_launch(plan_run(plan.base), trial=True)
    base = with_overrides(plan.base, {"tracking.uri": uri, "train.launch": launch})
    trainable = tune.with_parameters(run_trial, base=as_data(base), objective=plan.config.objective.model_dump(),
                                     num_tasks=num_tasks, sweep_id=sweep_id, parent_run_id=parent_run_id,
                                     shared=start_shared_values() if plan.config.share_starting_model_results else None)
    per_trial = trial_resources(plan, ray.cluster_resources().get("GPU", 0) > 0)
    trainable = tune.with_resources(trainable, trial_reservation(per_trial, launch, plan.config.resources.trial_cpus))
    max_concurrent = plan.config.resources.max_concurrent_trials or derive_max_concurrent_trials(
        per_trial, ray.cluster_resources())
    if plan.config.scheduler.type in ("pbt", "halving") and max_concurrent < population_size(plan):
        # Tune adds trials as resources free up: a population that runs in turns is never compared.
        raise SweepError(
            f"{plan.source}: scheduler {plan.config.scheduler.type} runs its population of {population_size(plan)} "
            f"trials at once, and "
            f"{'max_concurrent_trials' if plan.config.resources.max_concurrent_trials else 'the cluster'} allows "
            f"{max_concurrent} (each trial holds {per_trial}; cluster {dict(ray.cluster_resources())}). "
            f"Lower resources.cpus_per_worker or search.num_samples, or add nodes")

    callbacks = [orphaned_reservation_releaser()] + ([] if quiet else [trial_lines(num_tasks)])
    if resume:
        tuner = tune.Tuner.restore(str(state_dir / "tune"), trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(trainable, param_space=tune_param_space(plan),
                           tune_config=tune_config(plan, num_tasks, max_concurrent),
                           run_config=tune.RunConfig(name="tune", storage_path=str(state_dir),
                                                     stop=stop_rule_stopper(plan.config.stop) if plan.config.stop else None,
                                                     callbacks=callbacks,
                                                     verbose=0))
    if not quiet:
        sys.__stdout__.write(f"sweep {sweep_id}: {plan.base.method.name} on {stream.name} ({num_tasks} tasks), "
                             f"{plan.config.search.algorithm} search, {plan.config.scheduler.type} scheduler, "
                             f"up to {max_concurrent} trial(s) at once\n"
                             f"Ray, Tune and library logs: {state_dir / 'vlcl.log'}\n")
        sys.__stdout__.flush()
    results = tuner.fit()
    states = tune_trial_states(results)
    trials = [_outcome(result, plan, num_tasks, states) for result in results]
    _attach_child_runs(tracker, trials)
    ranked = rank_trials(trials)
    best = ranked[0] if ranked and not math.isnan(ranked[0].final_objective) else None
    best_config = None
    if best is not None:
        best_config = (schedule_config(plan.base, best.params, best.task_settings, pbt_keys(plan))
                       if plan.config.scheduler.type == "pbt" else with_overrides(plan.base, best.params))
        (state_dir / "best_config.yaml").write_text(to_yaml(best_config))
    _log_leaderboard(tracker, plan, ranked, best_config, num_tasks)
    return SweepResult(sweep_id=sweep_id, parent_run_id=parent_run_id, experiment_id=experiment_id,
                       num_tasks=num_tasks, trials=ranked, best=best, best_config=best_config)


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
        status = f"stopped ({plan.config.scheduler.type})"
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


def _attach_child_runs(tracker, trials: list[TrialOutcome]) -> None:
    """Find each trial's child run; end the runs of trials Tune ended (it kills their process)."""
    latest = tracker.latest_child_runs()
    for trial in trials:
        run = latest.get(trial.trial_id)
        if run is None:
            continue
        trial.run_id = run.info.run_id
        trial.exploited_from = run.data.tags.get("vlcl.exploited_from")
        # Tune ends a trial's process at its last report or when it stops it, often before
        # run_sequence closes the run itself, or while fit() is unwinding, which then marks the run
        # FAILED. The trial's outcome, not that race, decides how its run ends; an interrupted
        # trial's run stays open for --resume.
        final = None if trial.status == "interrupted" else {"completed": "FINISHED", "error": "FAILED"}.get(
            trial.status, "KILLED")
        tracker.end_child(run, trial.status, final)


def _log_leaderboard(tracker, plan: SweepPlan, ranked: list[TrialOutcome], best_config: RunConfig | None,
                     num_tasks: int) -> None:
    import pandas as pd

    rows = []
    for rank, trial in enumerate(ranked, start=1):
        row = {"rank": rank, "trial_id": trial.trial_id, "run_id": trial.run_id or "", "status": trial.status,
               "tasks_trained": trial.tasks_trained, "objective": trial.final_objective,
               "exploited_from": trial.exploited_from or ""}
        for key in ("cl/seen_avg", "cl/forgetting", "cl/last", "cl/avg", ZERO_SHOT_DROP_KEY):
            row[key] = finite(trial.last_metrics.get(key))
        row.update({f"param/{k}": v for k, v in trial.params.items()})
        rows.append(row)
    tracker.log_table(pd.DataFrame(rows), "leaderboard.json")
    with tempfile.TemporaryDirectory() as tmp:
        plot_path = Path(tmp) / "objective_per_task.png"
        plot_objective_per_task(ranked, num_tasks, plan.config.objective.describe(), plot_path)
        tracker.log_artifact(str(plot_path))
    if best_config is not None:
        best = ranked[0]
        tracker.log_text(to_yaml(best_config), "best_config.yaml")  # PBT: the winner's per-task schedule
        tracker.set_tag("vlcl.best_trial", best.trial_id)
        if best.run_id:
            tracker.set_tag("vlcl.best_run_id", best.run_id)
        tracker.log_metrics({"sweep/best_objective": best.final_objective}, step=num_tasks)
    tracker.log_metrics({
        "sweep/trials": len(ranked),
        "sweep/trials_completed": sum(t.status == "completed" for t in ranked),
        "sweep/trials_stopped": sum(t.status.startswith("stopped") for t in ranked),
        "sweep/trial_tasks_trained": sum(t.tasks_trained for t in ranked),
    }, step=num_tasks)
    interrupted = any(t.status == "interrupted" for t in ranked)
    tracker.set_tag("vlcl.sweep_state", "interrupted" if interrupted else "finished")
    tracker.finish("KILLED" if interrupted else "FINISHED")


def _record_driver(state_dir: Path) -> None:
    import os

    import psutil

    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / DRIVER_FILE).write_text(json.dumps({"pid": os.getpid(), "started": psutil.Process().create_time()}))


def _live_driver(state_dir: Path):
    """The `vlcl sweep` process that ran the sweep's latest attempt, if it still runs (psutil), but
    not this process (a sweep resumed by the process that ran it)."""
    import os

    import psutil

    path = state_dir / DRIVER_FILE
    if not path.is_file():
        return None
    driver = json.loads(path.read_text())
    try:
        process = psutil.Process(driver["pid"])
        same = process.create_time() == driver["started"]  # not another process that got its id since
    except psutil.NoSuchProcess:
        return None
    return process if same and process.pid != os.getpid() else None


def stop_sweep(plan: SweepPlan) -> str:
    """`vlcl sweep --stop`: end the latest sweep of this name, its `vlcl sweep` process if it still
    runs and every process of the local Ray it started (what a driver killed with -9 leaves behind:
    its Ray agents outlive it), and mark its parent run KILLED. `--resume` continues it."""
    import psutil

    from orchestrator.runtime import stop_owned_ray
    from orchestrator.tracking import SweepTracker

    sweep_id, state_dir = _sweep_state_dir(plan, resume=True, marker=DRIVER_FILE, option="--stop")
    stopped = []
    driver = _live_driver(state_dir)
    if driver is not None:
        driver.terminate()
        if psutil.wait_procs([driver], timeout=10)[1]:
            driver.kill()
            psutil.wait_procs([driver], timeout=10)
        stopped.append(f"its `vlcl sweep` process {driver.pid}")
    ray_processes = stop_owned_ray(str(state_dir))
    if ray_processes:
        stopped.append(f"{ray_processes} process(es) of the Ray it started")
    if (state_dir / SWEEP_STATE_FILE).is_file():
        state = json.loads((state_dir / SWEEP_STATE_FILE).read_text())
        tracker = SweepTracker(state["tracking_uri"], state["parent_run_id"], state["experiment_id"])
        if tracker.client.get_run(tracker.run_id).info.status == "RUNNING":
            tracker.set_tag("vlcl.sweep_state", "interrupted")
            tracker.finish("KILLED")
    return (f"sweep {sweep_id}: stopped {' and '.join(stopped)}" if stopped else
            f"sweep {sweep_id}: nothing of it was running") + "; `--resume` continues it"


def add_sweep_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep", help="search hyperparameters; one trial = one whole task sequence",
        description="Run a Ray Tune sweep described by SWEEP.yaml (see examples/sweep_digits.yaml).")
    parser.add_argument("sweep_file", metavar="SWEEP.yaml")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--resume", action="store_true",
                        help="continue the latest interrupted sweep of this name; finished trials are not re-run")
    action.add_argument("--stop", action="store_true",
                        help="stop the latest sweep of this name: its `vlcl sweep` process if it still runs and the "
                             "Ray it started (what a killed driver leaves running); --resume continues it")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    parser.set_defaults(handler=_sweep_command)


def _sweep_command(args) -> int:
    plan = load_sweep_config(args.sweep_file)
    if args.stop:
        print(stop_sweep(plan))
        return 0
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
