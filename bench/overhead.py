"""What does vlcl's orchestration cost on small tasks? The same work two ways, in one run:

(a) a plain single-process PyTorch loop: the same model, the same steps and batch size on the same
    shards (read with streams.local_reader), the same optimizer (fused AdamW), fine-tuning with methods.FineTune, and every eval set
    scored after every task (methods + orchestrator.evaluation's pure functions; no Ray, no MLflow);
(b) `vlcl run` as a user starts it (a subprocess: imports, Ray start, MLflow run, Ray Train,
    checkpoints, shutdown).

Both run as their own Python process, timed from launch to exit, so both pay the interpreter start
and the imports (torch, open_clip) a user's script pays. Prints both wall times (and the plain
loop's time after its imports), their ratio (b)/(a), and vlcl's time from launch to its first
training step (the MLflow timestamp of `time/first_step_seconds`).

    python bench/overhead.py                                   # the demo config (builtin:digits)
    python bench/overhead.py --stream builtin:mini-mtil --set train.max_steps_per_task=10
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def plain_loop(config) -> float:
    """Seconds for the whole sequence in one process."""
    from methods import get_method
    from methods.models import build_model, normalize_pixels
    from orchestrator.evaluation import (accuracy_from_counts, class_text_embeddings, recalls_from_features,
                                         retrieval_features, zero_shot_counts)
    from orchestrator.plan import build_plan
    from streams.local_reader import read_split
    from streams.samples import RowDecoder
    from methods.models import TokenizerFactory
    from methods import TaskInfo

    started = time.time()
    torch.manual_seed(config.train.seed)
    built = build_model(config.model.name, config.model.pretrained)
    plan = build_plan(config, built.image_size)
    model = built.model
    method = get_method(config.method.name)(model, built.tokenizer, config.method.hparams)
    factory = TokenizerFactory(config.model.name)

    def read(split, classes):
        return read_split(list(split.urls), RowDecoder(plan.image_size, factory, list(classes)), cap=split.cap)

    eval_sets = [(t, read(t.eval, t.classes)) for t in plan.tasks + plan.control]

    def evaluate():
        model.eval()
        scores = []
        for task, split in eval_sets:
            batches = [{"pixels": split.pixels[i:i + config.eval.batch_size].permute(0, 3, 1, 2),
                        "text": split.text[i:i + config.eval.batch_size],
                        "label": split.label[i:i + config.eval.batch_size]}
                       for i in range(0, len(split), config.eval.batch_size)]
            if task.kind == "classification":
                classes = plan.stream_classes if plan.eval_classifier == "stream" and task in plan.tasks else task.classes
                classifier = class_text_embeddings(model, built.tokenizer, list(classes), list(task.templates), "cpu")
                label_map = torch.tensor([list(classes).index(c) for c in task.classes])
                scores.append(accuracy_from_counts(*zero_shot_counts(model, classifier, batches, built.image_mean,
                                                                     built.image_std, "cpu", label_map))["score"])
            else:
                scores.append(recalls_from_features(*retrieval_features(model, batches, built.image_mean,
                                                                        built.image_std, "cpu"))["score"])
        return scores

    evaluate()
    for task in plan.tasks:
        split = read(task.train, task.classes)
        method.before_task(TaskInfo(index=task.index, name=task.name, kind=task.kind, num_tasks=len(plan.tasks),
                                    class_names=task.classes, templates=task.templates, steps=task.steps))
        optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=task.settings.lr,
                                      weight_decay=task.settings.weight_decay, fused=True)  # as vlcl's loop
        model.train()
        step, epoch, batch_size = 0, 0, config.train.batch_size
        while step < task.steps:
            order = torch.randperm(len(split), generator=torch.Generator().manual_seed(epoch))
            for start in range(0, len(split) - batch_size + 1, batch_size):
                rows = order[start:start + batch_size]
                pixels = split.pixels[rows].permute(0, 3, 1, 2).contiguous()
                batch = {"pixels": pixels, "image": normalize_pixels(pixels, built.image_mean, built.image_std),
                         "text": split.text[rows], "label": split.label[rows]}
                losses = method.training_loss(batch)
                losses["loss"].backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step >= task.steps:
                    break
            epoch += 1
        evaluate()
    return time.time() - started


def vlcl_run(args, workdir: Path) -> tuple[float, float]:
    """(wall seconds, seconds from launch to the first training step) of `vlcl run` in a subprocess."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    command = [sys.executable, "-m", "orchestrator.cli", "run", *([args.config] if args.config else []),
               "--set", f"stream={args.stream}", "--set", f"output_dir={workdir / 'runs'}",
               "--set", f"tracking.uri={uri}", *(x for item in args.set for x in ("--set", item))]
    launched = time.time()
    done = subprocess.run(command, cwd=workdir, env={**os.environ, "PYTHONPATH": str(args.vlcl_tree)},
                          capture_output=True, text=True)
    wall = time.time() - launched
    if done.returncode:
        raise SystemExit(f"vlcl run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    client = MlflowClient(uri)
    run = client.search_runs(client.search_experiments()[0].experiment_id, order_by=["start_time DESC"])[0]
    first = client.get_metric_history(run.info.run_id, "time/first_step_seconds")
    if not first:  # a vlcl from before that metric: its first logged loss, `train.log_every_steps` steps in
        first = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    return wall, first[0].timestamp / 1000 - launched


def plain_subprocess(args) -> tuple[float, float]:
    """(wall seconds from launch to exit, seconds inside the loop) of `plain_loop` in its own
    Python process: it pays the interpreter start and the imports (torch, open_clip), as `vlcl run` does."""
    import json

    command = [sys.executable, str(Path(__file__).resolve()), "--plain-only", *([args.config] if args.config else []),
               "--stream", args.stream, *(x for item in args.set for x in ("--set", item))]
    launched = time.time()
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    wall = time.time() - launched
    if done.returncode:
        raise SystemExit(f"plain loop failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1])["loop_seconds"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="run config YAML (default: the built-in demo)")
    parser.add_argument("--stream", default="builtin:digits")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides for both")
    parser.add_argument("--vlcl-tree", type=Path, default=REPO,
                        help="the checkout whose `vlcl run` is measured (an older commit, for before/after)")
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)  # the plain loop's own process
    args = parser.parse_args(argv)

    from orchestrator.config import load_run_config

    config = load_run_config(args.config, [f"stream={args.stream}", *args.set])
    if args.plain_only:
        import json

        print(json.dumps({"loop_seconds": plain_loop(config)}))
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        plain, plain_inside = plain_subprocess(args)
        wall, first_step = vlcl_run(args, Path(tmp))
    print(f"stream {args.stream}  method {config.method.name}  model {config.model.name}  "
          f"batch {config.train.batch_size}  overrides {args.set or 'none'}")
    print(f"plain loop (its own process)  {plain:7.1f} s   ({plain_inside:.1f} s after its imports)")
    print(f"vlcl run (its own process)    {wall:7.1f} s")
    print(f"ratio vlcl / plain            {wall / plain:7.2f}")
    print(f"vlcl: launch to first step    {first_step:7.1f} s")
    return {"plain_seconds": plain, "plain_loop_seconds": plain_inside, "vlcl_seconds": wall, "ratio": wall / plain,
            "first_step_seconds": first_step}


if __name__ == "__main__":
    main()
