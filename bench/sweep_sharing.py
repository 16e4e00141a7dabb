"""What a sweep saves by computing the starting model's results once instead of once per trial.

The same sweep (a distilling method on a many-dataset stream, a grid over the learning rate: the
trials differ only in training) runs twice: with `share_starting_model_results: true` (the first
trial scores the zero-shot row and computes the method's initial-model features, e.g. ZSCL's
teacher features of all reference texts; the others take both through a Ray actor) and with it off
(every trial computes both). Printed side by side: each sweep's wall time, the trials that computed
the row and the features themselves, the mean per-trial time to the first training step, the
ratios, and whether both sweeps scored the same rows and trained to the same matrices.

    .venv/bin/python bench/sweep_sharing.py                        # LwF on builtin:mini-mtil, 4 trials, 2 tasks
    .venv/bin/python bench/sweep_sharing.py --method zscl          # + a reference stream: shared features too
    .venv/bin/python bench/sweep_sharing.py --stream builtin:digits --tasks 3

With `--method zscl` (or any method that sets `needs_reference_data`) the reference stream is
`--reference` (default builtin:offline-pretrain, disjoint from mini-mtil), `--reference-samples`
images and `--reference-texts` captions.
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
    from methods import get_method

    base = {"stream": str(manifest), "model": {"name": "vlcl-tiny"}, "method": {"name": args.method},
            "train": {"batch_size": 32, "max_steps_per_task": args.steps, "epochs_per_task": 1},
            "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "sweep-sharing",
                         "checkpoints": "none"},
            "output_dir": str(folder / "runs")}
    if get_method(args.method).needs_reference_data:
        base["data"] = {"reference": args.reference, "reference_samples": args.reference_samples,
                        "reference_texts": args.reference_texts}
    return {
        "name": name,
        "base": base,
        "use_default_space": False,
        "space": {"train.lr": {"type": "choice", "values": args.lrs}},
        "search": {"algorithm": "grid", "num_samples": 1},
        "scheduler": {"type": "none"},
        "resources": {"workers": 1, "cpus_per_worker": args.cpus_per_worker, "max_concurrent_trials": 1},
        "storage_path": str(folder / "sweeps"),
        "share_starting_model_results": share,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", default="builtin:mini-mtil")
    parser.add_argument("--tasks", type=int, default=2, help="first N tasks (the control sets stay)")
    parser.add_argument("--method", default="lwf")
    parser.add_argument("--reference", default="builtin:offline-pretrain",
                        help="reference stream of methods that distil on reference data (zscl)")
    parser.add_argument("--reference-samples", type=int, default=512)
    parser.add_argument("--reference-texts", type=int, default=None,
                        help="reference captions (default: --reference-samples)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 1e-2])
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from methods import get_method
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
        # runs without the tag never exported features: the method computed them itself
        featured = sum(r.data.tags.get("vlcl.initial_model_features", "computed") == "computed" for r in runs)
        measured[name] = {"wall": wall, "scored": scored, "featured": featured,
                          "first_step": sum(firsts) / max(1, len(firsts)),
                          "rows": [t.matrix[0] for t in result.trials],
                          "matrices": {t.params["train.lr"]: t.matrix for t in result.trials}}
    shared, alone = measured["shared"], measured["per-trial"]
    print(f"stream {args.stream} (first {args.tasks} tasks and its control sets), method {args.method}, "
          f"{len(args.lrs)} trials one at a time, {args.steps} steps per task")
    has_features = get_method(args.method).has_initial_model_features
    for name, m in measured.items():
        print(f"{name:10s} wall {m['wall']:7.1f} s   trials that scored the zero-shot row: {m['scored']}   "
              f"computed the initial-model features: {m['featured'] if has_features else 'none (the method has none)'}   "
              f"mean launch-to-first-step {m['first_step']:6.1f} s")
    print(f"saved by sharing: {alone['wall'] - shared['wall']:.1f} s of {alone['wall']:.1f} s "
          f"(ratio {shared['wall'] / alone['wall']:.2f}); first step {shared['first_step']:.1f} s vs "
          f"{alone['first_step']:.1f} s")
    print(f"zero-shot rows identical with and without sharing: {shared['rows'] == alone['rows']}")
    print(f"accuracy matrices identical with and without sharing: {shared['matrices'] == alone['matrices']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
