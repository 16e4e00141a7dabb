"""ZSCL, zero-shot continual learning (Zheng et al., ICCV 2023; spec §2.3).

Keeps CLIP's zero-shot ability by distilling, on reference data that is *not* the training data
(ImageNet images + CC3M captions in the paper), the frozen initial model's image→text similarity
distributions into the student; plus, in weight space, a running weight ensemble (the task's
output model) and, in the released recipe, an L2 pull to the task-start weights.

Per step (official `mtil/src/models/finetune.py`):
    Z̄ = s F̄ Ḡᵀ,  Z = s F Ḡᵀ    (F = student, F̄ = teacher features of a reference image batch;
                               Ḡ = teacher features of all reference texts; s = exp(logit_scale))
    L = L_task + w_img T² CE_soft(Z̄/T → Z/T) + w_txt T² CE_soft(Z̄ᵀ/T → Zᵀ/T) + λ Σ ‖θ − θ_start‖²
The student logits use the *teacher's* text features (code; ZSCL issue #1), so only the image
tower is distilled; `student_text_in_distill=True` gives the paper's form Z = s F Gᵀ with the
student's own text features of the reference texts (costly: a text F+B over all of them per step).

Reference data is injected with `set_reference_data(images, texts)` before the first task; the
teacher's reference-text features are computed once per task and cached. With the initial model as
teacher they depend on nothing but that model and the texts: `initial_model_features` exports them
(as "reference_text") for other runs from the same model to import (methods/base.py).

DDP: the reference image features (student with grad, teacher without) are all-gathered, so both
distillation directions see the global reference batch (the text direction is a softmax over the
batch's images and changes with its size); every worker computes the same global term. Give each
worker `reference batch / world_size` images. The L2 term and the weight ensemble are identical on
every replica.
"""
from __future__ import annotations

from typing import Callable, Iterator, Literal, Sequence

import torch
from pydantic import Field

from methods.base import TOKENS_SUFFIX, Batch, ContinualMethod, MethodHparams, TaskInfo, frozen_copy
from methods.distributed import gather_no_grad, gather_with_grad
from methods.losses import soft_cross_entropy
from methods.method_state import load_task_state, load_teacher, task_state, teacher_state, tensors_to
from methods.we import WeightAverager
from methods.weights import snapshot, squared_distance

ImageSource = torch.Tensor | Callable[[], Iterator[torch.Tensor | Batch]]


class ReferenceDataError(ValueError):
    """A method that distils on reference data was not given any, or was given unusable data."""


