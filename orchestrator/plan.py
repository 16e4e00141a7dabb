"""The typed plan a run hands from its driver to every training worker, and the progress record.

`build_plan` does everything that can fail on the driver, before Ray starts: it opens the stream,
applies `task_order`, resolves each task's settings (`per_task`), counts steps, and decides which
splits a worker decodes once and keeps (`SplitPlan.cached`) and which stream through Ray Data.
Workers receive the plan as it is (one pickled object, no string dict) and need nothing else.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from methods import get_method
from orchestrator.config import ConfigError, RunConfig, TaskSettings

CACHE_LIMIT_BYTES = 512 * 2**20  # data.cache=auto keeps a split decoded in memory below this size


@dataclass(frozen=True)
class SplitPlan:
    """One split's shards and how a worker reads them."""

    urls: tuple[str, ...]
    samples: int
    cached: bool  # decoded once and kept in the worker's memory; else read per pass (Ray Data for training)
    cap: int | None = None  # eval: score the capped selection of at most this many rows


@dataclass(frozen=True)
class TaskPlan:
    index: int  # position in the training order (control sets: position among them)
    name: str
    kind: Literal["classification", "retrieval"]
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    eval: SplitPlan
    train: SplitPlan | None = None  # None for control sets
    steps: int = 0
    settings: TaskSettings | None = None

    @property
    def train_dataset_name(self) -> str:
        return f"train_{self.index}"


@dataclass(frozen=True)
class FaultInjection:
    """Test hooks. VLCL_FAULT_AFTER_TASK=k: worker 0 crashes once after checkpointing task k, once per
    VLCL_FAULT_MARKER file, to exercise FailureConfig and --resume for real. VLCL_HOLD_AFTER_TASK=k:
    worker 0 of the first run to get there (it writes its run id to the VLCL_HOLD_MARKER file) stops
    after logging task k's scores, before checkpointing and reporting it, until it is killed: where
    a killed sweep driver leaves a trial whose records are ahead of its last checkpoint. Read where
    `run_sequence` runs: a sweep's trials run in Ray's worker processes, which have the environment
    Ray started with, not later changes to the driver's."""

    after_task: int = 0
    marker: str = ""
    hold_after_task: int = 0
    hold_marker: str = ""

    @classmethod
    def from_env(cls) -> "FaultInjection | None":
        after, hold = os.environ.get("VLCL_FAULT_AFTER_TASK"), os.environ.get("VLCL_HOLD_AFTER_TASK")
        if not after and not hold:
            return None
        return cls(int(after or 0), os.environ.get("VLCL_FAULT_MARKER", ""), int(hold or 0),
                   os.environ.get("VLCL_HOLD_MARKER", ""))


@dataclass(frozen=True)
class RunPlan:
    config: RunConfig
    manifest: str
    stream_name: str
    eval_classifier: Literal["task", "stream"]
    stream_classes: tuple[str, ...]
    tasks: tuple[TaskPlan, ...]
    control: tuple[TaskPlan, ...]
    image_size: int
    reference: SplitPlan | None = None
    reference_captions: str | None = None  # captions.txt of the reference stream: texts apart from its images
    # filled in by the driver once the run exists
    use_gpu: bool = False
    tracking_uri: str = ""
    run_id: str = ""
    resume_from: str | None = None
    fault: FaultInjection | None = None
    progress_sink: object = None  # a Ray actor handle the console reads; None: no live progress
    started_at: float = 0.0  # driver's time.time() when the run was asked for (first-step latency)
    shared: object = None  # a sweep's SharedValues actor: what its trials compute once (zero-shot row, initial-model features)
    tune_gate: object = None  # a sweep trial's Ray queue: an item per task Tune continued (`wait_for_tune`)
    continues_run: bool = False  # resumed into an MLflow run that may hold points of tasks trained again
    launch: Literal["in_process", "ray"] = "ray"  # train.launch resolved (`resolve_launch`)
    checkpoint_root: str | None = None  # in_process: where task checkpoints are written (on Ray, Ray Train keeps them)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def control_names(self) -> list[str]:
        return [t.name for t in self.control]

    @property
    def streamed_tasks(self) -> list[TaskPlan]:
        """Tasks whose training split streams through Ray Data (too large to keep decoded)."""
        return [t for t in self.tasks if not t.train.cached]


