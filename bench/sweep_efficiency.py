"""Sweep efficiency: the full grid, ASHA + the forgetting stopper, and population-based training
(PBT), side by side in one run, on a space where the settings matter.

The benchmark (`--bench`): experience replay (a 200-sample memory), searching the learning rate
and the weight of the replayed rows' loss (replay_weight 0 is fine-tuning with a memory it ignores).
- mini-mtil (default): EffLite0-MiniLM from its LiT-aligned start (`vlcl pretrain`; made once, 7 min
  on 2 cores, then cached where the offline benchmark keeps it), over mini-mtil's first 3
  tasks (fashion-mnist, handwritten digits, emoji animals & nature), each eval set scored on 200
  samples. From a pretrained start the learning rate decides between learning little and wrecking
  the earlier tasks.
- digits: vlcl-tiny from scratch over the digits stream (5 tasks of two digits; 450 steps a task,
  which is what a task needs to learn from scratch: see DEMO_DEFAULTS). No start to make.
The grid also runs with train seed 1: the spread of each configuration's objective between the
seeds is the noise a search must beat.

All sweeps search the same space with the same seed, so a configuration trains identically in grid
and ASHA; the only difference is which trials are cut short. PBT starts a population half the
grid's size, drawn from the same choices, and at every task boundary lets its bottom quarter
continue from its top quarter's state with a neighbouring value of each choice.
Printed:

- noise: per configuration, |objective(seed 0) - objective(seed 1)| of the grid; the grid's spread
  (best - worst) beside it;
- compute: trial-tasks trained (one trial-task = one task of one trial, trained and evaluated),
  each sweep's and its ratio to the grid's, and wall time and its ratio;
- quality: the best final objective each finds (trials that trained every task) and whether it is
  within one point (0.01) of the grid's best. ASHA's best is judged by the grid's own final
  objective for that configuration; PBT's best is a per-task schedule, judged by its own objective.
- successive halving replayed on each grid's records: the best any one- or two-rung rule finds at
  <= 0.5 of the grid's trial-tasks, and the cheapest rule within one point of the grid's best.

    .venv/bin/python bench/sweep_efficiency.py                  # mini-mtil; 47 min on 2 cores (+7 the first time)
    .venv/bin/python bench/sweep_efficiency.py --bench digits   # ~25 min on 2 cores
    .venv/bin/python bench/sweep_efficiency.py --tasks 3 --steps 20 --noise-seeds   # quicker look
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ONE_POINT = 0.01  # scores are fractions: one point = one percentage point


# Each benchmark: its stream, model, and the defaults of the flags below.
BENCHES = {
    # EffLite0-MiniLM aligned by `vlcl pretrain` (cached: made once, shared with the offline
    # benchmark), fine-tuned with ER over mini-mtil's first tasks. From a pretrained start the
    # learning rate decides between learning little, learning each task well, and wrecking what came
    # before, so the grid's configurations are far apart.
    # Three tasks: the emoji task's 170 class prompts go through the text tower at every step (9
    # img/s on 2 cores, against 40 for fashion-mnist), so a fourth would double a sequence's time.
    "mini-mtil": {"stream": "mini-mtil", "model": "EffLite0-MiniLM", "tasks": 3, "steps": 40,
                  "lrs": [1e-5, 1e-4], "replay_weights": [0.0, 1.0], "eval_max_samples": 200,
                  "pbt_intervals": [1], "pretrained_start": True},
    # vlcl-tiny from scratch on the digits stream: no start to make, but near chance a task needs
    # 450 steps to learn (see DEMO_DEFAULTS)
    "digits": {"stream": "digits", "model": "vlcl-tiny", "tasks": 5, "steps": 450,
               "lrs": [5e-4, 1e-3], "replay_weights": [0.0, 0.1, 0.3, 1.0], "eval_max_samples": None,
               "pbt_intervals": [1, 2], "pretrained_start": False},
}


def first_tasks(manifest: Path, count: int, folder: Path) -> Path:
    """The stream's first `count` tasks, without its control sets (the objective does not read
    them, and scoring them after every task would only add time)."""
    from streams.manifest import load_stream

    stream = load_stream(manifest)
    data = stream.model_dump(exclude={"root"})
    data["name"] = f"{stream.name}{count}"
    data["tasks"] = data["tasks"][:count]
    data["control"] = []
    for task in data["tasks"]:
        for split in ("train", "eval"):
            task[split]["shards"] = [str(Path(stream.root) / s) for s in task[split]["shards"]]
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sweep_mapping(name: str, manifest: Path, folder: Path, args, scheduler: str, seed: int = 0,
                  pbt_interval: int = 1) -> dict:
    early_stopping = scheduler == "asha"
    return {
        "name": name,
        "base": {"stream": str(manifest), "model": args.model,
                 "method": {"name": "er", "hparams": {"memory_size": args.memory_size}},
                 "train": {"batch_size": 32, "max_steps_per_task": args.steps, "epochs_per_task": 1000,
                           "warmup_steps": 10, "seed": seed},
                 "data": {"eval_max_samples": args.eval_max_samples},
                 "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "sweep-efficiency",
                              "checkpoints": "none"},
                 "output_dir": str(folder / "runs")},
        "use_default_space": False,
        "space": {"train.lr": {"type": "choice", "values": args.lrs},
                  "replay_weight": {"type": "choice", "values": args.replay_weights}},
        "search": ({"algorithm": "random", "num_samples": args.population, "seed": 0} if scheduler == "pbt"
                   else {"algorithm": "grid", "num_samples": 1}),
        "objective": {"name": "weighted", "accuracy_weight": 1.0, "forgetting_weight": 1.0},
        "scheduler": ({"type": "pbt", "perturbation_interval": pbt_interval, "quantile_fraction": 0.25,
                       "resample_probability": 0.25} if scheduler == "pbt" else
                      {"type": "asha" if early_stopping else "none", "grace_period": args.asha_grace,
                       "reduction_factor": args.asha_reduction}),
        "stop": [{"metric": "cl/forgetting", "max": args.forgetting_bound, "after_task": 2}] if early_stopping else [],
        # PBT compares its whole population at every task boundary: all of it runs at once. So does
        # ASHA's: run in turns, the first trials reach every rung with no peers there, and no rule
        # can stop them (measured: 2 at a time, 0.85 of the grid's compute).
        "resources": {"workers": 1, "cpus_per_worker": args.cpus_per_worker,
                      "max_concurrent_trials": {"pbt": args.population, "asha": args.grid_size}.get(
                          scheduler, args.concurrent)},
        "storage_path": str(folder / "sweeps"),
    }


def sequence_starts(result, folder: Path) -> int:
    """How many times the sweep's trials started a task sequence: once per trial, plus once per
    restart (a PBT exploit, or a trial Tune paused and resumed). Each start writes a run-state file
    named after its trial."""
    states = [path.name for path in (folder / "runs" / "runs").glob("*.json")]
    return sum(trial.trial_id in name for trial in result.trials for name in states)


def seed_noise(grid, other) -> tuple[float, float]:
    """(mean, max) of |objective| differences of the same configurations trained with two seeds."""
    finals = {config_key(t.params): t.final_objective for t in grid.trials if t.status == "completed"}
    gaps = [abs(finals[config_key(t.params)] - t.final_objective) for t in other.trials
            if t.status == "completed" and config_key(t.params) in finals]
    return (sum(gaps) / len(gaps), max(gaps)) if gaps else (float("nan"), float("nan"))


def config_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def compare_pbt(grid, pbt, name: str = "pbt") -> dict:
    return {f"{name}_{key}": value for key, value in {
        "trial_tasks": pbt.trial_tasks_trained,
        "compute_ratio": pbt.trial_tasks_trained / grid.trial_tasks_trained,
        "best_objective": pbt.best.final_objective if pbt.best else None,
        "within_one_point": bool(pbt.best and grid.best
                                 and grid.best.final_objective - pbt.best.final_objective <= ONE_POINT),
        "exploits": sum(t.exploited_from is not None for t in pbt.trials),
        "best_schedule": [{k: v for k, v in s.items() if k in ("task", "lr")} | {"replay_weight": s["hparams"].get("replay_weight")}
                          for s in pbt.best.task_settings] if pbt.best else [],
    }.items()}


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


def halving_rules(grid, num_tasks: int) -> list[dict]:
    """Every synchronous successive-halving rule with one or two rungs, replayed on the grid's own
    per-task records (a configuration trains the same in grid and ASHA): at each rung (after task
    r) only the top `keep` configurations by objective go on. Ties at a rung break against the
    rule (the worse final first), so a rule counts as finding the best only if it does whichever
    way they break. Each: rungs, keeps, trial-tasks and ratio to the grid's, the best final
    objective among the configurations that train every task."""
    finished = [t for t in grid.trials if t.status == "completed" and len(t.objective_per_task) == num_tasks]
    total = len(finished) * num_tasks
    rules = []
    for count in (1, 2):
        for rungs in itertools.combinations(range(1, num_tasks), count):
            for keeps in itertools.combinations(range(len(finished) - 1, 0, -1), count):  # each rung keeps fewer
                alive, trained, previous = finished, 0, 0
                for rung, keep in zip(rungs, keeps):
                    trained += len(alive) * (rung - previous)
                    alive = sorted(alive, key=lambda t: (t.objective_per_task[rung - 1], -t.final_objective),
                                   reverse=True)[:keep]
                    previous = rung
                trained += len(alive) * (num_tasks - previous)
                rules.append({"rungs": list(rungs), "keeps": list(keeps), "trial_tasks": trained,
                              "compute_ratio": trained / total, "best": max(t.final_objective for t in alive)})
    return rules


def print_halving_rules(name: str, rules: list[dict], grid_best: float) -> dict:
    """The rules' trade-off in two lines: the best any rule finds at <= 0.5 of the grid's trial-tasks,
    and the cheapest rule within one point of the grid's best."""
    def describe(rule):
        steps = ", ".join(f"after task {r} keep {k}" for r, k in zip(rule["rungs"], rule["keeps"]))
        return f"{steps}: ratio {rule['compute_ratio']:.2f}, best {rule['best']:.4f} ({rule['best'] - grid_best:+.4f})"

    half = max((r for r in rules if r["compute_ratio"] <= 0.5), key=lambda r: r["best"], default=None)
    within = min((r for r in rules if grid_best - r["best"] <= ONE_POINT), key=lambda r: r["trial_tasks"], default=None)
    print(f"successive halving replayed on {name}'s records ({len(rules)} rules, ties broken against the rule):")
    print(f"  best at <= 0.5 of the trial-tasks: {describe(half) if half else 'none'}")
    print(f"  cheapest within one point: {describe(within) if within else 'none'}")
    return {"best_at_half": half, "cheapest_within_one_point": within}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", choices=sorted(BENCHES), default="mini-mtil",
                        help="mini-mtil: a pretrained start (made once, ~7 min on 2 cores, then cached); digits: "
                             "from scratch, no start needed")
    parser.add_argument("--start", type=Path, default=None,
                        help="mini-mtil's pretrained start (default <data root>/pretrained/efflite0-minilm-lit.pt, "
                             "the offline benchmark's; made by `vlcl pretrain` when missing)")
    parser.add_argument("--tasks", type=int, default=None, help="first N tasks of the stream")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per task")
    parser.add_argument("--lrs", type=float, nargs="+", default=None)
    parser.add_argument("--replay-weights", type=float, nargs="+", default=None)
    parser.add_argument("--eval-max-samples", type=int, default=None, help="samples scored per task's eval set")
    parser.add_argument("--memory-size", type=int, default=200)
    parser.add_argument("--noise-seeds", type=int, nargs="*", default=[1],
                        help="grid reruns with these train seeds, for the seed noise (none: skip)")
    parser.add_argument("--forgetting-bound", type=float, default=0.3)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--concurrent", type=int, default=2, help="grid trials at once (2 on a 2-core machine)")
    parser.add_argument("--asha-grace", type=int, default=2,
                        help="tasks before ASHA's first rung (after task 1 the memory is empty: replay_weight "
                             "cannot matter yet)")
    parser.add_argument("--asha-reduction", type=float, default=4.0, help="ASHA keeps the top 1/this at a rung")
    parser.add_argument("--pbt-intervals", type=int, nargs="+", default=None,
                        help="PBT runs, one per perturbation interval (tasks between exploit steps)")
    parser.add_argument("--population", type=int, default=None, help="PBT trials (default: half the grid)")
    parser.add_argument("--out", type=Path, default=None, help="keep sweeps, runs and mlflow.db here")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--only", nargs="+", default=None, metavar="SWEEP",
                        help="run just these sweeps (no comparison printed; for profiling one)")
    args = parser.parse_args()
    bench = BENCHES[args.bench]
    for key in ("tasks", "steps", "lrs", "replay_weights", "eval_max_samples", "pbt_intervals"):
        if getattr(args, key) is None:
            setattr(args, key, bench[key])
    args.grid_size = len(args.lrs) * len(args.replay_weights)
    args.population = args.population or max(2, args.grid_size // 2)
    # PBT's and ASHA's trials all run at once, so they share the machine's CPUs
    cpus = {"pbt": min(args.cpus_per_worker, (os.cpu_count() or 2) / args.population),
            "asha": min(args.cpus_per_worker, (os.cpu_count() or 2) / args.grid_size)}
    pbt_names = [f"pbt-every{interval}" for interval in args.pbt_intervals]
    from orchestrator.console import library_logs_to
    from orchestrator.runtime import ensure_ray
    from orchestrator.sweep import format_leaderboard, run_sweep
    from orchestrator.sweep_config import plan_sweep
    from offline_benchmark import default_start, pretrained_start
    from streams.builtin import materialize_builtin

    folder = args.out or Path(tempfile.mkdtemp(prefix="vlcl-sweep-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    results, seconds, starts = {}, {}, {}
    # (name, scheduler, train seed, PBT's perturbation interval)
    runs = [("grid", "grid", 0, 1), ("asha", "asha", 0, 1)] + [
        (name, "pbt", 0, interval) for name, interval in zip(pbt_names, args.pbt_intervals)] + [
        (f"grid-seed{seed}", "grid", seed, 1) for seed in args.noise_seeds]
    if args.only:
        unknown = sorted(set(args.only) - {run[0] for run in runs})
        if unknown:
            parser.error(f"--only: no sweep named {', '.join(unknown)}; the sweeps are {', '.join(r[0] for r in runs)}")
        runs = [run for run in runs if run[0] in args.only]
    print(f"Ray's and the libraries' logs: {folder / 'bench.log'}", flush=True)
    with library_logs_to(folder / "bench.log", verbose=False):
        ensure_ray()
        manifest = first_tasks(materialize_builtin(bench["stream"]), args.tasks, folder)
        args.model = {"name": bench["model"]}
        if bench["pretrained_start"]:
            start = args.start or default_start()
            args.model["pretrained"] = str(pretrained_start(start, None, f"sqlite:///{folder / 'mlflow.db'}"))
        for name, scheduler, seed, interval in runs:
            started = time.time()
            mapping = sweep_mapping(f"bench-{name}", manifest, folder, args, scheduler, seed, pbt_interval=interval)
            if scheduler in cpus:
                mapping["resources"]["cpus_per_worker"] = cpus[scheduler]
            plan = plan_sweep(mapping, source=f"bench {name}")
            results[name] = run_sweep(plan, quiet=True)
            seconds[name] = time.time() - started
            starts[name] = sequence_starts(results[name], folder)
            print(f"## {name} ({seconds[name]:.0f} s, {len(results[name].trials)} trials, {starts[name]} sequence starts)\n"
                  f"{format_leaderboard(results[name])}\n", flush=True)
    if args.only:
        return 0
    summary = compare(results["grid"], results["asha"])
    for name in pbt_names:
        summary |= compare_pbt(results["grid"], results[name], name)
    grid_finals = [t.final_objective for t in results["grid"].trials if t.status == "completed"]
    summary |= {"grid_spread": max(grid_finals) - min(grid_finals), "seconds": seconds, "sequence_starts": starts,
                "asha_wall_ratio": seconds["asha"] / seconds["grid"]}
    summary |= {f"{name}_wall_ratio": seconds[name] / seconds["grid"] for name in pbt_names}
    for seed in args.noise_seeds:
        summary[f"noise_seed{seed}"] = seed_noise(results["grid"], results[f"grid-seed{seed}"])
    print(f"stream: first {args.tasks} {bench['stream']} tasks (task-incremental), {bench['model']}; ER memory {args.memory_size}; grid "
          f"{len(args.lrs)} lr x {len(args.replay_weights)} replay_weight; {args.steps} steps per task; "
          f"objective seen_avg - forgetting")
    for seed in args.noise_seeds:
        mean, worst = summary[f"noise_seed{seed}"]
        print(f"seed noise (grid, seed 0 vs {seed}): mean {mean:.4f}, max {worst:.4f}; grid spread best - worst "
              f"{summary['grid_spread']:.4f}")
    print(f"compute (trial-tasks trained): grid {summary['grid_trial_tasks']}, ASHA + forgetting stopper "
          f"{summary['asha_trial_tasks']} -> ratio {summary['compute_ratio']:.2f}; wall {seconds['grid']:.0f} s vs "
          f"{seconds['asha']:.0f} s -> ratio {summary['asha_wall_ratio']:.2f}")
    print(f"stopped early: {summary['asha_stopped']}")
    print(f"best: grid {summary['grid_best']} ({summary['grid_best_objective']:.4f}); "
          f"ASHA {summary['asha_best']} ({summary['asha_best_objective']:.4f}); same config: {summary['same_best']}; "
          f"within one point: {summary['within_one_point']}")
    for name, interval in zip(pbt_names, args.pbt_intervals):
        print(f"PBT, exploit every {interval} task(s): population {args.population}, trial-tasks "
              f"{summary[name + '_trial_tasks']} -> ratio {summary[name + '_compute_ratio']:.2f}; wall {seconds[name]:.0f} s "
              f"-> ratio {summary[name + '_wall_ratio']:.2f}; {starts[name]} sequence starts; "
              f"{summary[name + '_exploits']} trials finished on a state "
              f"copied from another trial; best objective {summary[name + '_best_objective']:.4f}; within one point "
              f"of the grid's best: {summary[name + '_within_one_point']}")
        print(f"  its best schedule: {summary[name + '_best_schedule']}")
    for name in ["grid"] + [f"grid-seed{seed}" for seed in args.noise_seeds]:
        grid = results[name]
        summary[f"halving_{name}"] = print_halving_rules(name, halving_rules(grid, args.tasks), grid.best.final_objective)
    print(f"artifacts in {folder}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
