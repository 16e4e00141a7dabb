"""EWC, elastic weight consolidation (CTP repository's EWC baseline, spec §4.4).

    L = L_task + λ/2 Σ_n F_n (θ_n − θ*_n)²,   λ = 5000

θ* = the weights at the end of the previous task. F = empirical Fisher diagonal: after each task,
the squared gradient of the task loss per *batch* (not per sample, as in CTP), averaged over the
batches of one pass over the task's training data, merged across tasks as a running mean
F ← α F_old + (1 − α) F_new with α = t/(t+1) (t = 0-based task index). The penalty covers the
trainable parameters (all but logit_scale/bias).

Needs from the loop: `after_task(task, batches)` with the task's training batches (a full pass by
default, `importance_batches` to cap it). Without batches (plain loops that pass none), the last
`recent_batches_kept` training batches given to `after_step` are used, as documented fallback
(they are not checkpointed: a run resumed mid-task estimates on the batches seen since resuming).
DDP: every worker estimates on its own batches (equal counts per worker: the task loss gathers),
and the importances are averaged across workers, so every replica holds the same F.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch
from pydantic import Field

from methods.base import Batch, BatchSource, ContinualMethod, MethodHparams, TaskInfo, iterate
from methods.distributed import all_reduce_mean
from methods.method_state import load_task_state, task_state, tensors_to
from methods.weights import snapshot, squared_distance


class ImportanceError(RuntimeError):
    """Importance estimation had no data to run on."""


class EWCHparams(MethodHparams):
    penalty_weight: float = Field(5000.0, ge=0.0, description="λ of λ/2 Σ F (θ − θ*)² (CTP train_EWC.py: 5000)")
    importance_batches: int = Field(0, ge=0, description="batches used to estimate importance after a task (0 = one full pass)")
    recent_batches_kept: int = Field(4, ge=1, description="training batches kept for the estimate when after_task gets none")


def merge_importance(old: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor], task_index: int) -> dict[str, torch.Tensor]:
    """Running mean over tasks: α old + (1 − α) new with α = t/(t+1) (t = 0-based index of the new task)."""
    if old is None:
        return new
    alpha = task_index / (task_index + 1)
    return {n: alpha * old[n].to(new[n].device) + (1 - alpha) * new[n] for n in new}


def estimate_importance(method: ContinualMethod, batches, objective: Callable[[Batch], torch.Tensor],
                        transform: Callable[[torch.Tensor], torch.Tensor], limit: int) -> dict[str, torch.Tensor]:
    """mean over batches of transform(∂ objective(batch) / ∂θ) for every trainable parameter, in train
    mode (CTP estimates with augmentation and dropout on); averaged across DDP workers."""
    names = [n for n, p in method.model.named_parameters() if p.requires_grad and n not in ("logit_scale", "logit_bias")]
    params = [dict(method.model.named_parameters())[n] for n in names]
    totals = [torch.zeros_like(p) for p in params]
    count = 0
    was_training = method.model.training
    if not was_training:  # in the training loop: keep its modes (frozen BatchNorm stays frozen)
        method.model.train()
    try:
        for batch in batches:
            grads = torch.autograd.grad(objective(batch), params, allow_unused=True)
            for total, grad in zip(totals, grads):
                if grad is not None:
                    total += transform(grad.detach())
            count += 1
            if limit and count >= limit:
                break
    finally:
        if not was_training:
            method.model.eval()
    if count == 0:
        raise ImportanceError(f"{method.name}: no batches to estimate parameter importance on; pass the task's "
                              f"training batches to after_task(task, batches)")
    return {n: all_reduce_mean(t / count) for n, t in zip(names, totals)}


class EWC(ContinualMethod):
    name = "ewc"
    summary = "Quadratic penalty pulling each weight to its previous-task value, weighted by the Fisher diagonal."
    Hparams = EWCHparams

    def __init__(self, model, tokenizer, hparams=None, **overrides):
        super().__init__(model, tokenizer, hparams, **overrides)
        self.importance: dict[str, torch.Tensor] | None = None
        self.anchor: dict[str, torch.Tensor] | None = None
        self._recent: deque[Batch] = deque(maxlen=self.hparams.recent_batches_kept)

    def set_hparams(self, hparams) -> None:
        super().set_hparams(hparams)
        self._recent = deque(self._recent, maxlen=self.hparams.recent_batches_kept)

    def before_task(self, task: TaskInfo) -> None:
        super().before_task(task)
        self._recent.clear()

    def penalty(self) -> torch.Tensor:
        if self.importance is None:
            return torch.zeros((), device=self.device)
        return 0.5 * self.hparams.penalty_weight * squared_distance(self.model, self.anchor, self.importance)

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        task = self.task_loss(batch)
        penalty = self.penalty()
        return {"loss": task + penalty, "task": task, "penalty": penalty}

    def after_step(self, batch: Batch, losses: dict[str, torch.Tensor]) -> None:
        self._recent.append({k: v.detach() for k, v in batch.items() if isinstance(v, torch.Tensor)})

    def importance_objective(self, batch: Batch) -> torch.Tensor:
        return self.task_loss(batch)

    def importance_transform(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.pow(2)

    def after_task(self, task: TaskInfo, batches: BatchSource | None = None) -> None:
        source = iterate(batches) if batches is not None else iter(list(self._recent))
        new = estimate_importance(self, source, self.importance_objective, self.importance_transform,
                                  self.hparams.importance_batches)
        self.importance = merge_importance(self.importance, new, task.index)
        self.anchor = {n: v for n, v in snapshot(self.model).items() if n in self.importance}
        self._recent.clear()

    def state_dict(self) -> dict:
        return {**task_state(self), "importance": self.importance, "anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        load_task_state(self, state)
        self.importance = tensors_to(state["importance"], self.device)
        self.anchor = tensors_to(state["anchor"], self.device)
