"""The Methods II methods in a plain PyTorch loop over two tiny tasks (classification, and retrieval
for the pretraining methods), state round trips through torch.load(weights_only=True), and frozen
teachers."""
from __future__ import annotations

import pytest
import torch

from method_helpers import classification_task, digit_batches, retrieval_task, tiny_clip
from methods import METHODS
from methods.models import normalize_pixels

NAMES = ["er", "ewc", "mas", "icarl", "ctp", "inc_clip", "mulki"]
RETRIEVAL = ["ctp", "inc_clip", "mulki"]
SMALL = {"er": {"memory_size": 16, "replay_batch_size": 4}, "icarl": {"memory_size": 16, "herding_candidates": 24,
         "replay_batch_size": 4}, "ctp": {"queue_size": 16, "memory_size": 16, "replay_batch_size": 4},
         "inc_clip": {"memory_size": 16, "replay_batch_size": 4}, "mulki": {"avg_freq": 2}, "ewc": {}, "mas": {}}
WORDS = ["red", "blue", "green", "car", "boat", "house", "dog", "cat", "tree", "lamp", "two", "three"]


def caption_batches(model, tokenizer, count: int, seed: int, size: int = 6):
    """Image–caption pairs without labels: random uint8 images, captions from a small vocabulary."""
    cfg = model.visual.preprocess_cfg
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        pixels = torch.randint(0, 256, (size, 3, 32, 32), generator=generator, dtype=torch.uint8)
        words = torch.randint(0, len(WORDS), (size, 2), generator=generator)
        captions = [f"a {WORDS[a]} {WORDS[b]}" for a, b in words.tolist()]
        batches.append({"image": normalize_pixels(pixels, cfg["mean"], cfg["std"]), "pixels": pixels,
                        "text": tokenizer(captions), "label": torch.full((size,), -1)})
    return batches


def run_task(method, task, batches, optimizer):
    losses = []
    method.before_task(task)
    for batch in batches:
        terms = method.training_loss(batch)
        assert all(v.ndim == 0 and torch.isfinite(v) for v in terms.values()), terms
        terms["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(batch, terms)
        losses.append(terms)
    method.after_task(task, lambda: iter(batches))
    return losses


@pytest.mark.parametrize("name", NAMES)
def test_two_classification_tasks_in_a_plain_loop(name):
    model, tokenizer = tiny_clip()
    method = METHODS[name](model, tokenizer, **SMALL[name])
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-3)
    first = run_task(method, classification_task(0, (0, 1, 2)), digit_batches(tokenizer, (0, 1, 2), 8, 3), optimizer)
    second = run_task(method, classification_task(1, (3, 4, 5)), digit_batches(tokenizer, (3, 4, 5), 8, 3, seed=1), optimizer)
    extra = set(second[-1]) - set(first[-1])
    expected_new = {"er": {"replay"}, "ewc": set(), "mas": set(), "icarl": {"distill_image", "distill_text"},
                    "ctp": {"replay", "topology_cross", "topology_intra"}, "inc_clip": {"replay", "distill"},
                    "mulki": set()}[name]
    assert extra == expected_new
    if name in ("ewc", "mas"):
        assert second[-1]["penalty"] > 0
    assert isinstance(method.eval_model(), torch.nn.Module)


@pytest.mark.parametrize("name", RETRIEVAL)
def test_two_retrieval_tasks_in_a_plain_loop(name):
    model, tokenizer = tiny_clip()
    method = METHODS[name](model, tokenizer, **SMALL[name])
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-3)
    run_task(method, retrieval_task(0), caption_batches(model, tokenizer, 3, seed=0), optimizer)
    method.before_task(retrieval_task(1))
    assert method.resolved_task_loss() == "contrastive"
    second = run_task(method, retrieval_task(1), caption_batches(model, tokenizer, 3, seed=1), optimizer)
    assert "replay" not in second[-1]                      # memory pairs join the contrastive loss itself


def first_steps(name):
    model, tokenizer = tiny_clip()
    method = METHODS[name](model, tokenizer, **SMALL[name])
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.05)
    run_task(method, classification_task(0, (0, 1)), digit_batches(tokenizer, (0, 1), 6, 2), optimizer)
    method.before_task(classification_task(1, (2, 3)))
    for batch in digit_batches(tokenizer, (2, 3), 6, 1, seed=3):
        terms = method.training_loss(batch)
        terms["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(batch, terms)
    return model, tokenizer, method


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip_through_weights_only_load_gives_the_identical_next_loss(name, tmp_path):
    model, tokenizer, method = first_steps(name)
    torch.save({"model": model.state_dict(), "method": method.state_dict()}, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh_model, _ = tiny_clip()
    fresh_model.load_state_dict(saved["model"])
    fresh = METHODS[name](fresh_model, tokenizer, **SMALL[name])
    fresh.load_state_dict(saved["method"])
    batch = digit_batches(tokenizer, (2, 3), 6, 1, seed=9)[0]
    expected, got = method.training_loss(batch), fresh.training_loss(batch)
    assert expected.keys() == got.keys()
    for term in expected:
        assert torch.allclose(expected[term], got[term], rtol=1e-5, atol=1e-6), (term, expected[term], got[term])


TEACHERS = {"icarl": ["teacher"], "ctp": ["reference", "momentum_model"], "inc_clip": ["teacher"],
            "mulki": ["initial", "previous"]}


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_teachers_are_frozen_and_untouched_by_training(name):
    model, tokenizer, method = first_steps(name)
    for attribute in TEACHERS[name]:
        teacher = getattr(method, attribute)
        assert not teacher.training
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    if name != "ctp":      # CTP's momentum model moves by EMA only; its reference is checked below
        before = {a: {k: v.clone() for k, v in getattr(method, a).state_dict().items()} for a in TEACHERS[name]}
    else:
        before = {"reference": {k: v.clone() for k, v in method.reference.state_dict().items()}}
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.5)
    batch = digit_batches(tokenizer, (2, 3), 6, 1, seed=4)[0]
    terms = method.training_loss(batch)
    terms["loss"].backward()
    optimizer.step()
    method.after_step(batch, terms)
    for attribute, state in before.items():
        for key, value in getattr(method, attribute).state_dict().items():
            assert torch.equal(value, state[key]), (attribute, key)
