"""What each continual method's extra passes cost: step time relative to fine-tuning, beside the
FLOP ratio, on one model and one batch. A method whose time ratio exceeds its FLOP ratio spends
time outside its useful arithmetic (small kernels, copies, syncs) - that is what to optimise.

    python bench/method_cost.py --model vlcl-tiny --batch 32 --steps 10 --device cpu --precision fp32
    python bench/method_cost.py --model ViT-B-32 --batch 512 --steps 20 --device cuda --precision bf16

Every method is measured on its second task (index 1), after `before_task`/a few steps/`after_task`
of task 0, because teachers, reference models and replay memories only exist from then on. A step
is what vlcl's training loop does: training_loss under autocast, backward, optimizer.step,
zero_grad, after_step. FLOPs are counted by torch's FlopCounterMode over one step (matmuls,
convolutions, attention; elementwise work such as the optimizer update is not counted).
`--json PATH` writes each method's figures as JSON, rewritten after each method; a method that fails
is recorded there (and named at the end) while the others still run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import time
import traceback
from dataclasses import dataclass

import torch
from step_options import add_json_option, add_step_options, check_step_options, device_name, write_json

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATE = "a photo of the number {}."
TASK0_STEPS = 2  # steps on task 0 so replay memories and EWC/MAS statistics have something in them


@dataclass
class MethodCost:
    name: str
    step_seconds: float
    flops_per_step: int
    peak_memory_bytes: int | None  # CUDA only


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_options(parser, steps_help="timed steps per method (after warm-up)",
                     warmup_help="untimed steps per method before timing")
    parser.add_argument("--task-kind", choices=("classification", "retrieval"), default="classification",
                        help="classification: class-prompt CE task loss; retrieval: contrastive task loss")
    parser.add_argument("--reference-samples", type=int, default=256, help="random reference pairs for ZSCL-like methods")
    parser.add_argument("--methods", nargs="*", default=None, help="methods to measure (default: all; finetune is always added)")
    add_json_option(parser)
    args = parser.parse_args(argv)
    check_step_options(parser, args)
    return args


def autocast_for(precision: str, device: torch.device):
    """The same autocast vlcl's loop uses (orchestrator.trainer.autocast_for) for an explicit precision."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def synthetic_batch(built, batch_size: int, num_classes: int, device: torch.device, generator: torch.Generator) -> dict:
    """Random images with digit captions and labels, already on `device` (no data loading measured)."""
    from methods.models import normalize_pixels

    size = built.image_size
    pixels = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    text = built.tokenizer([TEMPLATE.format(DIGIT_NAMES[int(c)]) for c in labels])
    pixels = pixels.to(device)
    return {"image": normalize_pixels(pixels, built.image_mean, built.image_std), "pixels": pixels,
            "text": text.to(device), "label": labels.to(device)}


def task_info(index: int, kind: str, steps: int, train_samples: int = 0):
    from methods import TaskInfo

    classes = DIGIT_NAMES[5 * index:5 * index + 5]
    if kind == "retrieval":
        return TaskInfo(index=index, name=f"captions-{index}", kind="retrieval", num_tasks=2, steps=steps,
                        train_samples=train_samples)
    return TaskInfo(index=index, name=f"digits-{index}", kind="classification", num_tasks=2,
                    class_names=classes, templates=(TEMPLATE,), steps=steps, train_samples=train_samples)


def give_reference_data(method, built, samples: int, device: torch.device, generator: torch.Generator) -> None:
    """Random reference images and captions: what `data.reference` would give, at zero loading cost."""
    from methods.models import normalize_pixels

    size = built.image_size
    pixels = torch.randint(0, 256, (samples, 3, size, size), dtype=torch.uint8, generator=generator)
    words = ["street", "bowl of fruit", "red car", "mountain", "small dog", "old building", "river", "kitchen"]
    captions = [f"a photo of a {words[i % len(words)]}, view {i}" for i in range(samples)]
    method.set_reference_data(normalize_pixels(pixels.to(device), built.image_mean, built.image_std),
                              built.tokenizer(captions))


