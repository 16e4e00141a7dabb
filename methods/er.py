"""ER, experience replay with a reservoir memory (CTP repository's ER baseline, spec §4.9).

The memory is a uniform reservoir sample of every training pair seen so far (budget 10,000 as in
CTP). CTP appends the buffer to the next task's dataset; vlcl's loop owns the data, so instead each
step concatenates a memory batch drawn from the memory (same expected mix, no loader edits).
Insertion is online: after every optimizer step the step's (gathered) batch is offered to the
reservoir; the distribution equals CTP's after-task pass over the same stream. By default only
samples of *earlier* tasks are replayed, as in CTP (`replay_current_task=True` gives Mammoth-style
ER that also replays the running task).

Loss: for retrieval tasks (contrastive task loss) the memory pairs join the current batch in one
contrastive loss; for classification tasks the current rows take the class-prompt CE of the
current task and each memory row a CE against its own task's class prompts (term `replay`).

Needs: `pixels` (uint8) in every batch. No batches in `after_task`.
DDP: identical memories on every rank (gathered insertion, identically seeded generator); each
rank replays its slice of one global memory draw.
"""
from __future__ import annotations

import torch
from pydantic import Field

from methods.base import Batch, ContinualMethod, MethodHparams, TaskInfo
from methods.memory import Replay, concat_batches, require_pixels
from methods.method_state import load_task_state, task_state


class ERHparams(MethodHparams):
    memory_size: int = Field(10000, ge=1, description="replay budget in samples (CTP buffer.yaml: 10,000)")
    replay_batch_size: int = Field(0, ge=0, description="memory samples per step per worker (0 = the current local batch size)")
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
    """The task loss with memory rows mixed in: shared by ER, iCaRL and CTP+ER."""
    if method.resolved_task_loss() == "contrastive":
        return {"task": method.task_loss(concat_batches(batch, replay))}
    current, remembered = encode_mixed(method, batch, replay)
    terms = {"task": method.task_loss(batch, image_features=current)}
    if replay is not None:
        terms["replay"] = replay_weight * replay_part.loss(
            method.model, replay, remembered, method.logit_scale, method.hparams.label_smoothing)
    return terms


class ER(ContinualMethod):
    name = "er"
    summary = "Experience replay: a reservoir memory of past pairs mixed into every training step."
    Hparams = ERHparams

    def __init__(self, model, tokenizer, hparams=None, **overrides):
        super().__init__(model, tokenizer, hparams, **overrides)
        hp = self.hparams
        self.replay = Replay(hp.memory_size, hp.replay_batch_size, hp.seed, not hp.replay_current_task)

    def before_task(self, task: TaskInfo) -> None:
        super().before_task(task)
        self.replay.start_task(task.index, self._class_prompt_tokens)

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        require_pixels(batch, self.name)
        replay = self.replay.draw(self.model, batch["image"].shape[0], self.task.index)
        terms = replay_task_loss(self, self.replay, batch, replay, self.hparams.replay_weight)
        self.replay.pending = batch
        return {"loss": sum(terms.values()), **terms}

    def after_step(self) -> None:
        self.replay.observe_pending(self.task.index)

    def state_dict(self) -> dict:
        return {**task_state(self), "replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        load_task_state(self, state)
        self.replay.load_state_dict(state["replay"])
