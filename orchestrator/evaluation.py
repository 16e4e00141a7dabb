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
                       autocast=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised float32 image features (N, D), caption features (M, D) and the image row of each
    caption (M,). A batch with `captions` and `caption_row` (every caption of its images: COCO and
    Flickr30K have five) is scored over all of them; otherwise row i's `text` is image i's caption."""
    image_features, text_features, caption_image = [], [], []
    images_so_far = 0
    for batch in batches:
        with autocast():
            images = model.encode_image(normalize_pixels(batch["pixels"].to(device), mean, std), normalize=True).float()
            if "captions" in batch:
                texts = model.encode_text(batch["captions"].to(device), normalize=True).float()
                owner = batch["caption_row"].to(device) + images_so_far
            else:
                texts = model.encode_text(batch["text"].to(device), normalize=True).float()
                owner = torch.arange(images.shape[0], device=device) + images_so_far
        image_features.append(images)
        text_features.append(texts)
        caption_image.append(owner)
        images_so_far += images.shape[0]
    if not image_features:  # a worker's share of a small eval set can be empty
        return (torch.zeros(0, 0, device=device), torch.zeros(0, 0, device=device),
                torch.zeros(0, dtype=torch.int64, device=device))
    return torch.cat(image_features), torch.cat(text_features), torch.cat(caption_image)


def retrieval_recalls(model, batches: Iterable[dict], mean, std, device,
                      autocast=contextlib.nullcontext) -> dict[str, float]:
    """R@1/5/10 image->text and text->image over every caption of the batches' images."""
    return recalls_from_features(*retrieval_features(model, batches, mean, std, device, autocast))


RANK_CHUNK = 1024  # similarity rows at a time: COCO's 5k images x 25k captions would be 500 MB at once


def recalls_from_features(images: torch.Tensor, texts: torch.Tensor, caption_image: torch.Tensor | None = None,
                          eval_set: str = "the evaluation set") -> dict[str, float]:
    """R@K of (N, D) image and (M, D) caption features; caption j belongs to image caption_image[j]
    (None: M = N and caption i is image i's only one)."""
    if images.shape[0] == 0:
        raise ValueError(f"{eval_set} has no readable sample")
    if caption_image is None:
        caption_image = torch.arange(images.shape[0], device=images.device)
    image_rank = torch.cat([_image_ranks(images[start:start + RANK_CHUNK] @ texts.t(), start, caption_image)
                            for start in range(0, images.shape[0], RANK_CHUNK)])
    text_rank = torch.cat([_text_ranks(texts[start:start + RANK_CHUNK] @ images.t(),
                                       caption_image[start:start + RANK_CHUNK])
                           for start in range(0, texts.shape[0], RANK_CHUNK)])
    return _recalls(image_rank, text_rank)


def recalls_from_similarity(similarity: torch.Tensor, caption_image: torch.Tensor | None = None) -> dict[str, float]:
    """The recalls of a whole (N images, M captions) similarity matrix; caption j belongs to image
    caption_image[j] (None: the match of row i is column i)."""
    if caption_image is None:
        caption_image = torch.arange(similarity.shape[0], device=similarity.device)
    return _recalls(_image_ranks(similarity, 0, caption_image), _text_ranks(similarity.t(), caption_image))


def _image_ranks(similarity: torch.Tensor, first_image: int, caption_image: torch.Tensor) -> torch.Tensor:
    """Image -> text: the rank of the image's best-scoring own caption among all M captions (the
    CLIP/ALBEF i2t protocol: a hit at K when any of its captions is in the top K). Rows are images
    first_image, first_image + 1, ...; rank = captions scoring strictly higher."""
    rows = torch.arange(first_image, first_image + similarity.shape[0], device=similarity.device)
    own = caption_image.unsqueeze(0) == rows.unsqueeze(1)
    best_own = similarity.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)
    return (similarity > best_own).sum(dim=1)


def _text_ranks(similarity: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """Text -> image: the rank of each caption's own image among all N images (rows: captions)."""
    own = similarity.gather(1, caption_image.unsqueeze(1))
    return (similarity > own).sum(dim=1)


def _recalls(image_rank: torch.Tensor, text_rank: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in RECALL_AT:
        out[f"i2t_r{k}"] = float((image_rank < k).float().mean())
        out[f"t2i_r{k}"] = float((text_rank < k).float().mean())
    out["r_mean"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_AT) / (2 * len(RECALL_AT))
    out["score"] = out["r_mean"]
    out["samples"] = float(image_rank.shape[0])
    out["captions"] = float(text_rank.shape[0])
    return out


def gather_retrieval_features(images: torch.Tensor, texts: torch.Tensor, caption_image: torch.Tensor):
    """Every worker's (images, captions, caption_image) as one set, in rank order: each worker's
    caption rows are shifted by the images of the workers before it."""
    from methods.distributed import gather_ragged_rows, is_distributed, rank

    if not is_distributed():
        return images, texts, caption_image
    counts = gather_ragged_rows(torch.tensor([images.shape[0]], device=images.device))
    offset = int(counts[:rank()].sum())
    return gather_ragged_rows(images), gather_ragged_rows(texts), gather_ragged_rows(caption_image + offset)


def union_of(sets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Several retrieval eval sets as one gallery (CTP scores the union of the seen tasks' test sets)."""
    images, texts, owners, so_far = [], [], [], 0
    for set_images, set_texts, set_owners in sets:
        images.append(set_images)
        texts.append(set_texts)
        owners.append(set_owners + so_far)
        so_far += set_images.shape[0]
    return torch.cat(images), torch.cat(texts), torch.cat(owners)


@torch.no_grad()
def evaluate_all(model, plan, data, tokenizer, image_mean, image_std, device, autocast=contextlib.nullcontext,
                 tasks_trained: int = 0):
    """Every task's eval set and every control set, each worker scoring its own share of the rows.

    Returns (row, control_row, details, seen_union): the score per task in training order, per
    control set, every metric by name, and (CTP's protocol) the recalls over the union of the eval
    sets of the first `tasks_trained` tasks when two or more of them are retrieval sets, else {}.
    Classification adds up the workers' (correct, total); retrieval gathers every worker's features
    and ranks all captions against all images, so the scores are those of the whole eval set at any
    world size. Every worker returns rank 0's copy."""
    from methods.distributed import all_reduce_sum, broadcast_object

    model.eval()
    row, control_row, details = [], [], {}
    stream_classifier = None
    scored: dict[tuple, dict] = {}  # tasks that share an eval set (e.g. Mod-X's phases) are scored once
    seen_sets = []  # the gathered features of the seen tasks' distinct retrieval eval sets
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
            features = gather_retrieval_features(*retrieval_features(model, batches, image_mean, image_std, device,
                                                                     autocast=autocast))
            result = recalls_from_features(*features, eval_set=where)
            if kind == "eval" and task.index < tasks_trained:
                seen_sets.append(features)
        details[task.name] = scored[same_set] = result
        (row if kind == "eval" else control_row).append(result["score"])
    seen_union = recalls_from_features(*union_of(seen_sets)) if len(seen_sets) >= 2 else {}
    # Rank 0's copy, so that float noise can never make workers disagree about the matrix.
    return broadcast_object((row, control_row, details, seen_union))
