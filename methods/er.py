"""ER, experience replay with a reservoir memory (CTP repository's ER baseline, spec §4.9).

The memory is a uniform reservoir sample of every training pair seen so far (budget 10,000 as in
CTP). Insertion is online: after every optimizer step the step's (gathered) training batch, given to
`after_step`, is offered to the reservoir; the distribution equals CTP's after-task pass over the
same stream. By default only samples of *earlier* tasks are replayed, as in CTP
(`replay_current_task=True` gives Mammoth-style ER that also replays the running task).

How memory samples enter a step (`replay_mix`):
* "appended" (default, CTP): CTP appends the buffer to the next task's dataset, so a batch drawn
  from the shuffled union holds memory samples in proportion p = |M| / (|M| + N) (N = the task's
  training rows, `TaskInfo.train_samples`; |M| = 10,000 against P9D's tasks: about 4–21 %).
  vlcl's loop owns the data, so the method reproduces that mix inside the step: every row of the
  global batch is independently replaced by a memory sample with probability p (the memory's
  seeded generator, identical on every worker), i.e. Binomial(B, p) memory rows per step. |M| is
  the eligible memory at the task's start (CTP's buffer is fixed during a task; vlcl's reservoir
  keeps updating, so late in a task the memory rows come from a uniform subset of it). Rows are
  drawn with replacement across steps, not once per epoch as in CTP: the same expected mix.
* "half_batch" (vlcl's earlier default): `replay_batch_size` memory samples (default: as many as
  the local batch) are concatenated to every step's batch, about half of each step's rows: far
  more replay than CTP's buffer gives (not the same mix).

Loss: on retrieval tasks (contrastive task loss) the memory pairs are part of the batch's one
contrastive loss. On classification tasks the current rows take the class-prompt CE of the current
task (`task`) and each memory row a CE against its own task's class prompts (`replay`, × replay_weight).
With "appended" both are sums over their rows divided by the batch size (the batch is one dataset:
their sum is the mean over all rows); with "half_batch" each is the mean over its own rows.

Needs: `pixels` (uint8) in every batch; `TaskInfo.train_samples` with "appended". No batches in
`after_task`.
DDP: identical memories on every rank (gathered insertion, identically seeded generator); each
rank replays its slice of one global memory draw.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from methods.base import Batch, ContinualMethod, MethodHparams, TaskInfo
from methods.memory import Replay, concat_batches, require_pixels
from methods.method_state import load_task_state, task_state


ReplayMix = Literal["appended", "half_batch"]


class ERHparams(MethodHparams):
    memory_size: int = Field(10000, ge=1, description="replay budget in samples (CTP buffer.yaml: 10,000)")
    replay_mix: ReplayMix = Field(
        "appended", description="appended: Binomial(B, |M|/(|M|+train_samples)) batch rows replaced by memory rows (CTP's "
                                "buffer appended to the data); half_batch: replay_batch_size memory rows added to every batch")
    replay_batch_size: int = Field(0, ge=0, description="half_batch: memory samples per step per worker (0 = the current local batch size)")
    replay_weight: float = Field(1.0, ge=0.0, description="weight of the memory rows' loss on classification tasks")
    replay_current_task: bool = Field(False, description="also replay samples of the running task (CTP: only earlier tasks)")
    seed: int = Field(0, description="seed of the reservoir/draw generator (must be equal on every worker)")


def encode_mixed(method: ContinualMethod, batch: Batch, replay: Batch | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image features of current rows and memory rows from one forward pass."""
    images = batch["image"] if replay is None else torch.cat([batch["image"], replay["image"]], 0)
    features = method.model.encode_image(images, normalize=True)
    n = batch["image"].shape[0]
    return features[:n], (None if replay is None else features[n:])


