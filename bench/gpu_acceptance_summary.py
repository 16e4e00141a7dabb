"""The last step of bench/gpu_acceptance.sh: gathers the figures its steps wrote under OUT into
`summary.json` (machine-readable: every figure, each step's status, what is missing) and
`summary.md` (the same as tables). Standard library only, so it still runs when a step's
environment broke. Exits 1 when a figure the run expected is missing (a step failed or timed out).

MFU is img/s x the FLOPs of one training step per image (FlopCounterMode, forward + backward)
over 989 TF/s, the dense bf16 peak of an H100/H200, on every device: on a CPU (`--smoke`) it is
a tiny fraction that says nothing about the CPU, and summary.md marks it so.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PEAK_FLOPS = 989e12


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the folder the steps wrote their JSON into")
    parser.add_argument("--steps", required=True, help="TSV of the steps: name, status, exit code, seconds, time limit")
    parser.add_argument("--mode", required=True, choices=("gpu", "smoke"))
    parser.add_argument("--seconds", type=float, default=None, help="wall time of the whole script so far")
    parser.add_argument("--throughput", nargs="*", default=[], help="throughput JSON files expected under --out")
    parser.add_argument("--decode", nargs="*", default=[], help="data.decode values expected in each of them")
    parser.add_argument("--method-cost", default=None, help="method_cost JSON file expected under --out")
    parser.add_argument("--methods", nargs="*", default=[], help="methods expected in it")
    return parser.parse_args(argv)


def read_steps(path: Path) -> list[dict]:
    steps = []
    if path.is_file():
        for line in path.read_text().splitlines():
            name, status, code, seconds, limit = line.split("\t")
            steps.append({"name": name, "status": status, "exit_code": int(code), "seconds": int(seconds),
                          "time_limit_seconds": int(limit)})
    return steps


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def missing_figures(throughput: dict[str, dict | None], decodes: list[str], method_cost: dict | None,
                    method_cost_file: str | None, methods: list[str]) -> list[str]:
    """A line per expected figure that is absent, so a reader knows what to measure again."""
    missing = []
    for name, figures in throughput.items():
        if figures is None:
            missing.append(f"{name}: not written")
            continue
        if not (figures.get("plain") or {}).get("images_per_second"):
            missing.append(f"{name}: plain loop img/s")
        for decode in decodes:
            run = figures.get("vlcl", {}).get(decode) or {}
            if not is_positive(run.get("images_per_second")):
                missing.append(f"{name}: vlcl run data.decode={decode}" + (f" ({run['error']})" if "error" in run else ""))
    if method_cost_file is not None:
        if method_cost is None:
            missing.append(f"{method_cost_file}: not written")
        else:
            rows = {row["name"]: row for row in method_cost.get("methods", [])}
            for method in methods:
                row = rows.get(method, {})
                if row.get("flop_ratio") is None:
                    missing.append(f"{method_cost_file}: {method}" + (f" ({row['error']})" if "error" in row else ""))
    return missing


def gib(value) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f}"


def number(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(summary: dict) -> str:
    on_cpu = any(t.get("device") == "cpu" for t in summary["throughput"] if t)
    lines = [f"# GPU acceptance ({summary['mode']})", "",
             f"complete: {'yes' if summary['complete'] else 'no'}; wall time {number(summary['seconds'], 0)} s", ""]
    lines += ["## Throughput: vlcl run (orchestrated) against the plain PyTorch loop", "",
              "| model | batch | precision | device | loop | img/s | vlcl/plain | MFU vs 989 TF/s | torch peak GiB "
              "| device peak GiB | launch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for figures in summary["throughput"]:
        if not figures or not figures.get("plain"):
            continue
        head = f"| {figures['model']} | {figures['batch']} | {figures['precision']} | {figures['device_name']} "
        loops = [("plain", figures["plain"])] + [(f"vlcl data.decode={d}", r) for d, r in figures["vlcl"].items()]
        for loop, run in loops:
            if "error" in run:
                lines.append(head + f"| {loop} | failed: {run['error']} | | | | | |")
                continue
            lines.append(head + f"| {loop} | {run['images_per_second']:.1f} | {number(run.get('ratio_to_plain'), 3)} "
                         f"| {100 * run['mfu']:.4g}% | {gib(run['peak_memory_bytes'])} "
                         f"| {gib(run['device_memory_peak_bytes'])} | {run.get('launch') or '-'} |")
    flops = [f"{t['model']} {t['flops_per_image'] / 1e9:.2f} GFLOP" for t in summary["throughput"]
             if t and t.get("flops_per_image")]
    lines += ["", "FLOPs per image of one training step (forward + backward, FlopCounterMode): " + ", ".join(flops) + "."]
    if on_cpu:
        lines.append("MFU on a CPU is measured against the GPU's 989 TF/s, so it is tiny and says nothing about the CPU.")
    lines.append("torch peak: the allocator's peak in the bench process (plain loop; a vlcl run only when in process); "
                 "device peak: all processes' memory on the GPU at its sampled peak.")
    cost = summary["method_cost"]
    if cost:
        lines += ["", f"## Method cost: {cost['model']}, batch {cost['batch']}, {cost['precision']}, "
                      f"{cost['device_name']}, task index 1", "",
                  "| method | step ms | time ratio | GFLOP/step | FLOP ratio | time/FLOP ratio | peak GiB |",
                  "|---|---|---|---|---|---|---|"]
        for row in cost["methods"]:
            if "error" in row:
                lines.append(f"| {row['name']} | failed: {row['error']} | | | | | |")
                continue
            lines.append(f"| {row['name']} | {1000 * row['step_seconds']:.1f} | {number(row['time_ratio'])} "
                         f"| {row['flops_per_step'] / 1e9:.2f} | {number(row['flop_ratio'])} "
                         f"| {number(row['time_per_flop_ratio'])} | {gib(row['peak_memory_bytes'])} |")
    lines += ["", "## Steps", "", "| step | status | exit code | seconds | time limit s |", "|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['exit_code']} | {s['seconds']} | {s['time_limit_seconds']} |"
              for s in summary["steps"]]
    if summary["missing"]:
        lines += ["", "## Missing", ""] + [f"- {line}" for line in summary["missing"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    throughput = {name: read_json(out / name) for name in args.throughput}
    method_cost = read_json(out / args.method_cost) if args.method_cost else None
    missing = missing_figures(throughput, args.decode, method_cost, args.method_cost, args.methods)
    summary = {"mode": args.mode, "complete": not missing, "missing": missing, "seconds": args.seconds,
               "peak_flops": PEAK_FLOPS,
               "mfu_definition": "images_per_second * flops_per_image / peak_flops, on every device (tiny on a CPU)",
               "steps": read_steps(Path(args.steps)),
               "throughput": [figures for figures in throughput.values()],
               "files": {"throughput": args.throughput, "method_cost": args.method_cost}, "method_cost": method_cost}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    print((out / "summary.md").read_text())
    return 0 if summary["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
