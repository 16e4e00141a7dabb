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
