"""Run several methods over one stream with `vlcl run`'s code path and print a Markdown table of
Transfer / Avg / Last / BWT / forgetting per method (each run also lands in MLflow).

    python bench/methods_table.py                       # every method but those needing reference data
    python bench/methods_table.py finetune lwf er --set train.epochs_per_task=5
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    from methods import METHODS
    from orchestrator.config import load_run_config
    from orchestrator.run import run_sequence

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("methods", nargs="*", help="methods to run (default: all that need no reference data)")
    parser.add_argument("--config", help="base run config YAML (default: the demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    names = args.methods or ["finetune"] + sorted(n for n, c in METHODS.items()
                                                  if n != "finetune" and not c.needs_reference_data)
    rows = []
    for name in names:
        config = load_run_config(args.config, [*args.overrides, f"method.name={name}"])
        started = time.time()
        result = run_sequence(config, quiet=True)
        s = result.summary
        rows.append((name, s.get("cl/transfer"), s.get("cl/avg"), s.get("cl/last"), s.get("cl/bwt"),
                     s.get("cl/forgetting"), time.time() - started))
        print(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in s.items()), flush=True)
    print("\n| method | Transfer | Avg | Last | BWT | Forgetting | wall s |\n|---|---|---|---|---|---|---|")
    for name, *values, wall in rows:
        print(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in values) + f" | {wall:.0f} |")


if __name__ == "__main__":
    main()
