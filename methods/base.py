"""The continual-method interface every method implements, and the task loss they share.

A method wraps an open_clip model and owns everything it keeps across tasks. The training loop
that drives it (vlcl's Ray Train loop, or anyone's plain PyTorch loop) calls, per task:

    if method.needs_reference_data:
        method.set_reference_data(reference_images, reference_texts)   # once, before the first task
    for task in tasks:                         # TaskInfo(..., steps=planned steps, train_samples=rows)
        method.set_hparams(hparams_of(task))   # only where per-task settings change the method's hparams
        method.before_task(task)
        optimizer = AdamW(method.trainable_parameters(), ...)
        for batch in task_batches:
            if method.needs_independent_batch:
                batch["independent"] = next(independent_batches)   # see below
            losses = method.training_loss(batch)   # {"loss": total, "<term>": ..., ...}
            losses["loss"].backward(); optimizer.step(); optimizer.zero_grad()
            method.after_step(batch, losses)
        method.after_task(task, batches_of_the_task)
        evaluate(method.eval_model())

The loop owns backward, the optimizer, AMP and gradient averaging; the method only returns named
loss tensors, so every term can be logged and a new term needs no change to the loop.

A batch is a dict: `image` (B,3,H,W) normalised float, `pixels` (B,3,H,W) uint8 (the same images
before normalisation, for methods that store samples), `text` (B,L) token ids, `label` (B,) int64
(-1 where a sample has no label). A method whose class sets `needs_independent_batch` also needs
`independent`: a dict with the same four keys holding a second batch of the *current* task, drawn
independently of the training batch (its own shuffle) and preprocessed for evaluation (no
augmentation), as the ZSCL harness's LwF reference stream.

What a method needs from the loop is declared on its class, never sniffed (defaults False):
`needs_reference_data` (call `set_reference_data` before the first task), `trains_logit_scale`
(`trainable_parameters()` includes `logit_scale`; the method clamps it), `needs_independent_batch`.

Some methods compute tensors from the frozen starting model and fixed inputs alone (ZSCL's teacher
features of its reference texts, MulKI's pretrained teacher's class-prompt features): every run
that starts from the same model with the same inputs computes the same ones. A class that sets
`has_initial_model_features` lets a loop running many such runs (a sweep) compute them once:

    features = method.initial_model_features(tasks)   # {name: CPU tensor}, after set_reference_data
    other_method.use_initial_model_features(features) # another run: same starting model and inputs
    # torch.save(features, path) / torch.load(path, weights_only=True) carries them between processes

The imported tensors replace the method's own computation, so its losses are bit-identical to a run
that computed them (for the same model, inputs, device and precision). Each feature travels with the
token ids it was computed from, and a method refuses one whose tokens differ from its own inputs; the
starting model's identity and `initial_model_feature_hparams` are the caller's to match.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from methods.losses import clip_contrastive_loss
from methods.models import normalize_pixels

Batch = dict[str, torch.Tensor]
BatchSource = Callable[[], Iterator[Batch]]


class HparamError(ValueError):
    """Hyperparameters that do not validate; the message names the method and each bad field."""


class InitialModelFeaturesError(ValueError):
    """Imported initial-model features that do not fit this method or this run's inputs."""


TOKENS_SUFFIX = ".tokens"  # initial_model_features: "<name>.tokens" holds the token ids "<name>" was computed from


@dataclass(frozen=True)
class TaskInfo:
    """What a method may know about the task it is about to learn."""

    index: int
    name: str
    kind: Literal["classification", "retrieval"]
    num_tasks: int
    class_names: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    steps: int = 0  # optimizer steps planned for this task (0 = unknown)
    train_samples: int = 0  # rows in the task's training split (0 = unknown)
    extra: dict = field(default_factory=dict)


