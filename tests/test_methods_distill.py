"""LwF, LwF-VR, ZSCL and Mod-X: loss terms against hand computations, frozen teachers, state
round trips, and a plain two-task PyTorch loop per method."""
from __future__ import annotations

import io
import math

import pytest
import torch

from method_helpers import (classification_task, digit_batches, prototype_batches, provide_injected_data, random_batch,
                            reference_data, retrieval_task, tiny_clip, with_independent)
from methods import METHODS
from methods.lwf import IndependentBatchError, LwF
from methods.lwf_vr import LwFVR, random_token_sequences
from methods.modx import LOGIT_SCALE_MAX, ModX, selective_row_kl
from methods.zscl import ZSCL, ReferenceDataError, similarity_distillation

MINE = ["lwf", "lwf_vr", "wise_ft", "we", "wc", "zscl", "modx"]


def through_disk(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def softmax(row, t=1.0):
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def perturb_(model, seed: int = 3, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.add_(scale * torch.randn(p.shape, generator=generator))


# ---- hand computations -----------------------------------------------------------------------

def test_modx_selective_kl_on_a_3x3_similarity_matrix():
    old = [[0.9, 0.1, 0.0], [0.8, 0.3, 0.2], [0.1, 0.2, 0.7]]    # row 1: argmax 0, wrong -> masked
    new = [[0.5, 0.4, -0.2], [0.1, 0.6, 0.0], [0.3, -0.1, 0.2]]
    def kl(p_row, q_row):
        p, q = softmax(p_row), softmax(q_row)
        return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    expected_sum = kl(old[0], new[0]) + kl(old[2], new[2])
    got = selective_row_kl(torch.tensor(old), torch.tensor(new), 1.0, "sum", selective=True)
    assert got.item() == pytest.approx(expected_sum, rel=1e-5)
    everything = selective_row_kl(torch.tensor(old), torch.tensor(new), 1.0, "sum", selective=False)
    assert everything.item() == pytest.approx(expected_sum + kl(old[1], new[1]), rel=1e-5)
    mean = selective_row_kl(torch.tensor(old), torch.tensor(new), 1.0, "batchmean", selective=True)
    assert mean.item() == pytest.approx(expected_sum / 3, rel=1e-5)


def test_modx_loss_is_task_plus_alpha_times_half_the_two_directions():
    model, tokenizer = tiny_clip()
    method = ModX(model, tokenizer, kd_weight=7.0)
    method.before_task(retrieval_task())
    perturb_(model)
    batch = random_batch(tokenizer, 5)
    losses = method.training_loss(batch)
    with torch.no_grad():
        f, t = model.encode_image(batch["image"], normalize=True), model.encode_text(batch["text"], normalize=True)
        fo = method.teacher.encode_image(batch["image"], normalize=True)
        to = method.teacher.encode_text(batch["text"], normalize=True)
    s, so = (f @ t.t()).tolist(), (fo @ to.t()).tolist()
    def direction(old, new):
        total = 0.0
        for i, (o, n) in enumerate(zip(old, new)):
            if max(range(len(o)), key=o.__getitem__) == i:
                p, q = softmax(o), softmax(n)
                total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
        return total
    transpose = lambda m: [list(r) for r in zip(*m)]
    expected = 0.5 * (direction(so, s) + direction(transpose(so), transpose(s)))
    assert losses["distill_matrix"].item() == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert losses["loss"].item() == pytest.approx(losses["task"].item() + 7.0 * expected, rel=1e-5)


def test_zscl_distillation_terms_by_hand_on_2_images_and_3_texts():
    student_image = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    teacher_image = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    teacher_text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, -0.8]])
    scale, temperature = torch.tensor(3.0), 2.0
    image_term, text_term = similarity_distillation(student_image, teacher_image, teacher_text, scale, temperature)
    z = (3.0 * student_image @ teacher_text.t()).tolist()
    zbar = (3.0 * teacher_image @ teacher_text.t()).tolist()
    def soft_ce(teacher_rows, student_rows):
        rows = [-sum(p * math.log(q) for p, q in zip(softmax(tr, temperature), softmax(sr, temperature)))
                for tr, sr in zip(teacher_rows, student_rows)]
        return temperature ** 2 * sum(rows) / len(rows)
    transpose = lambda m: [list(r) for r in zip(*m)]
    assert image_term.item() == pytest.approx(soft_ce(zbar, z), rel=1e-5)
    assert text_term.item() == pytest.approx(soft_ce(transpose(zbar), transpose(z)), rel=1e-5)


