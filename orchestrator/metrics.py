"""Continual-learning metrics from the accuracy matrix. Every number vlcl reports comes from here.

The matrix R has T+1 rows and T columns: row 0 is the model before any training (zero-shot), row i
(1..T) the model after training task i, column j the eval score on task j (tasks 1-indexed in
formulas, 0-indexed in code). With MTIL's definitions (ZSCL `mtil/results.ipynb`):

- Transfer_j = mean_{1 <= i < j} R[i, j]   for j >= 2 (score on a task before it is learned,
  i.e. preserved zero-shot ability); Transfer = mean_j Transfer_j. The zero-shot row is not used.
- Avg_j = mean_{1 <= i <= T} R[i, j]; Avg = mean_j Avg_j.
- Last_j = R[T, j]; Last = mean_j Last_j.
- BWT = mean_{j < T} (R[T, j] - R[j, j])   (negative = forgetting; Lopez-Paz & Ranzato).
- Forgetting = mean_{j < T} (max_{j <= i < T} R[i, j] - R[T, j])   (Chaudhry et al.).

A partial matrix (rows 0..k, k < T: the run is at task k) gives the same metrics over what has
been trained so far: `seen_avg` = mean_{j <= k} R[k, j], BWT and forgetting over tasks 1..k-1.
That is what sweeps stop on after every task.

Control sets (held-out, never trained on) give a second matrix C with the same rows and one column
per set. Control retention after k tasks = mean_c C[k, c] / C[0, c]: the share of the starting
model's zero-shot score that survives (1 = all of it; sets the start scores 0 on are left out).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def as_matrix(rows: Sequence[Sequence[float]]) -> np.ndarray:
    matrix = np.asarray(rows, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[0] > matrix.shape[1] + 1:
        raise ValueError(f"accuracy matrix must have 1..T+1 rows of T scores, got shape {matrix.shape}")
    return matrix


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else math.nan


def transfer(rows) -> float:
    r = as_matrix(rows)
    k = r.shape[0] - 1  # tasks trained so far
    # Column j (0-indexed) is learned at row j + 1; rows 1..j are the models that have not seen it.
    per_task = [r[1:min(j, k) + 1, j].mean() for j in range(1, r.shape[1]) if min(j, k) >= 1]
    return _mean(per_task)


def average(rows) -> float:
    r = as_matrix(rows)
    if r.shape[0] < 2:
        return math.nan
    return float(r[1:].mean(axis=0).mean())


def last(rows) -> float:
    r = as_matrix(rows)
    return float(r[-1].mean()) if r.shape[0] >= 2 else math.nan


def seen_average(rows) -> float:
    r = as_matrix(rows)
    k = r.shape[0] - 1
    return float(r[k, :k].mean()) if k >= 1 else math.nan


def backward_transfer(rows) -> float:
    r = as_matrix(rows)
    k = r.shape[0] - 1
    return _mean(r[k, j] - r[j + 1, j] for j in range(k - 1))


def forgetting(rows) -> float:
    r = as_matrix(rows)
    k = r.shape[0] - 1
    return _mean(r[j + 1:k, j].max() - r[k, j] for j in range(k - 1))


def zero_shot(rows) -> float:
    return float(as_matrix(rows)[0].mean())


def control_retention(control_rows) -> float:
    c = np.asarray(control_rows, dtype=float)
    if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] == 0:
        return math.nan
    start, now = c[0], c[-1]
    return _mean(now[i] / start[i] for i in range(c.shape[1]) if start[i] > 0)


def summarize_control(control_rows) -> dict[str, float]:
    """Control-set metrics of the latest row (`cl/control`, `cl/control_retention`)."""
    c = np.asarray(control_rows, dtype=float)
    if c.ndim != 2 or c.shape[1] == 0:
        return {}
    return {"cl/control": float(c[-1].mean()), "cl/control_retention": control_retention(c)}


def summarize(rows) -> dict[str, float]:
    """All summary metrics of a (possibly partial) matrix, keyed as logged (`cl/<name>`)."""
    return {
        "cl/transfer": transfer(rows),
        "cl/avg": average(rows),
        "cl/last": last(rows),
        "cl/seen_avg": seen_average(rows),
        "cl/bwt": backward_transfer(rows),
        "cl/forgetting": forgetting(rows),
        "cl/zero_shot": zero_shot(rows),
    }
