"""Data parallelism for CTP, IncCLIP and MulKI: two gloo workers on half batches give the loss terms
and averaged gradients of one process on the whole batch (second task, so teachers, momentum
contrast, topology and distillation are all active)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from method_helpers import classification_task, random_batch, retrieval_task, tiny_clip, free_port
from methods import METHODS

GLOBAL_BATCH = 8
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


def _worker(rank: int, port: int, out_dir: str, model_state: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        half = GLOBAL_BATCH // 2
        results = {}
        for name, kind, _ in CASES:
            losses, grads = _run_case(name, kind, slice(rank * half, (rank + 1) * half), model_state)
            for g in grads.values():
                dist.all_reduce(g)
                g /= 2
            results[f"{name}-{kind}"] = {"losses": losses, "grads": grads}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



def test_two_workers_on_half_batches_match_one_process_on_the_whole_batch(tmp_path):
    model, _ = tiny_clip()
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    mp.spawn(_worker, args=(free_port(), str(tmp_path), model_state), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, kind, local_terms in CASES:
        key = f"{name}-{kind}"
        expected_losses, expected_grads = _run_case(name, kind, slice(0, GLOBAL_BATCH), model_state)
        for term, value in expected_losses.items():
            per_rank = [r[key]["losses"][term] for r in ranks]
            if term in local_terms or term == "loss":
                got = (per_rank[0] + per_rank[1]) / 2
            else:
                assert torch.allclose(per_rank[0], per_rank[1], rtol=1e-5, atol=1e-6), (key, term)
                got = per_rank[0]
            assert torch.allclose(got, value, rtol=1e-4, atol=1e-6), (key, term, got, value)
        got_grads = ranks[0][key]["grads"]
        assert got_grads.keys() == expected_grads.keys()
        for n, g in expected_grads.items():
            assert torch.allclose(got_grads[n], g, rtol=1e-3, atol=1e-6), (key, n)