def digest(decisive: dict) -> str:
    """A key for what a sweep's trials share: SHA-1 of everything that decides it, as sorted JSON."""
    import hashlib

    return hashlib.sha1(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()


def zero_shot_key(plan: RunPlan) -> str:
    """What decides a run's zero-shot row: the starting model (name, weights, seed), the stream, its
    order and its eval sets, and the method (whose eval_model is scored). Trials of a sweep with the
    same key have the same row; their learning rates, method hyperparameters and schedules act only
    in training."""
    config = plan.config
    decisive = {"model": config.model.model_dump(), "seed": config.train.seed, "manifest": plan.manifest,
                "task_order": config.task_order, "eval": config.eval.model_dump(), "data": config.data.model_dump(),
                "method": config.method.name, "image_size": plan.image_size}
    return digest(decisive)


def eval_set_key(plan: RunPlan, task: TaskPlan, share: tuple[int, int]) -> str:
    """What decides a worker's decoded rows of an eval set: its shards, cap and classes, the image
    size, tokenizer and decode settings, and the worker's share (rank, world size)."""
    config = plan.config
    decisive = {"urls": task.eval.urls, "cap": task.eval.cap, "classes": task.classes, "image_size": plan.image_size,
                "tokenizer": config.model.name, "decode": config.data.decode, "on_bad_sample": config.data.on_bad_sample,
                "share": share}
    return "eval-set:" + digest(decisive)


def initial_model_features_key(plan: RunPlan, first_task: int) -> str:
    """What decides the tensors a method computes from the frozen starting model alone
    (`ContinualMethod.initial_model_features`): the starting model (name, weights, seed, precision,
    device kind), the method and the hyperparameters it names in `initial_model_feature_hparams` (as
    set for `first_task`, the first task this attempt trains), the tasks' class prompts, and the
    reference texts (the reference stream, how many samples and captions are read from it)."""
    config = plan.config
    hparams = plan.tasks[first_task].settings.hparams
    decisive = {"model": config.model.model_dump(), "seed": config.train.seed, "use_gpu": plan.use_gpu,
                "method": config.method.name,
                "hparams": {h: getattr(hparams, h) for h in get_method(config.method.name).initial_model_feature_hparams},
                "tasks": [(t.name, t.classes, t.templates) for t in plan.tasks],
                "reference": plan.reference.urls if plan.reference else None,
                "reference_samples": plan.reference.samples if plan.reference else None,
                "reference_texts": config.data.reference_texts, "reference_captions": plan.reference_captions,
                "on_bad_sample": config.data.on_bad_sample}
    return digest(decisive)


@dataclass
class Progress:
    """What a run has done so far; saved in every task checkpoint as progress.json."""

    tasks_done: int = 0
    global_step: int = 0
    matrix: list[list[float]] = field(default_factory=list)  # row 0: zero-shot; row i: after task i
    control: list[list[float]] = field(default_factory=list)  # the same rows for the control sets
    eval_details: dict[str, dict] = field(default_factory=dict)  # str(row) -> task -> metrics
    skipped_samples: int = 0
    task_settings: list[dict] = field(default_factory=list)  # the settings each trained task used
    first_step_seconds: float = 0.0  # from asking for the run to this attempt's first optimizer step

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Progress":
        return cls(**json.loads(text))


def _split(stream, shard_set, image_size: int, config: RunConfig, cap: int | None = None) -> SplitPlan:
    from streams.local_reader import count_rows
    from streams.manifest import is_url

    urls = tuple(stream.shard_urls(shard_set))
    samples = shard_set.samples or count_rows(list(urls))  # manifests written by vlcl record it
    kept = min(samples, cap) if cap else samples
    local = not any(is_url(u) for u in urls)
    if config.data.decode == "device":
        size = sum(Path(u.removeprefix("file://")).stat().st_size for u in urls) * kept // max(samples, 1) if local else 0
    else:
        size = kept * image_size * image_size * 3
    cached = config.data.cache == "always" or (config.data.cache == "auto" and local and size < CACHE_LIMIT_BYTES)
    return SplitPlan(urls=urls, samples=samples, cached=cached, cap=cap if cap and cap < samples else None)


def ordered_tasks(stream, task_order: list[str] | None) -> list:
    if task_order is None:
        return list(stream.tasks)
    by_name = {t.name: t for t in stream.tasks}
    unknown = [n for n in task_order if n not in by_name]
    if unknown:
        raise ConfigError(f"task_order: {unknown} are not tasks of stream {stream.name!r} ({list(by_name)})")
    return [by_name[n] for n in task_order]


def build_plan(config: RunConfig, image_size: int) -> RunPlan:
    """Validate `config` against its stream and lay out every task. Raises ConfigError / StreamError."""
    from streams.builtin import open_stream

    manifest, stream = open_stream(config.stream, config.data.root)
    tasks = ordered_tasks(stream, config.task_order)
    names = [t.name for t in tasks]
    for key in config.per_task:
        if key not in names and not (key.isdigit() and int(key) < len(tasks)):
            raise ConfigError(f"per_task.{key}: not a task of stream {stream.name!r}: give a task name ({names}) "
                              f"or an index below {len(tasks)}")
    cap = config.data.eval_max_samples
    planned = []
    for index, task in enumerate(tasks):
        try:
            settings = config.task_settings(task.name, str(index))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        train = _split(stream, task.train, image_size, config)
        if train.samples < config.train.batch_size:
            raise ConfigError(f"task {task.name!r} has {train.samples} training samples, fewer than one batch "
                              f"(train.batch_size={config.train.batch_size})")
        steps = (train.samples // config.train.batch_size) * settings.epochs_per_task
        if settings.max_steps_per_task:
            steps = min(steps, settings.max_steps_per_task)
        planned.append(TaskPlan(index=index, name=task.name, kind=task.kind, classes=tuple(task.classes),
                                templates=tuple(task.templates), train=train,
                                eval=_split(stream, task.eval, image_size, config, cap), steps=steps,
                                settings=settings))
    control = tuple(TaskPlan(index=i, name=t.name, kind=t.kind, classes=tuple(t.classes), templates=tuple(t.templates),
                             eval=_split(stream, t.eval, image_size, config, cap))
                    for i, t in enumerate(stream.control))
    reference, reference_captions = None, None
    if config.data.reference:
        from streams.protocols import REFERENCE_CAPTIONS_NAME

        reference_manifest, reference_stream = open_stream(config.data.reference, config.data.root)
        urls = tuple(u for t in reference_stream.tasks for u in reference_stream.shard_urls(t.train))
        reference = SplitPlan(urls=urls, samples=config.data.reference_samples, cached=True)
        captions = Path(reference_manifest).parent / REFERENCE_CAPTIONS_NAME
        reference_captions = str(captions) if captions.is_file() else None
    return RunPlan(config=config, manifest=manifest, stream_name=stream.name, eval_classifier=stream.eval_classifier,
                   stream_classes=tuple(stream.stream_classes()), tasks=tuple(planned), control=control,
                   image_size=image_size, reference=reference, reference_captions=reference_captions)
