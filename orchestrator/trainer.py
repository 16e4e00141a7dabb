"""The training loop every worker runs: the whole task sequence, top to bottom (`train_sequence`).

Read like a recipe: set up, zero-shot row, in a sweep the method's initial-model features (shared
by its trials), then per task: before_task -> steps -> after_task -> evaluate every task ->
report(metrics, checkpoint). A checkpoint after each task holds model, method state, optimizer
(when it carries over) and progress, so a run restarts at the next task after a worker failure
(FailureConfig) or `vlcl run --resume`. The driver's side (plan, MLflow run, where it trains) is
`orchestrator.run`.

Data parallelism: every worker holds a full model; after backward the gradients are averaged over
workers (`average_gradients`). Unlike wrapping the model in DDP this lets a method run any number
of forwards per step (teachers, reference batches, replay) - the losses that depend on the whole
batch gather features themselves (methods/distributed.py), so every worker computes the global
loss and the averaged gradient equals the single-process gradient of the global batch.
"""
from __future__ import annotations

import contextlib
import math
import tempfile
import time
from pathlib import Path

import torch

from orchestrator.config import RunConfig, to_yaml
from orchestrator.metrics import summarize, summarize_control
from orchestrator.plan import FaultInjection, Progress, RunPlan, TaskPlan, initial_model_features_key, zero_shot_key


