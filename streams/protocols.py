"""Streams for the retrieval protocols (spec methods.md §1.3-1.5) and ZSCL's reference data.

* `from_karpathy`: COCO / Flickr30K as the Karpathy split JSON describes them
  (`dataset_coco.json`, `dataset_flickr30k.json`: `images[*].{filepath?, filename, split,
  sentences[*].raw}`). The test split (COCO 5K, Flickr30K 1K) is the eval set; the training images
  (train+restval, or the splits given; Mod-X uses Flickr30K train+val) are cut, in JSON order, into
  N contiguous chunks of sizes differing by at most one (Mod-X's phases: no shuffling). Every
  sample is one image: `.txt` = one of its captions (train: a seeded draw; eval: the first) and the
  `.json` holds `captions` (all of them) and `image_id`.
* `from_p9d`: P9D as CTP's loader reads it (KevinLight831/CTP `data/pretrain_product_dataset.py`,
  `configs/base_seqF.yaml`): `json/train.json` = {industry: {item_id: {title, cate_name, ...}}},
  `json/test.json` = {item_id: {title, cate_name, industry_name}}, images `train_images/<id>.jpg`
  and (test) `gallery_images/<id>.jpg`. One retrieval task per industry, in CTP's order (or
  reversed); captions are CTP's `pre_caption(title, max_words=30)`.
* `from_cc3m`: img2dataset shards (CC3M) cut into N tasks, by instance or by class (§1.5), each
  with a held-out eval part. The class split is our proposal (the paper's construction is not
  public): see `caption_class`.
* `build_reference`: reference pairs for `data.reference` (ZSCL): images from a class-folder tree
  (ImageNet train), captions from CC3M's TSV or a caption list, paired at random with a seed.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

from streams.converters import (FILE_IMAGE_SUFFIXES, MANIFEST_NAME, is_eval_key, key_from_path, prepare_output,
                                resplit_samples, safe_name, stored_image)
from streams.errors import ManifestError, SourceError
from streams.manifest import ShardSet, StreamSpec, TaskSpec, expand_shards, write_manifest
from streams.writer import Sample, write_split

MAX_SAMPLES_PER_SHARD = 1000
REFERENCE_CAPTIONS_NAME = "captions.txt"


def write_shards(out: Path, split: str, name: str, samples: Iterable[Sample], shard_size: int) -> ShardSet:
    written = write_split(samples, out / split, safe_name(name), shard_size)
    return ShardSet(shards=[f"{split}/{p.name}" for p in written.shards], samples=written.samples)


def read_json(path: Path, what: str):
    if not path.is_file():
        raise SourceError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SourceError(f"{what} {path} is not valid JSON ({err})") from None


def require_images(paths: list[Path], what: str) -> None:
    """Fail before writing when image files are missing, naming how many and the first few."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise SourceError(f"{what}: {len(missing)} of {len(paths)} image files do not exist, e.g. "
                          f"{', '.join(str(p) for p in missing[:3])}; check the image root")


