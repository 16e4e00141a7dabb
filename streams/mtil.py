"""MTIL (spec methods.md §1.1): the 11 datasets as torchvision keeps them on disk -> one stream.

`build_mtil(root, out_dir)` reads each dataset with torchvision's own class (`download=False`) from
`root` (the folder given as every class's `root`, as the ZSCL harness's `--data-location`), and
writes one classification task per dataset: the harness's class names and templates
(streams/mtil_classes.py), its splits, evaluated task-incrementally (`eval_classifier: task`, each
task scored over its own classes). Splits:

* official torchvision train/test for Aircraft (train/test), CIFAR100, DTD (train1/test1),
  Flowers102 (train/test), Food101, MNIST, OxfordPet (trainval/test), StanfordCars;
* Caltech101, EuroSAT and SUN397: 80/20 as the harness's `torch.utils.data.random_split(dataset,
  [int(0.8 n), n - int(0.8 n)], generator=torch.Generator().manual_seed(42))` over torchvision's
  sample order. That order is fixed for Caltech101 (sorted categories, image_0001...) and EuroSAT
  (an ImageFolder, sorted); torchvision lists SUN397 in filesystem order (`rglob`), so SUN397's
  files are sorted by path first: the split is the same on every machine, and equal to a harness
  run's only where its `rglob` happened to return sorted paths.

Every dataset is checked (its files, then torchvision opening it) before any shard is written;
all missing or malformed ones are reported together, each with the path looked in and the layout
torchvision expects. Few-shot (`few_shot=N`) keeps N seeded training images per class; evaluation
always uses the whole test split. Image files are stored byte for byte (JPEG/PNG); array datasets
(MNIST, CIFAR) are stored as PNG. Shards are written once; `manifest.yaml` lists the tasks in the
chosen order and `manifest-order-I.yaml` / `manifest-order-II.yaml` list the same shards in each
order, so switching order needs no rebuild.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from streams.converters import MANIFEST_NAME, key_from_path, prepare_output, safe_name, stored_image
from streams.errors import MissingDatasetError, SourceError
from streams.manifest import ShardSet, StreamSpec, TaskSpec, write_manifest
from streams.mtil_classes import (AIRCRAFT, CALTECH, CARS, CIFAR10, CIFAR100, CLASS_NAMES, CONTROLS, DTD, EUROSAT,
                                  EUROSAT_FOLDERS, FLOWERS, FOOD, MNIST, ORDERS, PET, SUN, TEMPLATES,
                                  harness_class_name)
from streams.writer import Sample, write_split

BUILD_INFO_NAME = "build.yaml"
SPLIT_SEED = 42          # the harness's random_split generator seed
TRAIN_FRACTION = 0.8     # the harness's split_dataset ratio
MAX_SAMPLES_PER_SHARD = 1000


@dataclass(frozen=True)
class Dataset:
    """Where torchvision looks for one dataset under `root`, and how the harness splits it."""

    task: str
    torchvision_class: str
    required: tuple[str, ...]   # paths relative to root that torchvision opens
    layout: str                 # the layout, for error messages
    official_split: bool        # False: the harness's seeded 80/20 split of one set
    source: str                 # where to get it


DATASETS: dict[str, Dataset] = {d.task: d for d in (
    Dataset(AIRCRAFT, "FGVCAircraft",
            ("fgvc-aircraft-2013b/data/variants.txt", "fgvc-aircraft-2013b/data/images_variant_train.txt",
             "fgvc-aircraft-2013b/data/images_variant_test.txt", "fgvc-aircraft-2013b/data/images"),
            "ROOT/fgvc-aircraft-2013b/data/{variants.txt, images_variant_train.txt, images_variant_test.txt, "
            "images/<id>.jpg}", True, "fgvc-aircraft-2013b.tar.gz (robots.ox.ac.uk), extracted in ROOT"),
    Dataset(CALTECH, "Caltech101", ("caltech101/101_ObjectCategories",),
            "ROOT/caltech101/101_ObjectCategories/<category>/image_0001.jpg ... (102 folders with "
            "BACKGROUND_Google, which torchvision drops)", False, "caltech-101.zip (data.caltech.edu), "
            "101_ObjectCategories.tar.gz extracted in ROOT/caltech101"),
    Dataset(CIFAR100, "CIFAR100",
            ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
            "ROOT/cifar-100-python/{train, test, meta} (the python pickles; torchvision checks their md5)", True,
            "cifar-100-python.tar.gz (cs.toronto.edu), extracted in ROOT"),
    Dataset(DTD, "DTD", ("dtd/dtd/images", "dtd/dtd/labels/train1.txt", "dtd/dtd/labels/test1.txt"),
            "ROOT/dtd/dtd/{images/<class>/<image>.jpg, labels/train1.txt, labels/test1.txt} (lines "
            "'<class>/<image>.jpg')", True, "dtd-r1.0.1.tar.gz (robots.ox.ac.uk), extracted in ROOT/dtd"),
    Dataset(EUROSAT, "EuroSAT", ("eurosat/2750",),
            f"ROOT/eurosat/2750/<class>/<image>.jpg with the 10 class folders {', '.join(EUROSAT_FOLDERS)}",
            False, "EuroSAT.zip (RGB), extracted in ROOT/eurosat"),
    Dataset(FLOWERS, "Flowers102",
            ("flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"),
            "ROOT/flowers-102/{jpg/image_00001.jpg ..., imagelabels.mat (labels 1..102), setid.mat (trnid, "
            "valid, tstid)}", True, "102flowers.tgz + imagelabels.mat + setid.mat (robots.ox.ac.uk), in "
            "ROOT/flowers-102"),
    Dataset(FOOD, "Food101", ("food-101/images", "food-101/meta/train.json", "food-101/meta/test.json"),
            "ROOT/food-101/{images/<class>/<id>.jpg, meta/train.json, meta/test.json}", True,
            "food-101.tar.gz (data.vision.ee.ethz.ch), extracted in ROOT"),
    Dataset(MNIST, "MNIST",
            tuple(f"MNIST/raw/{name}" for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                   "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
            "ROOT/MNIST/raw/{train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            "t10k-labels-idx1-ubyte} (uncompressed IDX files)", True, "the four MNIST .gz files, gunzipped"),
    Dataset(PET, "OxfordIIITPet",
            ("oxford-iiit-pet/images", "oxford-iiit-pet/annotations/trainval.txt",
             "oxford-iiit-pet/annotations/test.txt"),
            "ROOT/oxford-iiit-pet/{images/<Breed>_<n>.jpg, annotations/trainval.txt, annotations/test.txt}",
            True, "images.tar.gz + annotations.tar.gz (robots.ox.ac.uk), extracted in ROOT/oxford-iiit-pet"),
    Dataset(CARS, "StanfordCars",
            ("stanford_cars/devkit/cars_meta.mat", "stanford_cars/devkit/cars_train_annos.mat",
             "stanford_cars/cars_train", "stanford_cars/cars_test", "stanford_cars/cars_test_annos_withlabels.mat"),
            "ROOT/stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, cars_test/, "
            "cars_test_annos_withlabels.mat}", True,
            "the Stanford Cars files by hand (torchvision's download URL is gone; a mirror such as Kaggle's)"),
    Dataset(SUN, "SUN397", ("SUN397/ClassName.txt",),
            "ROOT/SUN397/{ClassName.txt, <letter>/<class>[/<sub>]/sun_*.jpg}", False,
            "SUN397.tar.gz (vision.princeton.edu), extracted in ROOT"),
    Dataset(CIFAR10, "CIFAR10",
            tuple(f"cifar-10-batches-py/{name}" for name in
                  ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                   "batches.meta")),
            "ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (torchvision checks their md5)",
            True, "cifar-10-python.tar.gz (cs.toronto.edu), extracted in ROOT"),
)}


@dataclass(frozen=True)
class Item:
    """One sample of a dataset: an image file, or an image array (MNIST, CIFAR)."""

    key: str
    label: int
    path: Path | None = None
    pixels: Any = None


@dataclass
class DatasetSplits:
    task: str
    classes: list[str]
    train: list[Item]
    test: list[Item]
    notes: list[str] = field(default_factory=list)


def missing_error(dataset: Dataset, root: Path, problem: str) -> str:
    return (f"MTIL dataset {dataset.task} (torchvision {dataset.torchvision_class}, download=False): {problem}. "
            f"torchvision expects {dataset.layout.replace('ROOT', str(root))}. Get {dataset.source}")


def check_files(dataset: Dataset, root: Path) -> str | None:
    for relative in dataset.required:
        if not (root / relative).exists():
            return missing_error(dataset, root, f"{root / relative} does not exist")
    return None


def flowers_class():
    """torchvision's Flowers102 without its md5 check of imagelabels.mat/setid.mat: a copy re-saved
    with scipy (or a mirror's) holds the same arrays in different bytes; everything else is torchvision's."""
    from torchvision.datasets import Flowers102

    class Flowers102Files(Flowers102):
        def _check_integrity(self):
            return self._images_folder.is_dir() and all(
                (self._base_folder / self._file_dict[part][0]).is_file() for part in ("label", "setid"))

    return Flowers102Files


def open_torchvision(dataset: Dataset, root: Path) -> list[tuple[str, Any]]:
    """[(split, torchvision dataset)]: train and test, or one `all` set the harness splits 80/20."""
    import torchvision.datasets as tv

    name = dataset.task
    if name == FLOWERS:
        cls = flowers_class()
        return [(s, cls(str(root), split=s, download=False)) for s in ("train", "test")]
    cls = getattr(tv, dataset.torchvision_class)
    if name in (MNIST, CIFAR100, CIFAR10):
        return [(s, cls(str(root), train=s == "train", download=False)) for s in ("train", "test")]
    if name == PET:
        return [("train", cls(str(root), split="trainval", download=False)),
                ("test", cls(str(root), split="test", download=False))]
    if name in (AIRCRAFT, DTD, FOOD, CARS):
        return [(s, cls(str(root), split=s, download=False)) for s in ("train", "test")]
    return [("all", cls(str(root), download=False))]


def items_of(task: str, split: str, data, root: Path) -> list[Item]:
    """(key, label, image file or array) of a torchvision dataset, from the lists it builds on open
    (no image is decoded). Keys are the file's path under root, or `<task>-<split>-<index>`."""
    def files(pairs) -> list[Item]:
        return [Item(key=key_from_path(Path(p).relative_to(root).as_posix()), label=int(y), path=Path(p))
                for p, y in pairs]

    if hasattr(data, "data") and hasattr(data, "targets"):          # MNIST (tensor), CIFAR (ndarray)
        pixels = data.data.numpy() if hasattr(data.data, "numpy") else data.data
        return [Item(key=f"{task}-{split}-{i:05d}", label=int(y), pixels=pixels[i])
                for i, y in enumerate(list(data.targets))]
    if hasattr(data, "categories") and hasattr(data, "y"):          # Caltech101
        folder = Path(data.root) / "101_ObjectCategories"
        return files((folder / data.categories[y] / f"image_{i:04d}.jpg", y) for i, y in zip(data.index, data.y))
    for paths, labels in (("_image_files", "_labels"), ("_images", "_labels")):
        if hasattr(data, paths) and hasattr(data, labels):
            return files(zip(getattr(data, paths), getattr(data, labels)))
    for attribute in ("samples", "_samples"):                       # EuroSAT (ImageFolder), StanfordCars
        if hasattr(data, attribute):
            return files(getattr(data, attribute))
    import torchvision

    raise SourceError(f"MTIL dataset {task}: torchvision {torchvision.__version__}'s {type(data).__name__} lists "
                      f"its samples under attributes streams/mtil.py does not know; extend items_of")


def class_names(task: str, parts: list[tuple[str, Any]]) -> list[str]:
    """The harness's class names: its fixed list, or the dataset's own (train split) with '_' -> ' '."""
    data = parts[0][1]
    if task == CALTECH and len(data.categories) != len(CLASS_NAMES[CALTECH]):
        raise SourceError(f"{Path(data.root) / '101_ObjectCategories'} holds {len(data.categories)} categories "
                          f"besides BACKGROUND_Google; the harness names {len(CLASS_NAMES[CALTECH])}")
    if task == EUROSAT and list(data.classes) != EUROSAT_FOLDERS:
        raise SourceError(f"{Path(data.root) / 'eurosat' / '2750'} holds the class folders {list(data.classes)}; "
                          f"the harness's names are for {EUROSAT_FOLDERS}")
    if task in CLASS_NAMES:
        return list(CLASS_NAMES[task])
    return [harness_class_name(c) for c in data.classes]


def relabelled(test_data, train_classes: list[str], items: list[Item], task: str) -> list[Item]:
    """Test items with labels in the train split's class order (datasets that derive `classes` per split)."""
    test_classes = [harness_class_name(c) for c in getattr(test_data, "classes", train_classes)]
    if test_classes == train_classes:
        return items
    unknown = sorted(set(test_classes) - set(train_classes))
    if unknown:
        raise SourceError(f"MTIL dataset {task}: the test split has classes {unknown[:5]} that train lacks")
    index = {name: train_classes.index(name) for name in test_classes}
    return [Item(item.key, index[test_classes[item.label]], item.path, item.pixels) for item in items]


def harness_split(count: int) -> tuple[list[int], list[int]]:
    """(train, test) indices of `random_split(range(count), [int(0.8 count), rest], manual_seed(42))`."""
    import torch

    order = torch.randperm(count, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    cut = int(TRAIN_FRACTION * count)
    return sorted(order[:cut]), sorted(order[cut:])


def read_splits(task: str, root: Path) -> DatasetSplits:
    """Open one dataset with torchvision and return its classes and train/test items, as the harness
    splits them. Raises MissingDatasetError naming the path and layout when torchvision cannot open it."""
    dataset = DATASETS[task]
    problem = check_files(dataset, root)
    if problem:
        raise MissingDatasetError(problem)
    try:
        parts = open_torchvision(dataset, root)
    except (RuntimeError, OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise MissingDatasetError(missing_error(dataset, root, f"torchvision cannot read {root} "
                                                               f"({type(err).__name__}: {err})")) from None
    try:
        classes = class_names(task, parts)
    except SourceError as err:
        raise MissingDatasetError(missing_error(dataset, root, str(err))) from None
    notes = []
    if dataset.official_split:
        (_, train_data), (_, test_data) = parts
        train = items_of(task, "train", train_data, root)
        test = relabelled(test_data, classes, items_of(task, "test", test_data, root), task) \
            if task not in CLASS_NAMES else items_of(task, "test", test_data, root)
    else:
        everything = items_of(task, "all", parts[0][1], root)
        if task == SUN:
            everything.sort(key=lambda item: item.key)
            notes.append("sun397: files sorted by path before the seeded 80/20 split (torchvision lists them in "
                         "filesystem order)")
        train_idx, test_idx = harness_split(len(everything))
        train, test = [everything[i] for i in train_idx], [everything[i] for i in test_idx]
    bad = sorted({item.label for item in train + test if not 0 <= item.label < len(classes)})
    if bad:
        raise SourceError(f"MTIL dataset {task}: labels {bad[:5]} in {root} are outside the {len(classes)} classes")
    return DatasetSplits(task=task, classes=classes, train=train, test=test, notes=notes)


def few_shot_items(items: list[Item], shots: int, seed: int, task: str, classes: list[str]) -> list[Item]:
    """`shots` training items per class, drawn with a seeded RNG per task; in the split's order."""
    by_class: dict[int, list[int]] = {}
    for position, item in enumerate(items):
        by_class.setdefault(item.label, []).append(position)
    rng = random.Random(f"{seed}:{task}")
    short = {classes[c]: len(by_class.get(c, [])) for c in range(len(classes)) if len(by_class.get(c, [])) < shots}
    if short:
        raise SourceError(f"MTIL dataset {task}: --few-shot {shots} but classes {dict(list(short.items())[:5])} have "
                          f"fewer training images")
    chosen = sorted(p for c in range(len(classes)) for p in rng.sample(by_class[c], shots))
    return [items[p] for p in chosen]


def image_of(item: Item, task: str):
    """Encoded bytes of an image file (kept as they are when JPEG/PNG/WebP), or a PIL image."""
    if item.pixels is not None:
        import numpy as np
        from PIL import Image

        return Image.fromarray(np.asarray(item.pixels))
    return stored_image(item.path, f"MTIL dataset {task}")


def samples_of(items: list[Item], task: str, classes: list[str], template: str) -> Iterator[Sample]:
    for item in items:
        name = classes[item.label]
        yield Sample(key=item.key, image=image_of(item, task), caption=template.format(name), label=item.label,
                     class_name=name)


def write_shards(out: Path, split: str, task: str, samples, shard_size: int) -> ShardSet:
    written = write_split(samples, out / split, safe_name(task), shard_size)
    return ShardSet(shards=[f"{split}/{p.name}" for p in written.shards], samples=written.samples)


def stream_name(order: str, few_shot: int | None) -> str:
    return f"mtil{f'-{few_shot}shot' if few_shot else ''}-order-{order}"


def build_mtil(root: str | os.PathLike, out_dir: str | os.PathLike, order: str = "I", few_shot: int | None = None,
               seed: int = 0, controls: list[str] | None = None, tasks: list[str] | None = None,
               shard_size: int = MAX_SAMPLES_PER_SHARD, overwrite: bool = False,
               progress: Callable[[str], None] | None = None) -> Path:
    """Build the MTIL stream from the torchvision datasets under `root`; returns manifest.yaml's path.

    `order`: I or II (the manifest's task order). `few_shot`: training images per class (None = all).
    `controls`: zero-shot-only sets (`cifar10`). `tasks`: a subset of the 11 (default all), kept in
    the protocol's order; for smoke tests on a partial download.
    """
    root = Path(root)
    if order not in ORDERS:
        raise SourceError(f"MTIL order {order!r} is not one of {', '.join(ORDERS)}")
    if few_shot is not None and few_shot < 1:
        raise SourceError(f"--few-shot must be at least 1, got {few_shot}")
    controls = list(controls or [])
    unknown = [c for c in controls if c not in CONTROLS]
    chosen = list(tasks) if tasks else list(ORDERS["I"])
    unknown += [t for t in chosen if t not in ORDERS["I"]]
    if unknown:
        raise SourceError(f"unknown MTIL datasets {unknown}; tasks are {', '.join(ORDERS['I'])}; controls "
                          f"{', '.join(CONTROLS)}")
    if not root.is_dir():
        raise MissingDatasetError(f"MTIL data root {root} does not exist or is not a folder; it must hold the "
                                  f"datasets as torchvision keeps them (download=False)")
    report = progress or (lambda line: None)

    # Everything is opened before anything is written, and every problem is reported at once.
    opened: dict[str, DatasetSplits] = {}
    problems = []
    for task in chosen + controls:
        try:
            opened[task] = read_splits(task, root)
        except SourceError as err:
            problems.append(str(err))
    if problems:
        raise MissingDatasetError(f"{len(problems)} of the {len(chosen + controls)} MTIL datasets cannot be read "
                                  f"under {root}:\n  " + "\n  ".join(problems))
    train_items = {task: few_shot_items(opened[task].train, few_shot, seed, task, opened[task].classes)
                   if few_shot else opened[task].train for task in chosen}

    out = prepare_output(out_dir, overwrite)
    specs: dict[str, TaskSpec] = {}
    for task in chosen + controls:
        splits = opened[task]
        templates = TEMPLATES[task]
        evaluation = write_shards(out, "eval", task, samples_of(splits.test, task, splits.classes, templates[0]),
                                  shard_size)
        train = None if task in controls else write_shards(
            out, "train", task, samples_of(train_items[task], task, splits.classes, templates[0]), shard_size)
        specs[task] = TaskSpec(name=task, kind="classification", classes=splits.classes, templates=templates,
                               train=train, eval=evaluation)
        report(f"  {task}: {len(splits.classes)} classes, train {train.samples if train else 0}, "
               f"eval {evaluation.samples}")

    manifests = {}
    for name in ORDERS:
        ordered = [specs[t] for t in ORDERS[name] if t in chosen]
        spec = StreamSpec(name=stream_name(name, few_shot), eval_classifier="task", tasks=ordered,
                          control=[specs[c] for c in controls])
        manifests[name] = write_manifest(spec, out / f"manifest-order-{name}.yaml")
    (out / MANIFEST_NAME).write_text(manifests[order].read_text())
    info = {"protocol": "MTIL (ZSCL), spec methods.md §1.1", "root": str(root.resolve()), "order": order,
            "few_shot": few_shot, "seed": seed, "controls": controls, "tasks": chosen,
            "torchvision": torchvision_version(),
            "samples": {t: {"train": s.train.samples if s.train else 0, "eval": s.eval.samples}
                        for t, s in specs.items()},
            "notes": [n for t in chosen + controls for n in opened[t].notes]}
    (out / BUILD_INFO_NAME).write_text(yaml.safe_dump(info, sort_keys=False))
    return out / MANIFEST_NAME


def torchvision_version() -> str:
    import torchvision

    return torchvision.__version__


__all__ = ["DATASETS", "MissingDatasetError", "build_mtil", "harness_split", "read_splits"]
