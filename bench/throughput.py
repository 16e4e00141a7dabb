"""Is vlcl's training phase as fast as a plain PyTorch loop? Both, in one run, on one machine:

(a) the plain loop: the model, a synthetic batch already on the device, AdamW (fused),
    autocast at --precision, CLIP's contrastive loss; img/s after warm-up.
(b) `vlcl run`'s training phase (orchestrator.run.run_sequence, fine-tuning with the
    contrastive task loss) on real JPEG webdataset shards: sklearn digits upscaled to the model's
    image size, written with streams.writer as a one-task stream. Its img/s is the
    `train/images_per_second` metric the trainer logs to MLflow (a temporary sqlite store); it
    covers the whole task (first step and data-pipeline start included), so give it enough steps.

Prints img/s of both, the ratio (b)/(a), MFU of each against 989 TF/s (H100 dense bf16), with the
FLOPs per image counted by FlopCounterMode over one plain step, and GPU memory on CUDA. MFU is
computed against that GPU peak on every device, so on a CPU it is a tiny, meaningless fraction.
`--json PATH` writes the same figures (and how each vlcl run launched) as JSON, rewritten after each
measurement; a `--decode` run that fails is recorded there and the others still run.

    python bench/throughput.py --model vlcl-tiny --batch 32 --steps 10 --device cpu --precision fp32
    python bench/throughput.py --model ViT-B-32 --batch 512 --steps 100 --precision bf16 --decode cpu device
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from step_options import add_json_option, add_step_options, check_step_options, device_name, write_json

H100_PEAK_FLOPS = 989e12  # dense bf16 tensor-core peak of an H100 SXM
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION = "a photo of the handwritten number {}."


@dataclass
class Throughput:
    images_per_second: float
    peak_memory_bytes: int | None = None         # torch allocator peak (CUDA, in this process: the plain loop, an in-process vlcl run)
    device_memory_peak_bytes: int | None = None  # whole-device memory in use at its peak, as nvidia-smi shows it
    launch: str | None = None                    # vlcl runs: where training ran (the run's vlcl.launch tag)

    def figures(self, flops_per_image: float, plain: "Throughput | None" = None) -> dict:
        """The JSON form: img/s, MFU (a fraction of H100_PEAK_FLOPS), memory, and the ratio to `plain`."""
        figures = {"images_per_second": self.images_per_second,
                   "mfu": self.images_per_second * flops_per_image / H100_PEAK_FLOPS,
                   "peak_memory_bytes": self.peak_memory_bytes, "device_memory_peak_bytes": self.device_memory_peak_bytes}
        if plain is not None:
            figures |= {"ratio_to_plain": self.images_per_second / plain.images_per_second, "launch": self.launch}
        return figures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_options(parser, steps_help="timed steps of the plain loop and steps of vlcl's task",
                     warmup_help="untimed plain-loop steps")
    parser.add_argument("--samples", type=int, default=None,
                        help="training samples in the JPEG shards (default: enough for one epoch of --steps, at most 20000)")
    parser.add_argument("--decoders", type=int, default=None, help="data.decoders for vlcl (default: CPUs left after the worker)")
    parser.add_argument("--decode", nargs="+", choices=("cpu", "device"), default=["cpu"],
                        help="data.decode of the vlcl runs: one run (and one table row) per value")
    parser.add_argument("--workdir", default=None, help="where shards, runs and the MLflow store go (default: a temp dir)")
    add_json_option(parser)
    args = parser.parse_args(argv)
    check_step_options(parser, args)
    return args


# ----------------------------------------------------------------------------------------------
# (a) plain loop
# ----------------------------------------------------------------------------------------------
def plain_loop(args, device: torch.device) -> tuple[Throughput, float]:
    """img/s of the plain loop after warm-up, and FLOPs per image of one training step."""
    from torch.utils.flop_counter import FlopCounterMode

    from methods.losses import clip_contrastive_loss
    from methods.models import build_model, normalize_pixels

    torch.manual_seed(0)
    built = build_model(args.model)
    model = built.model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" else contextlib.nullcontext
    size = built.image_size
    pixels = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, device=device)
    images = normalize_pixels(pixels, built.image_mean, built.image_std)
    text = built.tokenizer([CAPTION.format(DIGIT_NAMES[i % 10]) for i in range(args.batch)]).to(device)

    def step() -> None:
        with autocast():
            loss = clip_contrastive_loss(model.encode_image(images, normalize=True),
                                         model.encode_text(text, normalize=True), model.logit_scale.exp())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with FlopCounterMode(display=False) as counter:
        step()  # also the first warm-up step
    for _ in range(args.warmup):
        step()
    synchronize()
    with DeviceMemoryWatch(device) as watch:
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize()
        seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del model, optimizer, images, pixels, text
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the device to vlcl's worker
    result = Throughput(args.steps * args.batch / seconds, peak_memory_bytes=peak, device_memory_peak_bytes=watch.peak)
    return result, counter.get_total_flops() / args.batch


class DeviceMemoryWatch:
    """Samples device-wide memory in use (all processes: vlcl trains in a Ray worker) on CUDA."""

    def __init__(self, device: torch.device, interval: float = 0.1):
        self.device, self.interval, self.peak = device, interval, None
        self._stop = threading.Event()
        self._thread = None

    def _sample(self) -> None:
        free, total = torch.cuda.mem_get_info(self.device)
        self.peak = max(self.peak or 0, total - free)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        if self.device.type == "cuda":
            self._sample()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()


# ----------------------------------------------------------------------------------------------
# (b) vlcl's training phase on JPEG shards
# ----------------------------------------------------------------------------------------------
def jpeg_digits(count: int, image_size: int, seed: int = 0):
    """`count` samples: sklearn digits bicubic-upscaled to `image_size`, JPEG-encoded, captioned."""
    import numpy as np
    from PIL import Image

    from streams.writer import Sample

    images, targets = digit_arrays()
    rng = np.random.default_rng(seed)
    encoded_cache: dict[int, bytes] = {}
    for i in range(count):
        index = int(rng.integers(len(targets)))
        if index not in encoded_cache:
            grey = (255 - images[index] * (255 / 16)).round().astype(np.uint8)
            image = Image.fromarray(grey, mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB")
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            encoded_cache[index] = buffer.getvalue()
        label = int(targets[index])
        yield Sample(key=f"s{i:07d}", image=encoded_cache[index], caption=CAPTION.format(DIGIT_NAMES[label]))


def digit_arrays():
    """sklearn's 8x8 digits (ink 0..16) and labels; where scikit-learn is missing (pack-wheels.sh does
    not pack it for the GPU machine), seeded random 8x8 ink maps, upscaled and encoded the same way."""
    import numpy as np

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        rng = np.random.default_rng(0)
        return rng.integers(0, 17, size=(1797, 8, 8)).astype(np.float64), rng.integers(0, 10, size=1797)
    digits = load_digits()
    return digits.images, digits.target


def write_jpeg_stream(root: Path, train_samples: int, eval_samples: int, image_size: int) -> Path:
    """A one-task retrieval stream of JPEG shards under `root`; returns its manifest path."""
    from streams.manifest import ShardSet, StreamSpec, TaskSpec, write_manifest
    from streams.writer import write_split

    splits = {}
    for split, count, seed in (("train", train_samples, 0), ("eval", eval_samples, 1)):
        written = write_split(jpeg_digits(count, image_size, seed), root / split, f"digits-jpeg-{split}",
                              max_samples_per_shard=1000)
        splits[split] = ShardSet(shards=[f"{split}/{p.name}" for p in written.shards], samples=written.samples)
    task = TaskSpec(name="digits-jpeg", kind="retrieval", train=splits["train"], eval=splits["eval"])
    return write_manifest(StreamSpec(name="digits-jpeg", tasks=[task]), root / "manifest.yaml")


def vlcl_training(args, manifest: Path, workdir: Path, device: torch.device, decode: str) -> Throughput:
    from mlflow.tracking import MlflowClient

    from orchestrator.config import load_run_config
    from orchestrator.run import run_sequence

    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    workdir = workdir / f"decode-{decode}"
    cpus = os.cpu_count() or 2
    decoders = args.decoders or max(1, cpus - 2)
    config = load_run_config(None, [
        f"stream={manifest}", f"output_dir={workdir / 'runs'}", f"tracking.uri={tracking_uri}",
        f"model.name={args.model}", f"model.precision={args.precision}", "method.name=finetune",
        "method.hparams.task_loss=contrastive", f"train.batch_size={args.batch}",
        f"train.max_steps_per_task={args.steps}", "train.epochs_per_task=1000", "train.lr=1e-5",
        f"train.use_gpu={str(device.type == 'cuda').lower()}", "train.cpus_per_worker=1",
        f"train.log_every_steps={max(1, args.steps)}", "tracking.checkpoints=none",
        f"data.decoders={decoders}", f"data.decode={decode}", f"eval.batch_size={min(args.batch, 256)}",
    ])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with DeviceMemoryWatch(device) as watch:
        result = run_sequence(config, quiet=True)
    client = MlflowClient(tracking_uri)
    history = client.get_metric_history(result.run_id, "train/images_per_second")
    if not history:
        raise RuntimeError(f"run {result.run_id} logged no train/images_per_second to {tracking_uri}")
    launch = client.get_run(result.run_id).data.tags.get("vlcl.launch")
    # in process, this process's allocator saw the whole run; on a Ray worker it saw none of it
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" and launch == "in_process" else None
    return Throughput(history[-1].value, peak_memory_bytes=peak, device_memory_peak_bytes=watch.peak, launch=launch)


# ----------------------------------------------------------------------------------------------
def format_report(args, plain: Throughput, vlcl: dict[str, Throughput], flops_per_image: float) -> str:
    def gib(value):
        return "-" if value is None else f"{value / 2**30:.2f}"

    lines = [f"model={args.model} batch={args.batch} precision={args.precision} device={args.device} steps={args.steps}",
             f"FLOPs per image (fwd+bwd, FlopCounterMode): {flops_per_image / 1e9:.3f} GFLOP", "",
             "| loop | img/s | MFU vs 989 TF/s | torch peak GiB | device peak GiB |", "|---|---|---|---|---|"]
    rows = [("plain PyTorch (synthetic, on device)", plain)]
    rows += [(f"vlcl run (JPEG shards, {result.launch or 'Ray'}, data.decode={decode})", result)
             for decode, result in vlcl.items()]
    for name, result in rows:
        mfu = result.images_per_second * flops_per_image / H100_PEAK_FLOPS
        lines.append(f"| {name} | {result.images_per_second:.1f} | {100 * mfu:.2f}% | "
                     f"{gib(result.peak_memory_bytes)} | {gib(result.device_memory_peak_bytes)} |")
    lines.append("")
    lines += [f"ratio vlcl/plain (data.decode={decode}): {result.images_per_second / plain.images_per_second:.3f}"
              for decode, result in vlcl.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from methods.models import build_model

    args = parse_args(argv)
    device = torch.device(args.device)
    figures = {"model": args.model, "batch": args.batch, "precision": args.precision, "device": args.device,
               "device_name": device_name(device), "steps": args.steps, "warmup": args.warmup,
               "peak_flops": H100_PEAK_FLOPS, "flops_per_image": None, "plain": None, "vlcl": {}}
    write_json(args.json, figures)
    plain, flops_per_image = plain_loop(args, device)
    figures |= {"flops_per_image": flops_per_image, "plain": plain.figures(flops_per_image)}
    write_json(args.json, figures)
    print(f"plain loop: {plain.images_per_second:.1f} img/s", flush=True)

    image_size = build_model(args.model).image_size
    train_samples = args.samples or min(20000, max(args.batch * (args.steps + 1), 2 * args.batch))
    failed = {}
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vlcl-bench-")))
        manifest = write_jpeg_stream(workdir / "stream", train_samples, min(args.batch, 256), image_size)
        vlcl = {}
        for decode in args.decode:
            try:
                vlcl[decode] = vlcl_training(args, manifest, workdir, device, decode)
            except Exception as error:  # the other --decode runs still measure; the error is in the JSON
                traceback.print_exc()
                failed[decode] = f"{type(error).__name__}: {error}"
                figures["vlcl"][decode] = {"error": failed[decode]}
                write_json(args.json, figures)
                continue
            figures["vlcl"][decode] = vlcl[decode].figures(flops_per_image, plain)
            write_json(args.json, figures)
            print(f"vlcl run (data.decode={decode}): {vlcl[decode].images_per_second:.1f} img/s", flush=True)
    print()
    print(format_report(args, plain, vlcl, flops_per_image), flush=True)
    if failed:
        raise SystemExit("vlcl runs failed: " + "; ".join(f"data.decode={d}: {e}" for d, e in failed.items()))
    first = vlcl[args.decode[0]]
    return {"plain_images_per_second": plain.images_per_second, "vlcl_images_per_second": first.images_per_second,
            "ratio": first.images_per_second / plain.images_per_second, "flops_per_image": flops_per_image,
            **{f"ratio_decode_{d}": r.images_per_second / plain.images_per_second for d, r in vlcl.items()}}


if __name__ == "__main__":
    main()
