"""Weight-space operations shared by methods (WiSE-FT, WE, WC, ZSCL, MulKI, CTP, EWC, ...).

Parameters are addressed by name so a snapshot survives `load_state_dict` and device moves.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def snapshot(model: nn.Module, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """Detached copies of the (trainable) parameters, keyed by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad or not trainable_only}


@torch.no_grad()
def interpolate_(model: nn.Module, anchor: dict[str, torch.Tensor], alpha: float) -> None:
    """In place: θ ← α θ + (1 − α) θ_anchor for every parameter in `anchor` (WiSE-FT)."""
    for n, p in model.named_parameters():
        if n in anchor:
            p.mul_(alpha).add_(anchor[n].to(p.device, p.dtype), alpha=1.0 - alpha)


@torch.no_grad()
def running_average_(average: dict[str, torch.Tensor], model: nn.Module, count: int) -> None:
    """In place: θ̂ ← (n θ̂ + θ) / (n + 1), with n = `count` models already averaged (ZSCL's WE)."""
    for n, p in model.named_parameters():
        if n in average:
            average[n].mul_(count / (count + 1)).add_(p.detach().to(average[n].dtype), alpha=1.0 / (count + 1))


@torch.no_grad()
def load_parameters_(model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        if n in params:
            p.copy_(params[n])


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
