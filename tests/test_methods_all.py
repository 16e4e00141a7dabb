"""Every registered method: defaults construct, one training step runs and changes the model,
terms are named, the hyperparameter model describes every field, and every tune space validates."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from method_helpers import classification_task, digit_batches, provide_injected_data, tiny_clip
from methods import METHODS


@pytest.mark.parametrize("name", sorted(METHODS))
def test_one_training_step_with_default_hparams(name):
    cls = METHODS[name]
    model, tokenizer = tiny_clip()
    method = cls(model, tokenizer)
    provide_injected_data(method, tokenizer)
    if getattr(cls, "needs_reference_data", False) and not hasattr(method, "set_reference_data"):
        pytest.skip(f"{name} needs injected data this test does not know how to provide")
    method.before_task(classification_task(0, (0, 1, 2)))
    batch = digit_batches(tokenizer, (0, 1, 2), 6, 1)[0]
    before = model.visual.proj.detach().clone()
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.1)
    losses = method.training_loss(batch)
    assert "loss" in losses and len(losses) >= 2
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    optimizer.step()
    method.after_step()
    assert not torch.equal(model.visual.proj, before)
    method.after_task(method.task)
    assert isinstance(method.eval_model(), torch.nn.Module)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_declares_a_summary_and_described_hparams(name):
    cls = METHODS[name]
    assert cls.name == name and cls.summary and "\n" not in cls.summary
    for field, info in cls.Hparams.model_fields.items():
        assert info.description, f"{name}.{field} has no description"


TUNE_SPACES = sorted((Path(__file__).parent.parent / "tune_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", TUNE_SPACES, ids=lambda p: p.stem)
def test_tune_space_keys_and_values_validate_against_the_method_hparams(path):
    space = yaml.safe_load(path.read_text())
    cls = METHODS[space["method"]]
    for key, spec in space["space"].items():
        if key.startswith("train."):
            continue
        assert key in cls.Hparams.model_fields, f"{path.name}: {key} is not a field of {cls.__name__}.Hparams"
        values = spec["values"] if spec["type"] == "choice" else [spec["lower"], spec["upper"]]
        for value in values:
            cls.Hparams(**{key: value})
