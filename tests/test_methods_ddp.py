"""Data parallelism: two CPU processes (gloo), each holding half of a global batch, give the same
loss terms and the same averaged gradients as one process on the whole batch, for the methods
whose terms are functions of the whole batch (contrastive task loss, Mod-X, ZSCL, LwF)."""
from __future__ import annotations

import torch

from method_helpers import (GLOBAL_BATCH, assert_two_workers_match_one_process, classification_task, random_batch,
                            reference_data, retrieval_task, tiny_clip)
from methods import METHODS

# name, task kind, terms that are per-worker means (equal to the global value only after averaging)
CASES = [("finetune", "retrieval", ()), ("modx", "retrieval", ()), ("lwf", "retrieval", ()),
         ("zscl", "classification", ("task",))]


def _perturb(model) -> None:
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.add_(0.2 * torch.randn(p.shape, generator=generator))


def _run_case(name: str, kind: str, rows: slice, model_state: dict):
    """Losses and gradients of one step of `name` on rows `rows` of the fixed global batch."""
    model, tokenizer = tiny_clip()
    model.load_state_dict(model_state)
    # ZSCL's L2 is replica-identical and would dwarf the gathered terms in the gradient check
    method = METHODS[name](model, tokenizer, **({"l2_weight": 0.0} if name == "zscl" else {}))
    if name == "zscl":
        images, texts = reference_data(tokenizer, images=GLOBAL_BATCH)
        method.set_reference_data(lambda: iter([images[rows]]), texts)
    task = retrieval_task() if kind == "retrieval" else classification_task(0, (0, 1, 2))
    method.before_task(task)
    _perturb(model)      # teacher (task-start copy) and student now differ
    batch = {k: v[rows] for k, v in random_batch(tokenizer, GLOBAL_BATCH).items()}
    if method.needs_independent_batch:
        batch["independent"] = {k: v[rows] for k, v in random_batch(tokenizer, GLOBAL_BATCH, seed=1).items()}
    losses = method.training_loss(batch)
    losses["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def test_two_workers_on_half_batches_match_one_process_on_the_whole_batch(tmp_path):
    assert_two_workers_match_one_process(tmp_path, CASES, _run_case)
