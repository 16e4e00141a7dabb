"""Build a stream (shards + manifest) from data people already have.

* `from_image_folder`: `root/<class>/<image>`. Classes in sorted order are cut into tasks of
  `classes_per_task` (class-incremental); captions come from prompt templates.
* `from_table`: a CSV or JSONL table with an image path and a caption per row, plus optional
  `label` (class name: the task becomes classification) and `task` columns (several tasks, in
  first-seen order). Without labels a task is image-text retrieval.
* `from_img2dataset`: existing img2dataset shards per task. With separate eval shards the manifest
  points at them (or copies them); with one set, the samples are re-split into new shards.

Train/eval split: a sample goes to eval when a seeded hash of its key falls below
`eval_fraction`, so the split is the same on every machine and does not move when samples are
added. Every input problem raises SourceError naming the file or row.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Literal

from PIL import Image, UnidentifiedImageError

from streams.check import read_shard_samples, shard_counts
from streams.errors import ManifestError, SourceError
from streams.manifest import ShardSet, StreamSpec, TaskSpec, expand_shards, is_url, write_manifest
from streams.writer import IMAGE_EXTENSIONS, Sample, write_split

FILE_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
DEFAULT_TEMPLATES = ["a photo of a {}."]
MANIFEST_NAME = "manifest.yaml"


def is_eval_key(key: str, eval_fraction: float, seed: int = 0) -> bool:
    """Deterministic split: the seeded hash of the key, read as a number in [0, 1), below the fraction."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def key_from_path(relative: str) -> str:
    """A webdataset-safe key from a relative file path (`cat/img 1.jpg` -> `cat_img_1_jpg`)."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", relative)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name) or "task"


def encoded_image(path: Path, where: str) -> Image.Image | bytes:
    """The image at `path`: its own bytes when they are JPEG/PNG/WebP, else a decoded RGB image."""
    if not path.is_file():
        raise SourceError(f"{where}: image file {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            if image.format in ("JPEG", "PNG", "WEBP"):
                return path.read_bytes()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise SourceError(f"{where}: {path} is not a readable image ({type(err).__name__}: {err}); "
                          f"fix or remove it") from None


def stored_image(path: Path, where: str) -> Image.Image | bytes:
    """The file's own bytes when they are JPEG/PNG/WebP (by signature, without decoding: fast on
    millions of files; `vlcl streams check` decodes), else the decoded RGB image."""
    from streams.writer import image_extension

    try:
        data = path.read_bytes()
    except OSError as err:
        raise SourceError(f"{where}: cannot read image file {path} ({err})") from None
    try:
        image_extension(data)
        return data
    except SourceError:
        pass
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise SourceError(f"{where}: {path} is not a readable image ({type(err).__name__}: {err}); "
                          f"fix or remove it") from None


def caption_for(class_name: str, key: str, templates: list[str], seed: int) -> str:
    """One template per sample, picked by the seeded key so rebuilding gives the same captions."""
    rng = random.Random(f"{seed}:{key}")
    return rng.choice(templates).format(class_name)


def check_fraction(eval_fraction: float) -> None:
    if not 0 < eval_fraction < 1:
        raise SourceError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")


def write_task(out_dir: Path, name: str, kind: str, classes: list[str], templates: list[str],
               samples: list[Sample], eval_fraction: float, seed: int, max_samples_per_shard: int) -> TaskSpec:
    """Split `samples` by key hash and write both splits of one task."""
    eval_samples = [s for s in samples if is_eval_key(s.key, eval_fraction, seed)]
    train_samples = [s for s in samples if not is_eval_key(s.key, eval_fraction, seed)]
    for split, chosen in (("train", train_samples), ("eval", eval_samples)):
        if not chosen:
            raise SourceError(f"task {name!r} gets no {split} samples out of {len(samples)} with eval_fraction "
                              f"{eval_fraction}; add samples or change the fraction")
    splits = {}
    for split, chosen in (("train", train_samples), ("eval", eval_samples)):
        written = write_split(chosen, out_dir / split, safe_name(name), max_samples_per_shard)
        splits[split] = ShardSet(shards=[f"{split}/{p.name}" for p in written.shards], samples=written.samples)
    return TaskSpec(name=name, kind=kind, classes=classes, templates=templates, **splits)


def prepare_output(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_NAME).exists() or (out_dir / "train").exists() or (out_dir / "eval").exists():
        if not overwrite:
            raise SourceError(f"{out_dir} already holds a stream; choose another folder or pass overwrite")
        for part in ("train", "eval"):
            shutil.rmtree(out_dir / part, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def from_image_folder(root: str | os.PathLike, out_dir: str | os.PathLike, name: str | None = None,
                      classes_per_task: int | None = None, templates: list[str] | None = None,
                      eval_fraction: float = 0.2, seed: int = 0,
                      eval_classifier: Literal["task", "stream"] = "stream",
                      max_samples_per_shard: int = 1000, overwrite: bool = False) -> Path:
    """`root/<class>/<image>` -> class-incremental stream; returns the manifest path.

    Classes are the sub-folders in sorted order; each task takes the next `classes_per_task`
    (all classes in one task when None). Files starting with '.' are ignored; any other non-image
    file is an error, so nothing is dropped silently.
    """
    root = Path(root)
    templates = templates or DEFAULT_TEMPLATES
    check_fraction(eval_fraction)
    if not root.is_dir():
        raise SourceError(f"image folder {root} does not exist or is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise SourceError(f"image folder {root} has no class sub-folders; expected {root}/<class>/<image>")
    stray = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if stray:
        raise SourceError(f"image folder {root} has files beside the class folders ({stray[:5]}); "
                          f"images belong in {root}/<class>/")
    per_task = classes_per_task or len(class_dirs)
    if per_task < 1:
        raise SourceError(f"classes_per_task must be at least 1, got {classes_per_task}")
    out = prepare_output(out_dir, overwrite)
    tasks = []
    for first in range(0, len(class_dirs), per_task):
        task_dirs = class_dirs[first:first + per_task]
        classes = [d.name for d in task_dirs]
        samples = []
        for label, class_dir in enumerate(task_dirs):
            files = sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not files:
                raise SourceError(f"class folder {class_dir} holds no images")
            for path in files:
                relative = path.relative_to(root).as_posix()
                if path.suffix.lower() not in FILE_IMAGE_SUFFIXES:
                    raise SourceError(f"{path} is not an image file (suffix {path.suffix!r}); remove it or move it "
                                      f"out of {root}")
                key = key_from_path(relative)
                samples.append(Sample(key=key, image=encoded_image(path, f"image folder {root}"),
                                      caption=caption_for(class_dir.name, key, templates, seed),
                                      label=label, class_name=class_dir.name))
        task_name = "-".join(classes) if len(classes) <= 3 else f"{classes[0]}-to-{classes[-1]}"
        tasks.append(write_task(out, task_name, "classification", classes, templates, samples,
                                eval_fraction, seed, max_samples_per_shard))
    spec = StreamSpec(name=name or root.name, eval_classifier=eval_classifier, tasks=tasks)
    return write_manifest(spec, out / MANIFEST_NAME)


def read_table(path: Path) -> Iterator[tuple[int, dict]]:
    """(row number as a person counts it, row dict) from a .csv or .jsonl/.json-lines file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=2):  # row 1 is the header
                yield number, row
    elif suffix in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SourceError(f"{path} line {number} is not valid JSON ({err})") from None
                if not isinstance(row, dict):
                    raise SourceError(f"{path} line {number} is not a JSON object")
                yield number, row
    else:
        raise SourceError(f"table {path} must be a .csv or .jsonl file")


