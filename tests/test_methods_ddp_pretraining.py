"""Data parallelism for CTP, IncCLIP and MulKI: two gloo workers on half batches give the loss terms
and averaged gradients of one process on the whole batch (second task, so teachers, momentum
contrast, topology and distillation are all active)."""
from __future__ import annotations

import torch

from method_helpers import (GLOBAL_BATCH, assert_two_workers_match_one_process, classification_task, random_batch,
                            retrieval_task, tiny_clip)
from methods import METHODS

# name, task kind, terms that are means over local rows (global value = mean over workers)
CASES = [("ctp", "retrieval", ("momentum_contrast", "topology_cross", "topology_intra")),
         ("inc_clip", "retrieval", ("distill",)),
         ("mulki", "retrieval", ("distill_initial", "distill_previous")),
         ("mulki", "classification", ("task", "distill_initial", "distill_previous"))]


def _run_case(name: str, kind: str, rows: slice, model_state: dict):
    model, tokenizer = tiny_clip()
    model.load_state_dict(model_state)
    method = METHODS[name](model, tokenizer, **({"queue_size": 8} if name == "ctp" else {}))
    make = (lambda i: retrieval_task(i)) if kind == "retrieval" else (lambda i: classification_task(i, (0, 1, 2)))
    method.before_task(make(0))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    method.before_task(make(1))              # teachers/reference = the perturbed model
    with torch.no_grad():                    # student now differs from them (in direction, not just norm)
        model.visual.proj.add_(0.3 * torch.randn(model.visual.proj.shape, generator=generator))
        model.text_projection.add_(0.3 * torch.randn(model.text_projection.shape, generator=generator))
    full = random_batch(tokenizer, GLOBAL_BATCH)
    full["pixels"] = torch.zeros(GLOBAL_BATCH, 3, 32, 32, dtype=torch.uint8)
    batch = {k: v[rows] for k, v in full.items()}
    losses = method.training_loss(batch)
    losses["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def test_two_workers_on_half_batches_match_one_process_on_the_whole_batch(tmp_path):
    assert_two_workers_match_one_process(tmp_path, CASES, _run_case)