def train_sequence(plan: RunPlan, worker: RayTrainWorker | InProcessWorker | None = None, skip_counter=None) -> None:
    """The whole task sequence of `plan`, on every Ray Train worker (`worker` None: this process is
    one, `RayTrainWorker`) or in the run's own process (`InProcessWorker`). `skip_counter`: the Ray
    Data readers' count of bad samples they skipped (data.on_bad_sample=skip, streamed splits)."""
    from methods import get_method
    from methods.distributed import all_reduce_sum, broadcast_parameters
    from methods.models import build_model
    from orchestrator.console import ProgressReporter
    from orchestrator.data import WorkerData
    from orchestrator.tracking import Tracker

    config = plan.config
    worker = worker or RayTrainWorker()
    rank, world = worker.rank, worker.world_size
    device = worker.device() if plan.use_gpu else torch.device("cpu")

    # -- setup, in dependency order: model -> method -> data -> restored state -> trackers --------
    torch.manual_seed(config.train.seed)
    built = build_model(config.model.name, config.model.pretrained)
    model = built.model.to(device)
    method = get_method(config.method.name)(model, built.tokenizer, config.method.hparams)
    autocast = autocast_for(config, device)
    data = WorkerData(plan, rank, world, device, built.image_mean, built.image_std)
    progress, optimizer_state = Progress(), None
    with worker.restart_checkpoint() as restart_dir:
        checkpoint_dir = restart_dir or plan.resume_from
        if checkpoint_dir:
            progress, optimizer_state = restore_checkpoint(Path(checkpoint_dir), model, method)
    broadcast_parameters(model)
    if method.needs_reference_data:  # after restoring: the method keeps reference texts, not images
        method.set_reference_data(*data.reference_data())
    tracker = Tracker(plan.tracking_uri, plan.run_id, skip_logged_steps=plan.continues_run) if rank == 0 else None
    reporter = ProgressReporter(plan.progress_sink if rank == 0 else None)
    monitor = None
    if tracker and (config.tracking.system_metrics or (config.tracking.system_metrics is None and device.type == "cuda")):
        monitor = tracker.system_monitor(resume=checkpoint_dir is not None)
        monitor.start()

    eval_sets_tagged = False

    def evaluate_and_record(row_index: int, scored: tuple | None = None) -> dict[str, float]:
        """Score every eval and control set (or take `scored`, the (row, control row, details) a
        sweep's trials share); add the row to progress; log it. Returns the metrics."""
        nonlocal eval_sets_tagged
        from orchestrator.evaluation import evaluate_all

        row, control_row, details, seen_union = scored or evaluate_all(
            method.eval_model(), plan, data, built.tokenizer, built.image_mean, built.image_std, device, autocast,
            tasks_trained=row_index)
        if tracker and plan.shared is not None and not scored and data.kept_eval_sets and not eval_sets_tagged:
            # the first evaluation decoded every kept eval set, or took another trial's
            tracker.mark_shared("eval_sets", ", ".join(sorted(data.eval_sets_decoded_by)) or None)
            eval_sets_tagged = True
        progress.matrix.append(row)
        progress.control.append(control_row)
        progress.eval_details[str(row_index)] = details
        skipped = all_reduce_sum(torch.tensor(data.skipped_count(), device=device)).item()
        if skip_counter is not None:
            import ray

            skipped += ray.get(skip_counter.total.remote())
        progress.skipped_samples = int(skipped)
        metrics = eval_metrics(plan, details, progress) | {"data/skipped_samples": progress.skipped_samples}
        # CTP's report: retrieval over one gallery of every seen task's eval set
        metrics |= {f"seen_union/{key}": value for key, value in seen_union.items() if key not in COUNTS}
        if tracker:
            tracker.log_metrics(metrics, step=row_index)
            tracker.log_matrix(plan.task_names, progress.matrix, plan.control_names, progress.control)
        return metrics

    # -- the zero-shot row, once, before any training ---------------------------------------------
    if not progress.matrix:
        shared = shared_zero_shot(plan, rank)
        evaluate_and_record(0, scored=shared and (shared["row"], shared["control_row"], shared["details"], {}))
        if tracker and plan.shared is not None:
            tracker.mark_shared("zero_shot", shared and shared["run_id"])
        if shared is None and plan.shared is not None and rank == 0:
            plan.shared.put.remote(zero_shot_key(plan), {
                "row": progress.matrix[0], "control_row": progress.control[0],
                "details": progress.eval_details["0"], "run_id": plan.run_id})
        reporter.evaluated(-1, "zero-shot", progress.matrix[0], progress.control[0])

    # -- what the method computes from the starting model alone, once per sweep ---------------------
    if method.has_initial_model_features and plan.shared is not None and progress.tasks_done < len(plan.tasks):
        share_initial_model_features(plan, method, progress.tasks_done, rank, tracker, autocast)

    # -- the tasks ----------------------------------------------------------------------------------
    optimizer = None
    for task in plan.tasks[progress.tasks_done:]:
        task_started = time.time()
        reporter.task_started()
        optimizer = train_task(task, plan, method, model, data, optimizer, optimizer_state, progress, tracker,
                               reporter, autocast)
        optimizer_state = None
        train_seconds = time.time() - task_started
        model.eval()
        metrics = evaluate_and_record(task.index + 1)
        metrics |= {"train/task_seconds": train_seconds,
                    "train/images_per_second": task.steps * config.train.batch_size / max(train_seconds, 1e-9)}
        if tracker:
            tracker.log_metrics({k: metrics[k] for k in ("train/task_seconds", "train/images_per_second")},
                                step=task.index + 1)
        reporter.evaluated(task.index, task.name, progress.matrix[-1], progress.control[-1], train_seconds)
        progress.tasks_done = task.index + 1
        if plan.fault:
            hold_if_asked(plan, progress.tasks_done, rank)
        report_task(plan, progress, model, method, optimizer, worker, tracker, {"task": task.index + 1, **metrics})
        if plan.fault:
            inject_fault(plan.fault, progress.tasks_done, rank)
        if plan.tune_gate is not None and progress.tasks_done < len(plan.tasks):
            wait_for_tune(plan, rank)
    if monitor is not None:
        monitor.finish()


