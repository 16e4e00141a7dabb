"""IncCLIP, generative negative text replay (Yan et al., ECCV 2022; spec §2.1).

Continual CLIP training with a reservoir memory of old image–text pairs, replayed in every step,
where texts generated from memory captions act as *hard negatives*, plus multi-modal distillation
from the previous task's model. Only the abstract is verified; what is ours ([proposed] in the spec
or here) is configurable:

* L_clip = ½[CE(s F Tᵀ) + CE(s T Fᵀ)] over current + memory pairs, the image→text denominator
  extended by the negatives G of the memory rows (gathered, shared by the whole batch) [proposed].
* L_kd = ½[KL(sm_τ(s̄ F̄ T̄ᵀ) ‖ sm_τ(s F Tᵀ)) + KL(sm_τ(s̄ T̄ F̄ᵀ) ‖ sm_τ(s T Fᵀ))] with the frozen
  previous-task model, τ = 1, λ_kd = 1, over all rows of the mixed batch or memory rows only
  (`kd_on`) [form and weights proposed]. No teacher on the first task.
* Weight-norm clipping after every step: a weight matrix whose Frobenius norm exceeds
  ρ × its task-start norm is rescaled to that bound, ρ = 1 [constants proposed; idea from a digest].
* Negatives: a pluggable generator (`set_negative_generator`). The default,
  `CaptionPerturbation`, works offline: it swaps content tokens of the memory caption with tokens
  from the vocabulary of captions seen so far (numbers with numbers; stop words are never swapped
  in or out), giving a caption that is close to the positive but wrong [ours].
  `negative_generator="embedding_inversion"` selects the spec's proposed model inversion in
  token-embedding space (`TokenEmbeddingInversion`; open_clip CLIP text towers only; K = 10 Adam
  steps, lr 0.01, band m₁ = 0.05, m₂ = 0.3) [proposed]. A captioning model can be plugged in as
  another generator with the same methods. Negatives are regenerated at every step for the memory
  rows drawn; the spec's per-refresh cache of inverted embeddings is not implemented, so inversion
  costs K extra text-tower F+B over the memory rows per step.
* On classification tasks the current rows take the class-prompt CE (`task`) and the memory rows
  the extended contrastive loss (`replay`) [ours].

Needs `pixels` in every batch; nothing in `after_task`. DDP as ER (identical memories, rank slices
of one draw); features and negatives are gathered so the contrastive and KD terms are those of
the global batch.
"""
from __future__ import annotations

from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from methods.base import Batch, ContinualMethod, MethodHparams, TaskInfo, frozen_copy
from methods.distributed import gather_no_grad, gather_with_grad
from methods.losses import clip_contrastive_loss, kl_rows
from methods.memory import Replay, require_pixels
from methods.method_state import load_task_state, load_teacher, task_state, teacher_state

STOP_WORDS = ("a an the of in on at to with and or is are was were be by for from this that these those it its "
              "as into over under there their his her he she they we you i . , ! ? ' \" - photo picture image").split()