def test_zscl_loss_with_a_fixed_teacher_matches_a_direct_computation():
    model, tokenizer = tiny_clip()
    method = ZSCL(model, tokenizer, reference_batch_size=4)
    images, texts = reference_data(tokenizer, images=4)
    method.set_reference_data(images, texts)
    method.before_task(classification_task(0, (0, 1, 2)))
    perturb_(model)
    batch = digit_batches(tokenizer, (0, 1, 2), 6, 1)[0]
    losses = method.training_loss(batch)
    with torch.no_grad():
        order = torch.randperm(4, generator=torch.Generator().manual_seed(0))
        ref = images[order]
        teacher_text = method.teacher.encode_text(texts, normalize=True)
        z = model.logit_scale.exp() * model.encode_image(ref, normalize=True) @ teacher_text.t()
        zbar = model.logit_scale.exp() * method.teacher.encode_image(ref, normalize=True) @ teacher_text.t()
        expected_image = -(torch.softmax(zbar / 2, 1) * torch.log_softmax(z / 2, 1)).sum(1).mean() * 4
        expected_text = -(torch.softmax(zbar.t() / 2, 1) * torch.log_softmax(z.t() / 2, 1)).sum(1).mean() * 4
        expected_l2 = sum(((p - method.task_start[n]) ** 2).sum() for n, p in model.named_parameters())
    assert losses["distill_image"].item() == pytest.approx(expected_image.item(), rel=1e-5)
    assert losses["distill_text"].item() == pytest.approx(expected_text.item(), rel=1e-5)
    assert losses["l2"].item() == pytest.approx(expected_l2.item(), rel=1e-4)
    total = losses["task"] + losses["distill_image"] + losses["distill_text"] + losses["l2"]
    assert losses["loss"].item() == pytest.approx(total.item(), rel=1e-6)


@pytest.mark.parametrize("student_text, text_tower_gets_gradient", [(False, False), (True, True)])
def test_zscl_code_form_distils_only_the_image_tower(student_text, text_tower_gets_gradient):
    model, tokenizer = tiny_clip()
    method = ZSCL(model, tokenizer, student_text_in_distill=student_text, l2_weight=0.0)
    provide_injected_data(method, tokenizer)
    method.before_task(classification_task(0, (0, 1, 2)))
    perturb_(model)
    losses = method.training_loss(digit_batches(tokenizer, (0, 1, 2), 4, 1)[0])
    (losses["distill_image"] + losses["distill_text"]).backward()
    grad = model.text_projection.grad
    assert (grad is not None and grad.abs().sum() > 0) == text_tower_gets_gradient
    assert model.visual.proj.grad.abs().sum() > 0


def test_zscl_without_reference_data_says_how_to_provide_it():
    model, tokenizer = tiny_clip()
    with pytest.raises(ReferenceDataError, match="set_reference_data"):
        ZSCL(model, tokenizer).before_task(classification_task(0, (0, 1)))


def test_zscl_callable_reference_source_restarts_when_exhausted():
    model, tokenizer = tiny_clip()
    method = ZSCL(model, tokenizer)
    images, texts = reference_data(tokenizer, images=4)
    calls = []
    def source():
        calls.append(1)
        return iter([{"image": images[:2]}, images[2:]])
    method.set_reference_data(source, texts)
    drawn = [method._next_reference_images() for _ in range(3)]
    assert len(calls) == 2 and torch.equal(drawn[2], images[:2]) and torch.equal(drawn[1], images[2:])


def test_zscl_weight_ensemble_is_the_task_output():
    model, tokenizer = tiny_clip()
    method = ZSCL(model, tokenizer, avg_freq=1)
    provide_injected_data(method, tokenizer)
    method.before_task(classification_task(0, (0, 1, 2)))
    start = model.text_projection.detach().clone()
    with torch.no_grad():
        model.text_projection.add_(0.3)
    method.after_step({}, {})
    method.after_task(method.task)
    assert torch.allclose(model.text_projection, start + 0.15, atol=1e-6)


def hand_soft_ce(teacher_rows, student_rows, temperature=2.0):
    """T² · mean_rows −Σ_j softmax(teacher/T)_j log softmax(student/T)_j, plain Python (ZSCL's distillation)."""
    total = 0.0
    for t_row, s_row in zip(teacher_rows, student_rows):
        p = softmax(t_row, temperature)
        log_z = math.log(sum(math.exp(v / temperature) for v in s_row))
        total += -sum(pi * (v / temperature - log_z) for pi, v in zip(p, s_row))
    return temperature ** 2 * total / len(teacher_rows)


