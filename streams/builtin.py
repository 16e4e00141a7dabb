"""Built-in streams, materialised as shards on first use.

The stream recipes of streams/recipes.py (`builtin:split-fmnist`, `builtin:mini-mtil`,
`builtin:offline-pretrain`) are built-in too, with their default options, once their packaged
sources are installed (`bash streams/install_sources.sh`).

`digits`: scikit-learn's 1,797 real 8x8 handwritten digits, upscaled to 32x32 RGB, split into five
tasks of two digits each (0-1, 2-3, ...), each evaluated zero-shot over its own two classes
(`eval_classifier: task`, the task-incremental protocol: a from-scratch model that has only ever
seen two digits at a time cannot be asked to pick among ten). The train/eval split is stratified
with a fixed seed (80/20).
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

from streams.errors import ManifestError
from streams.manifest import BUILTIN_PREFIX, ShardSet, StreamSpec, TaskSpec, load_stream, write_manifest
from streams.writer import Sample, publish_directory, staging_directory, write_split

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = [
    "a photo of the digit {}.",
    "a handwritten {}.",
    "a drawing of the number {}.",
    "a low resolution image of the digit {}.",
    "a blurry photo of a handwritten {}.",
]
DIGITS_VERSION = 2  # 2: eval_classifier task (was stream)
DIGITS_IMAGE_SIZE = 32
DIGITS_SEED = 0
DIGITS_EVAL_FRACTION = 0.2
COMPLETE_MARKER = "COMPLETE"
MANIFEST_NAME = "manifest.yaml"


def default_data_root() -> Path:
    return Path(os.environ.get("VLCL_DATA_DIR") or Path.home() / ".cache" / "vlcl")


def digit_image(pixels_8x8):
    """An 8x8 array of 0..16 ink levels -> a 32x32 RGB image, dark ink on white like handwriting."""
    import numpy as np
    from PIL import Image

    grey = (255 - np.asarray(pixels_8x8, dtype=np.float64) * (255 / 16)).round().astype(np.uint8)
    # Bicubic keeps strokes smooth; nearest would give 4x4 blocks that look like nothing at 32 px.
    return Image.fromarray(grey, mode="L").resize((DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE),
                                                   Image.Resampling.BICUBIC).convert("RGB")


def build_digits(out_dir: Path) -> Path:
    """Write the digits stream (shards + manifest) into `out_dir`; returns the manifest path."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = list(range(len(digits.target)))
    train_idx, eval_idx = train_test_split(indices, test_size=DIGITS_EVAL_FRACTION, random_state=DIGITS_SEED,
                                           stratify=digits.target)
    caption_rng = random.Random(DIGITS_SEED)
    captions = [caption_rng.choice(DIGIT_TEMPLATES) for _ in indices]
    tasks = []
    for first in range(0, 10, 2):
        task_digits = [first, first + 1]
        classes = [DIGIT_NAMES[d] for d in task_digits]
        name = f"digits-{first}-{first + 1}"
        splits = {}
        for split, split_idx in (("train", train_idx), ("eval", eval_idx)):
            chosen = sorted(i for i in split_idx if digits.target[i] in task_digits)
            samples = (Sample(key=f"digit{i:04d}", image=digit_image(digits.images[i]),
                              caption=captions[i].format(DIGIT_NAMES[digits.target[i]]),
                              label=task_digits.index(int(digits.target[i])),
                              class_name=DIGIT_NAMES[digits.target[i]])
                       for i in chosen)
            written = write_split(samples, out_dir / split, name, max_samples_per_shard=200)
            splits[split] = ShardSet(shards=[f"{split}/{p.name}" for p in written.shards], samples=written.samples)
        tasks.append(TaskSpec(name=name, kind="classification", classes=classes, templates=DIGIT_TEMPLATES,
                              train=splits["train"], eval=splits["eval"]))
    spec = StreamSpec(name="digits", eval_classifier="task", tasks=tasks)
    return write_manifest(spec, out_dir / MANIFEST_NAME)


BUILTINS = {"digits": (DIGITS_VERSION, build_digits)}


def builtin_streams() -> dict:
    """name -> (version, build(out_dir)): `digits` plus every stream recipe (streams/recipes.py:
    split-fmnist, mini-mtil, offline-pretrain) with its default options."""
    from streams.recipes import builtin_builders

    return {**builtin_builders(), **BUILTINS}


def materialize_builtin(name: str, data_root: str | os.PathLike | None = None) -> Path:
    """The manifest path of built-in stream `name`, building its shards the first time.

    The stream lives in `<data_root>/<name>-v<version>/`; it counts as built only when its
    completion marker exists. It is built in a private folder and renamed into place, so two
    processes racing to build it both end up with one complete copy.
    """
    streams = builtin_streams()
    if name not in streams:
        raise ManifestError(f"unknown builtin stream {name!r}; known: {', '.join(sorted(streams))}")
    version, build = streams[name]
    root = Path(data_root) if data_root is not None else default_data_root()
    final = root / f"{name}-v{version}"
    if (final / COMPLETE_MARKER).is_file():
        return final / MANIFEST_NAME
    if final.exists():
        # Not built by this code (no marker): move it aside rather than trust or delete it blindly.
        aside = final.with_name(f"{final.name}.incomplete-{os.getpid()}")
        os.rename(final, aside)
    staging = staging_directory(final)
    try:
        build(staging)
        (staging / COMPLETE_MARKER).write_text(f"{name} version {version}\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_directory(staging, final)
    return final / MANIFEST_NAME


def open_stream(source: str | os.PathLike, data_root: str | os.PathLike | None = None) -> tuple[str, StreamSpec]:
    """(manifest path, stream) of a manifest path or `builtin:<name>` (built under `data_root` on first use).

    The one place a stream source is resolved: run, sweep, pretrain and the reference data all call it."""
    source = str(source)
    if source.startswith(BUILTIN_PREFIX):
        manifest = str(materialize_builtin(source[len(BUILTIN_PREFIX):], data_root))
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ManifestError(f"stream manifest {source} does not exist; give a manifest YAML path or one of "
                                + ", ".join(f"{BUILTIN_PREFIX}{name}" for name in sorted(builtin_streams())))
        manifest = str(path.resolve())
    return manifest, load_stream(manifest)
