"""One continual run, from the driver's side: plan, MLflow run, where it trains, result.

`run_sequence` builds the typed plan (everything that can fail does, before Ray starts), opens
or continues the MLflow run, trains the sequence in this process or on
Ray Train workers (`resolve_launch`), draws the console and returns the result. What every worker
runs, task after task, is `orchestrator.trainer.train_sequence`. A run folder's state files and
task checkpoints are how `--resume` finds where to continue (`find_resumable`, `latest_checkpoint`).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from orchestrator.config import ConfigError, RunConfig
from orchestrator.metrics import summarize, summarize_control
from orchestrator.plan import FaultInjection, Progress, RunPlan
from orchestrator.trainer import InProcessWorker, train_sequence


@dataclass
class SequenceResult:
    run_id: str
    experiment_id: str
    tasks: list[str]
    matrix: list[list[float]]
    summary: dict[str, float]
    tracking_uri: str = ""
    skipped_samples: int = 0
    wall_seconds: float = 0.0
    eval_details: dict = field(default_factory=dict)
    control_tasks: list[str] = field(default_factory=list)
    control_matrix: list[list[float]] = field(default_factory=list)  # rows as `matrix`, one column per control set
    task_settings: list[dict] = field(default_factory=list)  # the settings each task trained with
    log_file: str = ""
    first_step_seconds: float = 0.0


def run_sequence(config: RunConfig, *, resume: bool = False, resume_from: str | None = None,
                 parent_run_id: str | None = None, run_name_suffix: str = "", extra_tags: dict | None = None,
                 ray_callbacks: list | None = None, shared=None, tune_gate=None, task_report=None,
                 resume_finished: bool = False, quiet: bool = False, verbose: bool = False) -> SequenceResult:
    """Train and evaluate `config`'s method over its stream; everything lands in MLflow.

    `resume`: continue the last unfinished run of this config (its MLflow run and its latest
    checkpoint, or `resume_from` when given). `resume_from` alone: start from a task checkpoint
    directory instead of from scratch (a PBT exploit), in a new MLflow run. `shared`: a sweep's
    SharedValues actor (the zero-shot row and the method's initial-model features are computed by
    the first trial that needs them). A sweep trial on Ray Train workers passes `ray_callbacks` (its
    reports reach Tune through the Train controller) and `tune_gate`, a queue: after each task's
    report training waits for an item, which the trial puts once Tune continues it
    (`wait_for_tune`). A trial in its own process passes `task_report` instead, which hands each
    task's metrics and checkpoint to Tune directly (`trainer.report_task`). `resume_finished`: a
    trial that Tune restarts from its own checkpoint continues its run even when the run had ended
    (the sweep's driver was killed after the trial's last task, before Tune recorded it). `quiet`:
    no console (tests, sweep trials)."""
    from orchestrator.console import Console, library_logs_to, sink_drain, start_progress_sink
    from orchestrator.runtime import cluster_has_gpus, ensure_ray
    from orchestrator.tracking import Tracker, check_reachable, default_run_name, resolve_tracking_uri

    started = time.time()
    uri = resolve_tracking_uri(config)
    check_reachable(uri)  # before any data or Ray work
    plan = plan_run(config)
    launch = resolve_launch(plan)
    output = Path(config.output_dir)
    run_name = default_run_name(config, plan.stream_name) + run_name_suffix
    state = find_resumable(output, run_name, finished=resume_finished) if resume else None
    if resume and state is None:
        raise ConfigError(f"--resume: no unfinished run named {run_name!r} under {output}; start it without --resume")
    ray_name = f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}"
    log_file = output / ray_name / "vlcl.log"
    with library_logs_to(log_file, verbose) as log_handler:
        if launch == "ray":
            ensure_ray(verbose=verbose)
        if state:
            tracker = Tracker(uri, state["run_id"], state["experiment_id"])
            tracker.set_running()
            resume_from = resume_from or latest_checkpoint(output / state["ray_name"])
        else:
            tracker = Tracker.start_sequence(replace(plan, tracking_uri=uri), parent_run_id=parent_run_id,
                                             run_name_suffix=run_name_suffix, extra_tags=extra_tags)
        try:  # the MLflow run exists from here on: any failure marks it FAILED
            tracker.set_tag("vlcl.launch", launch)
            sink = None if quiet else start_progress_sink(in_process=launch == "in_process")
            if config.train.use_gpu != "auto":
                use_gpu = bool(config.train.use_gpu)
            else:
                use_gpu = cluster_has_gpus() if launch == "ray" else torch.cuda.is_available()
            plan = replace(plan, tracking_uri=uri, run_id=tracker.run_id, resume_from=resume_from, use_gpu=use_gpu,
                           fault=FaultInjection.from_env(), progress_sink=sink, started_at=started, shared=shared,
                           tune_gate=tune_gate, continues_run=state is not None,
                           launch=launch, checkpoint_root=str(output / ray_name) if launch == "in_process" else None)
            run_state = {"run_name": run_name, "run_id": tracker.run_id, "experiment_id": tracker.experiment_id,
                         "ray_name": ray_name, "previous": state["ray_name"] if state else None, "finished": False}
            write_state(output / "runs" / f"{ray_name}.json", run_state)
            console = None
            if sink is not None:
                console = Console(sink_drain(sink), len(plan.tasks))
                console.header(run_header(plan, tracker, resume_from, log_file))
            with console or contextlib.nullcontext():
                if launch == "in_process":
                    result = fit_in_process(plan, task_report)
                else:
                    result = fit_on_ray(plan, ray_name, ray_callbacks)
        except SystemExit:
            # Tune ends a trial it stops or pauses this way, in the report that asked: the sweep decides
            # how the trial's run ends (sweep._attach_child_runs), and a paused trial continues it.
            raise
        except BaseException:
            tracker.finish("FAILED")
            raise
        progress = final_progress(plan, result)
        summary = {k: v for k, v in (summarize(progress.matrix) | summarize_control(progress.control)).items()
                   if not math.isnan(v)}
        write_state(output / "runs" / f"{ray_name}.json", {**run_state, "finished": True})
        tracker.log_final_matrix(plan.task_names, progress.matrix, plan.control_names, progress.control)
        log_handler.flush()
        tracker.log_artifact(str(log_file))
        tracker.finish("FINISHED")
    return SequenceResult(run_id=tracker.run_id, experiment_id=tracker.experiment_id, tasks=plan.task_names,
                          matrix=progress.matrix, summary=summary, tracking_uri=uri,
                          skipped_samples=progress.skipped_samples, wall_seconds=time.time() - started,
                          eval_details=progress.eval_details, control_tasks=plan.control_names,
                          control_matrix=progress.control, task_settings=progress.task_settings,
                          first_step_seconds=progress.first_step_seconds,
                          log_file=str(log_file))


def plan_run(config: RunConfig) -> RunPlan:
    """The typed plan of `config` (orchestrator.plan.build_plan at the model's image size)."""
    from methods.models import build_model
    from orchestrator.plan import build_plan

    image_size = build_model(config.model.name, config.model.pretrained).image_size  # a bad model fails here
    return build_plan(config, image_size)


def resolve_launch(plan: RunPlan, trial: bool = False) -> str:
    """train.launch made concrete: "in_process" or "ray" (see the field's description).

    In-process training is the same `train_sequence` in the run's own process, so a run pays
    neither a worker group's start nor a worker actor's (imports, model, data), about 20 s of a
    small run, and on a laptop no Ray start either. It needs the data in the process (no Ray Data)
    and one worker. A named cluster ($RAY_ADDRESS) trains on Ray Train
    workers, except in a sweep's or a study's trial (`trial`): the trial is itself a process on the
    cluster, and its reservation holds the worker's CPUs and GPU (`sweep_tune.trial_resources`)."""
    import os

    config = plan.config
    streamed = [t.name for t in plan.streamed_tasks]
    if config.train.launch == "in_process":
        if streamed:
            raise ConfigError(f"train.launch: in_process keeps every task decoded in this process, but "
                              f"{streamed} stream through Ray Data (data.cache={config.data.cache!r}, tasks over the "
                              "cache limit): set train.launch=ray, or data.cache=always if they fit in memory")
        return "in_process"
    if config.train.launch == "ray":
        return "ray"
    local = config.train.num_workers == 1 and not streamed and (trial or not os.environ.get("RAY_ADDRESS"))
    return "in_process" if local else "ray"


def fit_in_process(plan: RunPlan, task_report=None) -> None:
    """`train_sequence` in this process, its only worker, restarting from the last task checkpoint
    after a failure as Ray Train's FailureConfig does on workers (train.max_failures). No Ray Train:
    its local mode would give the loop nothing it needs (rank 0 of 1, nothing to copy), and inside
    a Tune trial its functions refuse to run. `task_report`: where each task's report goes (a sweep
    trial's: to Tune)."""
    failures = 0
    while True:
        try:
            return train_sequence(plan, InProcessWorker(task_report))
        except Exception:
            limit = plan.config.train.max_failures
            if limit != -1 and failures >= limit:
                raise
            failures += 1
            plan = replace(plan, resume_from=latest_checkpoint(Path(plan.checkpoint_root)) or plan.resume_from)


def final_progress(plan: RunPlan, result) -> Progress:
    """The progress record of the run's last task checkpoint: the one the fit reported last (in
    this process, the run folder's newest), or the one it resumed from when every task was already
    done."""
    if plan.launch == "in_process":
        directory = latest_checkpoint(Path(plan.checkpoint_root)) or plan.resume_from
    elif result.checkpoint is not None:
        with result.checkpoint.as_directory() as directory:
            return Progress.from_json((Path(directory) / "progress.json").read_text())
    else:
        directory = plan.resume_from
    return Progress.from_json((Path(directory) / "progress.json").read_text())


def fit_on_ray(plan: RunPlan, ray_name: str, ray_callbacks: list | None):
    """`train_sequence` on `train.num_workers` Ray Train worker actors."""
    import ray.train
    from ray.train.torch import TorchTrainer

    config = plan.config
    datasets, skip_counter = streamed_datasets(plan)
    trainer = TorchTrainer(
        functools.partial(train_sequence, plan, skip_counter=skip_counter),  # Ray calls it with no arguments
        scaling_config=ray.train.ScalingConfig(num_workers=config.train.num_workers, use_gpu=plan.use_gpu,
                                               resources_per_worker={"CPU": config.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=ray_name, storage_path=config.output_dir,
                                       failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
                                       callbacks=ray_callbacks or None),
        datasets=datasets or None,
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def run_header(plan: RunPlan, tracker, resume_from: str | None, log_file: Path) -> list[tuple[str, str]]:
    config = plan.config
    start = config.model.pretrained or "from scratch"
    lines = [("run", f"{tracker.run_id} ({'resumed from ' + resume_from if resume_from else 'new'})"),
             ("stream", f"{plan.stream_name}: {len(plan.tasks)} tasks"
                        + (f" + {len(plan.control)} control sets" if plan.control else "")),
             ("model", f"{config.model.name} ({start})"),
             ("method", f"{config.method.name}  lr {config.train.lr:g}  batch {config.train.batch_size}  "
                        f"seed {config.train.seed}  workers {config.train.num_workers} "
                        + ("(in this process)" if plan.launch == "in_process" else "(Ray Train)")
                        + ("  gpu" if plan.use_gpu else "")),
             ("mlflow", f"{plan.tracking_uri}  experiment {tracker.experiment_id}"),
             ("log", f"{log_file} (Ray, MLflow and library logs; --verbose shows them)")]
    return lines


def streaming_cpus(cluster_cpus: float, config: RunConfig) -> tuple[float, float]:
    """(CPUs per decoding actor, CPUs per read task) for the streamed training splits.

    Ray Data runs beside the training workers on the CPUs they leave. Its decoding actors hold
    theirs for the whole task, so with Ray's default of one CPU each, a laptop's last core goes to
    the decoder and the read tasks feeding it never start: the run hangs at its first step. Where
    the spare CPUs do not cover the defaults, the decoders share three quarters of them and the read
    tasks (light: tar bytes to rows) the rest."""
    spare = cluster_cpus - config.train.num_workers * config.train.cpus_per_worker
    if spare <= 0:
        raise ConfigError(
            f"data: the training splits stream through Ray Data (data.cache={config.data.cache!r}), which "
            f"needs CPUs beside the training workers: the cluster has {cluster_cpus:g}, and "
            f"train.num_workers x train.cpus_per_worker reserve {config.train.num_workers * config.train.cpus_per_worker:g}. "
            "Lower train.cpus_per_worker (e.g. 0.5), or let small tasks be cached (data.cache=auto).")
    decoders = config.data.decoders
    if spare >= decoders + 1:
        return 1.0, 1.0
    return 0.75 * spare / decoders, 0.25 * spare


def streamed_datasets(plan: RunPlan):
    """Ray Data datasets for the training splits too large to keep decoded on the workers."""
    import ray

    from methods.models import TokenizerFactory
    from streams.ray_reader import SkipCounter, task_dataset

    config = plan.config
    if not plan.streamed_tasks:
        return {}, None
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # same seed, same batches
    skip_counter = SkipCounter.remote() if config.data.on_bad_sample == "skip" else None
    on_device = config.data.decode == "device"
    decoder_cpus, read_cpus = streaming_cpus(ray.cluster_resources().get("CPU", 0.0), config)
    datasets = {}
    for task in plan.streamed_tasks:
        dataset = task_dataset(list(task.train.urls), plan.image_size, TokenizerFactory(config.model.name),
                               list(task.classes), train=False, on_bad_sample=config.data.on_bad_sample,
                               skip_counter=skip_counter, decoders=config.data.decoders, decoder_cpus=decoder_cpus,
                               read_cpus=read_cpus, ship_encoded=on_device)
        datasets[task.train_dataset_name] = dataset.select_columns(
            ["encoded", "key", "text", "label"] if on_device else ["pixels", "text", "label"])
    return datasets, skip_counter


# ----------------------------------------------------------------------------------------------
# resuming
# ----------------------------------------------------------------------------------------------
def write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=1))


def find_resumable(output: Path, run_name: str, finished: bool = False) -> dict | None:
    """The newest unfinished attempt of `run_name` under `output` (or the newest at all, with
    `finished`), following earlier attempts."""
    states = []
    for path in sorted((output / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime):
        state = json.loads(path.read_text())
        if state.get("run_name") == run_name:
            states.append(state)
    if not states or (states[-1].get("finished") and not finished):
        return None
    latest = states[-1]
    # an attempt that failed before its first checkpoint: fall back to the attempt it resumed
    if latest_checkpoint(output / latest["ray_name"]) is None and latest.get("previous"):
        for state in reversed(states):
            if state["ray_name"] == latest["previous"]:
                return {**latest, "ray_name": state["ray_name"]}
    return latest


def latest_checkpoint(ray_run_dir: Path) -> str | None:
    best, best_done = None, -1
    for progress in ray_run_dir.glob("checkpoint_*/progress.json"):
        done = json.loads(progress.read_text())["tasks_done"]
        if done > best_done:
            best, best_done = str(progress.parent), done
    return best
