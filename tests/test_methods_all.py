"""Every registered method: defaults construct, one training step runs and changes the model,
terms are named, the hyperparameter model describes every field, and every tune space validates."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from method_helpers import classification_task, digit_batches, provide_injected_data, tiny_clip, with_independent
from methods import METHODS
from methods.base import ContinualMethod, HparamError


@pytest.mark.parametrize("name", sorted(METHODS))
def test_one_training_step_with_default_hparams(name):
    cls = METHODS[name]
    model, tokenizer = tiny_clip()
    method = cls(model, tokenizer)
    provide_injected_data(method, tokenizer)
    method.before_task(classification_task(0, (0, 1, 2)))
    batch = with_independent(method, digit_batches(tokenizer, (0, 1, 2), 6, 1),
                             digit_batches(tokenizer, (0, 1, 2), 6, 1, seed=1))[0]
    before = model.visual.proj.detach().clone()
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.1)
    losses = method.training_loss(batch)
    assert "loss" in losses and len(losses) >= 2
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    optimizer.step()
    method.after_step(batch, losses)
    assert not torch.equal(model.visual.proj, before)
    method.after_task(method.task)
    assert isinstance(method.eval_model(), torch.nn.Module)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_capabilities_are_declared_booleans_and_logit_scale_trains_only_where_declared(name):
    cls = METHODS[name]
    for capability in ("needs_reference_data", "trains_logit_scale", "needs_independent_batch"):
        assert type(vars(ContinualMethod)[capability]) is bool and type(getattr(cls, capability)) is bool
        assert vars(ContinualMethod)[capability] is False
    model, tokenizer = tiny_clip()
    trained = {id(p) for p in cls(model, tokenizer).trainable_parameters()}
    assert (id(model.logit_scale) in trained) is cls.trains_logit_scale


def test_which_methods_declare_each_capability():
    assert {n for n, c in METHODS.items() if c.trains_logit_scale} == {"modx"}
    assert {n for n, c in METHODS.items() if c.needs_independent_batch} == {"lwf", "lwf_vr"}
    assert {n for n, c in METHODS.items() if c.needs_reference_data} == {"zscl"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_set_hparams_validates_and_replaces_the_hyperparameters(name):
    cls = METHODS[name]
    model, tokenizer = tiny_clip()
    method = cls(model, tokenizer)
    with pytest.raises(HparamError, match=r"method\.hparams\.label_smoothing"):
        method.set_hparams({"label_smoothing": 2.0})
    method.set_hparams({"label_smoothing": 0.05})
    assert method.hparams.label_smoothing == 0.05 and isinstance(method.hparams, cls.Hparams)
    with pytest.raises(HparamError, match="no_such_field"):
        method.set_hparams({"no_such_field": 1})
    for field in cls.fixed_hparams:
        assert field in cls.Hparams.model_fields, (name, field)


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