def from_table(table: str | os.PathLike, out_dir: str | os.PathLike, name: str | None = None,
               image_column: str = "image", caption_column: str = "caption", label_column: str = "label",
               task_column: str = "task", templates: list[str] | None = None, eval_fraction: float = 0.2,
               seed: int = 0, eval_classifier: Literal["task", "stream"] = "task",
               max_samples_per_shard: int = 1000, overwrite: bool = False) -> Path:
    """A table of (image path, caption[, label][, task]) -> stream; returns the manifest path.

    Image paths are relative to the table's folder (or absolute). A task is classification when
    the label column exists (then every row needs a label; classes in sorted order), else
    retrieval. Without a task column all rows form one task named after the table.
    """
    table = Path(table)
    check_fraction(eval_fraction)
    if not table.is_file():
        raise SourceError(f"table {table} does not exist")
    rows_by_task: dict[str, list[tuple[int, dict]]] = {}
    has_labels = None
    for number, row in read_table(table):
        for column in (image_column, caption_column):
            if column not in row:
                raise SourceError(f"{table} row {number} has no column {column!r} (columns: {sorted(row)}); "
                                  f"name the right one with the image/caption column options")
        row_has_label = label_column in row
        if has_labels is None:
            has_labels = row_has_label
        elif row_has_label != has_labels:
            raise SourceError(f"{table} row {number}: column {label_column!r} is "
                              f"{'present' if row_has_label else 'missing'} unlike in earlier rows")
        task = str(row.get(task_column) or table.stem)
        rows_by_task.setdefault(task, []).append((number, row))
    if not rows_by_task:
        raise SourceError(f"table {table} has no rows")
    out = prepare_output(out_dir, overwrite)
    tasks = []
    seen_keys: dict[str, int] = {}
    for task_name, rows in rows_by_task.items():
        classes: list[str] = []
        if has_labels:
            for number, row in rows:
                label = row[label_column]
                if label is None or str(label).strip() == "":
                    raise SourceError(f"{table} row {number} has an empty {label_column!r}; every row of a "
                                      f"classification table needs one")
            classes = sorted({str(row[label_column]).strip() for _, row in rows})
        samples = []
        for number, row in rows:
            where = f"{table} row {number}"
            caption = row[caption_column]
            if not isinstance(caption, str) or not caption.strip():
                raise SourceError(f"{where} has an empty caption in column {caption_column!r}")
            image_path = Path(str(row[image_column]))
            if not image_path.is_absolute():
                image_path = table.parent / image_path
            key = key_from_path(str(row[image_column]))
            if key in seen_keys:
                key = f"{key}_r{number}"  # the same image may appear with several captions
            seen_keys[key] = number
            class_name = str(row[label_column]).strip() if has_labels else None
            samples.append(Sample(key=key, image=encoded_image(image_path, where), caption=caption.strip(),
                                  label=classes.index(class_name) if class_name is not None else None,
                                  class_name=class_name))
        kind = "classification" if has_labels else "retrieval"
        tasks.append(write_task(out, task_name, kind, classes, templates or DEFAULT_TEMPLATES, samples,
                                eval_fraction, seed, max_samples_per_shard))
    spec = StreamSpec(name=name or table.stem, eval_classifier=eval_classifier, tasks=tasks)
    return write_manifest(spec, out / MANIFEST_NAME)


