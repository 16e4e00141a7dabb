"""Command-line options shared by the step benchmarks (method_cost.py, throughput.py): the same model,
batch, precision and device flags mean the same thing in both."""
from __future__ import annotations

import argparse

import torch


def add_step_options(parser: argparse.ArgumentParser, steps_help: str, warmup_help: str) -> None:
    parser.add_argument("--model", default="vlcl-tiny", help="open_clip model name or vlcl-tiny / vlcl-small")
    parser.add_argument("--batch", type=int, default=32, help="batch size of every step")
    parser.add_argument("--steps", type=int, default=10, help=steps_help)
    parser.add_argument("--warmup", type=int, default=3, help=warmup_help)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")


def check_step_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.batch < 2 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch must be >= 2, --steps >= 1, --warmup >= 0")


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the figures to PATH as JSON, rewritten after each measurement, so a run "
                             "stopped part-way (bench/gpu_acceptance.sh gives each step a time limit) keeps what it measured")


def write_json(path: str | None, figures: dict) -> None:
    """Replace `path` atomically: a run killed mid-write leaves the previous, complete file."""
    if path is None:
        return
    import json
    import os

    temporary = f"{path}.partial"
    with open(temporary, "w") as handle:
        json.dump(figures, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.replace(temporary, path)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()}, {torch.get_num_threads()} torch threads)"
