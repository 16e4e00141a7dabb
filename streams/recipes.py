"""Stream recipes: packaged offline data (Debian, npm) -> webdataset shards + manifest.

`vlcl streams build <recipe>` runs one; `stream: builtin:<recipe>` in a run config builds it with
its default options on first use. Recipes read only what `streams/install_sources.sh` installs
(see streams/sources.py) and never download; a missing source raises MissingSourceError with the
command that installs it.

* `split-fmnist`: Fashion-MNIST class-incremental, 5 tasks of 2 classes, zero-shot over all classes
  seen in the stream. Train samples are the first N per class of the train file, eval samples the
  first M per class of the test file.
* `mini-mtil`: six domains in sequence, each scored over its own classes (MTIL-style): Fashion-MNIST,
  OpenCV handwritten digits, three emoji categories (train on Google + Twitter art, evaluate on
  OpenMoji colour art: the eval split is another style of the same concepts), and Tux Paint
  image-caption retrieval. Control set `emoji-lineart` (OpenMoji line art of the emoji concepts) is
  never trained on and scored after every task.
* `offline-pretrain`: image-caption pairs for a LiT-style alignment stage, disjoint from mini-mtil:
  emoji of the other categories in three styles, and Tux Paint stamps of the other categories
  (no alphabet letters, no caption that mini-mtil's Tux Paint task uses).

Output is deterministic: the same sources and options give the same manifest, keys, captions and
image bytes. Beside the manifest, `build.yaml` records the recipe, options, source packages,
licences, sample counts and what was skipped.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import yaml

from streams.builtin import DIGIT_NAMES, DIGIT_TEMPLATES
from streams.converters import is_eval_key, prepare_output
from streams.errors import SourceError
from streams.manifest import ShardSet, StreamSpec, TaskSpec, write_manifest
from streams.sources import (FASHION_CLASSES, LICENCES, NPM_PACKAGES, Emoji, Sources, Stamp, emoji_concepts,
                             emoji_png, fashion_mnist, first_per_class, opencv_digits, openmoji_images,
                             stamp_images, tux_stamps)
from streams.writer import Sample, write_split

MANIFEST_NAME = "manifest.yaml"
BUILD_INFO_NAME = "build.yaml"
MAX_SAMPLES_PER_SHARD = 500
SEED = 0

FASHION_TEMPLATES = [
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a product photo of a {}.",
    "a grayscale picture of a {}, a fashion item.",
]
EMOJI_TEMPLATES = [
    "an emoji of a {}.",
    "a {} emoji.",
    "an icon of a {}.",
    "a cartoon drawing of a {}.",
    "a flat illustration of a {}.",
]
# OpenCV's sheet: 5 rows of 100 cells per digit. The first 4 rows are the train pool, the last the
# eval pool, so eval digits come from sheet rows never trained on.
DIGIT_TRAIN_POOL = 400
DIGIT_EVAL_POOL = 100

MTIL_EMOJI_TASKS = {
    "emoji-animals-nature": "Animals & Nature",
    "emoji-food-drink": "Food & Drink",
    "emoji-travel-places": "Travel & Places",
}
MTIL_TUX_CATEGORIES = ["animals", "food", "vehicles", "plants"]
MTIL_TUX_EVAL_FRACTION = 0.2
TUX_LONG_SIDE = 128
EMOJI_SIZE = 64

PRETRAIN_EMOJI_CATEGORIES = ["Smileys & Emotion", "People & Body", "Objects", "Symbols", "Activities"]
PRETRAIN_EMOJI_STYLES = {"google": "Google Noto", "twitter": "Twitter", "color": "OpenMoji"}
PRETRAIN_TUX_EXCLUDE = ("symbols/alphabets/",)
PRETRAIN_EVAL_FRACTION = 0.1
PRETRAIN_CAPTIONS = [
    "an emoji of a {name}.",
    "a {style} emoji of a {name}.",
    "{name}, drawn as an emoji.",
    "an icon showing {annotation}.",
    "an emoji of {annotation}: {tags}.",
]


@dataclass(frozen=True)
class Recipe:
    """A named stream build. `build(out_dir, sources, **options)` writes shards + manifest and returns
    what build.yaml records (sources used, what was skipped); `options` are its integer knobs and
    their defaults (the defaults are what `builtin:<name>` builds)."""

    name: str
    version: int
    summary: str
    build: Callable[..., dict]
    options: dict[str, int]


def pick(key: str, choices: list[str]) -> str:
    """One of `choices`, fixed by the key, so a rebuild gives the same caption."""
    return random.Random(f"{SEED}:{key}").choice(choices)


def write_shards(out_dir: Path, split: str, name: str, samples: Iterable[Sample]) -> ShardSet:
    written = write_split(samples, out_dir / split, name, max_samples_per_shard=MAX_SAMPLES_PER_SHARD)
    return ShardSet(shards=[f"{split}/{p.name}" for p in written.shards], samples=written.samples)


def check_count(option: str, value: int, at_most: int | None = None) -> None:
    if value < 1 or (at_most is not None and value > at_most):
        bound = f"between 1 and {at_most}" if at_most is not None else "at least 1"
        raise SourceError(f"{option} must be {bound}, got {value}")


def limited(items: list, limit: int) -> list:
    """The first `limit` items (all when limit is 0): small, deterministic subsets for tests."""
    if limit < 0:
        raise SourceError(f"a subset limit must be 0 (all) or more, got {limit}")
    return items[:limit] if limit else items


# --- task builders (each writes one task's shards) ---

def fashion_samples(images, labels, indices: list[int], split: str, classes: list[int]) -> Iterator[Sample]:
    from PIL import Image

    for index in indices:
        label = int(labels[index])
        key = f"fmnist-{split}-{index:05d}"
        name = FASHION_CLASSES[label]
        yield Sample(key=key, image=Image.fromarray(images[index]), caption=pick(key, FASHION_TEMPLATES).format(name),
                     label=classes.index(label), class_name=name)


def fashion_task(out_dir: Path, name: str, classes: list[int], train_data, test_data, train_per_class: int,
                 eval_per_class: int) -> TaskSpec:
    """Train: the first `train_per_class` of each class in the train file; eval: likewise from the test file."""
    (train_images, train_labels), (test_images, test_labels) = train_data, test_data
    train = first_per_class(train_labels, classes, train_per_class)
    evaluation = first_per_class(test_labels, classes, eval_per_class)
    return TaskSpec(name=name, kind="classification", classes=[FASHION_CLASSES[c] for c in classes],
                    templates=FASHION_TEMPLATES,
                    train=write_shards(out_dir, "train", name, fashion_samples(train_images, train_labels, train,
                                                                               "train", classes)),
                    eval=write_shards(out_dir, "eval", name, fashion_samples(test_images, test_labels, evaluation,
                                                                             "test", classes)))


def digit_samples(cells, labels, indices: list[int]) -> Iterator[Sample]:
    from PIL import Image

    for index in indices:
        digit = int(labels[index])
        key = f"cvdigit-{index:04d}"
        yield Sample(key=key, image=Image.fromarray(cells[index]),
                     caption=pick(key, DIGIT_TEMPLATES).format(DIGIT_NAMES[digit]), label=digit,
                     class_name=DIGIT_NAMES[digit])


def digits_task(out_dir: Path, sources: Sources, train_per_class: int, eval_per_class: int) -> TaskSpec:
    check_count("train_per_class (handwritten digits)", train_per_class, DIGIT_TRAIN_POOL)
    check_count("eval_per_class (handwritten digits)", eval_per_class, DIGIT_EVAL_POOL)
    cells, labels = opencv_digits(sources)
    train = first_per_class(labels, range(10), train_per_class)
    evaluation = first_per_class(labels, range(10), eval_per_class, skip=DIGIT_TRAIN_POOL)
    name = "handwritten-digits"
    return TaskSpec(name=name, kind="classification", classes=DIGIT_NAMES, templates=DIGIT_TEMPLATES,
                    train=write_shards(out_dir, "train", name, digit_samples(cells, labels, train)),
                    eval=write_shards(out_dir, "eval", name, digit_samples(cells, labels, evaluation)))


def emoji_class_samples(concepts: list[Emoji], images, prefix: str) -> Iterator[Sample]:
    classes = [e.name for e in concepts]
    for emoji, image in zip(concepts, images):
        key = f"{prefix}-{emoji.code}"
        yield Sample(key=key, image=image, caption=pick(key, EMOJI_TEMPLATES).format(emoji.name),
                     label=classes.index(emoji.name), class_name=emoji.name)


def emoji_task(out_dir: Path, sources: Sources, name: str, concepts: list[Emoji]) -> TaskSpec:
    """Train on the Google and Twitter PNGs of `concepts`, evaluate on their OpenMoji colour renders."""
    def train_samples():
        for style in ("google", "twitter"):
            yield from emoji_class_samples(concepts, (emoji_png(sources, style, e) for e in concepts),
                                           f"emoji-{style}")

    colour = openmoji_images(sources, "color", concepts, EMOJI_SIZE)
    return TaskSpec(name=name, kind="classification", classes=[e.name for e in concepts], templates=EMOJI_TEMPLATES,
                    train=write_shards(out_dir, "train", name, train_samples()),
                    eval=write_shards(out_dir, "eval", name, emoji_class_samples(concepts, colour, "openmoji-color")))


def stamp_sample(stamp: Stamp, image) -> Sample:
    return Sample(key=f"tux-{stamp.key}", image=image, caption=stamp.caption)


def split_by_key(pairs: list[tuple[str, Sample]], eval_fraction: float, what: str) -> tuple[list, list]:
    """(train samples, eval samples) of (split key, sample) pairs: eval when the key's seeded hash is
    below `eval_fraction` (streams.converters.is_eval_key)."""
    evaluation = [s for k, s in pairs if is_eval_key(k, eval_fraction, SEED)]
    train = [s for k, s in pairs if not is_eval_key(k, eval_fraction, SEED)]
    if not train or not evaluation:
        raise SourceError(f"{what}: {len(pairs)} samples give {len(train)} train and {len(evaluation)} eval "
                          f"samples; use a larger subset")
    return train, evaluation


def retrieval_task(out_dir: Path, name: str, train: Iterable[Sample], evaluation: Iterable[Sample]) -> TaskSpec:
    return TaskSpec(name=name, kind="retrieval", train=write_shards(out_dir, "train", name, train),
                    eval=write_shards(out_dir, "eval", name, evaluation))


# --- recipes ---

def build_split_fmnist(out_dir: Path, sources: Sources, *, train_per_class: int, eval_per_class: int) -> dict:
    check_count("train_per_class", train_per_class, 6000)
    check_count("eval_per_class", eval_per_class, 1000)
    train_data, test_data = fashion_mnist(sources, "train"), fashion_mnist(sources, "test")
    tasks = [fashion_task(out_dir, f"fmnist-{first}-{first + 1}", [first, first + 1], train_data, test_data,
                          train_per_class, eval_per_class) for first in range(0, 10, 2)]
    write_manifest(StreamSpec(name="split-fmnist", eval_classifier="stream", tasks=tasks), out_dir / MANIFEST_NAME)
    return {"sources": ["dataset-fashion-mnist"]}


def mtil_emoji_concepts(sources: Sources, emoji_per_task: int) -> dict[str, list[Emoji]]:
    return {task: limited(emoji_concepts(sources, [category]), emoji_per_task)
            for task, category in MTIL_EMOJI_TASKS.items()}


def mtil_tux_stamps(sources: Sources, stamps_per_category: int) -> list[Stamp]:
    return [s for c in MTIL_TUX_CATEGORIES for s in limited(tux_stamps(sources, [c]), stamps_per_category)]


def build_mini_mtil(out_dir: Path, sources: Sources, *, train_per_class: int, eval_per_class: int,
                    emoji_per_task: int, stamps_per_category: int) -> dict:
    check_count("train_per_class", train_per_class, DIGIT_TRAIN_POOL)
    check_count("eval_per_class", eval_per_class, DIGIT_EVAL_POOL)
    # Check every source before writing anything, so a missing one fails in seconds.
    sources.require_rsvg("the OpenMoji eval and control images")
    emoji = mtil_emoji_concepts(sources, emoji_per_task)
    stamps = mtil_tux_stamps(sources, stamps_per_category)
    opencv_digits(sources)
    train_data, test_data = fashion_mnist(sources, "train"), fashion_mnist(sources, "test")

    tasks = [fashion_task(out_dir, "fashion-mnist", list(range(10)), train_data, test_data, train_per_class,
                          eval_per_class),
             digits_task(out_dir, sources, train_per_class, eval_per_class)]
    tasks += [emoji_task(out_dir, sources, name, concepts) for name, concepts in emoji.items()]
    kept, images = stamp_images(sources, stamps, TUX_LONG_SIDE)
    pairs = [(stamp.key, stamp_sample(stamp, image)) for stamp, image in zip(kept, images)]
    train, evaluation = split_by_key(pairs, MTIL_TUX_EVAL_FRACTION, "mini-mtil Tux Paint stamps")
    tasks.append(retrieval_task(out_dir, "tuxpaint", train, evaluation))

    lineart_concepts = [e for concepts in emoji.values() for e in concepts]
    lineart = openmoji_images(sources, "black", lineart_concepts, EMOJI_SIZE)
    control = TaskSpec(name="emoji-lineart", kind="classification", classes=[e.name for e in lineart_concepts],
                       templates=EMOJI_TEMPLATES,
                       eval=write_shards(out_dir, "eval", "emoji-lineart",
                                         emoji_class_samples(lineart_concepts, lineart, "openmoji-black")))
    write_manifest(StreamSpec(name="mini-mtil", eval_classifier="task", tasks=tasks, control=[control]),
                   out_dir / MANIFEST_NAME)
    return {"sources": ["dataset-fashion-mnist", "opencv-doc digits.png", "emoji-datasource-google",
                        "emoji-datasource-twitter", "openmoji", "tuxpaint-stamps-default"],
            "skipped": {"tux_svg_stamps_without_rsvg_convert": sorted(s.relative for s in stamps if s not in kept)}}


def pretrain_caption(key: str, emoji: Emoji, style: str) -> str:
    templates = PRETRAIN_CAPTIONS if emoji.tags else [t for t in PRETRAIN_CAPTIONS if "{tags}" not in t]
    return pick(key, templates).format(name=emoji.name, style=PRETRAIN_EMOJI_STYLES[style],
                                       annotation=emoji.annotation or emoji.name, tags=", ".join(emoji.tags))


def pretrain_emoji_samples(sources: Sources, concepts: list[Emoji]) -> list[tuple[str, Sample]]:
    """(concept code, sample) for every concept in the three pretraining styles."""
    colour = openmoji_images(sources, "color", concepts, EMOJI_SIZE)
    samples = []
    for style in PRETRAIN_EMOJI_STYLES:
        images = colour if style == "color" else [emoji_png(sources, style, e) for e in concepts]
        prefix = "openmoji-color" if style == "color" else f"emoji-{style}"
        for emoji, image in zip(concepts, images):
            key = f"{prefix}-{emoji.code}"
            samples.append((emoji.code, Sample(key=key, image=image, caption=pretrain_caption(key, emoji, style))))
    return samples


def pretrain_stamps(sources: Sources, stamps_per_category: int) -> tuple[list[Stamp], list[str]]:
    """Stamps of the categories mini-mtil leaves out, minus alphabet letters and any stamp whose caption
    a mini-mtil Tux Paint stamp also has; returns (stamps, the left-out relative paths)."""
    root_categories = {s.category for s in tux_stamps(sources)}
    categories = sorted(root_categories - set(MTIL_TUX_CATEGORIES))
    mtil_captions = {s.caption for s in tux_stamps(sources, MTIL_TUX_CATEGORIES)}
    stamps, left_out = [], []
    for category in categories:
        chosen = []
        for stamp in tux_stamps(sources, [category], exclude_prefixes=PRETRAIN_TUX_EXCLUDE):
            (left_out if stamp.caption in mtil_captions else chosen).append(stamp)
        stamps += limited(chosen, stamps_per_category)
    return stamps, sorted(s.relative for s in left_out)


def build_offline_pretrain(out_dir: Path, sources: Sources, *, emoji_per_category: int,
                           stamps_per_category: int) -> dict:
    sources.require_rsvg("the OpenMoji colour images")
    concepts = [e for category in PRETRAIN_EMOJI_CATEGORIES
                for e in limited(emoji_concepts(sources, [category]), emoji_per_category)]
    stamps, caption_overlap = pretrain_stamps(sources, stamps_per_category)

    emoji_pairs = pretrain_emoji_samples(sources, concepts)
    kept, images = stamp_images(sources, stamps, TUX_LONG_SIDE)
    stamp_pairs = [(stamp.key, stamp_sample(stamp, image)) for stamp, image in zip(kept, images)]
    # Emoji split by concept, so an eval concept is unseen in every style.
    train, evaluation = split_by_key(emoji_pairs + stamp_pairs, PRETRAIN_EVAL_FRACTION, "offline-pretrain pairs")
    task = retrieval_task(out_dir, "emoji-tux-captions", train, evaluation)
    write_manifest(StreamSpec(name="offline-pretrain", eval_classifier="task", tasks=[task]), out_dir / MANIFEST_NAME)
    return {"sources": ["emoji-datasource-google", "emoji-datasource-twitter", "openmoji", "tuxpaint-stamps-default"],
            "skipped": {"tux_svg_stamps_without_rsvg_convert": sorted(s.relative for s in stamps if s not in kept),
                        "tux_stamps_with_a_mini_mtil_caption": caption_overlap}}


# Subset limits of 0 mean "all"; tests pass small ones.
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("split-fmnist", 1, "Fashion-MNIST, 5 class-incremental tasks of 2 classes (Debian dataset-fashion-mnist)",
           build_split_fmnist, {"train_per_class": 1000, "eval_per_class": 200}),
    Recipe("mini-mtil", 1, "6 domains in sequence: Fashion-MNIST, digits, 3 emoji categories (train Google+Twitter, "
                           "eval OpenMoji), Tux Paint retrieval; control: emoji line art", build_mini_mtil,
           {"train_per_class": 300, "eval_per_class": 100, "emoji_per_task": 0, "stamps_per_category": 0}),
    Recipe("offline-pretrain", 1, "image-caption pairs for LiT alignment, disjoint from mini-mtil (emoji of other "
                                  "categories, other Tux Paint stamps)", build_offline_pretrain,
           {"emoji_per_category": 0, "stamps_per_category": 0}),
)}


def build_recipe(name: str, out_dir: str | os.PathLike, sources: Sources | None = None, overwrite: bool = False,
                 **options: int) -> Path:
    """Build recipe `name` into `out_dir` (shards, manifest.yaml, build.yaml); returns the manifest path."""
    if name not in RECIPES:
        raise SourceError(f"unknown stream recipe {name!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    unknown = sorted(set(options) - set(recipe.options))
    if unknown:
        raise SourceError(f"recipe {name!r} has no options {unknown}; it takes {sorted(recipe.options)}")
    sources = sources or Sources()
    out_dir = prepare_output(out_dir, overwrite)
    chosen = {**recipe.options, **options}
    info = recipe.build(out_dir, sources, **chosen)
    manifest = out_dir / MANIFEST_NAME
    write_build_info(out_dir / BUILD_INFO_NAME, recipe, chosen, info, manifest)
    return manifest


def write_build_info(path: Path, recipe: Recipe, options: dict, info: dict, manifest: Path) -> None:
    """Provenance beside the manifest: no timestamps or machine paths, so rebuilds compare equal."""
    from streams.manifest import load_stream

    spec = load_stream(manifest)
    counts = {t.name: {split: getattr(t, split).samples for split in ("train", "eval") if getattr(t, split)}
              for t in spec.tasks + spec.control}
    data = {"recipe": recipe.name, "version": recipe.version, "options": options,
            "sources": {s: {"version": NPM_PACKAGES.get(s, "Debian package"), "licence": LICENCES[s]}
                        for s in info["sources"]},
            "samples": counts, "skipped": info.get("skipped", {})}
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def describe_build(manifest: str | os.PathLike) -> list[str]:
    """Human lines about a built recipe: samples per task and split, size on disk, what was skipped."""
    folder = Path(manifest).parent
    info_path = folder / BUILD_INFO_NAME
    if not info_path.is_file():
        return [f"{folder}: no {BUILD_INFO_NAME} (not built by a recipe)"]
    info = yaml.safe_load(info_path.read_text())
    size = sum(p.stat().st_size for p in folder.rglob("*.tar"))
    lines = [f"{info['recipe']} v{info['version']} {info['options']}: {size / 2**20:.1f} MiB of shards in {folder}"]
    for task, counts in info["samples"].items():
        lines.append(f"  {task}: " + ", ".join(f"{split} {n}" for split, n in counts.items()))
    for reason, items in info.get("skipped", {}).items():
        if items:
            lines.append(f"  skipped {len(items)} ({reason.replace('_', ' ')})")
    return lines


def builtin_builders() -> dict[str, tuple[int, Callable[[Path], Path]]]:
    """Each recipe with its default options, as `streams.builtin` materialises built-in streams."""
    def builder(name: str) -> Callable[[Path], Path]:
        return lambda out_dir: build_recipe(name, out_dir, overwrite=True)

    return {name: (recipe.version, builder(name)) for name, recipe in RECIPES.items()}


__all__ = ["BUILD_INFO_NAME", "RECIPES", "Recipe", "build_recipe", "builtin_builders", "describe_build"]
