"""WE, weight ensemble (ZSCL §2.3-7 / spec §3.7): fine-tune, and every `avg_freq` optimizer steps
fold the current weights into a running uniform average θ̂ that starts at the task-start weights.

Code-faithful schedule: the average is updated after the optimizer step whose 0-based index i
satisfies `i % avg_freq == 0` (steps 1, 101, 201, ... counted from 1). The ZSCL harness runs a task
of N iterations as iterations 0..N inclusive, N + 1 optimizer steps, so for MTIL (N = 1000,
avg_freq 100) θ̂ is the uniform mean of {θ_start, θ_1, θ_101, ..., θ_1001}: the last sample is the
task's final weights. The MTIL protocol therefore sets `train.max_steps_per_task` to N + 1 (1001),
which reproduces the harness exactly with the defaults. A protocol that runs exactly N steps can
set `sample_final_step=True`: the final weights are then folded in at task end when the last step
was not a sampling step (as the harness's last iteration is), one training step short of the
harness. Training continues on the raw weights; at task end the model is overwritten with θ̂,
which is the task's output and the next task's start. Per worker: replicas hold identical weights,
so the average needs no communication.
"""
from __future__ import annotations

import warnings

import torch
from pydantic import Field

from methods.base import Batch, ContinualMethod, MethodHparams, TaskInfo
from methods.method_state import load_task_state, task_state, tensors_to
from methods.weights import load_parameters_, running_average_, snapshot


class WEHparams(MethodHparams):
    avg_freq: int = Field(100, ge=1, description="fold the weights into the running average every this many optimizer steps (ZSCL: 100)")
    sample_final_step: bool = Field(
        False, description="also fold the task's final weights in at task end if the last step was not sampled (the harness "
                           "runs iterations 0..N; exact instead with max_steps_per_task = N+1, as the MTIL protocol sets)")


class WeightAverager:
    """The running weight average shared by WE, ZSCL and MulKI: θ̂ starts at θ_start (count 1)."""

    def __init__(self, avg_freq: int, sample_final_step: bool = False):
        self.avg_freq = avg_freq
        self.sample_final_step = sample_final_step
        self.average: dict | None = None
        self.count = 0
        self.steps = 0

    def start(self, model) -> None:
        self.average, self.count, self.steps = snapshot(model), 1, 0

    def after_step(self, model) -> None:
        if self.steps % self.avg_freq == 0:
            running_average_(self.average, model, self.count)
            self.count += 1
        self.steps += 1

    def finish(self, model) -> None:
        final = self.sample_final_step and self.steps > 0 and (self.steps - 1) % self.avg_freq != 0
        if final:
            running_average_(self.average, model, self.count)
            self.count += 1
        if 1 < self.steps <= self.avg_freq:
            # Only the task-start weights and step 1's were sampled: the output would throw away
            # nearly all of the task's training (ZSCL's avg_freq 100 assumes ~1000-step tasks).
            also = " (and the final weights)" if final else ""
            warnings.warn(f"weight ensemble: the task ran {self.steps} optimizer steps, not more than avg_freq="
                          f"{self.avg_freq}, so its output averages only the task-start weights and step 1's{also}. "
                          f"Set method.hparams.avg_freq to about a tenth of the task's steps "
                          f"(here {max(1, self.steps // 10)}).", stacklevel=2)
        load_parameters_(model, self.average)

    def state_dict(self) -> dict:
        return {"average": self.average, "count": self.count, "steps": self.steps}

    def load_state_dict(self, state: dict, device) -> None:
        self.average = tensors_to(state["average"], device)
        self.count, self.steps = int(state["count"]), int(state["steps"])


class WeightEnsemble(ContinualMethod):
    name = "we"
    summary = "Fine-tuning whose task output is the running average of weights sampled every avg_freq steps."
    Hparams = WEHparams

    def __init__(self, model, tokenizer, hparams=None, **overrides):
        super().__init__(model, tokenizer, hparams, **overrides)
        self.averager = WeightAverager(self.hparams.avg_freq, self.hparams.sample_final_step)

    def set_hparams(self, hparams) -> None:
        super().set_hparams(hparams)
        self.averager.avg_freq, self.averager.sample_final_step = self.hparams.avg_freq, self.hparams.sample_final_step

    def before_task(self, task: TaskInfo) -> None:
        super().before_task(task)
        self.averager.start(self.model)

    def after_step(self, batch: Batch, losses: dict[str, torch.Tensor]) -> None:
        self.averager.after_step(self.model)

    def after_task(self, task: TaskInfo, batches=None) -> None:
        self.averager.finish(self.model)

    def state_dict(self) -> dict:
        return {**task_state(self), "averager": self.averager.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        load_task_state(self, state)
        self.averager.load_state_dict(state["averager"], self.device)
