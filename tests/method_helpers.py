"""Tiny models, tasks and batches for the method tests (vlcl-tiny, 32px, sklearn digits)."""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F

from methods.base import TaskInfo
from methods.models import build_model

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATE = "a photo of the number {}."


@functools.lru_cache(maxsize=1)
def _built():
    torch.manual_seed(0)
    return build_model("vlcl-tiny")


def tiny_clip():
    """A fresh copy of one seeded vlcl-tiny model and its tokenizer."""
    built = _built()
    return copy.deepcopy(built.model), built.tokenizer


def classification_task(index: int, classes: tuple[int, ...], num_tasks: int = 2, steps: int = 0,
                        train_samples: int = 100) -> TaskInfo:
    return TaskInfo(index=index, name=f"digits_{index}", kind="classification", num_tasks=num_tasks,
                    class_names=tuple(DIGIT_NAMES[c] for c in classes), templates=(TEMPLATE,), steps=steps,
                    train_samples=train_samples)


def retrieval_task(index: int = 0, train_samples: int = 100) -> TaskInfo:
    return TaskInfo(index=index, name=f"captions_{index}", kind="retrieval", num_tasks=2, train_samples=train_samples)


@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0          # (N, 8, 8) in [0, 1]
    images = F.interpolate(images[:, None], size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    return (images - 0.5) / 0.25, torch.tensor(data.target), (images * 255).round().to(torch.uint8)


def digit_batches(tokenizer, classes: tuple[int, ...], batch_size: int, count: int, seed: int = 0):
    """`count` batches of the digits in `classes`; labels are indices into `classes`. `pixels` holds
    the uint8 images `image` was normalised from (replay methods store them)."""
    images, targets, pixels = _digits()
    keep = torch.isin(targets, torch.tensor(classes))
    images, targets, pixels = images[keep], targets[keep], pixels[keep]
    local = torch.tensor([classes.index(int(t)) for t in targets])
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        pick = torch.randperm(len(images), generator=generator)[:batch_size]
        captions = [TEMPLATE.format(DIGIT_NAMES[int(targets[i])]) for i in pick]
        batches.append({"image": images[pick].contiguous(), "pixels": pixels[pick].contiguous(),
                        "text": tokenizer(captions), "label": local[pick]})
    return batches


def random_batch(tokenizer, batch_size: int = 6, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    words = ["cat", "dog", "car", "tree", "house", "boat", "bird", "fish", "lamp", "road"]
    captions = [f"a photo of a {words[i % len(words)]} number {i}" for i in range(batch_size)]
    return {"image": torch.randn(batch_size, 3, 32, 32, generator=generator), "text": tokenizer(captions),
            "label": torch.arange(batch_size) % 3}


def reference_data(tokenizer, images: int = 8, seed: int = 1):
    """Reference images (noise, not training data) and captions for ZSCL."""
    generator = torch.Generator().manual_seed(seed)
    texts = ["a street at night", "a bowl of fruit", "two people walking", "a red car", "a snowy mountain",
             "a plate of food", "a small dog", "an old building"]
    return torch.randn(images, 3, 32, 32, generator=generator), tokenizer(texts)


def provide_injected_data(method, tokenizer) -> None:
    """Give a method the data its class declares it needs injected (reference sets)."""
    if method.needs_reference_data:
        images, texts = reference_data(tokenizer)
        method.set_reference_data(images, texts)


def with_independent(method, batches: list[dict], independent: list[dict]) -> list[dict]:
    """The batches with `independent` added (the i-th of `independent`) when the method's class
    declares `needs_independent_batch`, as vlcl's loop does; unchanged otherwise."""
    if not method.needs_independent_batch:
        return batches
    return [{**b, "independent": i} for b, i in zip(batches, independent)]


def prototype_batches(tokenizer, classes: tuple[int, ...], batch_size: int, count: int, seed: int = 0):
    """Random images: a fixed noise prototype per class plus per-sample noise. A from-scratch tiny
    ViT separates these within a few steps, unlike digits, so a short loop shows learning."""
    prototypes = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(100))
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        labels = torch.randint(len(classes), (batch_size,), generator=generator)
        images = prototypes[torch.tensor(classes)[labels]] + 0.5 * torch.randn(batch_size, 3, 32, 32, generator=generator)
        captions = [TEMPLATE.format(DIGIT_NAMES[classes[int(c)]]) for c in labels]
        batches.append({"image": images, "text": tokenizer(captions), "label": labels})
    return batches


def free_port() -> int:
    """A free localhost TCP port for a test's process group rendezvous."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


GLOBAL_BATCH = 8


def _ddp_worker(rank: int, port: int, out_dir: str, model_state: dict, cases: list, run_case) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        half = GLOBAL_BATCH // 2
        results = {}
        for name, kind, _ in cases:
            losses, grads = run_case(name, kind, slice(rank * half, (rank + 1) * half), model_state)
            for g in grads.values():
                dist.all_reduce(g)
                g /= 2
            results[f"{name}-{kind}"] = {"losses": losses, "grads": grads}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def assert_two_workers_match_one_process(tmp_path, cases: list, run_case) -> None:
    """Two gloo processes, each on half of the global batch, against one process on the whole batch.

    `cases` are (method name, task kind, local terms); `run_case(name, kind, rows, model_state)` runs
    one step on `rows` of the fixed global batch and returns (loss terms, gradients). A local term is a
    mean over a worker's rows, so its global value is the mean over workers (and so is the total loss
    when any term is local); every other term must already be the whole-batch value on each worker.
    Averaged gradients must equal the whole-batch gradients either way."""
    import torch.multiprocessing as mp

    model, _ = tiny_clip()
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path), model_state, cases, run_case), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, kind, local_terms in cases:
        key = f"{name}-{kind}"
        expected_losses, expected_grads = run_case(name, kind, slice(0, GLOBAL_BATCH), model_state)
        for term, value in expected_losses.items():
            per_rank = [r[key]["losses"][term] for r in ranks]
            if term in local_terms or (term == "loss" and local_terms):
                got = (per_rank[0] + per_rank[1]) / 2
            else:
                assert torch.allclose(per_rank[0], per_rank[1], rtol=1e-5, atol=1e-6), (key, term)
                got = per_rank[0]
            assert torch.allclose(got, value, rtol=1e-4, atol=1e-6), (key, term, got, value)
        got_grads = ranks[0][key]["grads"]
        assert got_grads.keys() == expected_grads.keys()
        for n, g in expected_grads.items():
            assert torch.allclose(got_grads[n], g, rtol=1e-3, atol=1e-6), (key, n)
