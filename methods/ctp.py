"""CTP: compatible momentum contrast + topology preservation (Zhu et al., ICCV 2023; spec §2.2).

A momentum (EMA) model supplies contrast targets; from the second task on its update also pulls it
towards the frozen previous-task model R ("compatible" momentum): θ_M ← m θ_M + (1−m)(1−α) θ +
(1−m) α θ_R with m = 0.9, α = 0.5 (task 0: plain EMA, m = 0.995). Topology preservation distils
R's *relative* similarity structure of each batch (image↔text, image↔image, text↔text) with a
row-wise KL, so relations are kept rather than absolute feature positions.

Per step (F, T: local normalised features with grad; *_all: gathered across ranks; M, R: momentum
and reference features; Q_I, Q_T: feature queues; τ = 0.07 fixed as in CTP, `models/clip_pretrain.py`):
    ita        = ½ [CE(F T_allᵀ/τ, own index) + CE(T F_allᵀ/τ, own index)]   (L_task on retrieval tasks)
    moco(i→t)  = CE(F [T^M; Q_T]ᵀ/τ, own index),  moco(t→i) likewise;  cmc = ½ (i→t + t→i)
    topo_cross = ½ [KL(sm(F^R T^R_allᵀ/τ) ‖ sm(F T_allᵀ/τ)) + KL(sm(T^R F^R_allᵀ/τ) ‖ sm(T F_allᵀ/τ))]
    topo_intra = ½ [the same on F F_allᵀ and T T_allᵀ, self-similarity set to −1000 on both sides]
    task 0:   L = L_task + cmc                              (CTP_init: loss_ita = cmc + ita, summed)
    task ≥ 1: L = L_task + cmc + topo_cross + topo_intra    (all weights 1, train_CTP.py:101)
The momentum keys T^M, F^M are this worker's own momentum features (`momentum_keys="local"`, the
default): the official CTP_init/CTP build the momentum logits from the local `text_feat_m` /
`image_feat_m` with diagonal targets, so each GPU contrasts against its own b keys plus the queue.
That is why it is the default (fidelity); it makes the term depend on the local batch size, so
`momentum_keys="global"` (vlcl's earlier form) uses the keys of the whole gathered batch instead,
which gives the same value at any world size (identical to "local" in one process). Either way the
queues take the *gathered* momentum features after each step (the official `_dequeue_and_enqueue`
all-gathers before enqueueing): a ring buffer, identical on every rank, never reset between tasks,
random at the start, as in CTP. The momentum model is re-copied from the model at every task start;
R is the model at the task start. The trained model (not the momentum one) is the task's output.

Contrastive only, no MLM: CTP's base model is ALBEF-style with a fusion encoder and MLM head, so its
L_mlm and momentum MLM distillation have no counterpart in a CLIP dual encoder (spec §2.2
pitfalls; the ITA-only variant). L_task on retrieval tasks is CTP's ita with the fixed 1/τ
(`task_use_model_scale=True`: vlcl's shared contrastive task loss with the model's logit scale,
e.g. scale 100 for OpenAI weights); on classification tasks it is vlcl's class-prompt CE (model
scale). `use_model_scale=True` uses the model's logit scale instead of 1/τ in the CTP terms.

CTP+ER (spec §4.14): `memory_size > 0` adds ER's reservoir memory, mixed in as ER does
(`replay_mix`: by default CTP's buffer appended to the task data, Binomial(B, |M|/(|M|+N)) batch
rows replaced by memory rows; "half_batch" concatenates `replay_batch_size` memory rows). All terms
see the memory rows; on classification tasks the task term scores them against their own task's
class prompts. Needs `pixels` in every batch then (and `TaskInfo.train_samples` for "appended").
DDP: features are gathered with gradient (targets = rank·b + i), momentum features without; the
queue, momentum and reference models stay identical on every rank. cmc and topology terms are
means over local rows (average across workers gives the global value).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from methods.base import Batch, ContinualMethod, MethodHparams, TaskInfo, frozen_copy
from methods.distributed import gather_no_grad, gather_with_grad, rank
from methods.losses import kl_rows
from methods.er import ReplayMix, mixed_task_terms
from methods.memory import Replay, require_pixels
from methods.method_state import load_task_state, load_teacher, task_state, teacher_state

SELF_SIMILARITY = -1000.0


def moco_loss(query: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor, scale: float | torch.Tensor,
              offset: int) -> torch.Tensor:
    """−mean_i log softmax(scale · q_i · [keys; queue]ᵀ)_{offset+i}: query (b, D), keys (B, D), queue (Q, D)."""
    logits = scale * query @ torch.cat([keys, queue], 0).t()
    targets = torch.arange(query.shape[0], device=query.device) + offset
    return F.cross_entropy(logits, targets)


def topology_kl(student: torch.Tensor, student_all: torch.Tensor, reference: torch.Tensor,
                reference_all: torch.Tensor, scale: float | torch.Tensor, mask_offset: int | None = None) -> torch.Tensor:
    """KL(softmax(scale·R Rₐₗₗᵀ) ‖ softmax(scale·S Sₐₗₗᵀ)), batchmean over local rows. With
    `mask_offset`, column offset+i of row i (the sample itself) is set to −1000 on both sides."""
    student_logits = scale * student @ student_all.t()
    reference_logits = scale * reference @ reference_all.t()
    if mask_offset is not None:
        rows = torch.arange(student.shape[0], device=student.device)
        mask = torch.zeros_like(student_logits, dtype=torch.bool)
        mask[rows, rows + mask_offset] = True
        student_logits = student_logits.masked_fill(mask, SELF_SIMILARITY)
        reference_logits = reference_logits.masked_fill(mask, SELF_SIMILARITY)
    return kl_rows(reference_logits, student_logits)


@torch.no_grad()
def momentum_update_(momentum: torch.nn.Module, model: torch.nn.Module, m: float,
                     reference: torch.nn.Module | None = None, reference_share: float = 0.0) -> None:
    """θ_M ← m θ_M + (1−m)(1−a) θ + (1−m) a θ_R  (a = reference_share; plain EMA without reference)."""
    current = dict(model.named_parameters())
    ref = dict(reference.named_parameters()) if reference is not None else {}
    share = reference_share if reference is not None else 0.0
    for name, p in momentum.named_parameters():
        p.mul_(m).add_(current[name].detach(), alpha=(1 - m) * (1 - share))
        if share:
            p.add_(ref[name], alpha=(1 - m) * share)


class CTPHparams(MethodHparams):
    temperature: float = Field(0.07, gt=0.0, description="τ of the momentum contrast and topology terms (CTP: 0.07, fixed)")
    use_model_scale: bool = Field(False, description="use the model's logit scale instead of 1/τ in CTP's terms")
    task_use_model_scale: bool = Field(
        False, description="contrastive task term with the model's logit scale (vlcl's shared task loss) instead of CTP's 1/τ")
    momentum_keys: Literal["local", "global"] = Field(
        "local", description="momentum-contrast keys: this worker's momentum features (CTP code) or the gathered batch's")
    queue_size: int = Field(1024, ge=0, description="momentum feature queue length per modality (CTP: 1024)")
    first_task_momentum: float = Field(0.995, ge=0.0, le=1.0, description="EMA coefficient on task 0 (CTP_init: 0.995)")
    momentum: float = Field(0.9, ge=0.0, le=1.0, description="compatible momentum m on tasks ≥ 1 (CTP: 0.9)")
    reference_share: float = Field(0.5, ge=0.0, le=1.0, description="share α of (1−m) that goes to the previous-task model (CTP: 0.05/0.05 → 0.5)")
    momentum_contrast_weight: float = Field(1.0, ge=0.0, description="weight of the compatible momentum contrast on tasks ≥ 1 (CTP: 1)")
    topology_cross_weight: float = Field(1.0, ge=0.0, description="weight of cross-modal topology preservation (CTP: 1)")
    topology_intra_weight: float = Field(1.0, ge=0.0, description="weight of intra-modal topology preservation (CTP: 1)")
    memory_size: int = Field(0, ge=0, description="ER reservoir memory in samples (0 = memory-free CTP; CTP_ER: 10,000)")
    replay_mix: ReplayMix = Field(
        "appended", description="CTP_ER: memory appended to the task data (Binomial share of batch rows) or half_batch as ER's")
    replay_batch_size: int = Field(0, ge=0, description="half_batch: memory samples per step per worker (0 = the current local batch size)")
    seed: int = Field(0, description="seed of the queue initialisation and memory draws (equal on every worker)")


class CTP(ContinualMethod):
    name = "ctp"
    summary = "Compatible momentum contrast with feature queues plus topology preservation from the previous model (ITA-only)."
    Hparams = CTPHparams
    fixed_hparams = ("queue_size", "memory_size", "seed")

    def __init__(self, model, tokenizer, hparams=None, **overrides):
        super().__init__(model, tokenizer, hparams, **overrides)
        hp = self.hparams
        self.momentum_model = None
        self.reference = None
        self.image_queue: torch.Tensor | None = None
        self.text_queue: torch.Tensor | None = None
        self.queue_pointer = 0
        self.replay = Replay(hp.memory_size, hp.replay_batch_size, hp.seed, True) if hp.memory_size else None
        # the step's gathered momentum features, computed in training_loss, enqueued by after_step
        self._momentum_features: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_hparams(self, hparams) -> None:
        super().set_hparams(hparams)
        if self.replay is not None:
            self.replay.batch_size = self.hparams.replay_batch_size

    def before_task(self, task: TaskInfo) -> None:
        super().before_task(task)
        self.momentum_model = frozen_copy(self.model)
        self.reference = frozen_copy(self.model) if task.index > 0 else None
        if self.replay is not None:
            self.replay.start_task(task.index, self._class_prompt_tokens)

    def scale(self) -> float | torch.Tensor:
        return self.logit_scale if self.hparams.use_model_scale else 1.0 / self.hparams.temperature

    def task_scale(self) -> float | torch.Tensor:
        return self.logit_scale if self.hparams.task_use_model_scale else 1.0 / self.hparams.temperature

    def _ensure_queues(self, dim: int) -> None:
        if self.image_queue is None:
            generator = torch.Generator().manual_seed(self.hparams.seed)
            size = self.hparams.queue_size
            self.image_queue = F.normalize(torch.randn(size, dim, generator=generator), dim=-1).to(self.device)
            self.text_queue = F.normalize(torch.randn(size, dim, generator=generator), dim=-1).to(self.device)

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        hp = self.hparams
        replay = mixed = is_memory = remembered = None
        images, texts = batch["image"], batch["text"]
        if self.replay is not None:
            require_pixels(batch, self.name)
            if hp.replay_mix == "half_batch":
                replay = self.replay.draw(self.model, batch["image"].shape[0], self.task.index)
                if replay is not None:
                    images, texts = torch.cat([images, replay["image"]], 0), torch.cat([texts, replay["text"]], 0)
            else:
                mixed, is_memory, remembered = self.replay.mix_appended(batch, self.model, self.task, self.name)
                images, texts = mixed["image"], mixed["text"]
        n = batch["image"].shape[0]
        image = self.model.encode_image(images, normalize=True)
        text = self.model.encode_text(texts, normalize=True)
        if is_memory is None:
            terms = self._task_terms(batch, replay, image, text, n)
        else:
            terms = mixed_task_terms(self, self.replay, mixed, is_memory, remembered, image, 1.0,
                                     contrastive_scale=self.task_scale(), text=text)
        self._ensure_queues(image.shape[1])

        scale = self.scale()
        with torch.no_grad():
            momentum_image = self.momentum_model.encode_image(images, normalize=True)
            momentum_text = self.momentum_model.encode_text(texts, normalize=True)
            self._momentum_features = (gather_no_grad(momentum_image), gather_no_grad(momentum_text))
        if hp.momentum_keys == "local":
            image_keys, text_keys, offset = momentum_image, momentum_text, 0
        else:
            (image_keys, text_keys), offset = self._momentum_features, rank() * image.shape[0]
        cmc = 0.5 * (moco_loss(image, text_keys, self.text_queue, scale, offset)
                     + moco_loss(text, image_keys, self.image_queue, scale, offset))

        if self.reference is None:
            return {"loss": sum(terms.values()) + cmc, **terms, "momentum_contrast": cmc}

        offset = rank() * image.shape[0]
        image_all, text_all = gather_with_grad(image), gather_with_grad(text)
        with torch.no_grad():
            ref_image = self.reference.encode_image(images, normalize=True)
            ref_text = self.reference.encode_text(texts, normalize=True)
            ref_image_all, ref_text_all = gather_no_grad(ref_image), gather_no_grad(ref_text)
        cross = 0.5 * (topology_kl(image, text_all, ref_image, ref_text_all, scale)
                       + topology_kl(text, image_all, ref_text, ref_image_all, scale))
        intra = 0.5 * (topology_kl(image, image_all, ref_image, ref_image_all, scale, offset)
                       + topology_kl(text, text_all, ref_text, ref_text_all, scale, offset))
        terms.update(momentum_contrast=hp.momentum_contrast_weight * cmc,
                     topology_cross=hp.topology_cross_weight * cross, topology_intra=hp.topology_intra_weight * intra)
        return {"loss": sum(terms.values()), **terms}

    def _task_terms(self, batch: Batch, replay: Batch | None, image: torch.Tensor, text: torch.Tensor,
                    n: int) -> dict[str, torch.Tensor]:
        if self.resolved_task_loss() == "contrastive":
            # features already cover current + memory rows, so the batch itself is not re-encoded
            return {"task": self.task_loss(batch, image_features=image, text_features=text,
                                           contrastive_scale=self.task_scale())}
        terms = {"task": self.task_loss(batch, image_features=image[:n])}
        if replay is not None:
            terms["replay"] = self.replay.loss(self.model, replay, image[n:], self.logit_scale, self.hparams.label_smoothing)
        return terms

    @torch.no_grad()
    def _enqueue(self, image: torch.Tensor, text: torch.Tensor) -> None:
        size = self.hparams.queue_size
        if size == 0:
            return
        image, text = image[-size:], text[-size:]
        slots = (self.queue_pointer + torch.arange(image.shape[0], device=image.device)) % size
        self.image_queue[slots] = image
        self.text_queue[slots] = text
        self.queue_pointer = int((self.queue_pointer + image.shape[0]) % size)

    def after_step(self, batch: Batch, losses: dict[str, torch.Tensor]) -> None:
        hp = self.hparams
        if self.reference is None:
            momentum_update_(self.momentum_model, self.model, hp.first_task_momentum)
        else:
            momentum_update_(self.momentum_model, self.model, hp.momentum, self.reference, hp.reference_share)
        if self._momentum_features is not None:
            self._enqueue(*self._momentum_features)
            self._momentum_features = None
        if self.replay is not None:
            self.replay.observe(batch, self.task.index)

    def state_dict(self) -> dict:
        return {**task_state(self), "momentum_model": teacher_state(self.momentum_model),
                "reference": teacher_state(self.reference), "image_queue": self.image_queue,
                "text_queue": self.text_queue, "queue_pointer": self.queue_pointer,
                "replay": None if self.replay is None else self.replay.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        load_task_state(self, state)
        self.momentum_model = load_teacher(self.model, state["momentum_model"])
        self.reference = load_teacher(self.model, state["reference"])
        device = self.device
        self.image_queue = None if state["image_queue"] is None else state["image_queue"].to(device)
        self.text_queue = None if state["text_queue"] is None else state["text_queue"].to(device)
        self.queue_pointer = int(state["queue_pointer"])
        if self.replay is not None:
            self.replay.load_state_dict(state["replay"])
        self._momentum_features = None
