"""CTP on CLIP: topology KL, momentum contrast, compatible momentum update and queues by hand."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from method_helpers import classification_task, digit_batches, random_batch, retrieval_task, tiny_clip
from methods.ctp import CTP, momentum_update_, moco_loss, topology_kl

S = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
R = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])


def hand_kl(teacher_rows, student_rows):
    """mean over rows of Σ_j p_j (log p_j − log q_j), p = softmax(teacher), q = softmax(student)."""
    total = 0.0
    for t_row, s_row in zip(teacher_rows, student_rows):
        zt = sum(math.exp(v) for v in t_row)
        zs = sum(math.exp(v) for v in s_row)
        total += sum(math.exp(a) / zt * ((a - math.log(zt)) - (b - math.log(zs))) for a, b in zip(t_row, s_row))
    return total / len(teacher_rows)


def gram(x):
    return [[sum(a * b for a, b in zip(u, v)) for v in x] for u in x]


def test_topology_kl_on_3x3_matches_a_hand_computation():
    s_rows, r_rows = gram(S.tolist()), gram(R.tolist())
    assert torch.allclose(topology_kl(S, S, R, R, 1.0), torch.tensor(hand_kl(r_rows, s_rows)), atol=1e-6)
    # scaled, and self-similarity masked: each row is a 2-way softmax over the other samples
    scale = 1 / 0.07
    off = lambda rows: [[scale * v for j, v in enumerate(row) if j != i] for i, row in enumerate(rows)]  # noqa: E731
    got = topology_kl(S, S, R, R, scale, mask_offset=0)
    assert torch.allclose(got, torch.tensor(hand_kl(off(r_rows), off(s_rows))), rtol=1e-4)
    assert topology_kl(S, S, S, S, scale, mask_offset=0).abs() < 1e-7


def test_momentum_contrast_matches_a_hand_computation():
    keys, queue = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.6, 0.8]])
    first = moco_loss(torch.tensor([[1.0, 0.0]]), keys, queue, 2.0, offset=0)
    assert torch.allclose(first, torch.tensor(-math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(1.2)))))
    second = moco_loss(torch.tensor([[0.0, 1.0]]), keys, queue, 2.0, offset=1)   # positive = key 1 (rank offset)
    assert torch.allclose(second, torch.tensor(-math.log(math.exp(2) / (1 + math.exp(2) + math.exp(1.6)))))


def test_compatible_momentum_update_mixes_momentum_current_and_reference():
    def scalar(v):
        layer = nn.Linear(1, 1, bias=False)
        nn.init.constant_(layer.weight, v)
        return layer
    momentum, current, reference = scalar(1.0), scalar(2.0), scalar(4.0)
    momentum_update_(momentum, current, 0.9, reference, 0.5)
    assert momentum.weight.item() == pytest.approx(0.9 * 1 + 0.05 * 2 + 0.05 * 4, rel=1e-6)
    momentum_update_(momentum, current, 0.995)
    assert momentum.weight.item() == pytest.approx(0.995 * 1.2 + 0.005 * 2, rel=1e-6)


def test_queue_is_a_ring_buffer_of_momentum_features():
    model, tokenizer = tiny_clip()
    method = CTP(model, tokenizer, queue_size=8)
    method._ensure_queues(2)
    first, second = torch.arange(12.0).view(6, 2), 100 + torch.arange(12.0).view(6, 2)
    method._enqueue(first, -first)
    method._enqueue(second, -second)
    assert method.queue_pointer == 4
    assert torch.equal(method.image_queue[6:8], second[0:2]) and torch.equal(method.image_queue[0:4], second[2:6])
    assert torch.equal(method.image_queue[4:6], first[4:6]) and torch.equal(method.text_queue[4:6], -first[4:6])


def test_ctp_terms_per_task_and_momentum_after_step():
    model, tokenizer = tiny_clip()
    method = CTP(model, tokenizer, queue_size=16)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.05)
    method.before_task(classification_task(0, (0, 1)))
    batches = digit_batches(tokenizer, (0, 1), 6, 2)
    terms = method.training_loss(batches[0])
    assert set(terms) == {"loss", "task", "momentum_contrast"}
    assert torch.allclose(terms["loss"], terms["task"] + terms["momentum_contrast"])   # CTP_init sums them
    terms["loss"].backward()
    optimizer.step()
    optimizer.zero_grad()
    momentum_before = method.momentum_model.visual.proj.detach().clone()
    method.after_step(batches[0], terms)
    expected = 0.995 * momentum_before + 0.005 * model.visual.proj.detach()
    assert torch.allclose(method.momentum_model.visual.proj, expected, atol=1e-7)
    assert method.queue_pointer == 6
    method.after_task(method.task)

    method.before_task(classification_task(1, (2, 3)))
    batch = digit_batches(tokenizer, (2, 3), 6, 1)[0]
    terms = method.training_loss(batch)
    assert set(terms) == {"loss", "task", "momentum_contrast", "topology_cross", "topology_intra"}
    assert terms["topology_cross"].abs() < 1e-6 and terms["topology_intra"].abs() < 1e-6   # student = reference
    assert torch.allclose(terms["loss"], terms["task"] + terms["momentum_contrast"])
    terms["loss"].backward()
    optimizer.step()
    momentum_before = method.momentum_model.visual.proj.detach().clone()
    method.after_step(batch, terms)
    expected = 0.9 * momentum_before + 0.05 * model.visual.proj.detach() + 0.05 * method.reference.visual.proj
    assert torch.allclose(method.momentum_model.visual.proj, expected, atol=1e-7)
    assert not method.reference.visual.proj.requires_grad and not method.momentum_model.visual.proj.requires_grad


def test_ctp_with_memory_replays_earlier_tasks():
    model, tokenizer = tiny_clip()
    method = CTP(model, tokenizer, memory_size=10, replay_mix="half_batch", replay_batch_size=3, task_loss="contrastive")
    method.before_task(classification_task(0, (0, 1)))
    for batch in digit_batches(tokenizer, (0, 1), 4, 2):
        method.after_step(batch, method.training_loss(batch))
    assert len(method.replay.memory) == 8
    method.after_task(method.task)
    method.before_task(classification_task(1, (2, 3)))
    terms = method.training_loss(digit_batches(tokenizer, (2, 3), 4, 1)[0])
    assert method._momentum_features[0].shape[0] == 7            # 4 current + 3 memory rows were encoded
    assert torch.isfinite(terms["loss"])


def test_ctp_with_memory_appended_keeps_the_batch_size_and_replaces_rows():
    model, tokenizer = tiny_clip()
    method = CTP(model, tokenizer, memory_size=10, task_loss="contrastive")
    method.before_task(classification_task(0, (0, 1)))
    for batch in digit_batches(tokenizer, (0, 1), 4, 2):
        method.after_step(batch, method.training_loss(batch))
    method.after_task(method.task)
    method.before_task(classification_task(1, (2, 3), train_samples=8))   # share 8 / (8 + 8) = ½
    batch = digit_batches(tokenizer, (2, 3), 4, 1)[0]
    state = method.replay.memory.generator.get_state()
    terms = method.training_loss(batch)
    method.replay.memory.generator.set_state(state)
    positions, samples = method.replay.memory.draw_replacing(4, 0.5, before_task=1)
    assert method._momentum_features[0].shape[0] == 4 and 0 < positions.numel() < 4
    images = batch["image"].clone()
    images[positions] = normalize_like(model, samples["pixels"])
    with torch.no_grad():
        expected = method.momentum_model.encode_image(images, normalize=True)
    assert torch.allclose(method._momentum_features[0], expected, atol=1e-6)
    assert torch.isfinite(terms["loss"])


def normalize_like(model, pixels):
    from methods.models import normalize_pixels

    cfg = model.visual.preprocess_cfg
    return normalize_pixels(pixels, cfg["mean"], cfg["std"])


# ---- the official formulas by hand (models/clip_pretrain.py), on the model's own features ----------

def hand_ce(logit_rows, targets):
    """mean_i −log softmax(row_i)[target_i], in plain Python."""
    total = 0.0
    for row, target in zip(logit_rows, targets):
        total += math.log(sum(math.exp(v) for v in row)) - row[target]
    return total / len(logit_rows)


def dots(a, b):
    return [[sum(x * y for x, y in zip(u, v)) for v in b] for u in a]


def hand_ita(image, text, scale):
    """½[CE(s F Tᵀ, i) + CE(s T Fᵀ, i)] (CTP's ita, clip_pretrain.py CTP_init/CTP)."""
    i2t = [[scale * v for v in row] for row in dots(image, text)]
    t2i = [[scale * v for v in row] for row in dots(text, image)]
    own = list(range(len(image)))
    return 0.5 * (hand_ce(i2t, own) + hand_ce(t2i, own))


def hand_momentum_contrast(image, text, image_keys, text_keys, image_queue, text_queue, scale):
    """½[−mean log sm(F [T^M; Q_T]ᵀ/τ)_ii + −mean log sm(T [F^M; Q_I]ᵀ/τ)_ii] (CTP_init's loss_ita_md)."""
    own = list(range(len(image)))
    i2t = [[scale * v for v in row] for row in dots(image, text_keys + text_queue)]
    t2i = [[scale * v for v in row] for row in dots(text, image_keys + image_queue)]
    return 0.5 * (hand_ce(i2t, own) + hand_ce(t2i, own))


def ctp_first_step(**hparams):
    model, tokenizer = tiny_clip()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))          # OpenAI's learned scale, unlike CTP's fixed 1/0.07
    method = CTP(model, tokenizer, queue_size=4, task_loss="contrastive", **hparams)
    method.before_task(retrieval_task(0))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():                                # the momentum model now differs from the student
        for p in model.parameters():
            if p.ndim >= 2:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    batch = random_batch(tokenizer, 3)
    terms = method.training_loss(batch)
    with torch.no_grad():
        features = [m.encode_image(batch["image"], normalize=True).tolist() for m in (model, method.momentum_model)]
        texts = [m.encode_text(batch["text"], normalize=True).tolist() for m in (model, method.momentum_model)]
    queues = method.image_queue.tolist(), method.text_queue.tolist()
    return terms, features, texts, queues