def wait_for_tune(plan: RunPlan, rank: int) -> None:
    """In a sweep trial, hold the next task until Tune has taken this task's result and continued
    the trial. Tune decides at each result whether a trial goes on (ASHA and the stop rules end it,
    a synchronous PBT holds every trial at a boundary and pauses the ones it exploits), and ends
    the trial's process when it does not; the workers, meanwhile, would train the next task for
    nothing (and, after an exploit, the trial trains it again from the donor's checkpoint). Rank 0
    waits; the others wait on it."""
    from methods.distributed import broadcast_object

    if rank == 0:
        plan.tune_gate.get()
    broadcast_object(True)


def shared_zero_shot(plan: RunPlan, rank: int) -> dict | None:
    """The zero-shot row another trial of the sweep computed with the same starting model and eval
    sets, or None. Rank 0 asks and tells the others, so all ranks take the same path."""
    from methods.distributed import broadcast_object

    if plan.shared is None:
        return None
    import ray

    found = ray.get(plan.shared.get.remote(zero_shot_key(plan))) if rank == 0 else None
    return broadcast_object(found)


def share_initial_model_features(plan: RunPlan, method, first_task: int, rank: int, tracker, autocast) -> None:
    """Give the method the tensors it would compute from the frozen starting model alone (ZSCL's
    teacher features of the reference texts, MulKI's pretrained teacher's class-prompt features):
    another trial's, when one of the sweep with the same key computed them, else computed here
    (every rank, as the method would) and offered to the others. Rank 0 asks and tells the others,
    so all ranks take the same path. The actor keeps the CPU tensors, so they outlive the trial that
    computed them; each get sends them through Ray's object store."""
    import ray

    from methods.distributed import broadcast_object

    key = initial_model_features_key(plan, first_task)
    found = broadcast_object(ray.get(plan.shared.get.remote(key)) if rank == 0 else None)
    if found is None:
        # the settings the first task trains with: the method computes its features under them
        method.set_hparams(plan.tasks[first_task].settings.hparams)
        tasks = [task_info(plan, t) for t in plan.tasks]
        with autocast():
            features = method.initial_model_features(tasks)
        if rank == 0 and features:
            plan.shared.put.remote(key, {"features": features, "run_id": plan.run_id})
    else:
        features = found["features"]
    method.use_initial_model_features(features)
    if tracker and features:
        tracker.mark_shared("initial_model_features", found and found["run_id"])
        tracker.log_dict({name: {"shape": list(t.shape), "dtype": str(t.dtype), "sha1": tensor_digest(t)}
                          for name, t in features.items()}, "initial_model_features.json")


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-1 of a tensor's bytes: equal digests, bit-identical tensors (of one shape and dtype)."""
    import hashlib

    return hashlib.sha1(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def task_info(plan: RunPlan, task: TaskPlan, train_samples: int = 0):
    """What the method may know of `task` (methods.TaskInfo)."""
    from methods import TaskInfo

    return TaskInfo(index=task.index, name=task.name, kind=task.kind, num_tasks=len(plan.tasks),
                    class_names=task.classes, templates=task.templates, steps=task.steps, train_samples=train_samples)


def train_task(task: TaskPlan, plan: RunPlan, method, model, data, optimizer, optimizer_state, progress: Progress,
               tracker, reporter, autocast):
    """before_task -> `task.steps` optimizer steps -> after_task. Returns the optimizer."""
    from methods.distributed import average_gradients
    from methods.models import set_train_mode

    config, settings = plan.config, task.settings
    torch.manual_seed(config.train.seed * 1000 + task.index)  # a task's randomness does not depend on how we got here
    info = task_info(plan, task, train_samples=data.train_samples(task))
    method.set_hparams(settings.hparams)
    method.before_task(info)
    parameters = method.trainable_parameters()
    if optimizer is None or config.train.reset_optimizer_each_task:
        # fused: one kernel for the whole update (a GPU's, or the CPU's: 1.6 ms a step instead of 17 ms
        # for vlcl-tiny's 62 tensors, where the per-tensor loop is most of a small model's step)
        optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
        if optimizer_state is not None and not config.train.reset_optimizer_each_task:
            optimizer.load_state_dict(optimizer_state)
    for group in optimizer.param_groups:  # this task's settings, also on an optimizer carried over
        group.update(lr=settings.lr, initial_lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(settings.warmup_steps, task.steps))
    progress.task_settings.append({"task": task.name, **settings.model_dump()})

    set_train_mode(model, config.train.freeze_batchnorm)
    batches = data.endless_batches(task)
    independent = data.endless_batches(task, seed_offset=1, augment=False) if method.needs_independent_batch else None
    losses_sum: dict[str, torch.Tensor] = {}
    counted = 0
    for step in range(1, task.steps + 1):
        batch = next(batches)
        if independent is not None:
            batch["independent"] = next(independent)
        with autocast():
            losses = method.training_loss(batch)
        losses["loss"].backward()
        average_gradients(parameters)
        if settings.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(batch, losses)
        if step == 1 and tracker and not progress.first_step_seconds:
            progress.first_step_seconds = time.time() - plan.started_at
            tracker.log_metrics({"time/first_step_seconds": progress.first_step_seconds}, step=0)
        progress.global_step += 1
        for key, value in losses.items():  # summed on the device: no host sync per step
            losses_sum[key] = losses_sum.get(key, 0.0) + value.detach().float()
        counted += 1
        if step % config.train.log_every_steps == 0 or step == task.steps:
            means = dict(zip(losses_sum, (torch.stack(list(losses_sum.values())) / counted).tolist()))
            if tracker:
                tracker.log_metrics({f"train/{k}": v for k, v in means.items()} | {"train/lr": schedule.get_last_lr()[0]},
                                    step=progress.global_step)
            reporter.step(task.index, task.name, step, task.steps, means["loss"], config.train.batch_size)
            losses_sum, counted = {}, 0
    method.after_task(info, lambda: data.epoch_batches(task, epoch=10**6))
    return optimizer


def report_task(plan: RunPlan, progress: Progress, model, method, optimizer, worker, tracker, metrics: dict) -> None:
    """Report the task on every worker; rank 0 attaches the task checkpoint (and logs it to MLflow).
    On Ray Train workers the report goes to Ray Train; in a sweep trial that trains in its own
    process, straight to Tune (sweep_tune.TuneTaskReport)."""
    config = plan.config
    if worker.rank != 0:
        worker.report(metrics, None)
        return
    with checkpoint_directory(plan, progress.tasks_done) as directory:
        torch.save(model.state_dict(), Path(directory) / "model.pt")
        torch.save(method.state_dict(), Path(directory) / "method.pt")
        if not config.train.reset_optimizer_each_task:
            torch.save(optimizer.state_dict(), Path(directory) / "optimizer.pt")
        (Path(directory) / "progress.json").write_text(progress.to_json())
        (Path(directory) / "config.yaml").write_text(to_yaml(config))
        keep = config.tracking.checkpoints
        if tracker:  # every task's settings, inherited ones included (a sweep's exploit copies them)
            tracker.log_dict({"tasks": progress.task_settings}, "task_settings.json")
        if tracker and (keep == "all" or (keep == "last" and progress.tasks_done == len(plan.tasks))):
            tracker.log_checkpoint(directory, progress.tasks_done)
        worker.report(metrics, directory)


def checkpoint_folder(checkpoint) -> contextlib.AbstractContextManager[str | None]:
    """A Ray checkpoint's folder while its state is read (None without one): the stored folder
    itself on local storage, a download removed afterwards on remote storage. `to_directory`
    would leave a copy in /tmp at every restart."""
    return checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext(None)


class RayTrainWorker:
    """The loop on a Ray Train worker: its rank, world size and device from Ray Train's context, the
    checkpoint Ray Train restarts it from after a worker failure (FailureConfig), and each task's
    report to the Train controller, which copies the checkpoint to the run's storage."""

    def __init__(self):
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def restart_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        import ray.train

        return checkpoint_folder(ray.train.get_checkpoint())

    def report(self, metrics: dict, directory: str | None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)


class InProcessWorker:
    """The loop in the run's own process, the only worker: no Ray Train (`vlcl run`, or a sweep's or
    study's one-worker trial in its Tune trial's process, where Ray Train's functions refuse to run).
    The GPU is the one torch picks (CUDA_VISIBLE_DEVICES decides); a restart after a failure starts
    a new loop from the run folder's checkpoints (`run.fit_in_process`); each task's report goes to
    `task_report` (a sweep trial's: to Tune) or nowhere (the tracker and the console have it)."""

    rank, world_size = 0, 1

    def __init__(self, task_report=None):
        self.task_report = task_report

    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device())

    def restart_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        return contextlib.nullcontext(None)

    def report(self, metrics: dict, directory: str | None) -> None:
        if self.task_report is not None:
            self.task_report(metrics, directory)