def similarity_distillation(student_image: torch.Tensor, teacher_image: torch.Tensor, teacher_text: torch.Tensor,
                            logit_scale: torch.Tensor, temperature: float,
                            student_text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ZSCL's two distillation terms on (global) features; returns (image_direction, text_direction).

    student_image, teacher_image: (B, D) normalised; teacher_text (and optional student_text): (N, D).
    image direction: per image, soft CE between the teacher's and the student's softmax over the N
    texts; text direction: the same on the transposed logits (per text, over the B images). Both are
    T²-scaled soft-target cross-entropies averaged over rows (ZSCL's `distillation`).
    """
    student_logits = logit_scale * student_image @ (teacher_text if student_text is None else student_text).t()
    teacher_logits = logit_scale * teacher_image @ teacher_text.t()
    image_direction = soft_cross_entropy(student_logits, teacher_logits, temperature)
    text_direction = soft_cross_entropy(student_logits.t(), teacher_logits.t(), temperature)
    return image_direction, text_direction


@torch.no_grad()
def encode_texts(model, tokens: torch.Tensor, device: torch.device, chunk: int) -> torch.Tensor:
    """Normalised text features of many token rows, `chunk` rows at a time."""
    parts = [model.encode_text(tokens[i:i + chunk].to(device), normalize=True) for i in range(0, tokens.shape[0], chunk)]
    return torch.cat(parts, 0)


class ZSCLHparams(MethodHparams):
    temperature: float = Field(2.0, gt=0.0, description="distillation temperature T (args.T = 2)")
    image_loss_weight: float = Field(1.0, ge=0.0, description="weight of the image-direction distillation (--image_loss, 1)")
    text_loss_weight: float = Field(1.0, ge=0.0, description="weight of the transposed text-direction distillation (--text_loss, 1)")
    l2_weight: float = Field(1.0, ge=0.0, description="λ of Σ‖θ − θ_start‖² (ZSCL.sh replication recipe: 1; 0 turns it off)")
    weight_ensemble: bool = Field(True, description="output the running weight average of the task (--we)")
    avg_freq: int = Field(100, ge=1, description="weight-ensemble sampling interval in optimizer steps (100)")
    sample_final_step: bool = Field(
        False, description="also fold the task's final weights in at task end if the last step was not sampled (the harness "
                           "runs iterations 0..N; exact instead with max_steps_per_task = N+1, as the MTIL protocol sets)")
    teacher: Literal["initial", "previous"] = Field(
        "initial", description="distil from the initial zero-shot model (ZSCL) or the previous task's model (--ref-model)")
    student_text_in_distill: bool = Field(
        False, description="paper form: student logits use the student's own reference-text features (code: teacher's)")
    reference_batch_size: int = Field(64, ge=1, description="reference images per step when the images are given as one tensor")
    reference_seed: int = Field(0, description="seed of the reference-image shuffling when the images are given as one tensor")
    text_encode_chunk: int = Field(1024, ge=1, description="reference texts encoded per forward when caching their features")


class ZSCL(ContinualMethod):
    name = "zscl"
    summary = "Distil the initial CLIP's image-text similarities on reference data, with weight ensemble and L2 (ZSCL)."
    Hparams = ZSCLHparams
    needs_reference_data = True
    fixed_hparams = ("teacher",)   # the initial model cannot be recovered once training moved on
    has_initial_model_features = True   # with teacher=initial: its features of the reference texts
    initial_model_feature_hparams = ("teacher", "text_encode_chunk")

    def __init__(self, model, tokenizer, hparams=None, **overrides):
        super().__init__(model, tokenizer, hparams, **overrides)
        self.teacher = None
        self.task_start: dict | None = None
        self.averager = WeightAverager(self.hparams.avg_freq, self.hparams.sample_final_step)
        self.reference_texts: torch.Tensor | None = None
        self.reference_batches_drawn = 0
        self._reference_images: ImageSource | None = None
        self._reference_iterator: Iterator | None = None
        self._teacher_text: torch.Tensor | None = None

    def set_hparams(self, hparams) -> None:
        super().set_hparams(hparams)
        self.averager.avg_freq, self.averager.sample_final_step = self.hparams.avg_freq, self.hparams.sample_final_step

    # ---- reference data --------------------------------------------------------------------
    def set_reference_data(self, images: ImageSource, texts: torch.Tensor | list[str] | None = None) -> None:
        """Give the reference set the distillation runs on (never the training data).

        images: either one float tensor (N,3,H,W) of normalised reference images, drawn in shuffled
            batches of `reference_batch_size` (deterministic from `reference_seed`, resumes exactly),
            or a callable returning an iterator of normalised image batches (tensors, or batch dicts
            with an "image" key), called again whenever it is exhausted (restarts after a resume).
        texts: reference captions as token ids (N_txt, L) or strings (tokenised here); None keeps
            the texts already held (e.g. restored by `load_state_dict`).
        Call it before the first task, and again after `load_state_dict` (images are not saved;
        the texts and, for a tensor source, the draw position are).
        Under DDP give each worker its own images (its shard as a tensor, or an iterator over its
        shard) with `reference_batch_size` = global reference batch / world size; the texts are the
        same on every worker.
        """
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or not images.is_floating_point():
                raise ReferenceDataError(f"{self.name}: reference images must be a normalised float (N,3,H,W) tensor, "
                                         f"got {tuple(images.shape)} {images.dtype}")
        elif not callable(images):
            raise ReferenceDataError(f"{self.name}: reference images must be a tensor or a callable returning an iterator "
                                     f"of image batches, got {type(images).__name__}")
        if texts is not None:
            tokens = self.tokenizer(list(texts)) if isinstance(texts, (list, tuple)) else texts
            if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[0] == 0:
                raise ReferenceDataError(f"{self.name}: reference texts must be a non-empty list of strings or (N, L) token ids")
            self.reference_texts = tokens.long().cpu()
        if self.reference_texts is None:
            raise ReferenceDataError(f"{self.name}: no reference texts: pass `texts` to set_reference_data")
        self._reference_images = images
        self._reference_iterator = None
        self._teacher_text = None

    def _next_reference_images(self) -> torch.Tensor:
        source = self._reference_images
        if isinstance(source, torch.Tensor):
            count = source.shape[0]
            size = min(self.hparams.reference_batch_size, count)
            per_epoch = count // size
            epoch, position = divmod(self.reference_batches_drawn, per_epoch)
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.hparams.reference_seed + epoch))
            images = source[order[position * size:(position + 1) * size]]
        else:
            images = None
            for _ in range(2):
                if self._reference_iterator is None:
                    self._reference_iterator = iter(source())
                try:
                    images = next(self._reference_iterator)
                    break
                except StopIteration:
                    self._reference_iterator = None
            if images is None:
                raise ReferenceDataError(f"{self.name}: the reference image source yielded no batch")
            images = images["image"] if isinstance(images, dict) else images
        self.reference_batches_drawn += 1
        return images.to(self.device, non_blocking=True)

    def _require_reference_data(self) -> None:
        if self._reference_images is None or self.reference_texts is None:
            raise ReferenceDataError(
                f"{self.name}: no reference data. ZSCL distils on a reference set that is not the training data "
                f"(paper: ImageNet images + CC3M captions); call method.set_reference_data(images, texts) before "
                f"the first task (and again after load_state_dict).")

    # ---- the initial model's features of the reference texts ----------------------------------
    def initial_model_features(self, tasks: Sequence[TaskInfo]) -> dict[str, torch.Tensor]:
        """{"reference_text": the initial teacher's features of every reference text, ...tokens}; empty
        with teacher=previous (its teacher changes every task)."""
        self._require_reference_data()
        if self.hparams.teacher != "initial":
            return {}
        teacher = self.teacher if self.teacher is not None else frozen_copy(self.model)
        features = self._encode_reference_texts(teacher)
        return {"reference_text": features.cpu(), "reference_text" + TOKENS_SUFFIX: self.reference_texts.cpu()}

    def _encode_reference_texts(self, teacher) -> torch.Tensor:
        return encode_texts(teacher, self.reference_texts, self.device, self.hparams.text_encode_chunk)

    def _teacher_reference_text(self) -> torch.Tensor:
        if self.hparams.teacher == "previous":
            return self._encode_reference_texts(self.teacher)
        return self.initial_model_feature("reference_text", self.reference_texts,
                                          lambda: self._encode_reference_texts(self.teacher))

    # ---- hooks -----------------------------------------------------------------------------
    def before_task(self, task: TaskInfo) -> None:
        super().before_task(task)
        self._require_reference_data()
        if self.teacher is None or self.hparams.teacher == "previous":
            self.teacher = frozen_copy(self.model)
            self._teacher_text = None
        self.task_start = snapshot(self.model)
        if self.hparams.weight_ensemble:
            self.averager.start(self.model)

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        self._require_reference_data()
        hp = self.hparams
        task = self.task_loss(batch)
        if self._teacher_text is None:
            self._teacher_text = self._teacher_reference_text()
        reference_images = self._next_reference_images()
        with torch.no_grad():
            teacher_image = gather_no_grad(self.teacher.encode_image(reference_images, normalize=True))
        student_image = gather_with_grad(self.model.encode_image(reference_images, normalize=True))
        student_text = None
        if hp.student_text_in_distill:
            student_text = self.model.encode_text(self.reference_texts.to(self.device), normalize=True)
        distill_image, distill_text = similarity_distillation(
            student_image, teacher_image, self._teacher_text, self.logit_scale, hp.temperature, student_text)
        total = task + hp.image_loss_weight * distill_image + hp.text_loss_weight * distill_text
        losses = {"task": task, "distill_image": distill_image, "distill_text": distill_text}
        if hp.l2_weight > 0:
            losses["l2"] = squared_distance(self.model, self.task_start)
            total = total + hp.l2_weight * losses["l2"]
        return {"loss": total, **losses}

    def after_step(self, batch: Batch, losses: dict[str, torch.Tensor]) -> None:
        if self.hparams.weight_ensemble:
            self.averager.after_step(self.model)

    def after_task(self, task: TaskInfo, batches=None) -> None:
        if self.hparams.weight_ensemble:
            self.averager.finish(self.model)

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**task_state(self), "teacher": teacher_state(self.teacher), "task_start": self.task_start,
                "averager": self.averager.state_dict(), "reference_texts": self.reference_texts,
                "reference_batches_drawn": self.reference_batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        load_task_state(self, state)
        self.teacher = load_teacher(self.model, state["teacher"])
        self.task_start = tensors_to(state["task_start"], self.device)
        self.averager.load_state_dict(state["averager"], self.device)
        self.reference_texts = state["reference_texts"]
        self.reference_batches_drawn = int(state["reference_batches_drawn"])
        self._teacher_text = None
        self._reference_iterator = None