def class_order(pairs: set[tuple[int | None, str | None]]) -> list[str]:
    """Class names in label order when the samples' (label, class) pairs define one, else sorted."""
    names = sorted({name for _, name in pairs if name is not None})
    by_label = {label: name for label, name in pairs if label is not None and name is not None}
    consistent = (len(by_label) == len(names) == len({(l, n) for l, n in pairs if n is not None})
                  and sorted(by_label) == list(range(len(names))))
    return [by_label[i] for i in range(len(names))] if consistent else names


def describe_shards(urls: list[str], classes: list[str] | None, source: str) -> tuple[int, list[str]]:
    """(sample count, class names) of a shard set; class names from the samples' .json when not given."""
    total, pairs = 0, set()
    for url in urls:
        count, shard_pairs = shard_counts(url)
        total += count
        pairs |= shard_pairs
    if total == 0:
        raise SourceError(f"{source}: the shards hold no samples")
    found = class_order(pairs)
    if classes:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise SourceError(f"{source}: samples name classes {unknown} that are not among {classes}")
        return total, classes
    if any(label is not None for label, _ in pairs) and not found:
        raise SourceError(f"{source}: samples carry integer labels but no class names; give the class names "
                          f"(label i means classes[i])")
    return total, found


def from_img2dataset(tasks: list[tuple[str, str, str | None]], out_dir: str | os.PathLike, name: str,
                     classes: dict[str, list[str]] | None = None, templates: list[str] | None = None,
                     eval_fraction: float = 0.2, seed: int = 0, copy: bool = False,
                     eval_classifier: Literal["task", "stream"] = "task",
                     max_samples_per_shard: int = 1000, overwrite: bool = False) -> Path:
    """Existing img2dataset shards, one (task name, train pattern, eval pattern or None) per task.

    With an eval pattern the manifest points at the given shards (absolute paths or URLs), or at
    copies under `out_dir` with `copy`. Without one, the task's samples are re-split by key hash
    and written as new shards under `out_dir`. A task whose samples carry `class` names (or that
    is given `classes`) is classification; otherwise retrieval.
    """
    check_fraction(eval_fraction)
    if not tasks:
        raise SourceError("give at least one task: (name, train shards, eval shards or none)")
    out = prepare_output(out_dir, overwrite)
    task_specs = []
    for task_name, train_pattern, eval_pattern in tasks:
        given = (classes or {}).get(task_name)
        source = f"task {task_name!r}"
        try:
            train_urls = expand_shards([train_pattern])
            eval_urls = expand_shards([eval_pattern]) if eval_pattern else []
        except ManifestError as err:
            raise SourceError(f"{source}: {err}") from None
        if eval_urls:
            train_count, train_classes = describe_shards(train_urls, given, f"{source} train shards")
            eval_count, eval_classes = describe_shards(eval_urls, given or train_classes, f"{source} eval shards")
            task_classes = given or train_classes
            splits = {}
            for split, urls, count in (("train", train_urls, train_count), ("eval", eval_urls, eval_count)):
                if copy:
                    (out / split).mkdir(parents=True, exist_ok=True)
                    listed = []
                    for index, url in enumerate(urls):
                        if is_url(url):
                            raise SourceError(f"{source}: copying remote shard {url} is not supported; "
                                              f"leave out copy to point at it")
                        target = out / split / f"{safe_name(task_name)}-{index:06d}.tar"
                        shutil.copyfile(url, target)
                        listed.append(f"{split}/{target.name}")
                else:
                    listed = [url if is_url(url) else str(Path(url).resolve()) for url in urls]
                splits[split] = ShardSet(shards=listed, samples=count)
        else:
            samples = list(resplit_samples(train_urls, source))
            task_classes = given or class_order({(s.label, s.class_name) for s in samples})
            if any(s.class_name is None and s.label is not None for s in samples) and not given:
                raise SourceError(f"{source}: samples carry integer labels but no class names; give the class "
                                  f"names (label i means classes[i])")
            samples = [relabel(s, task_classes, source) for s in samples]
            spec = write_task(out, task_name, "classification" if task_classes else "retrieval", task_classes,
                              templates or DEFAULT_TEMPLATES, samples, eval_fraction, seed, max_samples_per_shard)
            task_specs.append(spec)
            continue
        task_specs.append(TaskSpec(name=task_name, kind="classification" if task_classes else "retrieval",
                                   classes=task_classes, templates=templates or DEFAULT_TEMPLATES, **splits))
    spec = StreamSpec(name=name, eval_classifier=eval_classifier, tasks=task_specs)
    return write_manifest(spec, out / MANIFEST_NAME)


