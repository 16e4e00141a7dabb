"""Sweep efficiency: the full grid, ASHA + the forgetting stopper, and population-based training
(PBT), side by side in one run, on the same space.

All sweeps search the same space on the same small stream (the first tasks of the built-in digits
stream, scored task-incrementally; tiny model from scratch) with the same seeds, so a configuration
trains identically in grid and ASHA; the only difference is which trials are cut short. PBT starts
a population half the grid's size, drawn from the same choices, and at every task boundary lets
its bottom quarter continue from its top quarter's state with a neighbouring value of each choice.
Printed:

- compute: trial-tasks trained (one trial-task = one task of one trial, trained and evaluated),
  each sweep's and its ratio to the grid's, and wall time;
- quality: the best final objective each finds (trials that trained every task) and whether it is
  within one point (0.01) of the grid's best. ASHA's best is judged by the grid's own final
  objective for that configuration; PBT's best is a per-task schedule, judged by its own objective.

    .venv/bin/python bench/sweep_efficiency.py                 # 4 tasks, 8 configurations, 80 steps per task
    .venv/bin/python bench/sweep_efficiency.py --tasks 5 --steps 20
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ONE_POINT = 0.01  # scores are fractions: one point = one percentage point


def first_tasks(manifest: Path, count: int, folder: Path) -> Path:
    from streams.manifest import load_stream

    stream = load_stream(manifest)
    data = stream.model_dump(exclude={"root"})
    data["name"] = f"{stream.name}{count}"
    data["tasks"] = data["tasks"][:count]
    # Task-incremental scoring (each task over its own two digits): a from-scratch tiny model learns
    # that within the steps and forgets it measurably, so configurations differ. Scored over all ten
    # digits (the demo's class-incremental setting) every configuration stays near chance, and which
    # one "wins" is noise.
    data["eval_classifier"] = "task"
    for task in data["tasks"]:
        for split in ("train", "eval"):
            task[split]["shards"] = [str(Path(stream.root) / s) for s in task[split]["shards"]]
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sweep_mapping(name: str, manifest: Path, folder: Path, args, scheduler: str) -> dict:
    early_stopping = scheduler == "asha"
    return {
        "name": name,
        "base": {"stream": str(manifest), "model": {"name": "vlcl-tiny"}, "method": {"name": "finetune"},
                 "train": {"batch_size": 32, "max_steps_per_task": args.steps, "epochs_per_task": 1},
                 "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "sweep-efficiency",
                              "checkpoints": "none"},
                 "output_dir": str(folder / "runs")},
        "use_default_space": False,
        "space": {"train.lr": {"type": "choice", "values": args.lrs},
                  "label_smoothing": {"type": "choice", "values": args.label_smoothing}},
        "search": ({"algorithm": "random", "num_samples": args.population, "seed": 0} if scheduler == "pbt"
                   else {"algorithm": "grid", "num_samples": 1}),
        "objective": {"name": "weighted", "accuracy_weight": 1.0, "forgetting_weight": 1.0},
        "scheduler": ({"type": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.25, "resample_probability": 0.25}
                      if scheduler == "pbt" else
                      {"type": "asha" if early_stopping else "none", "grace_period": 1, "reduction_factor": 2}),
        "stop": [{"metric": "cl/forgetting", "max": args.forgetting_bound, "after_task": 2}] if early_stopping else [],
        # PBT compares its whole population at every task boundary: all of it runs at once.
        "resources": {"workers": 1, "cpus_per_worker": args.cpus_per_worker,
                      "max_concurrent_trials": args.population if scheduler == "pbt" else args.concurrent},
        "storage_path": str(folder / "sweeps"),
    }


def config_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def compare_pbt(grid, pbt) -> dict:
    return {
        "pbt_trial_tasks": pbt.trial_tasks_trained,
        "pbt_compute_ratio": pbt.trial_tasks_trained / grid.trial_tasks_trained,
        "pbt_best_objective": pbt.best.final_objective if pbt.best else None,
        "pbt_within_one_point": bool(pbt.best and grid.best
                                     and grid.best.final_objective - pbt.best.final_objective <= ONE_POINT),
        "pbt_exploits": sum(t.exploited_from is not None for t in pbt.trials),
        "pbt_best_schedule": [{k: v for k, v in s.items() if k in ("task", "lr")} | {"label_smoothing": s["hparams"].get("label_smoothing")}
                              for s in pbt.best.task_settings] if pbt.best else [],
    }


def compare(grid, asha) -> dict:
    """Compute ratio and best-config agreement of two SweepResults over the same grid."""
    grid_final = {config_key(t.params): t.final_objective for t in grid.trials if t.status == "completed"}
    asha_best_objective_in_grid = grid_final.get(config_key(asha.best.params)) if asha.best else None
    return {
        "grid_trial_tasks": grid.trial_tasks_trained,
        "asha_trial_tasks": asha.trial_tasks_trained,
        "compute_ratio": asha.trial_tasks_trained / grid.trial_tasks_trained,
        "grid_best": grid.best.params if grid.best else None,
        "grid_best_objective": grid.best.final_objective if grid.best else None,
        "asha_best": asha.best.params if asha.best else None,
        "asha_best_objective": asha.best.final_objective if asha.best else None,
        "same_best": bool(grid.best and asha.best and config_key(grid.best.params) == config_key(asha.best.params)),
        "within_one_point": (asha_best_objective_in_grid is not None and grid.best is not None
                             and grid.best.final_objective - asha_best_objective_in_grid <= ONE_POINT),
        "asha_stopped": {s: sum(t.status == s for t in asha.trials) for s in ("stopped (rule)", "stopped (asha)")},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=4, help="first N tasks of the digits stream")
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps per task")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 5e-4, 2e-3, 8e-3])
    parser.add_argument("--label-smoothing", type=float, nargs="+", default=[0.0, 0.2])
    parser.add_argument("--forgetting-bound", type=float, default=0.3)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--concurrent", type=int, default=1, help="grid and ASHA trials at once (1 on a 2-core machine)")
    parser.add_argument("--population", type=int, default=4, help="PBT trials (default: half the 8-configuration grid)")
    parser.add_argument("--out", type=Path, default=None, help="keep sweeps, runs and mlflow.db here")
    args = parser.parse_args()

    from orchestrator.runtime import ensure_ray
    from orchestrator.sweep import format_leaderboard, run_sweep
    from orchestrator.sweep_config import plan_sweep
    from streams.builtin import materialize_builtin

    folder = args.out or Path(tempfile.mkdtemp(prefix="vlcl-sweep-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    ensure_ray()
    manifest = first_tasks(materialize_builtin("digits"), args.tasks, folder)
    results, seconds = {}, {}
    for name in ("grid", "asha", "pbt"):
        started = time.time()
        plan = plan_sweep(sweep_mapping(f"bench-{name}", manifest, folder, args, name), source=f"bench {name}")
        results[name] = run_sweep(plan, quiet=True)
        seconds[name] = time.time() - started
        print(format_leaderboard(results[name]), "\n", flush=True)
    summary = compare(results["grid"], results["asha"]) | compare_pbt(results["grid"], results["pbt"])
    print(f"stream: first {args.tasks} digits tasks (task-incremental scoring); grid {len(args.lrs)} lr x {len(args.label_smoothing)} label smoothing; "
          f"{args.steps} steps per task; objective seen_avg - forgetting")
    print(f"compute (trial-tasks trained): grid {summary['grid_trial_tasks']}, ASHA + forgetting stopper "
          f"{summary['asha_trial_tasks']}  -> ratio {summary['compute_ratio']:.2f} "
          f"(wall {seconds['grid']:.0f} s vs {seconds['asha']:.0f} s)")
    print(f"stopped early: {summary['asha_stopped']}")
    print(f"best: grid {summary['grid_best']} ({summary['grid_best_objective']:.4f}); "
          f"ASHA {summary['asha_best']} ({summary['asha_best_objective']:.4f}); same config: {summary['same_best']}; "
          f"within one point: {summary['within_one_point']}")
    print(f"PBT: population {args.population}, trial-tasks {summary['pbt_trial_tasks']} -> ratio "
          f"{summary['pbt_compute_ratio']:.2f} of the grid's (wall {seconds['pbt']:.0f} s); {summary['pbt_exploits']} "
          f"trials finished on a state copied from another trial; best objective {summary['pbt_best_objective']:.4f}; "
          f"within one point of the grid's best: {summary['pbt_within_one_point']}")
    print(f"PBT's best schedule: {summary['pbt_best_schedule']}")
    print(f"artifacts in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
