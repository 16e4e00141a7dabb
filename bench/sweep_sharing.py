"""What a sweep saves by scoring the zero-shot row once instead of once per trial, side by side.

The same sweep (a distilling method, LwF, on a many-dataset stream, a grid over the learning rate:
the trials differ only in training) runs twice: with `share_zero_shot: true` (the first trial scores
every eval and control set before training, the others take that row through a Ray actor) and
with it off (every trial scores them). Printed: each sweep's wall time, the trials that scored the
row themselves, the mean per-trial time to the first training step, and the ratios.

    .venv/bin/python bench/sweep_sharing.py                        # builtin:mini-mtil, 4 trials, 2 tasks
    .venv/bin/python bench/sweep_sharing.py --stream builtin:digits --tasks 3
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def first_tasks(source: str, count: int, folder: Path) -> Path:
    from streams.builtin import open_stream

    manifest, stream = open_stream(source, None)
    data = stream.model_dump(exclude={"root"})
    data["name"] = f"{stream.name}{count}"
    data["tasks"] = data["tasks"][:count]
    root = Path(stream.root)
    for task in data["tasks"] + data.get("control", []):
        for split in ("train", "eval"):
            if task.get(split):
                task[split]["shards"] = [str(root / s) for s in task[split]["shards"]]
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sweep_mapping(name: str, manifest: Path, folder: Path, args, share: bool) -> dict:
    return {
        "name": name,
        "base": {"stream": str(manifest), "model": {"name": "vlcl-tiny"}, "method": {"name": args.method},
                 "train": {"batch_size": 32, "max_steps_per_task": args.steps, "epochs_per_task": 1},
                 "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "sweep-sharing",
                              "checkpoints": "none"},
                 "output_dir": str(folder / "runs")},
        "use_default_space": False,
        "space": {"train.lr": {"type": "choice", "values": args.lrs}},
        "search": {"algorithm": "grid", "num_samples": 1},
        "scheduler": {"type": "none"},
        "resources": {"workers": 1, "cpus_per_worker": args.cpus_per_worker, "max_concurrent_trials": 1},
        "storage_path": str(folder / "sweeps"),
        "share_zero_shot": share,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", default="builtin:mini-mtil")
    parser.add_argument("--tasks", type=int, default=2, help="first N tasks (the control sets stay)")
    parser.add_argument("--method", default="lwf")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 1e-2])
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from orchestrator.runtime import ensure_ray
    from orchestrator.sweep import run_sweep
    from orchestrator.sweep_config import plan_sweep

    folder = Path(tempfile.mkdtemp(prefix="vlcl-sweep-sharing-"))
    ensure_ray()
    manifest = first_tasks(args.stream, args.tasks, folder)
    measured = {}
    for share in (True, False):
        name = "shared" if share else "per-trial"
        started = time.time()
        result = run_sweep(plan_sweep(sweep_mapping(f"bench-{name}", manifest, folder, args, share),
                                      source=f"bench {name}"), quiet=True)
        wall = time.time() - started
        client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
        runs = [client.get_run(t.run_id) for t in result.trials]
        firsts = [m.value for r in runs for m in client.get_metric_history(r.info.run_id, "time/first_step_seconds")]
        scored = sum(r.data.tags.get("vlcl.zero_shot", "computed") == "computed" for r in runs)
        measured[name] = {"wall": wall, "scored": scored, "first_step": sum(firsts) / max(1, len(firsts)),
                          "rows": [t.matrix[0] for t in result.trials]}
    shared, alone = measured["shared"], measured["per-trial"]
    print(f"stream {args.stream} (first {args.tasks} tasks and its control sets), method {args.method}, "
          f"{len(args.lrs)} trials one at a time, {args.steps} steps per task")
    for name, m in measured.items():
        print(f"{name:10s} wall {m['wall']:7.1f} s   trials that scored the zero-shot row: {m['scored']}   "
              f"mean launch-to-first-step {m['first_step']:6.1f} s")
    print(f"saved by sharing: {alone['wall'] - shared['wall']:.1f} s of {alone['wall']:.1f} s "
          f"(ratio {shared['wall'] / alone['wall']:.2f}); first step {shared['first_step']:.1f} s vs "
          f"{alone['first_step']:.1f} s")
    print(f"zero-shot rows identical with and without sharing: {shared['rows'] == alone['rows']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
