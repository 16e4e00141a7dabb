"""Loss functions shared by methods. Pure functions of tensors; shapes in each docstring."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.distributed import gather_with_grad, rank


def clip_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                          extra_text_negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (CLIP).

    image_features, text_features: (b, D) L2-normalised local features; gathered across ranks so
    the loss is that of the global batch whatever the world size. `extra_text_negatives` (M, D)
    are appended as additional candidates in the image->text direction only.
    """
    all_images = gather_with_grad(image_features)
    all_texts = gather_with_grad(text_features)
    candidates = all_texts if extra_text_negatives is None else torch.cat([all_texts, extra_text_negatives], 0)
    logits_per_image = logit_scale * all_images @ candidates.t()
    logits_per_text = logit_scale * all_texts @ all_images.t()
    targets = torch.arange(all_images.shape[0], device=all_images.device)
    return 0.5 * (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets))


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """mean_rows CE(softmax(teacher/T), log_softmax(student/T)) * T^2 (Hinton distillation; ZSCL's form).

    Both (N, C). Equals KL(teacher || student) plus the teacher's entropy: same gradient as KL.
    """
    t = temperature
    target = F.softmax(teacher_logits / t, dim=-1)
    return -(target * F.log_softmax(student_logits / t, dim=-1)).sum(-1).mean() * t * t


def kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0,
            reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) row-wise; `reduction` as torch's kl_div."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                    reduction=reduction, log_target=True)


def local_rows(n_local: int) -> slice:
    """The rows of a gathered (global) tensor that belong to this rank."""
    start = rank() * n_local
    return slice(start, start + n_local)
