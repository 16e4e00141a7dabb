"""WiSE-FT, WE and WC against hand computations on a two-parameter model."""
from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from method_helpers import classification_task, digit_batches, tiny_clip
from methods.base import TaskInfo
from methods.we import WeightEnsemble
from methods.wc import WeightConsolidation
from methods.wise_ft import WiSEFT

TASK = TaskInfo(index=0, name="t0", kind="retrieval", num_tasks=2)


class TwoWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.b = nn.Parameter(torch.tensor(-1.0))


def set_weights(model: TwoWeights, w, b) -> None:
    with torch.no_grad():
        model.w.copy_(torch.tensor(w))
        model.b.fill_(b)


def through_disk(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_wise_ft_interpolates_end_weights_with_task_start_at_alpha():
    model = TwoWeights()
    method = WiSEFT(model, tokenizer=None)
    method.before_task(TASK)
    set_weights(model, [3.0, -2.0], 4.0)
    method.after_task(TASK)
    assert torch.allclose(model.w, torch.tensor([0.8 * 3 + 0.2 * 1, 0.8 * -2 + 0.2 * 2]))
    assert torch.allclose(model.b, torch.tensor(0.8 * 4 + 0.2 * -1))


def test_wise_ft_zeroshot_anchor_uses_initial_weights_on_later_tasks():
    model = TwoWeights()
    method = WiSEFT(model, tokenizer=None, alpha=0.5, anchor="zeroshot")
    method.before_task(TASK)
    set_weights(model, [5.0, 6.0], 1.0)
    method.after_task(TASK)                         # (3, 4, 0)
    method.before_task(TaskInfo(index=1, name="t1", kind="retrieval", num_tasks=2))
    set_weights(model, [9.0, 10.0], 3.0)
    method.after_task(TASK)
    assert torch.allclose(model.w, torch.tensor([5.0, 6.0]))   # 0.5 * (9, 10) + 0.5 * (1, 2)
    assert torch.allclose(model.b, torch.tensor(1.0))


def test_we_average_after_three_updates_is_uniform_over_start_and_samples():
    model = TwoWeights()
    method = WeightEnsemble(model, tokenizer=None, avg_freq=1)
    method.before_task(TASK)
    seen = [[1.0, 2.0]]
    for w in ([3.0, 0.0], [5.0, 4.0], [-1.0, 6.0]):
        set_weights(model, w, 0.0)
        method.after_step({}, {})
        seen.append(w)
    assert method.averager.count == 4
    method.after_task(TASK)
    assert torch.allclose(model.w, torch.tensor(seen).mean(0))     # (2, 3)
    assert torch.allclose(model.b, torch.tensor((-1.0 + 0 + 0 + 0) / 4))


def test_we_samples_at_steps_one_and_one_plus_avg_freq_like_the_official_loop():
    model = TwoWeights()
    method = WeightEnsemble(model, tokenizer=None, avg_freq=2)
    method.before_task(TASK)
    for w in ([3.0, 0.0], [100.0, 100.0], [5.0, 4.0], [100.0, 100.0]):  # 0-based steps 0..3: 0 and 2 sampled
        set_weights(model, w, -1.0)
        method.after_step({}, {})
    method.after_task(TASK)
    assert torch.allclose(model.w, torch.tensor([(1 + 3 + 5) / 3, (2 + 0 + 4) / 3]))


def test_we_state_round_trip_resumes_the_same_average():
    model = TwoWeights()
    method = WeightEnsemble(model, tokenizer=None, avg_freq=1)
    method.before_task(TASK)
    set_weights(model, [3.0, 0.0], 0.0)
    method.after_step({}, {})
    restored_model = TwoWeights()
    set_weights(restored_model, [3.0, 0.0], 0.0)
    restored = WeightEnsemble(restored_model, tokenizer=None, avg_freq=1)
    restored.load_state_dict(through_disk(method.state_dict()))
    for m, mm in ((method, model), (restored, restored_model)):
        set_weights(mm, [6.0, 6.0], 2.0)
        m.after_step({}, {})
        m.after_task(TASK)
    assert torch.equal(model.w, restored_model.w) and torch.equal(model.b, restored_model.b)
    assert torch.allclose(model.w, torch.tensor([(1 + 3 + 6) / 3, (2 + 0 + 6) / 3]))


def test_we_warns_when_the_task_is_too_short_for_avg_freq():
    model = TwoWeights()
    method = WeightEnsemble(model, tokenizer=None, avg_freq=100)
    method.before_task(TASK)
    for _ in range(30):
        method.after_step({}, {})
    with pytest.warns(UserWarning, match=r"30 optimizer steps, not more than avg_freq=100.*avg_freq.*\(here 3\)"):
        method.after_task(TASK)
    method.before_task(TASK)
    for _ in range(101):  # steps 1 and 101 sampled: no warning
        method.after_step({}, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method.after_task(TASK)


def batchnorm_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model.train()  # BatchNorm updating its statistics, as with train.freeze_batchnorm=false
    return model


def forward_shifted(model: nn.Module, shift: float) -> None:
    torch.manual_seed(int(shift))
    with torch.no_grad():
        model(torch.randn(16, 3) + shift)


def test_wise_ft_interpolates_batchnorm_statistics_and_leaves_the_counter():
    model = batchnorm_model()
    forward_shifted(model, 0.0)
    start_mean, start_var = model[1].running_mean.clone(), model[1].running_var.clone()
    method = WiSEFT(model, tokenizer=None, alpha=0.8)
    method.before_task(TASK)
    forward_shifted(model, 5.0)
    end_mean, end_var = model[1].running_mean.clone(), model[1].running_var.clone()
    assert not torch.allclose(start_mean, end_mean)
    method.after_task(TASK)
    assert torch.allclose(model[1].running_mean, 0.8 * end_mean + 0.2 * start_mean)
    assert torch.allclose(model[1].running_var, 0.8 * end_var + 0.2 * start_var)
    assert model[1].num_batches_tracked.item() == 2


def test_we_averages_batchnorm_statistics_with_the_weights():
    model = batchnorm_model()
    method = WeightEnsemble(model, tokenizer=None, avg_freq=1)
    method.before_task(TASK)
    seen = [model[1].running_mean.clone()]
    for shift in (2.0, 4.0):
        forward_shifted(model, shift)
        method.after_step({}, {})
        seen.append(model[1].running_mean.clone())
    method.after_task(TASK)
    assert torch.allclose(model[1].running_mean, torch.stack(seen).mean(0))


def test_wc_l2_is_the_summed_squared_distance_to_task_start():
    model, tokenizer = tiny_clip()
    method = WeightConsolidation(model, tokenizer, l2_weight=0.5)
    method.before_task(classification_task(0, (0, 1, 2)))
    with torch.no_grad():
        model.text_projection.add_(0.1)               # 64×64 entries moved by 0.1
        model.visual.proj.sub_(0.2)                    # 64×64 entries moved by 0.2
    batch = digit_batches(tokenizer, (0, 1, 2), 4, 1)[0]
    losses = method.training_loss(batch)
    expected = 64 * 64 * (0.1 ** 2 + 0.2 ** 2)
    assert losses["l2"].item() == pytest.approx(expected, rel=1e-4)
    assert losses["loss"].item() == pytest.approx(losses["task"].item() + 0.5 * expected, rel=1e-5)


def test_wc_state_round_trip_keeps_the_task_start_anchor():
    model, tokenizer = tiny_clip()
    method = WeightConsolidation(model, tokenizer)
    method.before_task(classification_task(0, (0, 1, 2)))
    with torch.no_grad():
        model.text_projection.add_(0.1)
    batch = digit_batches(tokenizer, (0, 1, 2), 4, 1)[0]
    fresh_model, _ = tiny_clip()
    fresh_model.load_state_dict(model.state_dict())
    fresh = WeightConsolidation(fresh_model, tokenizer)
    fresh.load_state_dict(through_disk(method.state_dict()))
    a, b = method.training_loss(batch), fresh.training_loss(batch)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_batchnorm_keeps_its_statistics_while_the_rest_trains(freeze):
    from methods.models import set_train_mode

    torch.manual_seed(0)
    tower = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(2))
    tower(torch.randn(2, 3, 8, 8))  # materialise the lazy layer
    before = {k: v.clone() for k, v in tower[1].state_dict().items()}
    set_train_mode(tower, freeze_batchnorm=freeze)
    assert tower.training and tower[2].training          # dropout and the rest train either way
    assert tower[1].training is not freeze
    optimizer = torch.optim.SGD(tower.parameters(), lr=0.1)
    tower(torch.randn(8, 3, 8, 8) * 5 + 3).square().mean().backward()
    optimizer.step()
    after = tower[1].state_dict()
    statistics_kept = all(torch.equal(before[k], after[k]) for k in ("running_mean", "running_var", "num_batches_tracked"))
    assert statistics_kept is freeze
    assert not torch.equal(before["weight"], after["weight"])  # its affine weights learn in both cases


def test_we_sample_final_step_folds_the_last_weights_in_unless_already_sampled():
    # avg_freq 2, 4 steps: 0-based steps 0 and 2 sampled; the harness's last iteration is a sample, so
    # sample_final_step adds step 3: mean of {start, θ0, θ2, θ3}
    model = TwoWeights()
    method = WeightEnsemble(model, tokenizer=None, avg_freq=2, sample_final_step=True)
    method.before_task(TASK)
    for w in ([3.0, 0.0], [100.0, 100.0], [5.0, 4.0], [7.0, -2.0]):
        set_weights(model, w, 0.0)
        method.after_step({}, {})
    method.after_task(TASK)
    assert torch.allclose(model.w, torch.tensor([(1 + 3 + 5 + 7) / 4, (2 + 0 + 4 - 2) / 4]))
    # 5 steps (MTIL's N + 1 with N = 4): step 4 is sampled by the schedule itself, not twice
    method.before_task(TASK)
    set_weights(model, [1.0, 2.0], -1.0)
    method.before_task(TASK)
    for w in ([3.0, 0.0], [100.0, 100.0], [5.0, 4.0], [100.0, 100.0], [7.0, -2.0]):
        set_weights(model, w, 0.0)
        method.after_step({}, {})
    method.after_task(TASK)
    assert method.averager.count == 4
    assert torch.allclose(model.w, torch.tensor([(1 + 3 + 5 + 7) / 4, (2 + 0 + 4 - 2) / 4]))


def test_we_set_hparams_changes_the_sampling_interval():
    model = TwoWeights()
    method = WeightEnsemble(model, tokenizer=None, avg_freq=100)
    method.set_hparams({"avg_freq": 1})
    assert method.hparams.avg_freq == 1 and method.averager.avg_freq == 1
    method.before_task(TASK)
    set_weights(model, [3.0, 0.0], 0.0)
    method.after_step({}, {})
    method.after_step({}, {})
    assert method.averager.count == 3
