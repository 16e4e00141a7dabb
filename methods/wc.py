"""WC, weight consolidation (ZSCL repository's `wc.sh`, spec §3.6): fine-tune with an L2 pull
towards the weights the task started from, `L = L_task + λ Σ_n ‖θ_n − θ_start,n‖²` (sum, not mean).

Under DDP the penalty is the same on every worker (weights are replicated); the task loss is the
shared one (class-prompt CE per worker, contrastive on gathered features).
"""
from __future__ import annotations

from pydantic import Field

from methods.base import Batch, ContinualMethod, MethodHparams, TaskInfo
from methods.method_state import load_task_state, task_state, tensors_to
from methods.weights import snapshot, squared_distance


class WCHparams(MethodHparams):
    l2_weight: float = Field(1.0, ge=0.0, description="λ of the summed squared distance to the task-start weights (wc.sh: 1)")


class WeightConsolidation(ContinualMethod):
    name = "wc"
    summary = "Fine-tuning plus a summed L2 penalty to the task-start weights (ZSCL's WC baseline)."
    Hparams = WCHparams

    def __init__(self, model, tokenizer, hparams=None, **overrides):
        super().__init__(model, tokenizer, hparams, **overrides)
        self.task_start: dict | None = None

    def before_task(self, task: TaskInfo) -> None:
        super().before_task(task)
        self.task_start = snapshot(self.model)

    def training_loss(self, batch: Batch):
        task = self.task_loss(batch)
        l2 = squared_distance(self.model, self.task_start)
        return {"loss": task + self.hparams.l2_weight * l2, "task": task, "l2": l2}

    def state_dict(self) -> dict:
        return {**task_state(self), "task_start": self.task_start}

    def load_state_dict(self, state: dict) -> None:
        load_task_state(self, state)
        self.task_start = tensors_to(state["task_start"], self.device)
