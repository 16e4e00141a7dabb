"""Continual fine-tuning: train each task in turn with only its own loss. The lower bound every
continual method must beat (ZSCL's "Continual-FT", CTP's "SeqF")."""
from __future__ import annotations

from methods.base import ContinualMethod, MethodHparams


class FineTune(ContinualMethod):
    name = "finetune"
    summary = "Sequential fine-tuning with the task loss only (the lower bound)."
    Hparams = MethodHparams