def test_lwf_distils_on_the_independent_batch_against_the_teachers_class_prompts():
    model, tokenizer = tiny_clip()
    method = LwF(model, tokenizer)
    method.before_task(classification_task(0, (0, 1, 2)))
    perturb_(model, scale=0.2)
    training, independent = digit_batches(tokenizer, (0, 1, 2), 6, 2)
    terms = method.training_loss({**training, "independent": independent})
    with torch.no_grad():
        prompts = method.teacher.encode_text(method._class_prompt_tokens, normalize=True)
        scale = model.logit_scale.exp().item()
        def logits(net, images):
            return (scale * net.encode_image(images, normalize=True) @ prompts.t()).tolist()
        on_independent = [logits(net, independent["image"]) for net in (model, method.teacher)]
        on_training = [logits(net, training["image"]) for net in (model, method.teacher)]
    transpose = lambda m: [list(r) for r in zip(*m)]  # noqa: E731
    expected_image = hand_soft_ce(on_independent[1], on_independent[0])
    expected_text = hand_soft_ce(transpose(on_independent[1]), transpose(on_independent[0]))
    reused = hand_soft_ce(on_training[1], on_training[0])
    assert method._teacher_text.shape == (3, 64)
    assert terms["distill_image"].item() == pytest.approx(expected_image, rel=1e-5)
    assert terms["distill_text"].item() == pytest.approx(expected_text, rel=1e-5)
    assert abs(terms["distill_image"].item() - reused) > 100 * abs(terms["distill_image"].item() - expected_image)
    print(f"LwF distill_image: on the independent batch {expected_image:.6f}, on the training batch {reused:.6f}")
    # the task loss is the training batch's alone; the old variant distils on the training images
    assert torch.equal(terms["task"], method.training_loss({**training, "independent": training})["task"])
    method.hparams = method.validate_hparams({"distill_images": "training"})
    assert method.training_loss(training)["distill_image"].item() == pytest.approx(reused, rel=1e-5)


@pytest.mark.parametrize("name", ["lwf", "lwf_vr"])
def test_lwf_without_the_independent_batch_names_the_key(name):
    model, tokenizer = tiny_clip()
    method = METHODS[name](model, tokenizer)
    method.before_task(classification_task(0, (0, 1, 2)))
    with pytest.raises(IndependentBatchError, match=r"batch\['independent'\].*needs_independent_batch"):
        method.training_loss(digit_batches(tokenizer, (0, 1, 2), 6, 1)[0])


def test_lwf_vr_set_hparams_redraws_the_random_sentences():
    model, tokenizer = tiny_clip()
    method = LwFVR(model, tokenizer)
    before = method.random_texts.clone()
    method.set_hparams({"num_sentences": 10, "seed": 1})
    assert method.random_texts.shape[0] == 10 and not torch.equal(method.random_texts, before[:10])
    method.set_hparams({})
    assert torch.equal(method.random_texts, before)


def test_modx_trains_the_logit_scale_and_clamps_it_to_ln_100_as_the_official_loop():
    model, tokenizer = tiny_clip()
    method = ModX(model, tokenizer)
    assert any(p is model.logit_scale for p in method.trainable_parameters())   # before: excluded, the clamp never acted
    method.before_task(retrieval_task())
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=1.0)
    before = model.logit_scale.item()
    batch = random_batch(tokenizer, 5)
    losses = method.training_loss(batch)
    losses["loss"].backward()
    optimizer.step()
    method.after_step(batch, losses)
    assert model.logit_scale.item() != before
    for value, clamped in ((5.0, 4.6052), (-0.5, 0.0), (3.0, 3.0)):
        with torch.no_grad():
            model.logit_scale.fill_(value)
        method.after_step(batch, losses)
        assert model.logit_scale.item() == pytest.approx(clamped, abs=1e-6)
    assert LOGIT_SCALE_MAX == 4.6052


def test_lwf_teacher_is_refreshed_to_the_previous_task_model():
    model, tokenizer = tiny_clip()
    method = LwF(model, tokenizer)
    method.before_task(classification_task(0, (0, 1)))
    training, independent = digit_batches(tokenizer, (0, 1), 4, 2)
    method.training_loss({**training, "independent": independent})["loss"].backward()
    perturb_(model)
    method.before_task(classification_task(1, (2, 3)))
    assert torch.equal(method.teacher.text_projection, model.text_projection)
    assert all(p.grad is None for p in method.teacher.parameters())   # the student's last grads are not copied


