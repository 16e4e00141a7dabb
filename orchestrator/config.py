"""Run configuration: YAML + `key=value` overrides -> one validated pydantic model.

Every default lives here; a bad field fails before any work, naming its dotted path and why.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator,
                      model_validator)

from methods import MethodHparams, get_method  # import-light (torch, open_clip): no Ray, no MLflow


class ConfigError(ValueError):
    """A run config that cannot be used; the message names every bad field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    name: str = Field("vlcl-tiny", description="open_clip model name (open_clip.list_models()) or vlcl-tiny / vlcl-small")
    pretrained: str | None = Field(None, description="open_clip pretrained tag (needs network) or a local checkpoint file")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU; master weights stay fp32")


class MethodConfig(_Section):
    name: str = Field("finetune", description="a method from `vlcl methods`")
    hparams: SerializeAsAny[MethodHparams] = Field(
        default_factory=MethodHparams, description="the method's hyperparameters (see `vlcl methods NAME`), validated "
                                                   "into the method's own typed model, defaults resolved")

    @model_validator(mode="before")
    @classmethod
    def _typed_hparams(cls, data: Any) -> Any:
        """The method's own Hparams model, built once here; workers receive it typed."""
        if not isinstance(data, dict):
            return data
        method = get_method(data.get("name", cls.model_fields["name"].default))  # raises with the known names
        hparams = data.get("hparams") or {}
        if isinstance(hparams, MethodHparams):
            hparams = hparams.model_dump(exclude_unset=True)
        return {**data, "hparams": method.validate_hparams(hparams)}


class TrainConfig(_Section):
    batch_size: int = Field(32, ge=1, description="global batch size (split evenly over workers)")
    epochs_per_task: int = Field(10, ge=1, description="passes over each task's training shards")
    max_steps_per_task: int | None = Field(None, ge=1, description="stop a task after this many optimizer steps")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (ZSCL: 0)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps at the start of every task, then cosine to 0")
    grad_clip_norm: float | None = Field(None, gt=0, description="clip the global gradient norm to this value")
    reset_optimizer_each_task: bool = Field(True, description="new optimizer state per task (ZSCL, CTP do this)")
    seed: int = Field(0, description="seeds model init, shuffling and every task's RNG")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel processes)")
    use_gpu: bool | Literal["auto"] = Field("auto", description="one GPU per worker; auto = when the cluster has GPUs")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker")
    augment: bool = Field(False, description="random resized crop (scale 0.9-1) on the training device")
    freeze_batchnorm: bool = Field(True, description="keep BatchNorm layers (conv image towers) in eval mode while "
                                   "training: pretrained running statistics, never updated")
    shuffle_buffer: int = Field(1024, ge=0, description="rows in the seeded local shuffle buffer (0 = no shuffling)")
    log_every_steps: int = Field(10, ge=1, description="log training losses every N optimizer steps")
    max_failures: int = Field(0, ge=-1, description="worker failures to recover from (restarts at the last finished task)")
    launch: Literal["auto", "in_process", "ray"] = Field(
        "auto", description="where training runs: in_process (this process: no Ray start, no worker actors) or ray "
                            "(Ray Train worker actors); auto: in_process for one worker whose tasks are all kept "
                            "decoded, when no cluster is named ($RAY_ADDRESS) or the run is a sweep's or study's trial "
                            "(it trains in the trial's own process), else ray. The same matrix either way (losses to "
                            "float rounding: a Ray worker or trial uses train.cpus_per_worker threads)")


