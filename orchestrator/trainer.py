"""One continual run: the whole task sequence on a Ray Train TorchTrainer.

Driver (`run_sequence`): validate, open the MLflow run, build one Ray Data dataset per task split,
launch the trainer, print the result. Workers (`train_sequence`): for each task, before_task ->
steps -> after_task -> evaluate every task -> report(metrics, checkpoint). A checkpoint after
each task holds model, method state, optimizer (when it carries over) and progress, so a run
restarts at the next task after a worker failure (FailureConfig) or `vlcl run --resume`.

Data parallelism: every worker holds a full model; after backward the gradients are averaged over
workers (`average_gradients`). Unlike wrapping the model in DDP this lets a method run any number
of forwards per step (teachers, reference batches, replay) - the losses that depend on the whole
batch gather features themselves (methods/distributed.py), so every worker computes the global
loss and the averaged gradient equals the single-process gradient of the global batch.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from orchestrator.config import ConfigError, RunConfig, to_yaml
from orchestrator.metrics import summarize, summarize_control

GRADIENT_BUCKET_ELEMENTS = 32 * 2**20
CACHE_LIMIT_BYTES = 512 * 2**20  # data.cache=auto materialises a task below this size


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


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def resolve_manifest(config: RunConfig) -> str:
    from streams.manifest import BUILTIN_PREFIX

    if config.stream.startswith(BUILTIN_PREFIX):
        from streams.builtin import materialize_builtin

        return str(materialize_builtin(config.stream[len(BUILTIN_PREFIX):], config.data.root))
    return str(Path(config.stream).expanduser().resolve())


def run_sequence(config: RunConfig, *, resume: bool = False, parent_run_id: str | None = None,
                 run_name_suffix: str = "", extra_tags: dict | None = None, ray_callbacks: list | None = None,
                 quiet: bool = False) -> SequenceResult:
    """Train and evaluate `config`'s method over its stream; everything lands in MLflow."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from methods.models import build_model
    from orchestrator import tracking
    from orchestrator.data_config import ShardedEvalDataConfig
    from orchestrator.runtime import cluster_has_gpus, ensure_ray
    from streams.manifest import load_stream

    started = time.time()
    tracking.check_reachable(tracking.resolve_tracking_uri(config))  # before any data or Ray work
    manifest = resolve_manifest(config)
    stream = load_stream(manifest)
    built = build_model(config.model.name, config.model.pretrained)  # fail on a bad model before Ray work
    del built.model
    if config.train.batch_size % config.train.num_workers:
        raise ConfigError(f"train.batch_size ({config.train.batch_size}) must be divisible by train.num_workers "
                          f"({config.train.num_workers})")
    ensure_ray(quiet=quiet)
    use_gpu = cluster_has_gpus() if config.train.use_gpu == "auto" else bool(config.train.use_gpu)
    tracking_uri = tracking.resolve_tracking_uri(config)

    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    run_name = tracking.default_run_name(config, stream.name) + run_name_suffix
    resume_from = None
    state = find_resumable(output, run_name) if resume else None
    if resume and state is None:
        raise ConfigError(f"--resume: no unfinished run named {run_name!r} under {output}; start it without --resume")
    if state:
        experiment_id, run_id = state["experiment_id"], state["run_id"]
        resume_from = latest_checkpoint(output / state["ray_name"])
        tracking.client(tracking_uri).update_run(run_id, status="RUNNING")
        print(f"Resuming MLflow run {run_id} from {resume_from or 'the start (no task had finished)'}")
    else:
        experiment_id, run_id = tracking.start_run(config, stream, manifest, parent_run_id=parent_run_id,
                                                   run_name_suffix=run_name_suffix, extra_tags=extra_tags)
    ray_name = f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}-{run_id[:6]}"
    write_state(output / "runs" / f"{ray_name}.json", {
        "run_name": run_name, "run_id": run_id, "experiment_id": experiment_id, "ray_name": ray_name,
        "previous": state["ray_name"] if state else None, "finished": False})

    datasets, skip_counter, planned = build_datasets(config, stream, built.image_size)
    reference = load_reference(config, built.image_size) if config.data.reference else None
    train_names = [f"train_{i}" for i in range(len(stream.tasks))]
    loop_config = {
        "config": config.model_dump(), "manifest": manifest, "tracking_uri": tracking_uri, "run_id": run_id,
        "resume_from": resume_from, "planned_steps": planned, "skip_counter": skip_counter,
        "use_gpu": use_gpu, "fault": fault_injection_from_env(), "reference": reference,
    }
    trainer = TorchTrainer(
        train_sequence,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=config.train.num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": config.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=ray_name, storage_path=str(output),
                                       failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
                                       callbacks=ray_callbacks or None),
        datasets=datasets,
        dataset_config=ShardedEvalDataConfig(train_names, [name for name in datasets if name not in train_names]),
    )
    try:
        result = trainer.fit()
    except BaseException:
        tracking.client(tracking_uri).set_terminated(run_id, status="FAILED")
        raise
    if result.error:
        tracking.client(tracking_uri).set_terminated(run_id, status="FAILED")
        raise result.error
    with result.checkpoint.as_directory() as directory:
        progress = json.loads((Path(directory) / "progress.json").read_text())
    matrix = progress["matrix"]
    control_matrix = progress.get("control", [])
    summary = {k: v for k, v in (summarize(matrix) | summarize_control(control_matrix)).items() if not math.isnan(v)}
    write_state(output / "runs" / f"{ray_name}.json", {
        "run_name": run_name, "run_id": run_id, "experiment_id": experiment_id, "ray_name": ray_name,
        "finished": True})
    tracking.client(tracking_uri).set_terminated(run_id, status="FINISHED")
    return SequenceResult(run_id=run_id, experiment_id=experiment_id, tasks=[t.name for t in stream.tasks],
                          matrix=matrix, summary=summary, tracking_uri=tracking_uri,
                          skipped_samples=progress.get("skipped_samples", 0), wall_seconds=time.time() - started,
                          eval_details=progress.get("eval_details", {}),
                          control_tasks=[t.name for t in stream.control], control_matrix=control_matrix)