def test_lwf_vr_random_sentences_are_framed_seeded_and_fit_the_context():
    tokens = random_token_sequences(1000, 10, 49408, 16, 49406, 49407, seed=42, include_special_ids=False)
    assert tokens.shape == (1000, 16)
    assert (tokens[:, 0] == 49406).all() and (tokens[:, 11] == 49407).all() and (tokens[:, 12:] == 0).all()
    middle = tokens[:, 1:11]
    assert not ((middle == 49406) | (middle == 49407)).any()
    assert torch.equal(tokens, random_token_sequences(1000, 10, 49408, 16, 49406, 49407, 42, False))
    short = random_token_sequences(5, 10, 49408, 8, 49406, 49407, 42, False)
    assert (short[:, 7] == 49407).all()
    quirky = random_token_sequences(4000, 10, 8, 16, 6, 7, 42, include_special_ids=True)[:, 1:11]
    assert ((quirky == 6) | (quirky == 7)).any()
    model, tokenizer = tiny_clip()
    method = LwFVR(model, tokenizer)
    assert method.reference_text_tokens().shape == (1000, tokenizer.context_length)


# ---- teachers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lwf", "lwf_vr", "zscl", "modx"])
def test_teachers_are_frozen_on_the_model_device_and_unchanged_by_a_step(name):
    model, tokenizer = tiny_clip()
    method = METHODS[name](model, tokenizer)
    provide_injected_data(method, tokenizer)
    method.before_task(classification_task(0, (0, 1, 2)))
    teacher = method.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.1)
    batch = with_independent(method, digit_batches(tokenizer, (0, 1, 2), 6, 1), digit_batches(tokenizer, (0, 1, 2), 6, 1, 1))[0]
    losses = method.training_loss(batch)
    losses["loss"].backward()
    optimizer.step()
    method.after_step(batch, losses)
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(p.device == method.device for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not torch.equal(model.visual.proj, teacher.visual.proj)


# ---- state round trip --------------------------------------------------------------------------

@pytest.mark.parametrize("name", MINE)
def test_state_round_trip_gives_the_identical_next_loss(name):
    model, tokenizer = tiny_clip()
    method = METHODS[name](model, tokenizer, **({"reference_batch_size": 4} if name == "zscl" else {}))
    provide_injected_data(method, tokenizer)
    method.before_task(classification_task(0, (0, 1, 2)))
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.05)
    batches = with_independent(method, digit_batches(tokenizer, (0, 1, 2), 6, 2), digit_batches(tokenizer, (0, 1, 2), 6, 2, 1))
    losses = method.training_loss(batches[0])
    losses["loss"].backward()
    optimizer.step()
    method.after_step(batches[0], losses)
    state = through_disk(method.state_dict())

    fresh_model, _ = tiny_clip()
    fresh_model.load_state_dict(model.state_dict())
    fresh = METHODS[name](fresh_model, tokenizer, **({"reference_batch_size": 4} if name == "zscl" else {}))
    fresh.load_state_dict(state)
    provide_injected_data(fresh, tokenizer)
    expected, got = method.training_loss(batches[1]), fresh.training_loss(batches[1])
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.allclose(expected[key], got[key], rtol=1e-6, atol=1e-7), key
    method.after_task(method.task)
    fresh.after_task(fresh.task)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(model.parameters(), fresh_model.parameters()))


# ---- plain PyTorch loop ------------------------------------------------------------------------

# Short-budget settings for a from-scratch tiny model: λ = 1 on the summed L2 pins it to its start
# within 20 steps, and avg_freq 100 would average only the first step; the terms are the same.
LOOP_OVERRIDES = {"we": {"avg_freq": 5}, "zscl": {"avg_freq": 5, "l2_weight": 0.01}, "wc": {"l2_weight": 0.01}}


@pytest.mark.parametrize("name", MINE)
def test_plain_loop_over_two_tasks_lowers_the_task_loss(name):
    torch.manual_seed(0)
    model, tokenizer = tiny_clip()
    method = METHODS[name](model, tokenizer, **LOOP_OVERRIDES.get(name, {}))
    provide_injected_data(method, tokenizer)
    for index, classes in enumerate([(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]):
        method.before_task(classification_task(index, classes, steps=20))
        optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-3, weight_decay=0.0)
        task_losses = []
        batches = with_independent(method, prototype_batches(tokenizer, classes, 32, 20, seed=index),
                                   prototype_batches(tokenizer, classes, 32, 20, seed=10 + index))
        for batch in batches:
            losses = method.training_loss(batch)
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
            method.after_step(batch, losses)
            task_losses.append(losses["task"].item())
            assert all(torch.isfinite(v) for v in losses.values())
        method.after_task(method.task)
        assert sum(task_losses[-5:]) / 5 < sum(task_losses[:5]) / 5 - 0.05, (name, index, task_losses)
