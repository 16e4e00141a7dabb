"""Weight-space operations shared by methods (WiSE-FT, WE, WC, ZSCL, MulKI, CTP, EWC, ...).

Tensors are addressed by name so a snapshot survives `load_state_dict` and device moves.

A snapshot holds the parameters *and* the floating-point buffers (BatchNorm running statistics):
a model averaged or reset in parameters only would normalise with statistics gathered under other
weights. With `train.freeze_batchnorm` (the default) the statistics never move and this changes
nothing; with it off, WiSE-FT, WE and ZSCL average the statistics as the official WiSE-FT code
does (it interpolates the whole state dict). Integer buffers (`num_batches_tracked`) are counters,
not weights, and are left alone. The penalties (`squared_distance`) act on parameters only.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


def _weights(model: nn.Module, trainable_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
    for name, p in model.named_parameters():
        if p.requires_grad or not trainable_only:
            yield name, p
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point():
            yield name, buffer


@torch.no_grad()
def snapshot(model: nn.Module, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """Detached copies of the (trainable) parameters and the floating-point buffers, keyed by name."""
    return {n: t.detach().clone() for n, t in _weights(model, trainable_only)}


@torch.no_grad()
def interpolate_(model: nn.Module, anchor: dict[str, torch.Tensor], alpha: float) -> None:
    """In place: θ ← α θ + (1 − α) θ_anchor for every tensor in `anchor` (WiSE-FT)."""
    for n, t in _weights(model, trainable_only=False):
        if n in anchor:
            t.mul_(alpha).add_(anchor[n].to(t.device, t.dtype), alpha=1.0 - alpha)


@torch.no_grad()
def running_average_(average: dict[str, torch.Tensor], model: nn.Module, count: int) -> None:
    """In place: θ̂ ← (n θ̂ + θ) / (n + 1), with n = `count` models already averaged (ZSCL's WE)."""
    for n, t in _weights(model, trainable_only=False):
        if n in average:
            average[n].mul_(count / (count + 1)).add_(t.detach().to(average[n].dtype), alpha=1.0 / (count + 1))


@torch.no_grad()
def load_parameters_(model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Copy every tensor in `params` (parameters and buffers, by name) into `model`."""
    for n, t in _weights(model, trainable_only=False):
        if n in params:
            t.copy_(params[n])


def squared_distance(model: nn.Module, anchor: dict[str, torch.Tensor],
                     importance: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Σ_n w_n (θ_n − θ*_n)² over the parameters in `anchor` (w = 1 without `importance`).

    With importance = Fisher this is EWC's penalty (before its λ/2); without, ZSCL's WC term.
    """
    total = None
    for n, p in model.named_parameters():
        if n not in anchor:
            continue
        diff = (p - anchor[n].to(p.device, p.dtype)).pow(2)
        if importance is not None:
            diff = diff * importance[n].to(p.device, p.dtype)
        term = diff.sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros((), device=next(model.parameters()).device)
    return total