def resplit_samples(urls: list[str], source: str) -> Iterable[Sample]:
    """The samples of existing shards as `Sample`s (image bytes kept as they are)."""
    for url in urls:
        for key, files in read_shard_samples(url):
            where = f"{source}: shard {url} sample {key!r}"
            image = next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)
            if image is None:
                raise SourceError(f"{where} has no image ({sorted(files)})")
            if "txt" not in files:
                raise SourceError(f"{where} has no caption (.txt)")
            meta = {}
            if "json" in files:
                try:
                    meta = json.loads(files["json"])
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise SourceError(f"{where} has a .json that does not parse ({err})") from None
            label = meta.get("label") if isinstance(meta, dict) else None
            class_name = meta.get("class") if isinstance(meta, dict) else None
            if not (image.startswith(b"\x89PNG") or image.startswith(b"\xff\xd8\xff")):
                try:
                    with Image.open(io.BytesIO(image)) as decoded:
                        image = decoded.convert("RGB")
                except (UnidentifiedImageError, OSError) as err:
                    raise SourceError(f"{where}: image does not decode ({err})") from None
            yield Sample(key=key_from_path(key), image=image, caption=files["txt"].decode("utf-8"),
                         label=label if isinstance(label, int) else None,
                         class_name=class_name if isinstance(class_name, str) else None)


def relabel(sample: Sample, classes: list[str], source: str) -> Sample:
    """Labels index the task's class list; fill whichever of label/class is missing."""
    if not classes:
        return sample
    class_name = sample.class_name
    if class_name is None:
        if sample.label is None or not 0 <= sample.label < len(classes):
            raise SourceError(f"{source}: sample {sample.key!r} has label {sample.label} and no class name, which "
                              f"does not fit the {len(classes)} classes {classes}")
        class_name = classes[sample.label]
    if class_name not in classes:
        raise SourceError(f"{source}: sample {sample.key!r} has class {class_name!r}, not among {classes}")
    return Sample(key=sample.key, image=sample.image, caption=sample.caption, label=classes.index(class_name),
                  class_name=class_name)
