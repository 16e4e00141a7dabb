"""EWC and MAS: importance estimators, cross-task merge and penalty against hand computations."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from method_helpers import classification_task, digit_batches, tiny_clip
from methods.ewc import EWC, ImportanceError, estimate_importance, merge_importance
from methods.mas import MAS


def linear_method():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0]]))
    return SimpleNamespace(model=model, name="toy")


BATCHES = [{"x": torch.tensor([[1.0, 2.0]])}, {"x": torch.tensor([[3.0, -1.0]])}]


def objective(method):
    return lambda batch: method.model(batch["x"]).sum()      # gradient wrt w = x


def test_fisher_is_the_mean_of_squared_batch_gradients():
    method = linear_method()
    importance = estimate_importance(method, iter(BATCHES), objective(method), lambda g: g.pow(2), limit=0)
    assert torch.allclose(importance["weight"], torch.tensor([[(1 + 9) / 2, (4 + 1) / 2]]))


def test_mas_style_importance_is_the_mean_absolute_gradient_and_limit_caps_batches():
    method = linear_method()
    importance = estimate_importance(method, iter(BATCHES), objective(method), lambda g: g.abs(), limit=0)
    assert torch.allclose(importance["weight"], torch.tensor([[2.0, 1.5]]))
    first_only = estimate_importance(method, iter(BATCHES), objective(method), lambda g: g.abs(), limit=1)
    assert torch.allclose(first_only["weight"], torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ImportanceError, match="after_task"):
        estimate_importance(method, iter([]), objective(method), lambda g: g.abs(), limit=0)


def test_merge_is_a_running_mean_over_tasks():
    old, new = {"w": torch.tensor([2.0])}, {"w": torch.tensor([5.0])}
    assert merge_importance(None, new, 0)["w"].item() == 5.0
    assert merge_importance(old, new, 1)["w"].item() == pytest.approx(3.5)        # α = 1/2
    assert merge_importance(old, new, 2)["w"].item() == pytest.approx(3.0)        # α = 2/3


def test_ewc_penalty_is_half_lambda_fisher_weighted_squared_distance():
    model, tokenizer = tiny_clip()
    method = EWC(model, tokenizer)
    name, param = "visual.proj", model.visual.proj
    method.importance = {name: torch.full_like(param, 2.0)}
    method.anchor = {name: param.detach() - 0.1}
    expected = 0.5 * 5000 * 2.0 * 0.01 * param.numel()
    assert torch.allclose(method.penalty(), torch.tensor(expected), rtol=1e-4)
    method.before_task(classification_task(1, (2, 3)))
    terms = method.training_loss(digit_batches(tokenizer, (2, 3), 4, 1)[0])
    assert torch.allclose(terms["loss"], terms["task"] + terms["penalty"])


@pytest.mark.parametrize("cls,weight", [(EWC, 5000.0), (MAS, 1.0)])
def test_after_task_estimates_every_trainable_parameter_and_anchors_the_weights(cls, weight):
    model, tokenizer = tiny_clip()
    method = cls(model, tokenizer)
    assert method.hparams.penalty_weight == weight
    method.before_task(classification_task(0, (0, 1)))
    batches = digit_batches(tokenizer, (0, 1), 4, 3)
    method.after_task(method.task, lambda: iter(batches))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad} - {"logit_scale"}
    assert set(method.importance) == trainable == set(method.anchor)
    assert all(v.min() >= 0 for v in method.importance.values())
    assert method.penalty() == 0
    with torch.no_grad():
        model.visual.proj.add_(0.1)
    hand = 0.5 * weight * (method.importance["visual.proj"] * 0.01).sum()
    assert torch.allclose(method.penalty(), hand, rtol=1e-4)


def test_without_batches_after_task_uses_the_recent_training_batches():
    model, tokenizer = tiny_clip()
    method = EWC(model, tokenizer, recent_batches_kept=2)
    method.before_task(classification_task(0, (0, 1)))
    batches = digit_batches(tokenizer, (0, 1), 4, 3)
    for batch in batches:
        method.after_step(batch, method.training_loss(batch))   # the batches given to after_step are kept
    method.after_task(method.task)
    explicit = EWC(tiny_clip()[0], tokenizer)
    explicit.before_task(classification_task(0, (0, 1)))
    explicit.after_task(explicit.task, lambda: iter(batches[1:]))
    for name, value in explicit.importance.items():
        assert torch.allclose(method.importance[name], value, rtol=1e-4, atol=1e-10)