@contextlib.contextmanager
def checkpoint_directory(plan: RunPlan, tasks_done: int):
    """Where rank 0 writes a task checkpoint. On Ray Train workers, a temporary folder that
    `ray.train.report` copies to the run's storage; in-process, Ray Train copies nothing, so the run
    folder itself (the layout `latest_checkpoint` reads either way; a sweep trial's Tune copies it
    to the trial's storage as well)."""
    if plan.checkpoint_root is None:
        with tempfile.TemporaryDirectory() as directory:
            yield directory
        return
    directory = Path(plan.checkpoint_root) / f"checkpoint_task_{tasks_done:03d}"
    directory.mkdir(parents=True, exist_ok=True)
    yield str(directory)


def restore_checkpoint(directory: Path, model, method) -> tuple[Progress, dict | None]:
    model.load_state_dict(torch.load(directory / "model.pt", map_location="cpu", weights_only=True))
    method.load_state_dict(torch.load(directory / "method.pt", map_location="cpu", weights_only=True))
    optimizer_path = directory / "optimizer.pt"
    optimizer_state = torch.load(optimizer_path, map_location="cpu", weights_only=True) if optimizer_path.exists() else None
    return Progress.from_json((directory / "progress.json").read_text()), optimizer_state


def hold_if_asked(plan: RunPlan, tasks_done: int, rank: int) -> None:
    """FaultInjection.hold_after_task: the first run to get there waits here until it is killed."""
    if plan.fault.hold_after_task != tasks_done or rank != 0:
        return
    try:
        with open(plan.fault.hold_marker, "x") as marker:
            marker.write(plan.run_id)
    except FileExistsError:
        return
    while True:
        time.sleep(1)


def inject_fault(fault: FaultInjection, tasks_done: int, rank: int) -> None:
    if fault.after_task != tasks_done or rank != 0:
        return
    if fault.marker:
        try:  # created exclusively: of trials reaching it at once (a sweep's), exactly one fires
            with open(fault.marker, "x") as marker:
                marker.write("fired")
        except FileExistsError:
            return
    raise RuntimeError(f"injected fault after task {tasks_done} (VLCL_FAULT_AFTER_TASK)")


def autocast_for(config: RunConfig, device: torch.device):
    precision = config.model.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def warmup_cosine(warmup: int, total: int):
    """LambdaLR factor: linear warm-up over `warmup` steps, then cosine to 0 at `total`."""
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


COUNTS = ("samples", "captions")  # sizes of the scored sets: in the eval details, not logged as metrics


def eval_metrics(plan: RunPlan, details: dict, progress: Progress) -> dict[str, float]:
    metrics = {}
    for name in plan.task_names + plan.control_names:
        for key, value in details[name].items():
            if key not in COUNTS:
                metrics[f"eval/{name}/{key}"] = value
    metrics.update(summarize(progress.matrix))
    metrics.update(summarize_control(progress.control))
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