def replay_task_loss(method: ContinualMethod, replay_part: Replay, batch: Batch, replay: Batch | None,
                     replay_weight: float) -> dict[str, torch.Tensor]:
    """The task loss with memory rows concatenated to the batch ("half_batch"): shared by ER, iCaRL and CTP+ER."""
    if method.resolved_task_loss() == "contrastive":
        return {"task": method.task_loss(concat_batches(batch, replay))}
    current, remembered = encode_mixed(method, batch, replay)
    terms = {"task": method.task_loss(batch, image_features=current)}
    if replay is not None:
        terms["replay"] = replay_weight * replay_part.loss(
            method.model, replay, remembered, method.logit_scale, method.hparams.label_smoothing)
    return terms


def rows_of(batch: Batch, where: torch.Tensor) -> Batch:
    return {k: v.index_select(0, where) for k, v in batch.items()}


def mixed_task_terms(method: ContinualMethod, replay_part: Replay, mixed: Batch, is_memory: torch.Tensor,
                     remembered: Batch | None, image: torch.Tensor, replay_weight: float,
                     contrastive_scale: torch.Tensor | float | None = None,
                     text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The task terms of a batch whose rows `is_memory` (CPU bool) were replaced by memory samples
    ("appended"). `image` (and `text`): features of all rows of `mixed`, with grad."""
    if method.resolved_task_loss() == "contrastive":
        return {"task": method.task_loss(mixed, image_features=image, text_features=text,
                                         contrastive_scale=contrastive_scale)}
    rows = is_memory.shape[0]
    current = (~is_memory).nonzero().flatten()
    terms = {"task": image.new_zeros(())}
    if current.numel():
        where = current.to(image.device)
        terms["task"] = method.task_loss(rows_of(mixed, where), image_features=image.index_select(0, where)) * (
            current.numel() / rows)
    if remembered is not None:   # present on every step once the memory replays, so logged means stay per step
        replayed = is_memory.nonzero().flatten()
        terms["replay"] = image.new_zeros(())
        if replayed.numel():
            terms["replay"] = replay_weight * (replayed.numel() / rows) * replay_part.loss(
                method.model, remembered, image.index_select(0, replayed.to(image.device)), method.logit_scale,
                method.hparams.label_smoothing)
    return terms


class ER(ContinualMethod):
    name = "er"
    summary = "Experience replay: a reservoir memory of past pairs mixed into the training batches."
    Hparams = ERHparams
    fixed_hparams = ("memory_size", "seed")

    def __init__(self, model, tokenizer, hparams=None, **overrides):
        super().__init__(model, tokenizer, hparams, **overrides)
        hp = self.hparams
        self.replay = Replay(hp.memory_size, hp.replay_batch_size, hp.seed, not hp.replay_current_task)

    def set_hparams(self, hparams) -> None:
        super().set_hparams(hparams)
        self.replay.batch_size = self.hparams.replay_batch_size
        self.replay.previous_tasks_only = not self.hparams.replay_current_task

    def before_task(self, task: TaskInfo) -> None:
        super().before_task(task)
        self.replay.start_task(task.index, self._class_prompt_tokens)

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        require_pixels(batch, self.name)
        hp = self.hparams
        if hp.replay_mix == "half_batch":
            replay = self.replay.draw(self.model, batch["image"].shape[0], self.task.index)
            terms = replay_task_loss(self, self.replay, batch, replay, hp.replay_weight)
        else:
            mixed, is_memory, remembered = self.replay.mix_appended(batch, self.model, self.task, self.name)
            contrastive = self.resolved_task_loss() == "contrastive"
            image = None if contrastive else self.model.encode_image(mixed["image"], normalize=True)
            terms = mixed_task_terms(self, self.replay, mixed, is_memory, remembered, image, hp.replay_weight)
        return {"loss": sum(terms.values()), **terms}

    def after_step(self, batch: Batch, losses: dict[str, torch.Tensor]) -> None:
        self.replay.observe(batch, self.task.index)

    def state_dict(self) -> dict:
        return {**task_state(self), "replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        load_task_state(self, state)
        self.replay.load_state_dict(state["replay"])
