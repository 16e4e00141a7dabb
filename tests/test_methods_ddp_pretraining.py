"""Data parallelism for CTP, IncCLIP and MulKI: two gloo workers on half batches give the loss terms
and averaged gradients of one process on the whole batch (second task, so teachers, momentum
contrast, topology and distillation are all active)."""
from __future__ import annotations

import torch

import os

import torch.distributed as dist
import torch.multiprocessing as mp

from method_helpers import (GLOBAL_BATCH, assert_two_workers_match_one_process, classification_task, free_port,
                            random_batch, retrieval_task, tiny_clip)
from methods import METHODS

# name, task kind, terms that are means over local rows (global value = mean over workers)
CASES = [("ctp", "retrieval", ("momentum_contrast", "topology_cross", "topology_intra")),
         ("inc_clip", "retrieval", ("distill",)),
         ("mulki", "retrieval", ("distill_initial", "distill_previous")),
         ("mulki", "classification", ("task", "distill_initial", "distill_previous"))]


def _run_case(name: str, kind: str, rows: slice, model_state: dict):
    model, tokenizer = tiny_clip()
    model.load_state_dict(model_state)
    # CTP's default "local" momentum keys depend on the local batch by design (the official code's); the
    # gathered-key option is the one equal to one process at any world size (local keys: test below)
    method = METHODS[name](model, tokenizer, **({"queue_size": 8, "momentum_keys": "global"} if name == "ctp" else {}))
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


def _ctp_local_step(rows: slice, model_state: dict):
    """CTP (default local momentum keys) one step on `rows` of the global batch: its momentum-contrast
    term and the queues after `after_step`."""
    from methods.ctp import CTP

    model, tokenizer = tiny_clip()
    model.load_state_dict(model_state)
    method = CTP(model, tokenizer, queue_size=16)
    method.before_task(retrieval_task(0))
    batch = {k: v[rows] for k, v in random_batch(tokenizer, GLOBAL_BATCH).items()}
    losses = method.training_loss(batch)
    method.after_step(batch, losses)
    return {"cmc": losses["momentum_contrast"].detach(), "image_queue": method.image_queue,
            "text_queue": method.text_queue, "pointer": torch.tensor(method.queue_pointer)}


def _ctp_local_worker(rank: int, port: int, out_dir: str, model_state: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        half = GLOBAL_BATCH // 2
        torch.save(_ctp_local_step(slice(rank * half, (rank + 1) * half), model_state),
                   os.path.join(out_dir, f"ctp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ctp_local_momentum_keys_are_each_workers_own_and_the_queue_takes_the_gathered_keys(tmp_path):
    model, _ = tiny_clip()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mp.spawn(_ctp_local_worker, args=(free_port(), str(tmp_path), state), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"ctp{r}.pt", weights_only=True) for r in range(2)]
    half = GLOBAL_BATCH // 2
    whole = _ctp_local_step(slice(0, GLOBAL_BATCH), state)
    for r, got in enumerate(ranks):
        alone = _ctp_local_step(slice(r * half, (r + 1) * half), state)   # one process holding only this half
        assert torch.allclose(got["cmc"], alone["cmc"], rtol=1e-5), (r, got["cmc"], alone["cmc"])
        for key in ("image_queue", "text_queue"):                           # both halves' keys were enqueued
            assert torch.allclose(got[key], whole[key], atol=1e-6), (r, key)
        assert int(got["pointer"]) == GLOBAL_BATCH
    assert not torch.allclose(ranks[0]["cmc"], whole["cmc"], rtol=1e-4)     # fewer in-batch keys than one process