def build_datasets(config: RunConfig, stream, image_size: int):
    """One Ray dataset per task split; small tasks are decoded once and kept (no per-epoch re-decode)."""
    import ray

    from methods.models import TokenizerFactory
    from streams.ray_reader import SkipCounter, task_dataset

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same seed, same batches: resumed == uninterrupted
    skip_counter = SkipCounter.remote() if config.data.on_bad_sample == "skip" else None
    factory = TokenizerFactory(config.model.name)
    datasets, planned = {}, []
    workers = config.train.num_workers
    local_batch = config.train.batch_size // workers

    def split_dataset(shard_set, classes: list[str], is_eval: bool):
        on_device = config.data.decode == "device"
        urls = stream.shard_urls(shard_set)
        dataset = task_dataset(urls, image_size, factory, classes, train=False,
                               on_bad_sample=config.data.on_bad_sample, skip_counter=skip_counter,
                               decoders=config.data.decoders, ship_encoded=on_device)
        dataset = dataset.select_columns(["encoded", "key", "text", "label"] if on_device else ["pixels", "text", "label"])
        fraction = 1.0
        if is_eval and config.data.eval_max_samples:
            dataset = capped_eval_dataset(dataset, shard_set.samples, config.data.eval_max_samples)
            if shard_set.samples:
                fraction = min(1.0, config.data.eval_max_samples / shard_set.samples)
        size = fraction * cached_size_estimate(urls, shard_set.samples, image_size, on_device)
        if config.data.cache == "always" or (config.data.cache == "auto" and 0 < size < CACHE_LIMIT_BYTES):
            dataset = dataset.materialize()
        return dataset

    for index, task in enumerate(stream.tasks):
        datasets[f"train_{index}"] = split_dataset(task.train, task.classes, is_eval=False)
        datasets[f"eval_{index}"] = split_dataset(task.eval, task.classes, is_eval=True)
        rows = datasets[f"train_{index}"].count()
        steps_per_epoch = (rows // workers) // local_batch
        if steps_per_epoch == 0:
            raise ConfigError(f"task {task.name!r} has {rows} training samples, fewer than one batch per worker "
                              f"(train.batch_size={config.train.batch_size}, {workers} workers)")
        steps = steps_per_epoch * config.train.epochs_per_task
        if config.train.max_steps_per_task:
            steps = min(steps, config.train.max_steps_per_task)
        planned.append(steps)
    for index, task in enumerate(stream.control):  # evaluated only, never trained
        datasets[f"control_{index}"] = split_dataset(task.eval, task.classes, is_eval=True)
    return datasets, skip_counter, planned


def capped_eval_dataset(dataset, total: int | None, cap: int):
    """At most `cap` rows drawn evenly from the whole split, the same rows in every run.

    A plain prefix would be wrong: eval shards are often written class by class, so the first rows
    would cover only the first classes. Each row is kept with probability cap/total, then the result
    is cut at `cap`. The seed is fixed, not the run's: runs with different seeds are scored on the
    same rows, so their numbers compare."""
    total = total or dataset.count()  # manifests written by vlcl record it; others pay one read
    if total <= cap:
        return dataset
    return dataset.random_sample(cap / total, seed=0).limit(cap)


def load_reference(config: RunConfig, image_size: int):
    """Up to data.reference_samples image-caption pairs from the reference stream's train splits,
    as an object ref of (pixels uint8 (N,H,W,3), captions token ids (N,L))."""
    import numpy as np
    import ray

    from methods.models import TokenizerFactory
    from streams.manifest import BUILTIN_PREFIX, load_stream
    from streams.ray_reader import task_dataset

    source = config.data.reference
    if source.startswith(BUILTIN_PREFIX):
        from streams.builtin import materialize_builtin

        source = str(materialize_builtin(source[len(BUILTIN_PREFIX):], config.data.root))
    spec = load_stream(source)
    urls = [url for task in spec.tasks for url in spec.shard_urls(task.train)]
    dataset = task_dataset(urls, image_size, TokenizerFactory(config.model.name), [], train=False,
                           decoders=config.data.decoders).select_columns(["pixels", "text"])
    batch = dataset.take_batch(config.data.reference_samples, batch_format="numpy")
    return ray.put((np.asarray(batch["pixels"]), np.asarray(batch["text"])))


def write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=1))


