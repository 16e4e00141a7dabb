"""`vlcl pretrain`: LiT (locked-image text tuning) of a model whose image trunk is already trained.

Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning": keep the pretrained
image trunk fixed and teach the text side to meet it. Here the trunk (EfficientNet-Lite0 on
ImageNet for EffLite0-MiniLM) is frozen in eval mode, so its pooled features are computed once per
training image and cached; the image projection head, the whole text tower with its projection and
the logit scale train on the cached features with the CLIP contrastive loss. The result is one
file, the whole model's state dict, which `vlcl run` takes as `model.pretrained`.

    vlcl pretrain --stream builtin:offline-pretrain --out ckpt/efflite-minilm-lit.pt \
        --eval-stream builtin:mini-mtil

One process, no Ray: shards are read in plain Python and decoded exactly as the training workers
decode them (same resize/crop, same tokenizer), so zero-shot numbers here match `vlcl run`'s.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.config import ConfigError, PretrainConfig, RunConfig, TrackingConfig, pretrain_config

if TYPE_CHECKING:  # annotations only: `vlcl --help` does not import torch
    import torch

FEATURE_BATCH = 256
LOGIT_SCALE_MAX = math.log(100.0)  # CLIP's clamp on the learned temperature


# ----------------------------------------------------------------------------------------------
# data: shards -> decoded tensors, with the training workers' reader (streams.local_reader)
# ----------------------------------------------------------------------------------------------
def read_split(urls: list[str], image_size: int, tokenizer, classes: list[str], max_samples: int | None = None):
    """A split decoded as `vlcl run`'s workers decode it: `pixels`, `text` (token ids), `label`."""
    from streams.local_reader import read_split as read_rows
    from streams.samples import RowDecoder

    split = read_rows(urls, RowDecoder(image_size, lambda: tokenizer, classes), limit=max_samples)
    if not len(split):
        raise ConfigError(f"no samples in shards {urls[:3]}")
    return split


# ----------------------------------------------------------------------------------------------
# LiT
# ----------------------------------------------------------------------------------------------
def image_trunk_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The open_clip timm image tower's trunk (locked) and head (trained)."""
    visual = getattr(model, "visual", None)
    if not (hasattr(visual, "trunk") and hasattr(visual, "head")):
        raise ConfigError("pretrain --model: LiT locks a pretrained timm image trunk (model.visual.trunk); this "
                          "model has none. Use EffLite0-MiniLM or an open_clip config with `timm_model_name`.")
    return visual.trunk, visual.head


def lock_image_trunk(model) -> torch.nn.Module:
    """Freeze the trunk: no gradients, eval mode (BatchNorm statistics stay the pretrained ones)."""
    trunk, _ = image_trunk_and_head(model)
    trunk.eval()
    trunk.requires_grad_(False)
    return trunk


def lit_parameters(model) -> list[torch.nn.Parameter]:
    """Everything but the trunk: image head, text tower with its projection, logit scale (and bias)."""
    trunk_ids = {id(p) for p in image_trunk_and_head(model)[0].parameters()}
    return [p for p in model.parameters() if id(p) not in trunk_ids]