class DataConfig(_Section):
    root: str | None = Field(None, description="where built-in streams are materialised ($VLCL_DATA_DIR, ~/.cache/vlcl)")
    on_bad_sample: Literal["error", "skip"] = Field("error", description="error: stop naming shard+key; skip: drop and count")
    decoders: int = Field(1, ge=1, description="Ray Data actors decoding images per dataset")
    decode: Literal["cpu", "device"] = Field(
        "cpu", description="where images are decoded and resized: cpu (Ray Data actors ship uint8 pixels) or device "
                           "(actors ship the encoded bytes; the training worker decodes each batch on its device, "
                           "JPEG by nvjpeg on a GPU)")
    cache: Literal["auto", "always", "never"] = Field(
        "auto", description="materialise decoded tasks in the object store (auto: when a task is small)")
    eval_max_samples: int | None = Field(None, ge=1, description="evaluate at most this many samples per task, "
                                         "drawn evenly from the whole eval split (seeded)")
    reference: str | None = Field(None, description="stream manifest of reference image-text pairs for methods that "
                                  "distil on reference data (zscl); never the training stream")
    reference_samples: int = Field(512, ge=1, description="reference pairs loaded from data.reference")
    reference_texts: int | None = Field(
        None, ge=1, description="captions kept for methods that draw reference texts apart from the images "
                                "(ZSCL), from the reference stream's captions.txt when it has one (`vlcl streams "
                                "build reference` writes it); default: data.reference_samples")


class EvalConfig(_Section):
    batch_size: int = Field(256, ge=1, description="evaluation batch size")


