"""MulKI [proposed instantiation]: re-weighting, relation KL, prototypes, stage switches, retrieval fallback."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from method_helpers import classification_task, digit_batches, retrieval_task, tiny_clip
from methods.mulki import MulKI, relation_kl, teacher_weights


def test_teacher_weights_prefer_the_teacher_with_lower_ce():
    weights = teacher_weights(torch.tensor([[0.5, 1.5], [2.0, 2.0]]), gamma=1.0)
    e1, e2 = math.exp(-0.5), math.exp(-1.5)
    assert torch.allclose(weights[0], torch.tensor([e1 / (e1 + e2), e2 / (e1 + e2)]))
    assert torch.allclose(weights[1], torch.tensor([0.5, 0.5]))
    sharper = teacher_weights(torch.tensor([[0.5, 1.5]]), gamma=0.1)
    assert sharper[0, 0] > weights[0, 0]


def test_relation_kl_is_temperature_squared_kl_per_row():
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)        # teacher logits (2, 0) at T = 2
    q = torch.softmax(torch.tensor([0.5, 0.0]), 0)        # student logits (1, 0) at T = 2
    expected = 4 * float((p * (p.log() - q.log())).sum())
    got = relation_kl(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 2.0)
    assert torch.allclose(got, torch.tensor([expected, 0.0]), atol=1e-7)


def test_image_prototypes_start_at_the_class_mean_then_follow_an_ema():
    model, tokenizer = tiny_clip()
    method = MulKI(model, tokenizer)
    method.before_task(classification_task(0, (0, 1, 2)))
    first = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0]])
    second = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.5, 0.5]])
    for feats in (first, second):
        method._pending = {"student": feats, "initial": feats, "previous": feats, "label": torch.tensor([0, 0, 1])}
        method._update_prototypes()
    start = F.normalize(torch.tensor([1.0, 0.1]), dim=0)
    expected = F.normalize(0.9 * start + 0.1 * F.normalize(torch.tensor([0.25, 0.75]), dim=0), dim=0)
    assert torch.allclose(method.image_prototypes["student"][0], expected, atol=1e-6)
    assert method.prototype_ready.tolist() == [True, True, False]


def test_align_term_appears_once_prototypes_exist_and_matches_the_prototype_contrast():
    model, tokenizer = tiny_clip()
    method = MulKI(model, tokenizer)
    method.before_task(classification_task(0, (0, 1, 2)))
    batches = digit_batches(tokenizer, (0, 1, 2), 12, 2)
    first = method.training_loss(batches[0])
    assert set(first) == {"loss", "task", "distill_initial", "distill_previous"}
    assert first["distill_initial"].abs() < 1e-6            # student = both teachers on task 0
    method._update_prototypes()
    terms = method.training_loss(batches[1])
    with torch.no_grad():
        text = model.encode_text(method._class_prompt_tokens, normalize=True)
        ready = method.prototype_ready
        logits = method.logit_scale * method.image_prototypes["student"][ready] @ text[ready].t()
        expected = F.cross_entropy(logits, torch.arange(int(ready.sum())))
    assert torch.allclose(terms["align"], expected, atol=1e-5)
    off = MulKI(tiny_clip()[0], tokenizer, use_stage_1=False)
    off.before_task(classification_task(0, (0, 1, 2)))
    off.training_loss(batches[0])
    off._update_prototypes()
    assert "align" not in off.training_loss(batches[1])


def perturbed_second_task(**hparams):
    model, tokenizer = tiny_clip()
    method = MulKI(model, tokenizer, **hparams)
    method.before_task(classification_task(0, (0, 1)))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    method.before_task(classification_task(1, (2, 3)))          # previous teacher ≠ initial teacher now
    with torch.no_grad():
        model.visual.proj.mul_(1.1)
    return method, digit_batches(tokenizer, (2, 3), 8, 1)[0]


def test_stage_3_reweights_per_sample_and_off_means_equal_halves():
    method, batch = perturbed_second_task(use_stage_3=False)
    uniform = method.training_loss(batch)
    method_w, _ = perturbed_second_task()
    weighted = method_w.training_loss(batch)
    assert torch.allclose(uniform["task"], weighted["task"])
    assert not torch.allclose(uniform["distill_initial"], weighted["distill_initial"])
    # the two weights sum to one per sample, so the sum of terms is a convex mix of the same per-sample losses
    assert weighted["distill_initial"] + weighted["distill_previous"] <= 2 * max(uniform["distill_initial"], uniform["distill_previous"]) + 1e-6


@pytest.mark.parametrize("stage_4", [True, False])
def test_stage_4_outputs_the_interpolated_weight_ensemble(stage_4):
    model, tokenizer = tiny_clip()
    method = MulKI(model, tokenizer, use_stage_4=stage_4, avg_freq=1000)
    method.before_task(classification_task(0, (0, 1)))
    start = model.visual.proj.detach().clone()
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.5)
    batch = digit_batches(tokenizer, (0, 1), 6, 1)[0]
    losses = method.training_loss(batch)
    losses["loss"].backward()
    optimizer.step()
    trained = model.visual.proj.detach().clone()
    method.after_step(batch, losses)
    method.after_task(method.task)
    expected = 0.8 * (start + trained) / 2 + 0.2 * start if stage_4 else trained
    assert torch.allclose(model.visual.proj, expected, atol=1e-6)


def test_retrieval_fallback_uses_in_batch_pairs_as_classes():
    model, tokenizer = tiny_clip()
    method = MulKI(model, tokenizer)
    method.before_task(retrieval_task(0))
    captions = ["a red car", "a blue boat", "three dogs", "a small house"]
    batch = {"image": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), "text": tokenizer(captions),
             "label": torch.full((4,), -1)}
    terms = method.training_loss(batch)
    assert set(terms) == {"loss", "task", "align", "distill_initial", "distill_previous"}
    with torch.no_grad():
        image = model.encode_image(batch["image"], normalize=True)
        text = model.encode_text(batch["text"], normalize=True)
        expected = F.cross_entropy(method.logit_scale * image @ text.t(), torch.arange(4))
    assert torch.allclose(terms["align"], expected, atol=1e-5)
    assert terms["distill_initial"].abs() < 1e-6 and terms["distill_previous"].abs() < 1e-6
