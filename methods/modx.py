"""Mod-X, maintain off-diagonal information (Ni et al., ICML 2023; spec §2.4).

On the current batch, keep the old model's full contrastive-matrix row distributions:
    S = F Tᵀ, S' = T Fᵀ (raw cosines, no logit scale), S°, S'° the same from the frozen phase-start model,
    L_kd = ½ [Σ_i m_i KL(softmax(S°_i/τ) ‖ softmax(S_i/τ)) + Σ_i m'_i KL(softmax(S'°_i/τ) ‖ softmax(S'_i/τ))]
    L = L_task + α L_kd
with the selective mask m_i = 1 only for rows the old model retrieves correctly
(argmax_j S°_ij = i); the released code replaces wrong old rows by the new ones, which gives the
same (zero) contribution and gradient.

Batch-size dependence: the softmax runs over raw cosines (τ = 1, nearly flat) and the KL is summed
over the whole N×N matrix (`reduction="sum"`), so the term grows with the global batch N; α = 20
was tuned at N = 280. For another batch size rescale α (e.g. α·280/N) or use `kd_reduction="batchmean"`.

DDP: the matrices are built on all-gathered features (student with grad, teacher without), so every
worker computes the same global N×N term whatever the world size, like the official DataParallel.
The task loss is the shared one (contrastive on gathered features for retrieval tasks).

Logit scale: the official loop optimises every parameter, `logit_scale` included, and after each
optimizer step clamps it to [0, 4.6052] (ln 100 as the code writes it, `continue_train_model.py`).
The class declares `trains_logit_scale`, so `trainable_parameters()` includes it, and `after_step`
clamps it (`clamp_logit_scale`).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from methods.base import Batch, ContinualMethod, MethodHparams, TaskInfo, frozen_copy
from methods.distributed import gather_no_grad, gather_with_grad
from methods.method_state import load_task_state, load_teacher, task_state, teacher_state

LOGIT_SCALE_MAX = 4.6052   # ln 100, the literal of Mod-X's clamp


def selective_row_kl(teacher_similarity: torch.Tensor, student_similarity: torch.Tensor, temperature: float,
                     reduction: Literal["sum", "batchmean"], selective: bool) -> torch.Tensor:
    """Σ over rows i (kept by the mask) of KL(softmax(teacher_i/τ) ‖ softmax(student_i/τ)).

    Both (N, N) with matching pairs on the diagonal. Rows where the teacher's argmax is not the
    diagonal are dropped when `selective`. "batchmean" divides the sum by N (all rows, as torch does).
    """
    log_q = F.log_softmax(student_similarity / temperature, dim=-1)
    log_p = F.log_softmax(teacher_similarity / temperature, dim=-1)
    per_row = (log_p.exp() * (log_p - log_q)).sum(-1)
    if selective:
        correct = teacher_similarity.argmax(dim=-1) == torch.arange(teacher_similarity.shape[0], device=per_row.device)
        per_row = per_row * correct.to(per_row.dtype)
    total = per_row.sum()
    return total / teacher_similarity.shape[0] if reduction == "batchmean" else total


class ModXHparams(MethodHparams):
    kd_weight: float = Field(20.0, ge=0.0, description="α, weight of the contrastive-matrix KL (modx_5phase.sh: 20 at global batch 280)")
    kd_temperature: float = Field(1.0, gt=0.0, description="softmax temperature on the raw cosine matrices (code: 1)")
    kd_reduction: Literal["sum", "batchmean"] = Field("sum", description="sum over the N×N matrix (code) or divide by N")
    selective: bool = Field(True, description="drop rows the old model retrieves wrongly (Mod-X's selective alignment)")
    clamp_logit_scale: bool = Field(True, description="clamp the trained logit_scale to [0, 4.6052 = ln 100] after each step (code)")


class ModX(ContinualMethod):
    name = "modx"
    summary = "KL between old and new models' full image-text similarity matrices on the batch, selective rows (Mod-X)."
    Hparams = ModXHparams
    trains_logit_scale = True

    def __init__(self, model, tokenizer, hparams=None, **overrides):
        super().__init__(model, tokenizer, hparams, **overrides)
        self.teacher = None

    def before_task(self, task: TaskInfo) -> None:
        super().before_task(task)
        self.teacher = frozen_copy(self.model)

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        hp = self.hparams
        image_features = self.model.encode_image(batch["image"], normalize=True)
        text_features = self.model.encode_text(batch["text"], normalize=True)
        task = self.task_loss(batch, image_features=image_features, text_features=text_features)
        with torch.no_grad():
            old_image = gather_no_grad(self.teacher.encode_image(batch["image"], normalize=True))
            old_text = gather_no_grad(self.teacher.encode_text(batch["text"], normalize=True))
        all_image, all_text = gather_with_grad(image_features), gather_with_grad(text_features)
        new_similarity, old_similarity = all_image @ all_text.t(), old_image @ old_text.t()
        kd_image_to_text = selective_row_kl(old_similarity, new_similarity, hp.kd_temperature, hp.kd_reduction, hp.selective)
        kd_text_to_image = selective_row_kl(old_similarity.t(), new_similarity.t(), hp.kd_temperature, hp.kd_reduction,
                                            hp.selective)
        distill = 0.5 * (kd_image_to_text + kd_text_to_image)
        return {"loss": task + hp.kd_weight * distill, "task": task, "distill_matrix": distill}

    def after_step(self, batch: Batch, losses: dict[str, torch.Tensor]) -> None:
        if self.hparams.clamp_logit_scale:
            with torch.no_grad():
                self.model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)

    def state_dict(self) -> dict:
        return {**task_state(self), "teacher": teacher_state(self.teacher)}

    def load_state_dict(self, state: dict) -> None:
        load_task_state(self, state)
        self.teacher = load_teacher(self.model, state["teacher"])