def trunk_features(trunk, pixels: torch.Tensor, mean, std, device, batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """(N, D) pooled trunk features of uint8 (N,H,W,3) pixels, on the CPU."""
    import torch

    from methods.models import normalize_pixels

    trunk.eval()
    with torch.no_grad():
        out = [trunk(normalize_pixels(pixels[i:i + batch_size].to(device), mean, std)).float().cpu()
               for i in range(0, len(pixels), batch_size)]
    return torch.cat(out)


def lit_loss(model, head, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE between projected cached image features and encoded captions."""
    import torch

    from methods.losses import clip_contrastive_loss

    image_features = torch.nn.functional.normalize(head(features), dim=-1)
    text_features = model.encode_text(tokens, normalize=True)
    return clip_contrastive_loss(image_features, text_features, model.logit_scale.exp())


def train_lit(model, features: torch.Tensor, tokens: torch.Tensor, *, steps: int, batch_size: int, lr: float,
              weight_decay: float = 0.0, warmup_steps: int = 0, seed: int = 0, device="cpu",
              on_step=None) -> list[float]:
    """`steps` AdamW steps of LiT on cached trunk features; returns the loss of every step.

    Batches are drawn without replacement from a seeded permutation per epoch (the last partial
    batch of an epoch is dropped). The trunk is locked first and left untouched.
    """
    import torch

    if len(features) < batch_size:
        raise ConfigError(f"pretrain --batch-size {batch_size}: only {len(features)} training pairs")
    lock_image_trunk(model)
    _, head = image_trunk_and_head(model)
    parameters = lit_parameters(model)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    from orchestrator.trainer import warmup_cosine

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, steps))
    generator = torch.Generator().manual_seed(seed)
    model.text.train()
    head.train()
    per_epoch = len(features) // batch_size
    losses: list[float] = []
    order = None
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(features), generator=generator)
        index = order[(step % per_epoch) * batch_size:(step % per_epoch + 1) * batch_size]
        loss = lit_loss(model, head, features[index].to(device), tokens[index].to(device))
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1], schedule.get_last_lr()[0])
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------
# evaluation: every task (and control set) of the eval streams
# ----------------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    stream: str
    task: object  # streams.manifest.TaskSpec
    classes_for_classifier: list[str]
    label_map: torch.Tensor | None
    data: object  # streams.local_reader.DecodedSplit

    @property
    def name(self) -> str:
        return f"{self.stream}/{self.task.name}"


def load_eval_sets(source: str, data_root: str | None, image_size: int, tokenizer,
                   max_samples: int | None) -> list[EvalSet]:
    """Every task's and control set's eval split, scored as `vlcl run` scores it."""
    import torch

    from streams.builtin import open_stream

    _, stream = open_stream(source, data_root)
    stream_classes = stream.stream_classes()
    sets = []
    for task, is_control in [(t, False) for t in stream.tasks] + [(t, True) for t in stream.control]:
        data = read_split(stream.shard_urls(task.eval), image_size, tokenizer, task.classes, max_samples)
        if task.kind == "classification" and stream.eval_classifier == "stream" and not is_control:
            classes, label_map = stream_classes, torch.tensor([stream_classes.index(c) for c in task.classes])
        else:
            classes, label_map = list(task.classes), None
        sets.append(EvalSet(stream.name, task, classes, label_map, data))
    return sets


def evaluate(model, built, eval_sets: list[EvalSet], device, batch_size: int = 256) -> dict[str, dict]:
    """name -> result dict (`score` = top-1 or retrieval r_mean, as in the accuracy matrix)."""
    from orchestrator.evaluation import class_text_embeddings, retrieval_recalls, zero_shot_accuracy

    model.eval()
    results = {}
    classifiers: dict[tuple, torch.Tensor] = {}
    for eval_set in eval_sets:
        data, task = eval_set.data, eval_set.task
        batches = [{"pixels": data.pixels[i:i + batch_size], "text": data.text[i:i + batch_size],
                    "label": data.label[i:i + batch_size]} for i in range(0, len(data), batch_size)]
        if task.kind == "classification":
            key = (tuple(eval_set.classes_for_classifier), tuple(task.templates) if eval_set.label_map is None
                   else eval_set.stream)  # a stream classifier is built once, with its first task's templates
            if key not in classifiers:
                classifiers[key] = class_text_embeddings(model, built.tokenizer, eval_set.classes_for_classifier,
                                                         list(task.templates), device)
            result = zero_shot_accuracy(model, classifiers[key], batches, built.image_mean, built.image_std, device,
                                        label_map=eval_set.label_map)
            result["metric"] = "top1"
        else:
            result = retrieval_recalls(model, batches, built.image_mean, built.image_std, device)
            result["metric"] = "r_mean"
        result["kind"] = task.kind
        results[eval_set.name] = result
    return results


def format_table(before: dict[str, dict], after: dict[str, dict]) -> str:
    width = max([len(n) for n in before] + [10]) + 2
    lines = [f"{'eval set':<{width}}{'metric':>8}{'before':>9}{'after':>9}{'change':>9}"]
    for name, result in before.items():
        new = after[name]["score"]
        lines.append(f"{name:<{width}}{result['metric']:>8}{result['score']:>9.3f}{new:>9.3f}"
                     f"{new - result['score']:>+9.3f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------
@dataclass
class PretrainResult:
    checkpoint: Path
    summary_path: Path
    summary: dict
    run_id: str | None


def pretrain(config: PretrainConfig, echo=print) -> PretrainResult:
    """Decode -> cache trunk features -> evaluate (before) -> LiT -> evaluate (after) -> save + MLflow."""
    from orchestrator.console import library_logs_to

    out = Path(config.out).expanduser().resolve()
    with library_logs_to(out.with_suffix(".log"), verbose=False):  # MLflow's and the libraries' logs
        return _pretrain(config, out, echo)


def _pretrain(config: PretrainConfig, out: Path, echo) -> PretrainResult:
    import torch

    from methods.models import build_model
    from orchestrator import tracking
    from streams.builtin import open_stream

    started = time.time()
    uri = tracking.resolve_tracking_uri(RunConfig(tracking=TrackingConfig(uri=config.tracking_uri)))
    tracking.check_reachable(uri)  # before any work
    device = torch.device(config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))

    manifest, stream = open_stream(config.stream, config.data_root)
    torch.manual_seed(config.seed)
    built = build_model(config.model, config.pretrained)
    model = built.model.to(device)
    trunk = lock_image_trunk(model)
    trunk_before = {k: v.clone() for k, v in trunk.state_dict().items()}

    seconds = {}
    tick = time.time()
    features, tokens, train_tasks = cache_training_features(stream, built, trunk, device)
    seconds["decode_and_cache_features"] = time.time() - tick
    per_epoch = len(features) // config.batch_size
    if per_epoch == 0:
        raise ConfigError(f"pretrain --batch-size {config.batch_size}: stream {stream.name!r} has only "
                          f"{len(features)} training pairs")
    steps = config.steps if config.steps is not None else config.epochs * per_epoch
    echo(f"{len(features)} image-caption pairs from {stream.name} ({manifest}); trunk features "
         f"{tuple(features.shape)} cached in {seconds['decode_and_cache_features']:.0f} s; {steps} steps of "
         f"batch {config.batch_size} ({steps / per_epoch:.1f} epochs)")

    tick = time.time()
    eval_sources = [config.stream] + [s for s in config.eval_streams if s != config.stream]
    eval_sets = [s for source in eval_sources
                 for s in load_eval_sets(source, config.data_root, built.image_size, built.tokenizer,
                                         config.eval_max_samples)]
    before = evaluate(model, built, eval_sets, device)
    seconds["eval_before"] = time.time() - tick

    params = {"model": config.model, "pretrained": config.pretrained, "stream": config.stream, "manifest": manifest,
              "steps": steps, "epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr,
              "weight_decay": config.weight_decay, "warmup_steps": config.warmup_steps, "seed": config.seed,
              "train_pairs": len(features), "image_size": built.image_size, "device": str(device),
              "threads": torch.get_num_threads(), "eval_streams": ",".join(eval_sources),
              "eval_max_samples": config.eval_max_samples, "out": str(out)}
    logger = start_pretrain_run(uri, config, stream.name, out, params)
    try:
        logger.log_metrics(_eval_metrics(before), step=0)
        tick = time.time()
        losses = train_lit(model, features, tokens, steps=steps, batch_size=config.batch_size, lr=config.lr,
                           weight_decay=config.weight_decay, warmup_steps=config.warmup_steps, seed=config.seed,
                           device=device, on_step=loss_reporter(logger, steps, config.log_every, echo))
        seconds["train"] = time.time() - tick
        if any(not torch.equal(trunk_before[k], v) for k, v in trunk.state_dict().items()):
            raise RuntimeError("LiT changed the locked image trunk")  # a bug, never a user error

        tick = time.time()
        after = evaluate(model, built, eval_sets, device)
        seconds["eval_after"] = time.time() - tick
        logger.log_metrics(_eval_metrics(after), step=1)

        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out)
        seconds["total"] = time.time() - started
        summary = {
            "checkpoint": str(out), "model": config.model, "pretrained": config.pretrained,
            "use_in_run_config": {"model": {"name": config.model, "pretrained": str(out)}},
            "image_size": built.image_size, "image_mean": built.image_mean, "image_std": built.image_std,
            "trained_on": {"stream": stream.name, "source": config.stream, "manifest": manifest,
                           "tasks": train_tasks, "train_pairs": len(features)},
            "method": "LiT: image trunk locked (eval mode, cached features); image head, text tower, text "
                      "projection and logit scale trained with the CLIP contrastive loss",
            "steps": steps, "epochs": steps / per_epoch, "batch_size": config.batch_size, "lr": config.lr,
            "weight_decay": config.weight_decay, "warmup_steps": config.warmup_steps, "seed": config.seed,
            "device": str(device), "threads": torch.get_num_threads(),
            "loss": {"first": losses[0], "final": losses[-1],
                     "final_epoch_mean": sum(losses[-per_epoch:]) / len(losses[-per_epoch:])},
            "logit_scale": model.logit_scale.exp().item(),
            "zero_shot": {name: {"kind": before[name]["kind"], "metric": before[name]["metric"],
                                 "before": _plain(before[name]), "after": _plain(after[name])} for name in before},
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "mlflow": {"tracking_uri": uri, "experiment": config.experiment, "run_id": logger.run_id},
            "git_commit": tracking.git_commit(),
        }
        summary_path = out.with_suffix(".json")
        summary_path.write_text(json.dumps(summary, indent=1))
        logger.log_metrics({"train/final_loss": losses[-1], "train/seconds": seconds["train"]}, step=steps)
        logger.log_artifact(str(summary_path))
        logger.log_artifact(str(out.with_suffix(".log")))
    except BaseException:
        logger.finish("FAILED")
        raise
    logger.finish()
    echo("\n" + format_table(before, after))
    echo(f"\ncheckpoint {out}\nsummary    {summary_path}\nMLflow run {logger.run_id} (experiment "
         f"{config.experiment!r}) in {uri}\nuse it:    model: {{name: {config.model}, pretrained: {out}}}  "
         f"({seconds['total']:.0f} s)")
    return PretrainResult(out, summary_path, summary, logger.run_id)


def cache_training_features(stream, built, trunk, device):
    """Every task's train pairs: (trunk features (N, D), token ids (N, L), per-task counts)."""
    import torch

    from streams.local_reader import iter_split
    from streams.samples import RowDecoder

    feature_parts, token_parts, counts = [], [], []
    for task in stream.tasks:
        count = 0
        decoder = RowDecoder(built.image_size, lambda: built.tokenizer, task.classes)
        for chunk in iter_split(stream.shard_urls(task.train), decoder, chunk_rows=512):
            feature_parts.append(trunk_features(trunk, chunk.pixels, built.image_mean, built.image_std, device))
            token_parts.append(chunk.text)
            count += len(chunk)
        counts.append({"task": task.name, "train_pairs": count})
    return torch.cat(feature_parts), torch.cat(token_parts), counts


def start_pretrain_run(uri: str, config: PretrainConfig, stream_name: str, out: Path, params: dict):
    """The MLflow run of one alignment, in experiment `config.experiment`; returns its Tracker."""
    from orchestrator import tracking

    run_name = config.run_name or f"lit-{config.model}-{stream_name}-s{config.seed}"
    tracker = tracking.Tracker.start(uri, config.experiment, run_name, {
        "vlcl.kind": "pretrain", "vlcl.model": config.model, "vlcl.stream": stream_name,
        "vlcl.seed": str(config.seed), "vlcl.git_commit": tracking.git_commit(), "vlcl.checkpoint": str(out)},
        description=f"LiT alignment of {config.model} on {stream_name}: trunk locked, text tower and "
                    f"projections trained; zero-shot before (step 0) and after (step 1)")
    tracker.log_params(params)
    return tracker


def loss_reporter(logger, steps: int, print_every: int, echo):
    """on_step callback: print every `print_every` steps, log loss and lr to MLflow in batches of 50."""
    pending: list[tuple[int, float, float]] = []

    def on_step(step: int, loss: float, lr: float) -> None:
        pending.append((step, loss, lr))
        if step % print_every == 0 or step == steps - 1:
            echo(f"step {step + 1}/{steps} loss {loss:.4f} lr {lr:.2e}")
        if len(pending) >= 50 or step == steps - 1:
            for index, value, rate in pending:
                logger.log_metrics({"train/loss": value, "train/lr": rate}, step=index + 1)
            pending.clear()
    return on_step


def _plain(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("kind", "metric")}


def _eval_metrics(results: dict[str, dict]) -> dict[str, float]:
    return {f"eval/{name}/{key}": value for name, result in results.items() for key, value in result.items()
            if key not in ("samples", "kind", "metric")}


def add_pretrain_commands(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "pretrain", help="LiT alignment: lock the image trunk, train text tower + projections on a caption stream",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream",
                        help="caption stream: manifest path or builtin:<name> (every task's train shards are "
                             "image-caption pairs; default builtin:offline-pretrain)")
    parser.add_argument("--model", help="model with a timm image trunk (default EffLite0-MiniLM)")
    parser.add_argument("--pretrained", help="start from this checkpoint instead of the towers' packages")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="passes over the caption pairs (default 5)")
    length.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    parser.add_argument("--batch-size", type=int, help="pairs per step; more = more negatives (default 128)")
    parser.add_argument("--lr", type=float, help="peak AdamW learning rate (default 1e-4)")
    parser.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    parser.add_argument("--warmup-steps", type=int, help="linear warm-up, then cosine to 0 (default 10)")
    parser.add_argument("--seed", type=int, help="seeds the projection init and the batch order (default 0)")
    parser.add_argument("--out", required=True, help="checkpoint file to write (a .json summary goes beside it)")
    parser.add_argument("--eval-stream", dest="eval_streams", action="append", default=[],
                        help="also report zero-shot on every task of this stream before and after (repeatable; "
                             "the --stream's own eval split is always reported)")
    parser.add_argument("--eval-max-samples", type=int, help="evaluate at most this many samples per task")
    parser.add_argument("--data-root", help="where built-in streams live (default $VLCL_DATA_DIR or ~/.cache/vlcl)")
    parser.add_argument("--device", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; on a CPU shared "
                                                    "with other jobs 1 can be several times faster)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--experiment", help="MLflow experiment (default pretrain)")
    parser.add_argument("--run-name", help="MLflow run name (default lit-<model>-<stream>-s<seed>)")
    parser.add_argument("--log-every", type=int, help="print the loss every N steps (default 10)")
    # Defaults live in orchestrator.config.PretrainConfig, which validates every option.
    parser.set_defaults(func=command_pretrain)
    return parser


def command_pretrain(args) -> int:
    config = pretrain_config({k: v for k, v in vars(args).items() if k in PretrainConfig.model_fields})
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    pretrain(config, echo=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    from orchestrator.cli import main

    sys.exit(main(["pretrain", *sys.argv[1:]]))