class MethodHparams(BaseModel):
    """Hyperparameters every method has: how the current task itself is learned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_loss: Literal["auto", "contrastive", "class_prompts"] = Field(
        "auto", description="auto: class_prompts for classification tasks, contrastive for retrieval tasks")
    label_smoothing: float = Field(0.2, ge=0.0, lt=1.0, description="label smoothing of the class-prompt CE (ZSCL MTIL: 0.2)")


class ContinualMethod:
    """Base of all methods. Subclasses set `name`, `Hparams`, a one-line `summary`, and override hooks."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Hparams: ClassVar[type[MethodHparams]] = MethodHparams
    # what the method needs from the loop (see the module docstring)
    needs_reference_data: ClassVar[bool] = False
    trains_logit_scale: ClassVar[bool] = False
    needs_independent_batch: ClassVar[bool] = False
    # hyperparameters that shape state built once (memories, queues, seeds): set_hparams refuses to change them
    fixed_hparams: ClassVar[tuple[str, ...]] = ()
    # computes tensors from the frozen starting model and fixed inputs alone (see the module docstring) ...
    has_initial_model_features: ClassVar[bool] = False
    # ... and these hyperparameters change them (runs that differ in them cannot share the tensors)
    initial_model_feature_hparams: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, tokenizer, hparams: MethodHparams | dict | None = None, **overrides: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.hparams = self.validate_hparams({**(dict(hparams) if hparams else {}), **overrides})
        self.task: TaskInfo | None = None
        self._class_prompt_tokens: torch.Tensor | None = None
        self._imported_initial_features: dict[str, torch.Tensor] = {}

    # ---- hyperparameters -------------------------------------------------------------------
    @classmethod
    def validate_hparams(cls, values: dict | MethodHparams) -> MethodHparams:
        if isinstance(values, cls.Hparams):
            return values
        try:
            return cls.Hparams(**dict(values))
        except ValidationError as err:
            problems = "; ".join(
                f"method.hparams.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
            known = ", ".join(cls.Hparams.model_fields)
            raise HparamError(f"{cls.name}: {problems} (known fields: {known})") from None

    def set_hparams(self, hparams: MethodHparams | dict) -> None:
        """Replace the hyperparameters between tasks (call before `before_task` of the task they are for).

        `hparams` is the complete set for the coming task, validated like the constructor's (fields
        it leaves out take their defaults, not their previous values). Fields in `fixed_hparams`
        shape state built once (a memory's budget, a queue, a seed) and must keep their value.
        Subclasses that derive state from hparams extend this and rebuild that state.
        """
        new = self.validate_hparams(hparams)
        old_values, new_values = self.hparams.model_dump(), new.model_dump()
        changed = [f for f in self.fixed_hparams if old_values[f] != new_values[f]]
        if changed:
            raise HparamError(f"{self.name}: " + "; ".join(
                f"method.hparams.{f} cannot change between tasks ({old_values[f]!r} -> {new_values[f]!r})" for f in changed)
                + "; it shapes state kept across tasks, so set it once for the whole run")
        self.hparams = new

    # ---- hooks -----------------------------------------------------------------------------
    def before_task(self, task: TaskInfo) -> None:
        self.task = task
        self._class_prompt_tokens = self.class_prompt_tokens(task)

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        loss = self.task_loss(batch)
        return {"loss": loss, "task": loss}

    def after_step(self, batch: Batch, losses: dict[str, torch.Tensor]) -> None:
        """After the optimizer step: `batch` is the dict given to `training_loss`, `losses` what it returned."""

    def after_task(self, task: TaskInfo, batches: BatchSource | None = None) -> None:
        pass

    def eval_model(self) -> nn.Module:
        return self.model

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the logit bias and, unless the class `trains_logit_scale`, the logit
        scale: both stay frozen as in ZSCL."""
        frozen = ("logit_bias",) if self.trains_logit_scale else ("logit_scale", "logit_bias")
        return [p for n, p in self.model.named_parameters() if p.requires_grad and n not in frozen]

    def state_dict(self) -> dict:
        """Everything the method keeps across tasks besides `self.model` (the loop saves that)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ---- tensors of the frozen starting model, computed once for many runs -----------------------
    def initial_model_features(self, tasks: Sequence[TaskInfo]) -> dict[str, torch.Tensor]:
        """The tensors this method computes from the frozen starting model and fixed inputs alone over
        the task sequence `tasks`, by name, on the CPU, each with its input tokens under
        "<name>.tokens". Call after `set_reference_data`, with the model at its starting weights or
        the method's state restored (a method keeps its own frozen copy of the starting model). Empty
        for a method, or settings, with none."""
        return {}

    def use_initial_model_features(self, features: dict[str, torch.Tensor]) -> None:
        """Use `features` (from `initial_model_features` of a run with the same starting model and
        inputs) instead of computing them. Call before the first task, or after `load_state_dict`."""
        if features and not self.has_initial_model_features:
            raise InitialModelFeaturesError(f"{self.name}: computes nothing from the starting model alone "
                                            f"(has_initial_model_features is False); got {sorted(features)}")
        unpaired = [n for n in features if not n.endswith(TOKENS_SUFFIX) and n + TOKENS_SUFFIX not in features]
        if unpaired:
            raise InitialModelFeaturesError(f"{self.name}: initial-model features {unpaired} come without the token ids "
                                            f"they were computed from ('<name>{TOKENS_SUFFIX}'); pass what "
                                            f"initial_model_features returned, unchanged")
        self._imported_initial_features = dict(features)

    def initial_model_feature(self, name: str, tokens: torch.Tensor,
                              compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The starting model's features of `tokens`: imported under `name`, or `compute()` when none was."""
        imported = self._imported_initial_features.get(name)
        if imported is None:
            return compute()
        if not torch.equal(self._imported_initial_features[name + TOKENS_SUFFIX], tokens.cpu()):
            raise InitialModelFeaturesError(
                f"{self.name}: the imported initial-model feature {name!r} was computed from other token ids than "
                f"this run's ({tuple(self._imported_initial_features[name + TOKENS_SUFFIX].shape)} vs "
                f"{tuple(tokens.shape)}); export the features from a run with the same inputs")
        return imported.to(self.device)

    # ---- shared pieces ---------------------------------------------------------------------
    def class_prompt_tokens(self, task: TaskInfo) -> torch.Tensor | None:
        """Token ids of the task's class prompts (its first template), None for a task without classes."""
        if task.kind != "classification" or not task.class_names:
            return None
        template = task.templates[0] if task.templates else "{}"
        return self.tokenizer([fill_template(template, c) for c in task.class_names])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def resolved_task_loss(self) -> str:
        mode = self.hparams.task_loss
        if mode == "auto":
            return "class_prompts" if self._class_prompt_tokens is not None else "contrastive"
        if mode == "class_prompts" and self._class_prompt_tokens is None:
            raise HparamError(f"{self.name}: task_loss=class_prompts needs a classification task with class names "
                              f"(task {self.task.name if self.task else '?'} has none)")
        return mode

    def task_loss(self, batch: Batch, model: nn.Module | None = None, image_features: torch.Tensor | None = None,
                  text_features: torch.Tensor | None = None,
                  contrastive_scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """The current task's own objective: CE over the task's class prompts, or CLIP's contrastive loss.

        Methods that already encoded the batch (normalised, with grad) pass `image_features` /
        `text_features` so the batch is not encoded twice. `contrastive_scale` replaces the model's
        logit scale in the contrastive loss (CTP's fixed 1/τ); the class-prompt CE keeps the model's.
        """
        model = model or self.model
        if image_features is None:
            image_features = model.encode_image(batch["image"], normalize=True)
        if self.resolved_task_loss() == "class_prompts":
            class_text = model.encode_text(self._class_prompt_tokens.to(batch["image"].device), normalize=True)
            logits = self.logit_scale * image_features @ class_text.t()
            return F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)
        if text_features is None:
            text_features = model.encode_text(batch["text"], normalize=True)
        return clip_contrastive_loss(image_features, text_features,
                                     self.logit_scale if contrastive_scale is None else contrastive_scale)


def fill_template(template: str, class_name: str) -> str:
    return template.format(class_name) if "{}" in template else template.replace("{c}", class_name)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with gradients off: a teacher that cannot drift."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def batch_from_pixels(pixels: torch.Tensor, text: torch.Tensor, label: torch.Tensor, mean, std) -> Batch:
    """Rebuild a training batch from stored uint8 pixels (replay memories)."""
    return {"image": normalize_pixels(pixels, mean, std), "pixels": pixels, "text": text, "label": label}


def iterate(batches: BatchSource | Iterable[Batch] | None) -> Iterator[Batch]:
    if batches is None:
        return iter(())
    return batches() if callable(batches) else iter(batches)