class TrackingConfig(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    experiment: str | None = Field(None, description="MLflow experiment (default: the stream's name)")
    checkpoints: Literal["all", "last", "none"] = Field("all", description="per-task checkpoints logged to MLflow")
    system_metrics: bool | None = Field(None, description="log CPU/memory/GPU metrics (default: on for GPU runs)")
    run_name: str | None = Field(None, description="MLflow run name (default <method>-<stream>-s<seed>)")
    description: str | None = Field(None, description="one line shown as the run's description")


# Settings that may differ from task to task (`per_task`), besides any method.hparams.<field>.
PER_TASK_TRAIN_FIELDS = ("lr", "weight_decay", "warmup_steps", "max_steps_per_task", "epochs_per_task",
                         "grad_clip_norm")


class TaskSettings(BaseModel):
    """What one task trains with: the top-level settings with that task's `per_task` overrides applied."""

    model_config = ConfigDict(frozen=True)

    lr: float
    weight_decay: float
    warmup_steps: int
    max_steps_per_task: int | None
    epochs_per_task: int
    grad_clip_norm: float | None
    hparams: SerializeAsAny[MethodHparams]


class RunConfig(_Section):
    stream: str = Field("builtin:digits", description="stream manifest path, or builtin:<name> (digits; with `make sources`: "
                        "split-fmnist, mini-mtil, offline-pretrain)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output_dir: str = Field("vlcl_runs", validate_default=True, description="Ray Train storage (checkpoints, run state); shared on a cluster")
    task_order: list[str] | None = Field(
        None, description="the stream's task names in the order to train them (default: the manifest's order)")
    per_task: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="settings for single tasks, keyed by task name or 0-based index: dotted keys "
                    f"train.{{{','.join(PER_TASK_TRAIN_FIELDS)}}} or method.hparams.<field>, e.g. "
                    "{aircraft: {train.lr: 5.0e-5}}")

    @model_validator(mode="after")
    def _cross_field_checks(self):
        if self.train.batch_size % self.train.num_workers:
            raise ValueError(f"train.batch_size: {self.train.batch_size} is not divisible by train.num_workers "
                             f"({self.train.num_workers}); every worker takes an equal share of each batch")
        if self.train.launch == "in_process" and self.train.num_workers != 1:
            raise ValueError(f"train.launch: in_process trains in this one process; train.num_workers is "
                             f"{self.train.num_workers}: set train.launch=ray (or auto) for data-parallel workers")
        if get_method(self.method.name).needs_reference_data and not self.data.reference:
            raise ValueError(f"data.reference: method {self.method.name!r} distils on reference image-text pairs; give "
                             f"a stream manifest that is not the training stream (its train splits are used)")
        if self.data.reference and self.data.reference == self.stream:
            raise ValueError("data.reference: must not be the training stream")
        if self.task_order is not None and len(set(self.task_order)) != len(self.task_order):
            raise ValueError(f"task_order: names a task twice ({self.task_order})")
        for key, overrides in self.per_task.items():
            settings = self.task_settings(key)  # every override is a known field with a valid value
            for dotted in overrides:  # kept as validated (YAML's "5e-5" is a string until then)
                field = dotted.split(".")[-1]
                overrides[dotted] = getattr(settings.hparams if dotted.startswith("method.") else settings, field)
        return self

    def task_settings(self, *keys: str) -> TaskSettings:
        """The settings of the task known by `keys` (its name and its index as a string)."""
        train = {name: getattr(self.train, name) for name in PER_TASK_TRAIN_FIELDS}
        hparams = self.method.hparams.model_dump(exclude_unset=True)
        for key in keys:
            for dotted, value in (self.per_task.get(key) or {}).items():
                section, _, field = dotted.partition(".")
                where = f"per_task.{key}.{dotted}"
                if section == "train" and field in PER_TASK_TRAIN_FIELDS:
                    train[field] = value
                elif section == "method" and field.startswith("hparams.") and "." not in field[len("hparams."):]:
                    hparams[field[len("hparams."):]] = value
                else:
                    raise ValueError(f"{where}: not a per-task setting; use train.{{{','.join(PER_TASK_TRAIN_FIELDS)}}}"
                                     f" or method.hparams.<field>")
        try:
            checked = TrainConfig(**{**self.train.model_dump(), **train})
        except ValidationError as err:
            raise ValueError(f"per_task {'/'.join(keys)}: " + "; ".join(
                f"train.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())) from None
        method = get_method(self.method.name)
        try:
            typed = method.validate_hparams(hparams)
        except ValueError as err:
            raise ValueError(f"per_task {'/'.join(keys)}: {err}") from None
        fixed = [f for f in method.fixed_hparams if getattr(typed, f) != getattr(self.method.hparams, f)]
        if fixed:
            raise ValueError(f"per_task {'/'.join(keys)}: method.hparams.{fixed[0]} cannot differ per task: it shapes "
                             f"state {method.name} keeps across tasks (set it once, under method.hparams)")
        return TaskSettings(**{name: getattr(checked, name) for name in PER_TASK_TRAIN_FIELDS}, hparams=typed)

    @field_validator("output_dir")
    @classmethod
    def _absolute_output(cls, value: str) -> str:
        return value if "://" in value else str(Path(value).expanduser().resolve())


class PretrainConfig(_Section):
    """`vlcl pretrain`'s settings (LiT alignment); each field is the flag of the same name."""

    stream: str = Field("builtin:offline-pretrain", description="caption stream: manifest path or builtin:<name>")
    model: str = Field("EffLite0-MiniLM", description="model with a timm image trunk")
    pretrained: str | None = Field(None, description="start from this checkpoint instead of the towers' packages")
    epochs: int | None = Field(None, ge=1, description="passes over the caption pairs (default 5)")
    steps: int | None = Field(None, ge=1, description="optimizer steps (instead of epochs)")
    batch_size: int = Field(128, ge=1, description="pairs per step; more = more negatives")
    lr: float = Field(1e-4, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up, then cosine to 0")
    seed: int = Field(0, description="seeds the projection init and the batch order")
    out: str = Field(description="checkpoint file to write (a .json summary goes beside it)")
    eval_streams: list[str] = Field(default_factory=list, description="also scored before and after")
    eval_max_samples: int | None = Field(None, ge=1, description="evaluate at most this many samples per task")
    data_root: str | None = Field(None, description="where built-in streams live")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:1, ...")
    threads: int | None = Field(None, ge=1, description="torch CPU threads")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI")
    experiment: str = Field("pretrain", description="MLflow experiment")
    run_name: str | None = Field(None, description="MLflow run name (default lit-<model>-<stream>-s<seed>)")
    log_every: int = Field(10, ge=1, description="print the loss every N steps")

    @model_validator(mode="after")
    def _one_length(self):
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give exactly one of epochs and steps")
        if self.epochs is None and self.steps is None:
            self.epochs = 5
        return self


def pretrain_config(values: dict[str, Any], flag_prefix: str = "--") -> PretrainConfig:
    """Validate `vlcl pretrain`'s options; an error names the flag (`--batch-size`) and the rule."""
    try:
        return PretrainConfig(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"])
            where = f"{flag_prefix}{where.replace('_', '-')}" if where else "options"
            problems.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
        raise ConfigError("pretrain " + "; ".join(problems)) from None


def _format_errors(err: ValidationError, source: str, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        path = prefix + ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {path}: {msg}")
    return f"invalid run config ({source}):\n" + "\n".join(lines)


def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 1e-4 -> float, true -> bool, [1,2] -> list, else str."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def _validate(data: dict, source: str) -> RunConfig:
    try:
        return RunConfig(**data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    except (KeyError, ValueError) as err:  # unknown method / hparams raised inside a validator
        raise ConfigError(f"invalid run config ({source}):\n  {err}") from None


def read_yaml_mapping(path: str | os.PathLike, error: type[Exception], what: str, expected: str,
                      allow_empty: bool = False) -> dict:
    """Parse a YAML file that must hold a mapping; `error` names the file and what was wrong."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise error(f"{what} {path} is not valid YAML: {err}") from None
    if data is None and allow_empty:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{what} {path} must be a mapping ({expected})")
    return data


# The built-in demo (`vlcl run` with no config file) = the field defaults plus these. A from-scratch
# model starts every digits task at a saddle: its two new class prompts encode to nearly the same
# text feature, and the fastest way down from the confidently wrong first logits is to merge them,
# which parks the loss at ln 2 until Adam's noise finds the way out (after ~70 full-rate steps). The
# default 10 epochs (90 steps) decay the rate by cosine first, so some tasks never learned; 50 epochs
# with a short warm-up leave the rate high long enough in every seed we measured (~30 s a run).
DEMO_DEFAULTS = {"train": {"epochs_per_task": 50, "warmup_steps": 10}}


def load_run_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The config from a YAML file (or the built-in demo: DEMO_DEFAULTS) with `key.sub=value` overrides."""
    if path is None:
        data, source = copy.deepcopy(DEMO_DEFAULTS), "built-in defaults"
    else:
        source = str(path)
        data = read_yaml_mapping(path, ConfigError, "run config", "of sections: stream, model, method, train, ...",
                                 allow_empty=True)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=1e-4")
        key, value = item.split("=", 1)
        set_dotted(data, key.strip(), parse_value(value))
    return _validate(data, source)


def load_base_config(base: str | dict, *, source: str, relative_to: Path | None,
                     error: type[ConfigError] = ConfigError) -> RunConfig:
    """The `base:` run config of a sweep or study file: a YAML path (relative to `relative_to`, the
    file's folder) or a mapping. Every problem is an `error` naming `source` and `base`."""
    if isinstance(base, str):
        path = Path(base)
        if not path.is_absolute() and relative_to is not None:
            path = relative_to / path
        if not path.is_file():
            raise error(f"{source}: base: run config {path} does not exist")
        try:
            return load_run_config(path)
        except ConfigError as err:
            raise error(f"{source}: base: {err}") from None
    try:
        return RunConfig(**base)
    except ValidationError as err:
        raise error(_format_errors(err, f"{source}: base", prefix="base.")) from None
    except (KeyError, ValueError) as err:  # unknown method / hparams raised inside a validator
        raise error(f"invalid run config ({source}: base):\n  base.{err}") from None  # err names its field


def as_data(config: RunConfig) -> dict:
    """The config as plain data that validates back to it. Method hyperparameters keep only the
    fields that were set, so that a new `method.name` does not inherit the old method's fields."""
    data = config.model_dump()
    data["method"]["hparams"] = config.method.hparams.model_dump(exclude_unset=True)
    return data


def with_overrides(config: RunConfig, values: dict[str, Any]) -> RunConfig:
    """A copy of `config` with dotted keys replaced (used by sweeps for each trial)."""
    data = as_data(config)
    for key, value in values.items():
        set_dotted(data, key, value)
    return _validate(data, "overrides " + ", ".join(values))


def flatten(config: RunConfig) -> dict[str, str]:
    """Dotted key -> value string, for MLflow params: every resolved value, defaults included; the
    method's hyperparameters as `method.<field>` beside `method.name`."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            out[prefix] = str(node)

    data = config.model_dump()
    hparams = data["method"].pop("hparams")
    walk("", data)
    for key, value in hparams.items():
        out[f"method.{key}"] = str(value)
    return out


def to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(), sort_keys=False)
