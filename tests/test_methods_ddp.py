"""Data parallelism: two CPU processes (gloo), each holding half of a global batch, give the same
loss terms and the same averaged gradients as one process on the whole batch, for the methods
whose terms are functions of the whole batch (contrastive task loss, Mod-X, ZSCL, LwF)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from method_helpers import classification_task, random_batch, reference_data, retrieval_task, tiny_clip, free_port
from methods import METHODS

GLOBAL_BATCH = 8
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
    losses = method.training_loss(batch)
    losses["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def _worker(rank: int, port: int, out_dir: str, model_state: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        half = GLOBAL_BATCH // 2
        results = {}
        for name, kind, _ in CASES:
            losses, grads = _run_case(name, kind, slice(rank * half, (rank + 1) * half), model_state)
            averaged = {}
            for n, g in grads.items():
                dist.all_reduce(g)
                averaged[n] = g / 2
            results[name] = {"losses": losses, "grads": averaged}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



def test_two_workers_on_half_batches_match_one_process_on_the_whole_batch(tmp_path):
    model, _ = tiny_clip()
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    mp.spawn(_worker, args=(free_port(), str(tmp_path), model_state), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, kind, local_terms in CASES:
        expected_losses, expected_grads = _run_case(name, kind, slice(0, GLOBAL_BATCH), model_state)
        for term, value in expected_losses.items():
            per_rank = [r[name]["losses"][term] for r in ranks]
            if term in local_terms or (term == "loss" and local_terms):
                got = (per_rank[0] + per_rank[1]) / 2
            else:   # a global term: every worker computes the whole-batch value
                assert torch.allclose(per_rank[0], per_rank[1], rtol=1e-5, atol=1e-6), (name, term)
                got = per_rank[0]
            assert torch.allclose(got, value, rtol=1e-4, atol=1e-6), (name, term, got, value)
        got_grads = ranks[0][name]["grads"]
        assert got_grads.keys() == expected_grads.keys()
        for n, g in expected_grads.items():
            assert torch.allclose(got_grads[n], g, rtol=1e-3, atol=1e-6), (name, n)
