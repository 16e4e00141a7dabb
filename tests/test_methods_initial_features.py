"""Tensors a method computes from the frozen starting model alone (ZSCL's teacher features of the
reference texts, MulKI's pretrained teacher's class-prompt features): exported by one run and
imported by another, they give bit-identical losses and gradients; imports that do not fit refuse."""
from __future__ import annotations

import io

import pytest
import torch

from method_helpers import classification_task, digit_batches, reference_data, tiny_clip
from methods import METHODS
from methods.base import TOKENS_SUFFIX, InitialModelFeaturesError

SETTINGS = {"zscl": {"reference_batch_size": 4, "avg_freq": 2}, "mulki": {"avg_freq": 2}}
TASK_CLASSES = [(0, 1, 2), (3, 4, 5)]
FEATURE_NAMES = {"zscl": ["reference_text"], "mulki": ["class_prompts.digits_0", "class_prompts.digits_1"]}


def tasks():
    return [classification_task(i, classes, num_tasks=len(TASK_CLASSES), steps=3) for i, classes in enumerate(TASK_CLASSES)]


def new_method(name: str, **overrides):
    model, tokenizer = tiny_clip()
    method = METHODS[name](model, tokenizer, **SETTINGS[name], **overrides)
    if method.needs_reference_data:
        method.set_reference_data(*reference_data(tokenizer))
    return method


def through_disk(features: dict) -> dict:
    """As a plain PyTorch user carries them between processes."""
    buffer = io.BytesIO()
    torch.save(features, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def train(method) -> list[tuple[dict, list]]:
    """Two tasks of three SGD steps; per step the loss terms and every parameter's gradient."""
    recorded = []
    for task, classes in zip(tasks(), TASK_CLASSES):
        method.before_task(task)
        optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.05)
        for batch in digit_batches(method.tokenizer, classes, 6, task.steps, seed=task.index):
            losses = method.training_loss(batch)
            optimizer.zero_grad()
            losses["loss"].backward()
            recorded.append(({k: v.detach().clone() for k, v in losses.items()},
                             [p.grad.clone() for p in method.trainable_parameters() if p.grad is not None]))
            optimizer.step()
            method.after_step(batch, losses)
        method.after_task(task)
    return recorded


@pytest.mark.parametrize("name", ["zscl", "mulki"])
def test_imported_initial_model_features_give_bit_identical_losses_and_gradients(name):
    computed = train(new_method(name))

    features = through_disk(new_method(name).initial_model_features(tasks()))
    assert sorted(n for n in features if not n.endswith(TOKENS_SUFFIX)) == FEATURE_NAMES[name]
    assert all(t.device.type == "cpu" for t in features.values())
    importer = new_method(name)
    importer.use_initial_model_features(features)
    imported = train(importer)

    assert len(imported) == len(computed) == 6
    for step, ((losses, grads), (expected_losses, expected_grads)) in enumerate(zip(imported, computed)):
        assert losses.keys() == expected_losses.keys()
        for key in losses:
            assert torch.equal(losses[key], expected_losses[key]), (step, key)
        assert len(grads) == len(expected_grads) and all(torch.equal(a, b) for a, b in zip(grads, expected_grads)), step

    # ... and the imported tensors are the ones used: altered, the distillation changes. (Not a
    # permutation of the rows: ZSCL's distillation is invariant to reordering its reference texts.)
    altered = {k: (v if k.endswith(TOKENS_SUFFIX) else v.roll(1, dims=-1)) for k, v in features.items()}
    other = new_method(name)
    other.use_initial_model_features(altered)
    first_losses = train(other)[0][0]
    assert not torch.equal(first_losses["loss"], computed[0][0]["loss"])


def test_zscl_features_are_those_of_the_initial_teacher_also_after_training_started():
    method = new_method("zscl")
    before = method.initial_model_features(tasks())
    train(method)  # the model moved on; the teacher stays the starting model
    after = method.initial_model_features(tasks())
    assert torch.equal(before["reference_text"], after["reference_text"])
    assert torch.equal(before["reference_text"], method._teacher_text.cpu())


def test_zscl_features_of_other_reference_texts_are_refused_naming_the_feature():
    exporter = new_method("zscl")
    images, _ = reference_data(exporter.tokenizer)
    exporter.set_reference_data(images, exporter.tokenizer(["a cat", "a dog", "a tree"]))
    importer = new_method("zscl")
    importer.use_initial_model_features(exporter.initial_model_features(tasks()))
    importer.before_task(tasks()[0])
    batch = digit_batches(importer.tokenizer, TASK_CLASSES[0], 6, 1)[0]
    with pytest.raises(InitialModelFeaturesError, match=r"'reference_text' was computed from other token ids .*\(3, "):
        importer.training_loss(batch)


def test_mulki_features_of_other_class_prompts_are_refused():
    exporter = new_method("mulki")
    features = exporter.initial_model_features([classification_task(0, (7, 8, 9))])  # same task name, other classes
    importer = new_method("mulki")
    importer.use_initial_model_features(features)
    importer.before_task(tasks()[0])
    with pytest.raises(InitialModelFeaturesError, match=r"'class_prompts\.digits_0'"):
        importer.training_loss(digit_batches(importer.tokenizer, TASK_CLASSES[0], 6, 1)[0])


def test_zscl_distilling_from_the_previous_model_has_no_initial_model_features():
    method = new_method("zscl", teacher="previous")
    assert method.initial_model_features(tasks()) == {}


def test_a_method_without_initial_model_features_refuses_them_and_features_need_their_tokens():
    model, tokenizer = tiny_clip()
    finetune = METHODS["finetune"](model, tokenizer)
    assert not finetune.has_initial_model_features and finetune.initial_model_features(tasks()) == {}
    with pytest.raises(InitialModelFeaturesError, match="has_initial_model_features is False"):
        finetune.use_initial_model_features({"reference_text": torch.zeros(2, 4)})
    with pytest.raises(InitialModelFeaturesError, match=r"\['reference_text'\] come without the token ids"):
        new_method("zscl").use_initial_model_features({"reference_text": torch.zeros(2, 4)})
