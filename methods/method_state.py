"""Helpers that turn a method's cross-task state into plain tensors/ints/strs/lists/dicts and back.

Everything here must survive `torch.save` then `torch.load(..., weights_only=True)`, so teachers
are stored as state dicts of tensors and rebuilt as frozen copies of the live model on load.
"""
from __future__ import annotations

import torch
from torch import nn

from methods.base import ContinualMethod, TaskInfo, frozen_copy


def task_state(method: ContinualMethod) -> dict:
    """The current task and its class-prompt tokens, so a restored method can go on mid-task."""
    task = method.task
    state: dict = {"task": None, "class_prompt_tokens": method._class_prompt_tokens}
    if task is not None:
        state["task"] = {
            "index": task.index, "name": task.name, "kind": task.kind, "num_tasks": task.num_tasks,
            "class_names": list(task.class_names), "templates": list(task.templates), "steps": task.steps,
            "train_samples": task.train_samples,
        }
    return state


def load_task_state(method: ContinualMethod, state: dict) -> None:
    saved = state.get("task")
    if saved is not None:
        method.task = TaskInfo(
            index=int(saved["index"]), name=saved["name"], kind=saved["kind"], num_tasks=int(saved["num_tasks"]),
            class_names=tuple(saved["class_names"]), templates=tuple(saved["templates"]), steps=int(saved["steps"]),
            train_samples=int(saved.get("train_samples", 0)))  # 0 in checkpoints written before the field existed
    tokens = state.get("class_prompt_tokens")
    method._class_prompt_tokens = tokens


def teacher_state(teacher: nn.Module | None) -> dict[str, torch.Tensor] | None:
    return None if teacher is None else {k: v.detach().clone() for k, v in teacher.state_dict().items()}


def load_teacher(model: nn.Module, state: dict[str, torch.Tensor] | None) -> nn.Module | None:
    """A frozen copy of `model` (same architecture and device) holding the saved teacher weights."""
    if state is None:
        return None
    teacher = frozen_copy(model)
    teacher.load_state_dict(state)
    return teacher


def tensors_to(params: dict[str, torch.Tensor] | None, device: torch.device) -> dict[str, torch.Tensor] | None:
    return None if params is None else {k: v.to(device) for k, v in params.items()}