def contiguous_chunks(items: list, count: int) -> list[list]:
    """`count` contiguous parts in order, sizes differing by at most one (part i = items[i*n//c:(i+1)*n//c])."""
    n = len(items)
    if not 1 <= count <= n:
        raise SourceError(f"cannot cut {n} training images into {count} chunks")
    return [items[i * n // count:(i + 1) * n // count] for i in range(count)]


# --- Karpathy split JSON (COCO, Flickr30K) ---

@dataclass(frozen=True)
class KarpathyImage:
    key: str
    path: Path
    split: str
    captions: tuple[str, ...]


def karpathy_images(json_path: str | os.PathLike, image_root: str | os.PathLike) -> tuple[str, list[KarpathyImage]]:
    """(dataset name, images in JSON order). Image = image_root/[filepath/]filename."""
    json_path, image_root = Path(json_path), Path(image_root)
    data = read_json(json_path, "Karpathy split JSON")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SourceError(f"{json_path} has no `images` list; expected the Karpathy split JSON "
                          f"(dataset_coco.json / dataset_flickr30k.json)")
    images = []
    for index, entry in enumerate(data["images"]):
        where = f"{json_path} images[{index}]"
        if not isinstance(entry, dict) or "filename" not in entry or "split" not in entry:
            raise SourceError(f"{where} lacks `filename` or `split`")
        captions = tuple(s["raw"].strip() for s in entry.get("sentences", [])
                         if isinstance(s, dict) and isinstance(s.get("raw"), str) and s["raw"].strip())
        if not captions:
            raise SourceError(f"{where} ({entry['filename']}) has no sentence with a `raw` caption")
        relative = f"{entry['filepath']}/{entry['filename']}" if entry.get("filepath") else entry["filename"]
        images.append(KarpathyImage(key=key_from_path(relative), path=image_root / relative, split=entry["split"],
                                    captions=captions))
    return str(data.get("dataset") or json_path.stem), images


def karpathy_samples(images: list[KarpathyImage], train: bool, seed: int) -> Iterator[Sample]:
    for image in images:
        caption = random.Random(f"{seed}:{image.key}").choice(image.captions) if train else image.captions[0]
        yield Sample(key=image.key, image=stored_image(image.path, "Karpathy split image"), caption=caption,
                     extra={"captions": list(image.captions), "image_id": image.key})


def split_images(images: list[KarpathyImage], splits: Iterable[str], source: str) -> list[KarpathyImage]:
    splits = list(splits)
    chosen = [i for i in images if i.split in splits]
    if not chosen:
        found = sorted({i.split for i in images})
        raise SourceError(f"{source} has no images in splits {splits}; its splits are {found}")
    return chosen


def from_karpathy(json_path: str | os.PathLike, image_root: str | os.PathLike, out_dir: str | os.PathLike,
                  chunks: int = 1, train_splits: Iterable[str] = ("train", "restval"), test_split: str = "test",
                  name: str | None = None, control: tuple[str, str] | None = None, seed: int = 0,
                  shard_size: int = MAX_SAMPLES_PER_SHARD, overwrite: bool = False) -> Path:
    """Karpathy JSON + image root -> retrieval stream of `chunks` tasks; returns the manifest path.

    Every task is evaluated on the same test shards (written once). `control`: (JSON, image root)
    of another dataset whose test split is scored after every task, never trained (Mod-X: COCO 5K
    while training on Flickr30K).
    """
    dataset, images = karpathy_images(json_path, image_root)
    train = split_images(images, train_splits, str(json_path))
    test = split_images(images, [test_split], str(json_path))
    parts = contiguous_chunks(train, chunks)
    control_test = None
    if control is not None:
        control_name, control_images = karpathy_images(*control)
        control_test = split_images(control_images, [test_split], control[0])
        require_images([i.path for i in control_test], f"control {control[0]}")
    require_images([i.path for i in train + test], str(json_path))
    name = name or safe_name(dataset)
    out = prepare_output(out_dir, overwrite)
    evaluation = write_shards(out, "eval", f"{name}-{test_split}", karpathy_samples(test, False, seed), shard_size)
    tasks = []
    for index, part in enumerate(parts):
        task = f"{name}-{index + 1}" if chunks > 1 else name
        tasks.append(TaskSpec(name=task, kind="retrieval", train=write_shards(
            out, "train", task, karpathy_samples(part, True, seed), shard_size), eval=evaluation))
    controls = []
    if control_test is not None:
        control_task = f"{safe_name(control_name)}-{test_split}"
        controls.append(TaskSpec(name=control_task, kind="retrieval", eval=write_shards(
            out, "eval", control_task, karpathy_samples(control_test, False, seed), shard_size)))
    spec = StreamSpec(name=name if chunks == 1 else f"{name}-{chunks}-phases", eval_classifier="task", tasks=tasks,
                      control=controls)
    return write_manifest(spec, out / MANIFEST_NAME)


# --- P9D (CTP) ---

# configs/base_seqF.yaml `task`, in order; English names for the manifest (spec §1.3).
P9D_INDUSTRIES = {
    "家居用品": "household", "家装家饰": "furnishings", "食品/保健": "food", "美容护理": "beauty",
    "服饰鞋包": "clothing",
    "车品配件": "auto", "母婴": "parenting", "运动/户外": "outdoor", "3C数码": "electronics",
}


def pre_caption(caption: str, max_words: int = 30) -> str:
    """CTP's `data/utils.py:pre_caption`: lower case, punctuation .!"()*#:;~ to spaces, collapse
    spaces, keep the first `max_words` space-separated words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def p9d_samples(items: list[tuple[str, dict]], image_dir: Path, industry: str) -> Iterator[Sample]:
    for item_id, info in items:
        yield Sample(key=key_from_path(str(item_id)), image=stored_image(image_dir / f"{item_id}.jpg", "P9D image"),
                     caption=pre_caption(str(info["title"])),
                     extra={"item_id": str(item_id), "cate_name": info.get("cate_name"), "industry": industry})


def from_p9d(root: str | os.PathLike, out_dir: str | os.PathLike, order: Literal["default", "reverse"] = "default",
             train_images: str | os.PathLike | None = None, test_images: str | os.PathLike | None = None,
             shard_size: int = MAX_SAMPLES_PER_SHARD, overwrite: bool = False) -> Path:
    """P9D's release folder -> 9 retrieval tasks (one per industry, train + its cross-modal test
    pairs); returns the manifest path. Query/gallery (multi-modal mAP) are not converted."""
    root = Path(root)
    train_dir = Path(train_images) if train_images else root / "train_images"
    test_dir = Path(test_images) if test_images else root / "gallery_images"
    train = read_json(root / "json" / "train.json", "P9D train file")
    test = read_json(root / "json" / "test.json", "P9D test file")
    if not isinstance(train, dict) or not isinstance(test, dict):
        raise SourceError(f"{root}/json/train.json must map industry -> {{item_id: info}} and test.json "
                          f"item_id -> info (CTP's format)")
    unknown = sorted(set(train) - set(P9D_INDUSTRIES))
    if unknown:
        raise SourceError(f"{root}/json/train.json has industries {unknown} that P9D does not; expected "
                          f"{list(P9D_INDUSTRIES)}")
    industries = [i for i in P9D_INDUSTRIES if i in train]
    if order == "reverse":
        industries.reverse()
    plan = []
    for industry in industries:
        train_items = list(train[industry].items())
        test_items = [(k, v) for k, v in test.items() if isinstance(v, dict) and v.get("industry_name") == industry]
        for item_id, info in train_items + test_items:
            if not isinstance(info, dict) or not isinstance(info.get("title"), str):
                raise SourceError(f"P9D item {item_id!r} ({industry}) has no `title`")
        if not test_items:
            raise SourceError(f"{root}/json/test.json has no item with industry_name {industry!r}")
        require_images([train_dir / f"{k}.jpg" for k, _ in train_items], f"P9D {industry} train")
        require_images([test_dir / f"{k}.jpg" for k, _ in test_items], f"P9D {industry} test")
        plan.append((industry, train_items, test_items))
    out = prepare_output(out_dir, overwrite)
    tasks = []
    for industry, train_items, test_items in plan:
        name = P9D_INDUSTRIES[industry]
        tasks.append(TaskSpec(name=name, kind="retrieval",
                              train=write_shards(out, "train", name, p9d_samples(train_items, train_dir, industry),
                                                 shard_size),
                              eval=write_shards(out, "eval", name, p9d_samples(test_items, test_dir, industry),
                                                shard_size)))
    spec = StreamSpec(name="p9d" if order == "default" else "p9d-reverse", eval_classifier="task", tasks=tasks)
    return write_manifest(spec, out / MANIFEST_NAME)


# --- CC3M img2dataset shards, split by instance or by class (§1.5) ---

def read_class_vocabulary(path: str | os.PathLike) -> list[tuple[str, list[tuple[str, ...]]]]:
    """`name` or `name: synonym, synonym` per line -> [(name, [token tuples to match])]."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"class list {path} does not exist")
    classes = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, synonyms = line.partition(":")
        phrases = [name] + [s for s in synonyms.split(",") if s.strip()]
        tokens = [tuple(re.findall(r"\w+", p.lower())) for p in phrases]
        if not all(tokens):
            raise SourceError(f"{path} line {number}: a class or synonym has no word characters")
        classes.append((name.strip(), tokens))
    if not classes:
        raise SourceError(f"class list {path} has no classes")
    return classes


def caption_class(caption: str, classes: list[tuple[str, list[tuple[str, ...]]]]) -> int | None:
    """[Our proposal] The class of a caption: the class whose name or synonym occurs (as whole words)
    earliest in the caption; a tie at the same position goes to the longer phrase, then the class
    listed first. None when no class occurs (the pair is left out)."""
    words = re.findall(r"\w+", caption.lower())
    best = None
    for index, (_, phrases) in enumerate(classes):
        for phrase in phrases:
            for start in range(len(words) - len(phrase) + 1):
                if tuple(words[start:start + len(phrase)]) == phrase:
                    candidate = (start, -len(phrase), index)
                    best = candidate if best is None or candidate < best else best
                    break
    return None if best is None else best[2]


def from_cc3m(shards: list[str], out_dir: str | os.PathLike, tasks: int, split: Literal["instance", "class"],
              classes_file: str | os.PathLike | None = None, eval_fraction: float = 0.05, seed: int = 0,
              name: str = "cc3m", shard_size: int = MAX_SAMPLES_PER_SHARD, overwrite: bool = False) -> Path:
    """img2dataset shards -> `tasks` retrieval tasks; returns the manifest path.

    instance: a pair goes to task floor(h * tasks), h = the seeded hash of its key in [0, 1) (equal
    sizes in expectation, the same on every machine, independent of shard order).
    class [our proposal]: each caption gets a class by `caption_class` over the class list; the
    classes, in file order, are cut into `tasks` contiguous groups; pairs matching no class are left
    out. Each task holds out `eval_fraction` of its pairs (by key hash) as its eval set. The source
    shards are read twice per task (train, eval).
    """
    if tasks < 1:
        raise SourceError(f"--tasks must be at least 1, got {tasks}")
    try:
        urls = expand_shards(shards)
    except ManifestError as err:
        raise SourceError(str(err)) from None
    vocabulary = None
    if split == "class":
        if classes_file is None:
            raise SourceError("the class split needs a class list (--classes FILE: one class per line, optionally "
                              "`name: synonym, synonym`)")
        vocabulary = read_class_vocabulary(classes_file)
        if len(vocabulary) < tasks:
            raise SourceError(f"{classes_file} lists {len(vocabulary)} classes, fewer than the {tasks} tasks")
        groups = contiguous_chunks(list(range(len(vocabulary))), tasks)
        task_of_class = {c: t for t, group in enumerate(groups) for c in group}

    def task_of(sample: Sample) -> int | None:
        if vocabulary is None:
            digest = hashlib.sha256(f"chunk:{seed}:{sample.key}".encode()).digest()
            return int(int.from_bytes(digest[:8], "big") / 2**64 * tasks)
        found = caption_class(sample.caption, vocabulary)
        return None if found is None else task_of_class[found]

    def chosen(task: int, evaluation: bool) -> Iterator[Sample]:
        for sample in resplit_samples(urls, "CC3M shards"):
            if task_of(sample) == task and is_eval_key(sample.key, eval_fraction, seed) == evaluation:
                yield Sample(key=sample.key, image=sample.image, caption=sample.caption)

    out = prepare_output(out_dir, overwrite)
    specs = []
    for task in range(tasks):
        if vocabulary is not None:
            names = [vocabulary[c][0] for c in groups[task]]
            task_name = f"{name}-{safe_name(names[0])}-to-{safe_name(names[-1])}" if len(names) > 1 else \
                f"{name}-{safe_name(names[0])}"
        else:
            task_name = f"{name}-{task + 1}"
        specs.append(TaskSpec(name=task_name, kind="retrieval",
                              train=write_shards(out, "train", task_name, chosen(task, False), shard_size),
                              eval=write_shards(out, "eval", task_name, chosen(task, True), shard_size)))
    spec = StreamSpec(name=f"{name}-{split}-{tasks}", eval_classifier="task", tasks=specs)
    return write_manifest(spec, out / MANIFEST_NAME)


# --- Reference data (ZSCL) ---

def read_captions(path: str | os.PathLike) -> list[str]:
    """Captions from CC3M's TSV (caption<TAB>url, no header) or a plain list (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"caption file {path} does not exist")
    with path.open(encoding="utf-8", newline="") as handle:
        if path.suffix.lower() == ".tsv":
            captions = [row[0].strip() for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
        else:
            captions = [line.strip() for line in handle]
    captions = [c for c in captions if c]
    if not captions:
        raise SourceError(f"caption file {path} holds no caption")
    return captions


def folder_images(root: Path) -> list[Path]:
    """Image files of a class-folder tree (ImageNet train: root/<wnid>/<image>.JPEG), sorted."""
    if not root.is_dir():
        raise SourceError(f"image folder {root} does not exist or is not a folder")
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in FILE_IMAGE_SUFFIXES)
    if not images:
        raise SourceError(f"image folder {root} holds no image files (expected {root}/<class>/<image>.JPEG)")
    return images


def build_reference(images: str | os.PathLike, captions: str | os.PathLike, out_dir: str | os.PathLike,
                    samples: int | None = None, seed: int = 0, name: str = "reference",
                    shard_size: int = MAX_SAMPLES_PER_SHARD, overwrite: bool = False) -> Path:
    """Reference pairs for `data.reference`; returns the manifest path.

    ZSCL draws reference images (ImageNet train) and reference texts (CC3M captions) independently:
    an image and a caption share nothing. Here `samples` images (all when None) are drawn from the
    folder with `seed`, and the captions, shuffled with `seed`, are dealt to them in turn (caption
    i mod N), so every caption is used once before any repeats. `captions.txt` beside the manifest
    holds every caption, for a loader that takes the texts apart from the images. The eval split
    points at the train shards: a reference stream is never trained or scored.
    """
    image_root = Path(images)
    files = folder_images(image_root)
    texts = read_captions(captions)
    rng = random.Random(seed)
    if samples is not None:
        if samples < 1:
            raise SourceError(f"--samples must be at least 1, got {samples}")
        files = sorted(rng.sample(files, min(samples, len(files))))
    dealt = texts[:]
    random.Random(f"{seed}:captions").shuffle(dealt)
    out = prepare_output(out_dir, overwrite)

    def pairs() -> Iterator[Sample]:
        for index, path in enumerate(files):
            yield Sample(key=key_from_path(path.relative_to(image_root).as_posix()),
                         image=stored_image(path, f"reference image folder {image_root}"),
                         caption=dealt[index % len(dealt)])

    train = write_shards(out, "train", name, pairs(), shard_size)
    (out / REFERENCE_CAPTIONS_NAME).write_text("\n".join(texts) + "\n", encoding="utf-8")
    task = TaskSpec(name=name, kind="retrieval", train=train, eval=train)
    return write_manifest(StreamSpec(name=name, eval_classifier="task", tasks=[task]), out / MANIFEST_NAME)


def reference_captions(manifest: str | os.PathLike) -> list[str] | None:
    """Every caption of a reference stream built by `build_reference` (its captions.txt), for a loader
    that takes ZSCL's reference texts apart from the images; None for a stream without the file."""
    path = Path(manifest).parent / REFERENCE_CAPTIONS_NAME
    if not path.is_file():
        return None
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


__all__ = ["P9D_INDUSTRIES", "build_reference", "caption_class", "from_cc3m", "from_karpathy", "from_p9d",
           "pre_caption", "read_captions", "reference_captions"]
