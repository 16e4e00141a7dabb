"""WiSE-FT across tasks (ZSCL repository's `WiSE_finetune.sh`, spec §3.5): fine-tune each task,
then interpolate in weight space `θ ← α θ_end + (1 − α) θ_anchor` at the task's end.

The anchor is the task-start weights (the previous task's output, zero-shot for the first task;
`--wise_ft_model n`, the default) or the initial zero-shot weights (`anchor="zeroshot"`). The
interpolated weights are the task's output and the next task's start. Per worker: no batch-level
computation beyond the shared task loss; the interpolation is identical on every replica.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from methods.base import ContinualMethod, MethodHparams, TaskInfo
from methods.method_state import load_task_state, task_state, tensors_to
from methods.weights import interpolate_, snapshot


class WiSEFTHparams(MethodHparams):
    alpha: float = Field(0.8, ge=0.0, le=1.0, description="weight of the fine-tuned end-of-task weights in the interpolation (wise_ft_alpha 0.8)")
    anchor: Literal["previous", "zeroshot"] = Field(
        "previous", description="interpolate with the task-start weights (previous) or the initial weights (zeroshot)")


class WiSEFT(ContinualMethod):
    name = "wise_ft"
    summary = "Fine-tune each task, then interpolate its weights with the task-start weights (α = 0.8)."
    Hparams = WiSEFTHparams

    def __init__(self, model, tokenizer, hparams=None, **overrides):
        super().__init__(model, tokenizer, hparams, **overrides)
        self.task_start: dict | None = None
        self.initial: dict | None = None

    def before_task(self, task: TaskInfo) -> None:
        super().before_task(task)
        self.task_start = snapshot(self.model)
        if self.initial is None and self.hparams.anchor == "zeroshot":
            self.initial = snapshot(self.model)

    def after_task(self, task: TaskInfo, batches=None) -> None:
        anchor = self.initial if self.hparams.anchor == "zeroshot" else self.task_start
        interpolate_(self.model, anchor, self.hparams.alpha)

    def state_dict(self) -> dict:
        return {**task_state(self), "task_start": self.task_start, "initial": self.initial}

    def load_state_dict(self, state: dict) -> None:
        load_task_state(self, state)
        self.task_start = tensors_to(state["task_start"], self.device)
        self.initial = tensors_to(state["initial"], self.device)