def test_ctp_task_0_loss_is_ita_at_tau_plus_momentum_contrast_summed_as_ctp_init():
    terms, (image, image_m), (text, text_m), (image_queue, text_queue) = ctp_first_step()
    ita = hand_ita(image, text, 1 / 0.07)
    cmc = hand_momentum_contrast(image, text, image_m, text_m, image_queue, text_queue, 1 / 0.07)
    assert terms["task"].item() == pytest.approx(ita, rel=1e-5)
    assert terms["momentum_contrast"].item() == pytest.approx(cmc, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(ita + cmc, rel=1e-5)       # not ½ ita + ½ cmc
    # the earlier default: the model's logit scale (100) in the task term, halves summed
    ita_model_scale = hand_ita(image, text, 100.0)
    assert abs(ita - ita_model_scale) > 0.1
    print(f"CTP task 0: ita τ=0.07 {ita:.4f}, ita scale 100 {ita_model_scale:.4f}, cmc {cmc:.4f}; "
          f"loss now {ita + cmc:.4f}, before {0.5 * ita_model_scale + 0.5 * cmc:.4f}")


def test_ctp_task_use_model_scale_gives_the_shared_task_loss_with_the_models_scale():
    terms, (image, _), (text, _), _ = ctp_first_step(task_use_model_scale=True)
    assert terms["task"].item() == pytest.approx(hand_ita(image, text, 100.0), rel=1e-5)
