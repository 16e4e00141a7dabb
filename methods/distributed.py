"""The few collective operations methods need. Each is the identity in a single process, so a
method behaves the same in a plain loop and under data parallelism."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank along dim 0, keeping the gradient path to each rank's part.

    With every rank computing the same global loss on the gathered tensor and gradients averaged
    across ranks afterwards, each parameter receives exactly the single-process gradient of the
    global batch. Requires equal local batch sizes (the trainer drops ragged last batches).
    """
    if not is_distributed():
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= world_size()
    return x


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def gather_ragged_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank along dim 0 when ranks hold different numbers of rows (none
    included), in rank order. Goes through pickling, so keep it for results, not training steps."""
    if not is_distributed():
        return x
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, x.detach().cpu())
    filled = [p for p in parts if p.shape[0] > 0]
    return torch.cat(filled).to(x.device) if filled else x


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to every rank (e.g. a replay memory's contents)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


GRADIENT_BUCKET_ELEMENTS = 32 * 2**20


def average_gradients(parameters) -> None:
    """All-reduce (mean) the gradients over workers, in flat buckets; a no-op in one process."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads + [None]:
        if grad is not None:
            bucket.append(grad)
            size += grad.numel()
        if bucket and (grad is None or size >= GRADIENT_BUCKET_ELEMENTS):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= world_size()
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, size = [], 0


def broadcast_parameters(model: torch.nn.Module, src: int = 0) -> None:
    """Every rank takes rank `src`'s weights and buffers (the same start after a restore)."""
    if is_distributed():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=src)
