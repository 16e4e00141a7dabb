"""MAS, memory-aware synapses (CTP repository's MAS baseline, spec §4.5).

Same penalty as EWC, λ/2 Σ_n Ω_n (θ_n − θ*_n)² with λ = 1, but the importance is label-free:
Ω = mean over batches of |∂/∂θ [mean_i ‖f_raw(x_i)‖₂ + mean_i ‖g_raw(t_i)‖₂]|, the L2 *norm* (not
the squared norm of the MAS paper, following CTP's code) of the un-normalised image and text
embeddings. CTP also adds the fused [CLS] norm; CLIP has no fusion encoder, so that term is absent.
Merged across tasks with α = t/(t+1), like EWC.

Needs from the loop: `after_task(task, batches)` (fallback and DDP as in EWC).
"""
from __future__ import annotations

import torch
from pydantic import Field

from methods.base import Batch
from methods.ewc import EWC, EWCHparams


class MASHparams(EWCHparams):
    penalty_weight: float = Field(1.0, ge=0.0, description="λ of λ/2 Σ Ω (θ − θ*)² (CTP train_MAS.py: 1)")


class MAS(EWC):
    name = "mas"
    summary = "Quadratic penalty to previous-task weights, weighted by the gradient magnitude of the embedding norms."
    Hparams = MASHparams

    def importance_objective(self, batch: Batch) -> torch.Tensor:
        image = self.model.encode_image(batch["image"], normalize=False)
        text = self.model.encode_text(batch["text"], normalize=False)
        return image.norm(dim=-1).mean() + text.norm(dim=-1).mean()

    def importance_transform(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.abs()
