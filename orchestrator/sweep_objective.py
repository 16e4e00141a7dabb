"""What a sweep trial is ranked by: the objective computed after every task from the partial
accuracy matrix, the trial's outcome, the ranking, and the objective-per-task plot."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.sweep_config import ObjectiveSettings

OBJECTIVE_KEY = "objective"

ZERO_SHOT_DROP_KEY = "zero_shot_drop"


def finite(value, default: float = math.nan) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return default
    return value if not math.isnan(value) else default


def derived_metrics(metrics: dict, objective: ObjectiveSettings) -> dict[str, float]:
    """The objective and the zero-shot drop of one per-task report.

    Forgetting is undefined after the first task (nothing learned before to forget): it counts as 0.
    """
    forgetting = finite(metrics.get("cl/forgetting"), 0.0)
    seen_avg = finite(metrics.get("cl/seen_avg"))
    if objective.name == "avg":
        value = finite(metrics.get("cl/avg"))
    elif objective.name == "last":
        value = finite(metrics.get("cl/last"))
    elif objective.name == "seen_avg":
        value = seen_avg
    elif objective.name == "neg_forgetting":
        value = -forgetting
    else:
        value = objective.accuracy_weight * seen_avg - objective.forgetting_weight * forgetting
    zero_shot_drop = finite(metrics.get("cl/zero_shot")) - finite(metrics.get("cl/last"))
    return {OBJECTIVE_KEY: value, ZERO_SHOT_DROP_KEY: zero_shot_drop}


@dataclass


class TrialOutcome:
    trial_id: str
    params: dict[str, Any]
    objective_per_task: list[float]
    tasks_trained: int
    status: str  # completed / stopped (rule) / stopped (asha or halving: the scheduler) / error
    last_metrics: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    task_settings: list[dict] = field(default_factory=list)  # what each task trained with, inherited ones included
    matrix: list[list[float]] = field(default_factory=list)  # the accuracy matrix at its last checkpoint
    exploited_from: str | None = None  # PBT: the trial whose state this one continued from (its last exploit)

    @property
    def final_objective(self) -> float:
        return self.objective_per_task[-1] if self.objective_per_task else math.nan


def rank_trials(trials: list[TrialOutcome]) -> list[TrialOutcome]:
    """Completed trials first, by final objective; then the rest by tasks reached and objective."""
    def key(t: TrialOutcome):
        objective = t.final_objective if not math.isnan(t.final_objective) else -math.inf
        return (t.status == "completed", t.tasks_trained, objective)

    return sorted(trials, key=key, reverse=True)


def plot_objective_per_task(trials: list[TrialOutcome], num_tasks: int, objective: str, path: Path) -> None:
    """One line per trial: the objective after each task; stopped trials end with an x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trial in trials:
        tasks = list(range(1, len(trial.objective_per_task) + 1))
        line, = ax.plot(tasks, trial.objective_per_task, marker="o", label=f"{trial.trial_id} ({trial.status})")
        if trial.status != "completed" and tasks:
            ax.plot(tasks[-1], trial.objective_per_task[-1], marker="x", markersize=12, color=line.get_color())
    ax.set_xlabel("tasks trained")
    ax.set_ylabel(f"objective: {objective}")
    ax.set_xticks(range(1, num_tasks + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