def measure_method(name: str, built, base_state: dict, args, device: torch.device) -> MethodCost:
    from methods import METHODS

    cls = METHODS[name]
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(0)
    model = copy.deepcopy(built.model)
    model.load_state_dict(base_state)
    model.to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    method = cls(model, built.tokenizer)
    if cls.needs_reference_data:
        give_reference_data(method, built, args.reference_samples, device, generator)
    autocast = autocast_for(args.precision, device)
    num_classes = 5
    batches = [synthetic_batch(built, args.batch, num_classes, device, generator) for _ in range(4)]
    if cls.needs_independent_batch:   # the second, independently drawn batch vlcl's loop adds (LwF)
        batches = [{**b, "independent": synthetic_batch(built, args.batch, num_classes, device, generator)}
                   for b in batches]

    def new_optimizer():
        return torch.optim.AdamW(method.trainable_parameters(), lr=1e-5, fused=True)

    def step(optimizer, batch) -> None:
        with autocast():
            losses = method.training_loss(batch)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(batch, losses)

    first = task_info(0, args.task_kind, TASK0_STEPS)
    method.before_task(first)
    optimizer = new_optimizer()
    for i in range(TASK0_STEPS):
        step(optimizer, batches[i % len(batches)])
    method.after_task(first, lambda: iter(batches[:2]))

    second = task_info(1, args.task_kind, args.warmup + args.steps + 1, train_samples=len(batches) * args.batch)
    method.before_task(second)
    optimizer = new_optimizer()  # vlcl's default: train.reset_optimizer_each_task
    for i in range(args.warmup):
        step(optimizer, batches[i % len(batches)])
    synchronize()
    started = time.perf_counter()
    for i in range(args.steps):
        step(optimizer, batches[i % len(batches)])
    synchronize()
    seconds = (time.perf_counter() - started) / args.steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(optimizer, batches[0])
    return MethodCost(name=name, step_seconds=seconds, flops_per_step=counter.get_total_flops(), peak_memory_bytes=peak)


def method_figures(cost: MethodCost, base: MethodCost | None) -> dict:
    """The JSON form of one row of the table; the ratios are to fine-tuning's row (None without it)."""
    figures = {"name": cost.name, "step_seconds": cost.step_seconds, "flops_per_step": cost.flops_per_step,
               "peak_memory_bytes": cost.peak_memory_bytes, "time_ratio": None, "flop_ratio": None,
               "time_per_flop_ratio": None}
    if base is not None and base.step_seconds > 0 and base.flops_per_step > 0:
        figures["time_ratio"] = cost.step_seconds / base.step_seconds
        figures["flop_ratio"] = cost.flops_per_step / base.flops_per_step
        figures["time_per_flop_ratio"] = figures["time_ratio"] / figures["flop_ratio"] if figures["flop_ratio"] else None
    return figures


def format_table(costs: list[MethodCost], args) -> str:
    base = next(c for c in costs if c.name == "finetune")
    show_memory = any(c.peak_memory_bytes is not None for c in costs)
    header = "| method | step ms | time ratio | GFLOP/step | FLOP ratio | time/FLOP ratio |" + (" peak GiB |" if show_memory else "")
    rule = "|---|---|---|---|---|---|" + ("---|" if show_memory else "")
    lines = [f"model={args.model} batch={args.batch} precision={args.precision} device={args.device} "
             f"task_kind={args.task_kind} steps={args.steps} (task index 1)", "", header, rule]
    for c in costs:
        time_ratio = c.step_seconds / base.step_seconds
        flop_ratio = c.flops_per_step / base.flops_per_step if base.flops_per_step else float("nan")
        row = (f"| {c.name} | {1000 * c.step_seconds:.1f} | {time_ratio:.2f} | {c.flops_per_step / 1e9:.2f} | "
               f"{flop_ratio:.2f} | {time_ratio / flop_ratio:.2f} |")
        if show_memory:
            row += f" {c.peak_memory_bytes / 2**30:.2f} |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[MethodCost]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from methods import METHODS, get_method
    from methods.models import build_model

    args = parse_args(argv)
    names = args.methods or sorted(METHODS)
    for name in names:
        get_method(name)  # unknown names fail before any measuring
    names = ["finetune"] + [n for n in names if n != "finetune"]
    device = torch.device(args.device)
    torch.manual_seed(0)
    built = build_model(args.model)
    base_state = copy.deepcopy(built.model.state_dict())
    figures = {"model": args.model, "batch": args.batch, "precision": args.precision, "device": args.device,
               "device_name": device_name(device), "task_kind": args.task_kind, "steps": args.steps,
               "warmup": args.warmup, "methods": []}
    write_json(args.json, figures)
    costs, failed = [], {}
    for name in names:
        try:
            cost = measure_method(name, built, base_state, args, device)
        except Exception as error:  # the other methods still measure; the error is in the JSON
            traceback.print_exc()
            failed[name] = f"{type(error).__name__}: {error}"
            figures["methods"].append({"name": name, "error": failed[name]})
            write_json(args.json, figures)
            continue
        costs.append(cost)
        base = costs[0] if costs[0].name == "finetune" else None
        figures["methods"].append(method_figures(cost, base))
        write_json(args.json, figures)
        print(f"{name}: {1000 * cost.step_seconds:.1f} ms/step, {cost.flops_per_step / 1e9:.2f} GFLOP/step", flush=True)
    print()
    if costs and costs[0].name == "finetune":
        print(format_table(costs, args), flush=True)
    if failed:
        raise SystemExit("methods failed: " + "; ".join(f"{n}: {e}" for n, e in failed.items()))
    return costs


if __name__ == "__main__":
    main()