def find_resumable(output: Path, run_name: str) -> dict | None:
    """The newest unfinished attempt of `run_name` under `output`, following earlier attempts."""
    states = []
    for path in sorted((output / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime):
        state = json.loads(path.read_text())
        if state.get("run_name") == run_name:
            states.append(state)
    if not states or states[-1].get("finished"):
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


def fault_injection_from_env() -> dict | None:
    """Test hook: VLCL_FAULT_AFTER_TASK=k makes worker 0 crash once after checkpointing task k
    (once per VLCL_FAULT_MARKER file), to exercise FailureConfig and --resume for real."""
    after = os.environ.get("VLCL_FAULT_AFTER_TASK")
    if not after:
        return None
    return {"after_task": int(after), "marker": os.environ.get("VLCL_FAULT_MARKER", "")}


# ----------------------------------------------------------------------------------------------
# workers
# ----------------------------------------------------------------------------------------------
def train_sequence(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the whole task sequence."""
    import ray.train
    import ray.train.torch

    from methods import TaskInfo, get_method
    from methods.models import build_model, set_train_mode
    from orchestrator.tracking import RunLogger
    from streams.manifest import load_stream

    config = RunConfig(**loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if loop_config["use_gpu"] else torch.device("cpu")
    stream = load_stream(loop_config["manifest"])
    tasks = stream.tasks
    seed = config.train.seed

    torch.manual_seed(seed)
    built = build_model(config.model.name, config.model.pretrained)
    model = built.model.to(device)
    method = get_method(config.method.name)(model, built.tokenizer, config.method.hparams)
    autocast = _autocast(config, device)

    progress = {"tasks_done": 0, "matrix": [], "control": [], "global_step": 0, "skipped_samples": 0,
                "eval_details": {}}
    optimizer_state = None
    checkpoint = ray.train.get_checkpoint()
    checkpoint_dir = None
    if checkpoint is not None:
        checkpoint_dir = checkpoint.to_directory()
    elif loop_config.get("resume_from"):
        checkpoint_dir = loop_config["resume_from"]
    if checkpoint_dir:
        progress, optimizer_state = _restore(Path(checkpoint_dir), model, method)
    _broadcast_parameters(model)
    # after restoring: the method keeps reference texts in its state, not the images
    if loop_config.get("reference") is not None and hasattr(method, "set_reference_data"):
        import ray

        from methods.models import normalize_pixels

        pixels, texts = ray.get(loop_config["reference"])
        pixels = torch.from_numpy(pixels)[rank::world]  # each worker distils on its own share
        method.set_reference_data(normalize_pixels(pixels, built.image_mean, built.image_std).to(device),
                                  torch.from_numpy(texts))

    logger = RunLogger(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    system_monitor = None
    if logger and (config.tracking.system_metrics or (config.tracking.system_metrics is None and device.type == "cuda")):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # CPU, memory and (with pynvml) GPU of rank 0's node, as system/* metrics of the run
        system_monitor = SystemMetricsMonitor(loop_config["run_id"], resume_logging=checkpoint_dir is not None,
                                              tracking_uri=loop_config["tracking_uri"])
        system_monitor.start()
    names = [t.name for t in tasks]
    control_names = [t.name for t in stream.control]
    if not progress["matrix"]:  # before any training: the zero-shot row
        row, control_row, details = evaluate_all(method.eval_model(), built, stream, config, device, autocast)
        progress["matrix"], progress["control"] = [row], [control_row]
        progress["eval_details"]["0"] = details
        if logger:
            logger.log_metrics(_eval_metrics(names + control_names, details, progress), step=0)
            logger.log_matrix(names, progress["matrix"], control_names, progress["control"])

    optimizer = None
    for index in range(progress["tasks_done"], len(tasks)):
        task = tasks[index]
        torch.manual_seed(seed * 1000 + index)  # a task's randomness does not depend on how we got here
        steps = loop_config["planned_steps"][index]
        info = TaskInfo(index=index, name=task.name, kind=task.kind, num_tasks=len(tasks),
                        class_names=tuple(task.classes), templates=tuple(task.templates), steps=steps)
        method.before_task(info)
        if optimizer is None or config.train.reset_optimizer_each_task:
            # fused: one kernel for the whole update on a GPU, as the plain loop of bench/throughput.py
            optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=config.train.lr,
                                          weight_decay=config.train.weight_decay, fused=device.type == "cuda")
            if optimizer_state is not None and not config.train.reset_optimizer_each_task:
                optimizer.load_state_dict(optimizer_state)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(config.train.warmup_steps, steps))
        shard = ray.train.get_dataset_shard(f"train_{index}")
        local_batch = config.train.batch_size // world

        def task_batches(epoch: int = 0, shard=shard, index=index):
            for batch in device_batches(
                    shard, config, built.image_size, device, batch_size=local_batch, drop_last=True,
                    local_shuffle_buffer_size=config.train.shuffle_buffer or None,
                    local_shuffle_seed=(seed * 1000 + index) * 1000 + epoch if config.train.shuffle_buffer else None):
                yield _training_batch(batch, built, augment=config.train.augment)

        set_train_mode(model, config.train.freeze_batchnorm)
        step, epoch, sums, counted = 0, 0, {}, 0
        task_started = time.time()
        while step < steps:
            for batch in task_batches(epoch):
                with autocast():
                    losses = method.training_loss(batch)
                losses["loss"].backward()
                average_gradients(method.trainable_parameters())
                if config.train.grad_clip_norm:
                    torch.nn.utils.clip_grad_norm_(method.trainable_parameters(), config.train.grad_clip_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                method.after_step()
                step += 1
                progress["global_step"] += 1
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                counted += 1
                if logger and (step % config.train.log_every_steps == 0 or step == steps):
                    logger.log_metrics({f"train/{k}": v / counted for k, v in sums.items()}
                                       | {"train/lr": schedule.get_last_lr()[0]}, step=progress["global_step"])
                    sums, counted = {}, 0
                if step >= steps:
                    break
            epoch += 1
        train_seconds = time.time() - task_started
        method.after_task(info, lambda: task_batches(epoch))
        model.eval()

        row, control_row, details = evaluate_all(method.eval_model(), built, stream, config, device, autocast)
        progress["matrix"].append(row)
        progress.setdefault("control", []).append(control_row)
        progress["eval_details"][str(index + 1)] = details
        progress["tasks_done"] = index + 1
        if loop_config.get("skip_counter") is not None:
            import ray

            progress["skipped_samples"] = ray.get(loop_config["skip_counter"].total.remote())
        metrics = {"task": index + 1, **_eval_metrics(names + control_names, details, progress),
                   "train/task_seconds": train_seconds, "train/images_per_second": steps * config.train.batch_size / max(train_seconds, 1e-9),
                   "data/skipped_samples": progress["skipped_samples"]}
        metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
        if logger:
            logger.log_metrics({k: v for k, v in metrics.items() if k != "task"}, step=index + 1)
            logger.log_matrix(names, progress["matrix"], control_names, progress["control"])
        _report(config, progress, model, method, optimizer, rank, logger, metrics, index, len(tasks))
        _maybe_inject_fault(loop_config.get("fault"), index + 1, rank)
    if system_monitor is not None:
        system_monitor.finish()


def _report(config, progress, model, method, optimizer, rank, logger, metrics, index, num_tasks) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(model.state_dict(), Path(directory) / "model.pt")
        torch.save(method.state_dict(), Path(directory) / "method.pt")
        if not config.train.reset_optimizer_each_task:
            torch.save(optimizer.state_dict(), Path(directory) / "optimizer.pt")
        (Path(directory) / "progress.json").write_text(json.dumps(progress))
        (Path(directory) / "config.yaml").write_text(to_yaml(config))
        keep = config.tracking.checkpoints
        if logger and (keep == "all" or (keep == "last" and index + 1 == num_tasks)):
            logger.log_checkpoint(directory, index + 1)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _restore(directory: Path, model, method):
    model.load_state_dict(torch.load(directory / "model.pt", map_location="cpu", weights_only=True))
    method.load_state_dict(torch.load(directory / "method.pt", map_location="cpu", weights_only=True))
    optimizer_path = directory / "optimizer.pt"
    optimizer_state = torch.load(optimizer_path, map_location="cpu", weights_only=True) if optimizer_path.exists() else None
    return json.loads((directory / "progress.json").read_text()), optimizer_state


def _maybe_inject_fault(fault: dict | None, tasks_done: int, rank: int) -> None:
    if not fault or fault["after_task"] != tasks_done or rank != 0:
        return
    marker = fault.get("marker")
    if marker:
        if os.path.exists(marker):
            return
        Path(marker).write_text("fired")
    raise RuntimeError(f"injected fault after task {tasks_done} (VLCL_FAULT_AFTER_TASK)")


def _autocast(config: RunConfig, device: torch.device):
    precision = config.model.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def cached_size_estimate(urls: list[str], samples: int | None, image_size: int, encoded: bool) -> int:
    """Bytes a materialised split would hold in the object store (0 when unknown).

    Decoded on CPU it holds uint8 pixels; with `data.decode: device` it holds the files' encoded
    bytes, which the local shards' sizes bound (remote shards: unknown, so `auto` streams them)."""
    from streams.manifest import is_url

    if not encoded:
        return (samples or 0) * image_size * image_size * 3
    paths = [Path(url.removeprefix("file://")) for url in urls]
    if any(is_url(url) or not path.is_file() for url, path in zip(urls, paths)):
        return 0
    return sum(path.stat().st_size for path in paths)


def device_batches(shard, config: RunConfig, image_size: int, device, batch_size: int, **iterate):
    """A dataset shard's batches on `device`: uint8 `pixels` (B,3,H,W), `text` ids and `label`s,
    wherever the images were decoded (`data.decode`). `iterate`: more iter_torch_batches options."""
    on_device = config.data.decode == "device"
    if on_device:
        from streams.image_decode import decode_batch
        iterate["collate_fn"] = _encoded_columns
    for raw in shard.iter_torch_batches(batch_size=batch_size, **iterate):
        if on_device:
            pixels = decode_batch(raw["encoded"], image_size, device, keys=raw["key"])
        else:
            pixels = raw["pixels"].to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
        yield {"pixels": pixels, "text": raw["text"].to(device, non_blocking=True),
               "label": raw["label"].to(device, non_blocking=True)}


def _encoded_columns(batch: dict) -> dict:
    """iter_torch_batches' collate for `data.decode: device`: file bytes and keys stay Python objects."""
    return {"encoded": list(batch["encoded"]), "key": [str(k) for k in batch["key"]],
            "text": torch.as_tensor(batch["text"]), "label": torch.as_tensor(batch["label"])}


def _training_batch(batch: dict, built, augment: bool) -> dict:
    from methods.models import normalize_pixels

    pixels = random_resized_crop(batch["pixels"]) if augment else batch["pixels"]
    return {**batch, "image": normalize_pixels(pixels, built.image_mean, built.image_std), "pixels": pixels}


def random_resized_crop(pixels: torch.Tensor, scale=(0.9, 1.0)) -> torch.Tensor:
    """Per-image random crop (area fraction in `scale`, aspect 3/4-4/3) resized back, batched on device."""
    from torchvision.ops import roi_align

    n, _, h, w = pixels.shape
    area = torch.empty(n, device=pixels.device).uniform_(*scale) * h * w
    log_ratio = torch.empty(n, device=pixels.device).uniform_(math.log(3 / 4), math.log(4 / 3))
    ratio = log_ratio.exp()
    crop_w = (area * ratio).sqrt().clamp(max=w)
    crop_h = (area / ratio).sqrt().clamp(max=h)
    x0 = torch.rand(n, device=pixels.device) * (w - crop_w)
    y0 = torch.rand(n, device=pixels.device) * (h - crop_h)
    boxes = torch.stack([torch.arange(n, device=pixels.device, dtype=torch.float), x0, y0, x0 + crop_w, y0 + crop_h], 1)
    out = roi_align(pixels.float(), boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def average_gradients(parameters) -> None:
    """All-reduce (mean) the gradients over workers, in flat buckets; a no-op in one process."""
    import torch.distributed as dist

    from methods.distributed import is_distributed, world_size

    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads + [None]:
        if grad is not None:
            bucket.append(grad)
            size += grad.numel()
        if bucket and (grad is None or size >= GRADIENT_BUCKET_ELEMENTS):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= world_size()
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, size = [], 0


def _broadcast_parameters(model) -> None:
    import torch.distributed as dist

    from methods.distributed import is_distributed

    if is_distributed():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


@torch.no_grad()
def evaluate_all(model, built, stream, config: RunConfig, device, autocast):
    """Every task's eval set (and the control sets), each worker scoring its own share of the rows.

    Classification adds up the workers' (correct, total); retrieval gathers every worker's features
    and ranks all pairs against all, so the scores are those of the whole eval set at any world
    size. Every worker returns the same row."""
    import ray.train

    from methods.distributed import all_reduce_sum, broadcast_object, gather_ragged_rows
    from orchestrator.evaluation import (accuracy_from_counts, class_text_embeddings, recalls_from_features,
                                         retrieval_features, zero_shot_counts)

    model.eval()
    row, control_row, details = [], [], {}
    stream_classes = stream.stream_classes()
    stream_classifier = None
    evaluated = [(task, f"eval_{i}", False) for i, task in enumerate(stream.tasks)]
    evaluated += [(task, f"control_{i}", True) for i, task in enumerate(stream.control)]
    for task, dataset_name, is_control in evaluated:
        batches = device_batches(ray.train.get_dataset_shard(dataset_name), config, built.image_size, device,
                                 batch_size=config.eval.batch_size)
        if task.kind == "classification":
            # A control set is scored over its own classes: it is never part of the stream's label space.
            if stream.eval_classifier == "stream" and not is_control:
                if stream_classifier is None:
                    stream_classifier = class_text_embeddings(model, built.tokenizer, stream_classes,
                                                              task.templates, device)
                classifier = stream_classifier
                label_map = torch.tensor([stream_classes.index(c) for c in task.classes])
            else:
                classifier = class_text_embeddings(model, built.tokenizer, task.classes, task.templates, device)
                label_map = None
            counts = zero_shot_counts(model, classifier, batches, built.image_mean, built.image_std, device,
                                      label_map=label_map, autocast=autocast)
            correct, total = all_reduce_sum(torch.tensor(counts, device=device)).tolist()
            result = accuracy_from_counts(correct, total, f"the eval set of task {task.name!r} ({dataset_name})")
        else:
            images, texts = (gather_ragged_rows(f) for f in retrieval_features(
                model, batches, built.image_mean, built.image_std, device, autocast=autocast))
            result = recalls_from_features(images, texts, f"the eval set of task {task.name!r} ({dataset_name})")
        details[task.name] = result
        (control_row if is_control else row).append(result["score"])
    # Rank 0's copy, so that float noise can never make workers disagree about the matrix.
    return broadcast_object((row, control_row, details))


def _eval_metrics(names: list[str], details: dict, progress: dict) -> dict[str, float]:
    metrics = {}
    for name in names:
        for key, value in details[name].items():
            if key != "samples":
                metrics[f"eval/{name}/{key}"] = value
    metrics.update(summarize(progress["matrix"]))
    metrics.update(summarize_control(progress.get("control", [])))
    return metrics
