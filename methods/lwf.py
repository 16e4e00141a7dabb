"""LwF for CLIP as in the ZSCL repository (`lwf.sh`, spec §3.2): ZSCL's distillation code path with
the previous task's model as teacher, the current task's images as reference images and the
current task's class prompts as reference texts; no weight ensemble, no L2.

Reference images: the official code draws them from a *second, independent* shuffled stream of
the current task's training images with test preprocessing (`--ref-dataset <current>`,
`finetune.py:130-145`). The method therefore declares `needs_independent_batch`: the loop adds
`batch["independent"]` (image, pixels, text, label: a batch of the current task with its own
shuffle and eval preprocessing) and the distillation runs on `batch["independent"]["image"]`; the
task loss runs on the training batch. `distill_images="training"` (vlcl's earlier default) reuses
the training batch's augmented images instead, which saves the student forward on a second batch
but distils on exactly the images the task loss fits (the loop still provides the key then).

Reference texts: the current task's class prompts (template 0); for retrieval tasks, which have no
class names, the independent batch's own captions (teacher features computed per step and
all-gathered). As in ZSCL, the student logits use the teacher's text features, so only the image
tower is distilled (`student_text_in_distill=True` for the paper-style form).

DDP: image features are all-gathered (student with grad), so the text-direction softmax runs over
the global batch as under the official DataParallel; every worker computes the same global term.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from methods.base import Batch, ContinualMethod, MethodHparams, TaskInfo, frozen_copy
from methods.distributed import gather_no_grad, gather_with_grad
from methods.method_state import load_task_state, load_teacher, task_state, teacher_state
from methods.zscl import encode_texts, similarity_distillation


class LwFHparams(MethodHparams):
    temperature: float = Field(2.0, gt=0.0, description="distillation temperature T (args.T = 2)")
    image_loss_weight: float = Field(1.0, ge=0.0, description="weight of the image-direction distillation (--image_loss, 1)")
    text_loss_weight: float = Field(1.0, ge=0.0, description="weight of the transposed text-direction distillation (--text_loss, 1)")
    student_text_in_distill: bool = Field(
        False, description="paper form: student logits use the student's own reference-text features (code: teacher's)")
    text_encode_chunk: int = Field(1024, ge=1, description="reference texts encoded per forward when caching their features")
    distill_images: Literal["independent", "training"] = Field(
        "independent", description="distil on batch['independent'] (ZSCL harness: a second stream, eval preprocessing) "
                                   "or on the training batch's own images")


class IndependentBatchError(KeyError):
    """A method that distils on an independent batch was given a batch without one."""

    def __str__(self) -> str:
        return self.args[0]


class LwF(ContinualMethod):
    name = "lwf"
    summary = "Distil the previous task's model's image-to-class-prompt similarities on current images (ZSCL-style LwF)."
    Hparams = LwFHparams
    needs_independent_batch = True

    def __init__(self, model, tokenizer, hparams=None, **overrides):
        super().__init__(model, tokenizer, hparams, **overrides)
        self.teacher = None
        self._teacher_text: torch.Tensor | None = None

    def reference_text_tokens(self) -> torch.Tensor | None:
        """Token ids whose teacher features are cached per task; None = use each batch's captions."""
        return self._class_prompt_tokens

    def before_task(self, task: TaskInfo) -> None:
        super().before_task(task)
        self.teacher = frozen_copy(self.model)
        self._teacher_text = None

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        hp = self.hparams
        image_features = self.model.encode_image(batch["image"], normalize=True)
        task = self.task_loss(batch, image_features=image_features)

        if hp.distill_images == "training":
            reference, student_image = batch, image_features
        else:
            if "independent" not in batch:
                raise IndependentBatchError(
                    f"{self.name}: batch['independent'] is missing. LwF distils on a second batch of the current task, "
                    f"drawn independently of the training batch with eval preprocessing (keys image, pixels, text, "
                    f"label); add it to every training batch (vlcl's loop does, as the class sets "
                    f"needs_independent_batch), or set method.hparams.distill_images=training")
            reference = batch["independent"]
            student_image = self.model.encode_image(reference["image"], normalize=True)
        with torch.no_grad():
            teacher_image = gather_no_grad(self.teacher.encode_image(reference["image"], normalize=True))
        student_image = gather_with_grad(student_image)

        tokens = self.reference_text_tokens()
        if tokens is None:
            tokens = reference["text"]
            with torch.no_grad():
                teacher_text = gather_no_grad(self.teacher.encode_text(tokens, normalize=True))
            student_text = (gather_with_grad(self.model.encode_text(tokens, normalize=True))
                            if hp.student_text_in_distill else None)
        else:
            if self._teacher_text is None:
                self._teacher_text = encode_texts(self.teacher, tokens, self.device, hp.text_encode_chunk)
            teacher_text = self._teacher_text
            student_text = (self.model.encode_text(tokens.to(self.device), normalize=True)
                            if hp.student_text_in_distill else None)
        distill_image, distill_text = similarity_distillation(
            student_image, teacher_image, teacher_text, self.logit_scale, hp.temperature, student_text)
        total = task + hp.image_loss_weight * distill_image + hp.text_loss_weight * distill_text
        return {"loss": total, "task": task, "distill_image": distill_image, "distill_text": distill_text}

    def state_dict(self) -> dict:
        return {**task_state(self), "teacher": teacher_state(self.teacher)}

    def load_state_dict(self, state: dict) -> None:
        load_task_state(self, state)
        self.teacher = load_teacher(self.model, state["teacher"])
        self._teacher_text = None
