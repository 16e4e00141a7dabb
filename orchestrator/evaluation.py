"""Zero-shot classification and image-text retrieval, as pure functions of a model and batches.

Batches are dicts with `pixels` (B,H,W,3) or (B,3,H,W) uint8, `text` (B,L) token ids and `label`
(B,) int64. The entry of the accuracy matrix is `score`: top-1 for classification, the mean of the
six recalls (CTP's r_mean) for retrieval.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch

from methods.base import fill_template
from methods.models import normalize_pixels

RECALL_AT = (1, 5, 10)


@torch.no_grad()
def class_text_embeddings(model, tokenizer, class_names: list[str], templates: list[str], device) -> torch.Tensor:
    """(C, D): per class, the mean of its normalised template embeddings, renormalised (CLIP ensembling)."""
    prompts = [fill_template(t, c) for c in class_names for t in templates]
    tokens = tokenizer(prompts).to(device)
    features = model.encode_text(tokens, normalize=True).float()
    features = features.view(len(class_names), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(features, dim=-1)


@torch.no_grad()
def zero_shot_counts(model, classifier: torch.Tensor, batches: Iterable[dict], mean, std, device,
                     label_map: torch.Tensor | None = None, autocast=contextlib.nullcontext) -> tuple[int, int]:
    """(correct, total) of argmax_c <image, class_c> over `batches`; (0, 0) when there are none.
    `label_map` maps task-local labels to classifier rows. Sums over disjoint shards add up."""
    correct = total = 0
    for batch in batches:
        pixels = batch["pixels"].to(device)
        labels = batch["label"].to(device)
        if label_map is not None:
            labels = label_map.to(device)[labels]
        with autocast():
            image_features = model.encode_image(normalize_pixels(pixels, mean, std), normalize=True)
        predictions = (image_features.float() @ classifier.t()).argmax(dim=-1)
        correct += int((predictions == labels).sum())
        total += len(labels)
    return correct, total


def accuracy_from_counts(correct: int, total: int, eval_set: str = "the evaluation set") -> dict[str, float]:
    if total == 0:
        raise ValueError(f"{eval_set} has no readable sample")
    return {"top1": correct / total, "score": correct / total, "samples": float(total)}


def zero_shot_accuracy(model, classifier: torch.Tensor, batches: Iterable[dict], mean, std, device,
                       label_map: torch.Tensor | None = None, autocast=contextlib.nullcontext) -> dict[str, float]:
    """Top-1 of argmax_c <image, class_c>. `label_map` maps task-local labels to classifier rows."""
    return accuracy_from_counts(*zero_shot_counts(model, classifier, batches, mean, std, device, label_map, autocast))


@torch.no_grad()
def retrieval_features(model, batches: Iterable[dict], mean, std, device,
                       autocast=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float32 (image (N, D), text (N, D)) features, row i of each from the same pair."""
    image_features, text_features = [], []
    for batch in batches:
        with autocast():
            image_features.append(model.encode_image(normalize_pixels(batch["pixels"].to(device), mean, std),
                                                     normalize=True).float())
            text_features.append(model.encode_text(batch["text"].to(device), normalize=True).float())
    if not image_features:  # a worker's share of a small eval set can be empty
        return torch.zeros(0, 0, device=device), torch.zeros(0, 0, device=device)
    return torch.cat(image_features), torch.cat(text_features)


def retrieval_recalls(model, batches: Iterable[dict], mean, std, device,
                      autocast=contextlib.nullcontext) -> dict[str, float]:
    """R@1/5/10 image->text and text->image; sample i's caption is image i's only match."""
    return recalls_from_features(*retrieval_features(model, batches, mean, std, device, autocast))


def recalls_from_features(images: torch.Tensor, texts: torch.Tensor,
                          eval_set: str = "the evaluation set") -> dict[str, float]:
    """R@K of (N, D) image and text features, row i of each from the same pair."""
    if images.shape[0] == 0:
        raise ValueError(f"{eval_set} has no readable sample")
    return recalls_from_similarity(images @ texts.t())


def recalls_from_similarity(similarity: torch.Tensor) -> dict[str, float]:
    """similarity (N, N) image x text with the match of row i at column i."""
    n = similarity.shape[0]
    target = torch.arange(n, device=similarity.device)
    # rank of the true match = number of candidates scoring strictly higher
    image_rank = (similarity > similarity[target, target].unsqueeze(1)).sum(dim=1)
    text_rank = (similarity.t() > similarity[target, target].unsqueeze(1)).sum(dim=1)
    out: dict[str, float] = {}
    for k in RECALL_AT:
        out[f"i2t_r{k}"] = float((image_rank < k).float().mean())
        out[f"t2i_r{k}"] = float((text_rank < k).float().mean())
    out["r_mean"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_AT) / (2 * len(RECALL_AT))
    out["score"] = out["r_mean"]
    out["samples"] = float(n)
    return out


@torch.no_grad()
def evaluate_all(model, plan, data, tokenizer, image_mean, image_std, device, autocast=contextlib.nullcontext):
    """Every task's eval set and every control set, each worker scoring its own share of the rows.

    Returns (row, control_row, details): the score per task in training order, per control set,
    and every metric by name. Classification adds up the workers' (correct, total); retrieval
    gathers every worker's features and ranks all pairs against all, so the scores are those of
    the whole eval set at any world size. Every worker returns rank 0's copy."""
    from methods.distributed import all_reduce_sum, broadcast_object, gather_ragged_rows

    model.eval()
    row, control_row, details = [], [], {}
    stream_classifier = None
    scored: dict[tuple, dict] = {}  # tasks that share an eval set (e.g. Mod-X's phases) are scored once
    evaluated = [(task, "eval") for task in plan.tasks] + [(task, "control") for task in plan.control]
    for task, kind in evaluated:
        same_set = (kind == "eval" and plan.eval_classifier == "stream", task.kind, task.eval.urls, task.eval.cap,
                    task.classes, task.templates)
        if same_set in scored:
            details[task.name] = scored[same_set]
            (row if kind == "eval" else control_row).append(scored[same_set]["score"])
            continue
        batches = data.eval_batches(task)
        where = f"the eval set of task {task.name!r}" if kind == "eval" else f"control set {task.name!r}"
        if task.kind == "classification":
            # A control set is scored over its own classes: it is never part of the stream's label space.
            if plan.eval_classifier == "stream" and kind == "eval":
                if stream_classifier is None:
                    stream_classifier = class_text_embeddings(model, tokenizer, list(plan.stream_classes),
                                                              list(task.templates), device)
                classifier = stream_classifier
                label_map = torch.tensor([plan.stream_classes.index(c) for c in task.classes])
            else:
                classifier = class_text_embeddings(model, tokenizer, list(task.classes), list(task.templates), device)
                label_map = None
            counts = zero_shot_counts(model, classifier, batches, image_mean, image_std, device,
                                      label_map=label_map, autocast=autocast)
            correct, total = all_reduce_sum(torch.tensor(counts, device=device)).tolist()
            result = accuracy_from_counts(correct, total, where)
        else:
            images, texts = (gather_ragged_rows(f) for f in retrieval_features(
                model, batches, image_mean, image_std, device, autocast=autocast))
            result = recalls_from_features(images, texts, where)
        details[task.name] = scored[same_set] = result
        (row if kind == "eval" else control_row).append(result["score"])
    # Rank 0's copy, so that float noise can never make workers disagree about the matrix.
    return broadcast_object((row, control_row, details))