NUMBER_WORDS = [str(i) for i in range(101)] + (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty hundred").split()


class NegativeTextGenerator(Protocol):
    """Makes hard-negative text features for memory pairs. Must return exactly `per_caption` rows per
    memory row (in row order), with gradient to the model's text tower, so that every worker
    contributes equally many negatives."""

    def observe(self, tokens: torch.Tensor) -> None: ...
    def negative_features(self, model: nn.Module, replay: Batch, per_caption: int,
                          generator: torch.Generator) -> torch.Tensor: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def single_token_ids(tokenizer, words: list[str]) -> torch.Tensor:
    """Ids of the words that the tokenizer maps to exactly one token (assumes SOT … EOT layout)."""
    rows = tokenizer(words)
    eot = rows.argmax(dim=-1)
    single = eot == 2
    return rows[single, 1].unique()


class CaptionPerturbation:
    """Swap `swaps` content tokens of each caption for other tokens seen in earlier captions.

    Token ids follow open_clip's layout: SOT first, EOT = the largest id of the row, 0 padding.
    """

    def __init__(self, tokenizer, swaps: int = 1):
        self.swaps = swaps
        self.stop_ids = single_token_ids(tokenizer, STOP_WORDS)
        self.number_ids = single_token_ids(tokenizer, NUMBER_WORDS)
        self.counts = torch.zeros(0, dtype=torch.long)

    @staticmethod
    def content_positions(row: torch.Tensor) -> torch.Tensor:
        return torch.arange(1, int(row.argmax()), device=row.device)

    def observe(self, tokens: torch.Tensor) -> None:
        tokens = tokens.detach().cpu()
        content = torch.cat([row[self.content_positions(row)] for row in tokens]) if len(tokens) else tokens.flatten()
        if content.numel() == 0:
            return
        size = max(int(content.max()) + 1, self.counts.numel())
        counts = torch.zeros(size, dtype=torch.long)
        counts[:self.counts.numel()] = self.counts
        counts += torch.bincount(content, minlength=size)
        self.counts = counts

    def _replacement(self, original: int, generator: torch.Generator) -> int:
        seen = (self.counts > 0).nonzero().flatten()
        is_number = bool((self.number_ids == original).any())
        pools = ([seen[torch.isin(seen, self.number_ids)], self.number_ids] if is_number
                 else [seen[~torch.isin(seen, self.stop_ids) & ~torch.isin(seen, self.number_ids)], seen, self.number_ids])
        for pool in pools:
            pool = pool[pool != original]
            if pool.numel():
                return int(pool[torch.randint(0, pool.numel(), (1,), generator=generator)])
        raise ValueError("CaptionPerturbation: no replacement token available (the tokenizer knows no number words)")

    def generate(self, tokens: torch.Tensor, per_caption: int, generator: torch.Generator) -> torch.Tensor:
        out = []
        source = tokens.detach().cpu()
        for row in source:
            positions = self.content_positions(row)
            swappable = positions[~torch.isin(row[positions], self.stop_ids)] if positions.numel() else positions
            if swappable.numel() == 0:
                swappable = positions
            for _ in range(per_caption):
                negative = row.clone()
                if swappable.numel():
                    picks = swappable[torch.randperm(swappable.numel(), generator=generator)[:self.swaps]]
                    for position in picks.tolist():
                        negative[position] = self._replacement(int(row[position]), generator)
                out.append(negative)
        return torch.stack(out).to(tokens.device)

    def negative_features(self, model: nn.Module, replay: Batch, per_caption: int,
                          generator: torch.Generator) -> torch.Tensor:
        return model.encode_text(self.generate(replay["text"], per_caption, generator), normalize=True)

    def state_dict(self) -> dict:
        return {"counts": self.counts.clone(), "swaps": self.swaps}

    def load_state_dict(self, state: dict) -> None:
        self.counts = state["counts"].clone()
        self.swaps = int(state["swaps"])


class GeneratorError(ValueError):
    """A negative-text generator that cannot work with the given model."""


def encode_text_embeddings(model: nn.Module, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip CLIP's text forward from token embeddings (B, L, W) instead of ids, pooled at the EOT
    position of `tokens` (the source caption's ids); normalised (B, D). Mirrors CLIP.encode_text."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if not all(hasattr(model, a) for a in needed):
        raise GeneratorError(f"negative_generator=embedding_inversion needs an open_clip CLIP with a built-in text tower "
                             f"({', '.join(needed)}); {type(model).__name__} has a custom one: use caption_perturbation")
    from open_clip.transformer import text_global_pool

    cast_dtype = model.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + model.positional_embedding.to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1)


class TokenEmbeddingInversion:
    """The spec's proposed generator (§2.1): start from the memory caption's token embeddings plus
    noise and take `steps` Adam steps on the band loss
        max(0, c(E) − (c⁺ − m₁)) + max(0, (c⁺ − m₂) − c(E)),  c(E) = f(x)·g(E), c⁺ = f(x)·g(t),
    so the result is close to, but less similar than, the positive caption. The model only receives
    gradient through the final encoding of the found embeddings. Regenerated at every step (no
    per-slot cache): `steps` extra text-tower F+B over the memory rows per step."""

    def __init__(self, steps: int = 10, lr: float = 0.01, margin_low: float = 0.05, margin_high: float = 0.3,
                 noise: float = 0.01):
        if not 0 < margin_low < margin_high:
            raise GeneratorError(f"embedding inversion needs 0 < inversion_margin_low < inversion_margin_high, got {margin_low}, {margin_high}")
        self.steps, self.lr, self.margin_low, self.margin_high, self.noise = steps, lr, margin_low, margin_high, noise

    def observe(self, tokens: torch.Tensor) -> None:
        pass

    def band_loss(self, similarity: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        return (F.relu(similarity - (positive - self.margin_low)) + F.relu((positive - self.margin_high) - similarity)).sum()

    def negative_features(self, model: nn.Module, replay: Batch, per_caption: int,
                          generator: torch.Generator) -> torch.Tensor:
        tokens = replay["text"].repeat_interleave(per_caption, 0)
        with torch.no_grad():
            image = model.encode_image(replay["image"], normalize=True).repeat_interleave(per_caption, 0)
            positive = (image * model.encode_text(tokens, normalize=True)).sum(-1)
            start = model.token_embedding(tokens)
        noise = torch.randn(start.shape, generator=generator).to(start.device, start.dtype)
        embeddings = (start + self.noise * noise).requires_grad_(True)
        optimizer = torch.optim.Adam([embeddings], lr=self.lr)
        for _ in range(self.steps):
            similarity = (image * encode_text_embeddings(model, embeddings, tokens)).sum(-1)
            (grad,) = torch.autograd.grad(self.band_loss(similarity, positive), [embeddings])
            embeddings.grad = grad
            optimizer.step()
        return encode_text_embeddings(model, embeddings.detach(), tokens)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class IncCLIPHparams(MethodHparams):
    memory_size: int = Field(10000, ge=1, description="reservoir memory in image–text pairs [proposed; paper sweeps sizes]")
    replay_batch_size: int = Field(0, ge=0, description="memory pairs per step per worker (0 = the current local batch size)")
    negatives_per_sample: int = Field(1, ge=0, description="generated negative texts per memory pair (spec: 1)")
    negative_generator: Literal["caption_perturbation", "embedding_inversion"] = Field(
        "caption_perturbation", description="offline caption perturbation [ours] or token-embedding inversion [proposed]")
    swaps_per_caption: int = Field(1, ge=1, description="tokens swapped per negative by the caption-perturbation generator [ours]")
    inversion_steps: int = Field(10, ge=1, description="Adam steps K of the embedding inversion [proposed: 10]")
    inversion_lr: float = Field(0.01, gt=0.0, description="Adam learning rate of the embedding inversion [proposed: 0.01]")
    inversion_margin_low: float = Field(0.05, gt=0.0, description="m₁: negatives at most c⁺ − m₁ similar to the image [proposed: 0.05]")
    inversion_margin_high: float = Field(0.3, gt=0.0, description="m₂: negatives at least c⁺ − m₂ similar to the image [proposed: 0.3]")
    kd_weight: float = Field(1.0, ge=0.0, description="λ_kd of the multi-modal distillation [proposed: 1]")
    kd_temperature: float = Field(1.0, gt=0.0, description="τ of the distillation on logits already scaled by s [proposed: 1]")
    kd_on: Literal["all", "memory"] = Field("all", description="distil on the whole mixed batch or the memory rows only [proposed: all]")
    weight_norm_clip: bool = Field(True, description="rescale weight matrices whose norm grows beyond ρ × the task-start norm")
    norm_ratio: float = Field(1.0, gt=0.0, description="ρ of the weight-norm clipping [proposed: 1.0]")
    seed: int = Field(0, description="seed of memory draws and negative generation (equal on every worker)")


class IncCLIP(ContinualMethod):
    name = "inc_clip"
    summary = "Reservoir replay with generated hard-negative texts and image/text distillation from the previous model."
    Hparams = IncCLIPHparams
    fixed_hparams = ("memory_size", "negative_generator", "seed")

    def __init__(self, model, tokenizer, hparams=None, **overrides):
        super().__init__(model, tokenizer, hparams, **overrides)
        hp = self.hparams
        self.replay = Replay(hp.memory_size, hp.replay_batch_size, hp.seed, previous_tasks_only=True)
        self.negative_generator: NegativeTextGenerator = (
            CaptionPerturbation(tokenizer, hp.swaps_per_caption) if hp.negative_generator == "caption_perturbation"
            else TokenEmbeddingInversion(hp.inversion_steps, hp.inversion_lr, hp.inversion_margin_low, hp.inversion_margin_high))
        self.generator = torch.Generator().manual_seed(hp.seed + 1)
        self.teacher = None
        self.start_norms: dict[str, torch.Tensor] = {}

    def set_hparams(self, hparams) -> None:
        super().set_hparams(hparams)
        hp = self.hparams
        self.replay.batch_size = hp.replay_batch_size
        if isinstance(self.negative_generator, CaptionPerturbation):
            self.negative_generator.swaps = hp.swaps_per_caption
        elif isinstance(self.negative_generator, TokenEmbeddingInversion):
            self.negative_generator = TokenEmbeddingInversion(hp.inversion_steps, hp.inversion_lr, hp.inversion_margin_low,
                                                              hp.inversion_margin_high)

    def set_negative_generator(self, generator: NegativeTextGenerator) -> None:
        self.negative_generator = generator

    def before_task(self, task: TaskInfo) -> None:
        super().before_task(task)
        self.replay.start_task(task.index, self._class_prompt_tokens)
        self.teacher = frozen_copy(self.model) if task.index > 0 else None
        self.start_norms = {n: p.detach().norm() for n, p in self.model.named_parameters() if p.requires_grad and p.ndim >= 2}

    def _negatives(self, replay: Batch | None) -> torch.Tensor | None:
        if replay is None or self.hparams.negatives_per_sample == 0:
            return None
        return gather_with_grad(self.negative_generator.negative_features(
            self.model, replay, self.hparams.negatives_per_sample, self.generator))

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        require_pixels(batch, self.name)
        hp = self.hparams
        self.negative_generator.observe(gather_no_grad(batch["text"]))
        replay = self.replay.draw(self.model, batch["image"].shape[0], self.task.index)
        images = batch["image"] if replay is None else torch.cat([batch["image"], replay["image"]], 0)
        texts = batch["text"] if replay is None else torch.cat([batch["text"], replay["text"]], 0)
        n = batch["image"].shape[0]
        image = self.model.encode_image(images, normalize=True)
        text = self.model.encode_text(texts, normalize=True)
        negatives = self._negatives(replay)
        terms: dict[str, torch.Tensor] = {}
        if self.resolved_task_loss() == "contrastive":
            terms["task"] = clip_contrastive_loss(image, text, self.logit_scale, negatives)
        else:
            terms["task"] = self.task_loss(batch, image_features=image[:n])
            if replay is not None:
                terms["replay"] = clip_contrastive_loss(image[n:], text[n:], self.logit_scale, negatives)
        if self.teacher is not None and (hp.kd_on == "all" or replay is not None):
            rows = slice(0, None) if hp.kd_on == "all" else slice(n, None)
            with torch.no_grad():
                teacher_image = self.teacher.encode_image(images[rows], normalize=True)
                teacher_text = self.teacher.encode_text(texts[rows], normalize=True)
            terms["distill"] = hp.kd_weight * multimodal_distillation(
                image[rows], text[rows], self.logit_scale, teacher_image, teacher_text,
                self.teacher.logit_scale.exp(), hp.kd_temperature)
        return {"loss": sum(terms.values()), **terms}

    @torch.no_grad()
    def clip_weight_norms_(self) -> None:
        for name, p in self.model.named_parameters():
            bound = self.start_norms.get(name)
            if bound is not None:
                limit = self.hparams.norm_ratio * bound.to(p.device)
                norm = p.norm()
                if norm > limit:
                    p.mul_(limit / norm)

    def after_step(self, batch: Batch, losses: dict[str, torch.Tensor]) -> None:
        if self.hparams.weight_norm_clip:
            self.clip_weight_norms_()
        self.replay.observe(batch, self.task.index)

    def state_dict(self) -> dict:
        return {**task_state(self), "replay": self.replay.state_dict(), "teacher": teacher_state(self.teacher),
                "negative_generator": self.negative_generator.state_dict(), "generator": self.generator.get_state(),
                "start_norms": dict(self.start_norms)}

    def load_state_dict(self, state: dict) -> None:
        load_task_state(self, state)
        self.replay.load_state_dict(state["replay"])
        self.teacher = load_teacher(self.model, state["teacher"])
        self.negative_generator.load_state_dict(state["negative_generator"])
        self.generator.set_state(state["generator"])
        self.start_norms = {k: v.to(self.device) for k, v in state["start_norms"].items()}


def multimodal_distillation(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, teacher_image: torch.Tensor,
                            teacher_text: torch.Tensor, teacher_scale: torch.Tensor, temperature: float) -> torch.Tensor:
    """½[KL(sm(s̄ F̄ T̄ₐₗₗᵀ/τ) ‖ sm(s F Tₐₗₗᵀ/τ)) + the text→image twin], batchmean over local rows.
    Local (b, D) features; candidates gathered across ranks (the student's with gradient)."""
    text_all, image_all = gather_with_grad(text), gather_with_grad(image)
    teacher_text_all, teacher_image_all = gather_no_grad(teacher_text), gather_no_grad(teacher_image)
    image_to_text = kl_rows(teacher_scale * teacher_image @ teacher_text_all.t(), scale * image @ text_all.t(), temperature)
    text_to_image = kl_rows(teacher_scale * teacher_text @ teacher_image_all.t(), scale * text @ image_all.t(), temperature)
    return 0.5 * (image_to_text + text_to_image)
