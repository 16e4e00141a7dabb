"""MTIL stream builder on small on-disk copies of torchvision's real layouts, made from real images
that scikit-learn ships (its handwritten digits, as MNIST IDX files and as the DTD, EuroSAT and
Flowers102 photos): nothing to install."""
import argparse
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streams.check import check_stream, read_shard_samples
from streams.cli import add_streams_commands
from streams.errors import SourceError
from streams.manifest import load_stream
from streams.mtil import MissingDatasetError, build_mtil
from streams.mtil_classes import EUROSAT_CLASSES, EUROSAT_FOLDERS, FLOWERS_CLASSES, LEARNING_RATES, ORDERS, TEMPLATES

MNIST_NAMES = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
               "8 - eight", "9 - nine"]
DTD_CLASSES = ["banded", "cracked", "zigzagged"]


def write_idx(path, array):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.tobytes())


def digit_cells():
    """scikit-learn's 1,797 handwritten digits as 20x20 white-on-black cells (MNIST's look) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    cells = [np.asarray(Image.fromarray((image * (255 / 16)).round().astype(np.uint8)).resize(
        (20, 20), Image.Resampling.BICUBIC)) for image in digits.images]
    return np.stack(cells), digits.target.astype(np.uint8)


def photos(count):
    """`count` distinct real images (handwritten digits, dark on white) as 32x32 JPEG bytes."""
    from sklearn.datasets import load_digits

    from streams.builtin import digit_image

    out = []
    for pixels in load_digits().images[-count:]:
        buffer = io.BytesIO()
        digit_image(pixels).save(buffer, format="JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


@pytest.fixture(scope="module")
def mtil_root(tmp_path_factory):
    """ROOT with MNIST, DTD, EuroSAT and Flowers102 exactly where torchvision looks for them."""
    from scipy.io import savemat

    root = tmp_path_factory.mktemp("torchvision")
    cells, labels = digit_cells()
    by_class = [np.flatnonzero(labels == d) for d in range(10)]
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, offset, per_class in (("train", 0, 10), ("t10k", 40, 3)):
        indices = [by_class[d][offset + i] for i in range(per_class) for d in range(10)]
        write_idx(raw / f"{prefix}-images-idx3-ubyte", np.pad(cells[indices], ((0, 0), (4, 4), (4, 4))))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[indices])
    images = iter(photos(90))

    dtd = root / "dtd" / "dtd"
    lines = {"train1": [], "val1": [], "test1": []}
    for name in DTD_CLASSES:
        (dtd / "images" / name).mkdir(parents=True)
        for i, split in enumerate(["train1", "train1", "val1", "test1", "test1"]):
            (dtd / "images" / name / f"{name}_{i:04d}.jpg").write_bytes(next(images))
            lines[split].append(f"{name}/{name}_{i:04d}.jpg")
    (dtd / "labels").mkdir()
    for split, entries in lines.items():
        (dtd / "labels" / f"{split}.txt").write_text("\n".join(entries) + "\n")

    for folder in EUROSAT_FOLDERS:
        (root / "eurosat" / "2750" / folder).mkdir(parents=True)
        for i in range(6):
            (root / "eurosat" / "2750" / folder / f"{folder}_{i + 1}.jpg").write_bytes(next(images))

    flowers = root / "flowers-102"
    (flowers / "jpg").mkdir(parents=True)
    flower_labels = [1, 1, 1, 2, 2, 2, 102, 102, 102, 50]
    for image_id in range(1, len(flower_labels) + 1):
        (flowers / "jpg" / f"image_{image_id:05d}.jpg").write_bytes(next(images))
    savemat(flowers / "imagelabels.mat", {"labels": np.array([flower_labels], dtype=np.uint8)})
    savemat(flowers / "setid.mat", {"trnid": np.array([[1, 4, 7]]), "valid": np.array([[2, 5]]),
                                    "tstid": np.array([[3, 6, 8, 9, 10]])})
    return root


FOUR = ["mnist", "dtd", "eurosat", "flowers102"]


def split_samples(spec, shard_set):
    return [(key, files) for url in spec.shard_urls(shard_set) for key, files in read_shard_samples(url)]


def test_orders_and_learning_rates_are_the_harness_ones():
    order_one = ORDERS["I"]
    assert order_one == ["fgvc-aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers102", "food101",
                         "mnist", "oxford-pet", "stanford-cars", "sun397"]
    assert ORDERS["II"] == [order_one[i] for i in [9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2]]  # results.ipynb
    assert {t for t, lr in LEARNING_RATES.items() if lr == 5e-5} == {"fgvc-aircraft", "mnist"}
    assert set(LEARNING_RATES.values()) == {5e-5, 1e-5}
    assert all("{}" in t for templates in TEMPLATES.values() for t in templates)


def test_mtil_stream_has_the_harness_classes_splits_and_templates(mtil_root, tmp_path):
    import torch
    import torchvision

    manifest = build_mtil(mtil_root, tmp_path / "mtil", tasks=FOUR)
    spec = load_stream(manifest)
    assert spec.name == "mtil-order-I" and spec.eval_classifier == "task" and not spec.control
    assert [t.name for t in spec.tasks] == ["dtd", "eurosat", "flowers102", "mnist"]  # Order I, subset
    assert [t.name for t in load_stream(tmp_path / "mtil" / "manifest-order-II.yaml").tasks] == \
        ["mnist", "flowers102", "dtd", "eurosat"]
    tasks = {t.name: t for t in spec.tasks}
    assert tasks["mnist"].classes == MNIST_NAMES
    assert tasks["dtd"].classes == DTD_CLASSES
    assert tasks["eurosat"].classes == EUROSAT_CLASSES
    assert tasks["flowers102"].classes == FLOWERS_CLASSES
    assert all(task.templates == TEMPLATES[name] for name, task in tasks.items())
    assert tasks["mnist"].templates == ['a photo of the number: "{}".'] and len(tasks["dtd"].templates) == 8
    counts = {name: (t.train.samples, t.eval.samples) for name, t in tasks.items()}
    # official splits (DTD: train1/test1, val1 unused; Flowers102: trnid/tstid, valid unused); EuroSAT 80/20
    assert counts == {"mnist": (100, 30), "dtd": (6, 6), "flowers102": (3, 5), "eurosat": (48, 12)}
    assert check_stream(spec).ok

    # EuroSAT's split is the harness's random_split(..., generator=manual_seed(42)) over torchvision's order.
    eurosat = torchvision.datasets.EuroSAT(str(mtil_root), download=False)
    n = len(eurosat.samples)
    expected_train, expected_test = torch.utils.data.random_split(
        range(n), [int(0.8 * n), n - int(0.8 * n)], generator=torch.Generator().manual_seed(42))
    def keys(indices):
        return sorted(str(Path(eurosat.samples[i][0]).relative_to(mtil_root)).replace("/", "_")
                      .replace(".", "_") for i in indices)
    assert sorted(k for k, _ in split_samples(spec, tasks["eurosat"].train)) == keys(expected_train)
    assert sorted(k for k, _ in split_samples(spec, tasks["eurosat"].eval)) == keys(expected_test)

    # Samples: the first template filled with the class name; JPEG bytes kept; MNIST pixels exact.
    for name, task in tasks.items():
        for key, files in split_samples(spec, task.train) + split_samples(spec, task.eval):
            meta = json.loads(files["json"])
            assert meta["class"] == task.classes[meta["label"]]
            assert files["txt"].decode() == TEMPLATES[name][0].format(meta["class"])
    flower_train = dict(split_samples(spec, tasks["flowers102"].train))
    assert sorted(json.loads(f["json"])["class"] for f in flower_train.values()) == \
        ["blackberry lily", "hard-leaved pocket orchid", "pink primrose"]
    assert flower_train["flowers-102_jpg_image_00004_jpg"]["jpg"] == \
        (mtil_root / "flowers-102" / "jpg" / "image_00004.jpg").read_bytes()
    mnist = torchvision.datasets.MNIST(str(mtil_root), train=False, download=False)
    key, files = split_samples(spec, tasks["mnist"].eval)[7]
    assert key == "mnist-test-00007"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(files["png"]))), mnist.data[7].numpy())
    assert json.loads(files["json"])["label"] == int(mnist.targets[7])


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="vlcl")
    add_streams_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_few_shot_from_the_command_line_is_seeded_and_keeps_the_whole_test_split(mtil_root, tmp_path, capsys):
    def build(folder, seed):
        assert run_cli(["streams", "build", "mtil", "--root", str(mtil_root), "--out", str(tmp_path / folder),
                        "--tasks", "eurosat,mnist", "--few-shot", "2", "--seed", str(seed), "--order", "II"]) == 0
        return load_stream(tmp_path / folder / "manifest.yaml")

    first, again, other = build("a", 0), build("b", 0), build("c", 1)
    assert "eurosat: 10 classes, train 20, eval 12" in capsys.readouterr().out
    assert first.name == "mtil-2shot-order-II" and [t.name for t in first.tasks] == ["mnist", "eurosat"]
    for task in first.tasks:
        train = split_samples(first, task.train)
        labels = [json.loads(f["json"])["label"] for _, f in train]
        assert sorted(labels) == sorted(list(range(len(task.classes))) * 2)
        assert [k for k, _ in train] == [k for k, _ in split_samples(again, again.tasks[first.tasks.index(task)].train)]
    assert first.tasks[0].eval.samples == 30
    with pytest.raises(SourceError, match=r"dtd: --few-shot 3 but classes \{'banded': 2, 'cracked': 2"):
        build_mtil(mtil_root, tmp_path / "short", tasks=["dtd"], few_shot=3)
    assert not (tmp_path / "short").exists()  # checked before anything is written
    assert [k for k, _ in split_samples(first, first.tasks[0].train)] != \
        [k for k, _ in split_samples(other, other.tasks[0].train)]


def test_missing_or_misplaced_datasets_fail_before_any_work_naming_path_and_layout(mtil_root, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(MissingDatasetError) as caught:
        build_mtil(mtil_root, out, controls=["cifar10"])
    message = str(caught.value)
    assert message.startswith(f"8 of the 12 MTIL datasets cannot be read under {mtil_root}")
    for name, path in [("fgvc-aircraft", "fgvc-aircraft-2013b/data/variants.txt"),
                       ("caltech101", "caltech101/101_ObjectCategories"), ("cifar100", "cifar-100-python/train"),
                       ("food101", "food-101/images"), ("oxford-pet", "oxford-iiit-pet/images"),
                       ("stanford-cars", "stanford_cars/devkit/cars_meta.mat"), ("sun397", "SUN397/ClassName.txt"),
                       ("cifar10", "cifar-10-batches-py/data_batch_1")]:
        assert f"MTIL dataset {name} (torchvision " in message and f"{mtil_root / path} does not exist" in message
    assert f"torchvision expects {mtil_root}/food-101/{{images/<class>/<id>.jpg, meta/train.json" in message
    assert "MTIL dataset mnist" not in message and not out.exists()

    # A dataset whose files are there but laid out wrongly: DTD without its test list, EuroSAT short a class.
    broken = tmp_path / "broken"
    (broken / "dtd" / "dtd").mkdir(parents=True)
    for part in ("images", "labels"):
        (broken / "dtd" / "dtd" / part).symlink_to(mtil_root / "dtd" / "dtd" / part, target_is_directory=True)
    (broken / "eurosat" / "2750").mkdir(parents=True)
    for folder in EUROSAT_FOLDERS[:-1]:
        (broken / "eurosat" / "2750" / folder).symlink_to(mtil_root / "eurosat" / "2750" / folder)
    with pytest.raises(MissingDatasetError,
                       match=r"EuroSAT.*2750 holds the class folders \[.*'River'\].*harness's names are for"):
        build_mtil(broken, out, tasks=["eurosat"])
    (broken / "dtd" / "dtd" / "labels").unlink()
    (broken / "dtd" / "dtd" / "labels").mkdir()
    (broken / "dtd" / "dtd" / "labels" / "train1.txt").write_text("banded/banded_0000.jpg\n")
    with pytest.raises(MissingDatasetError) as caught:
        build_mtil(broken, out, tasks=["dtd"])
    assert f"{broken}/dtd/dtd/labels/test1.txt does not exist" in str(caught.value)
    assert "labels/train1.txt, labels/test1.txt} (lines '<class>/<image>.jpg')" in str(caught.value)
    with pytest.raises(SourceError, match="unknown MTIL datasets \\['imagenet'\\]"):
        build_mtil(mtil_root, out, tasks=["imagenet"])


@pytest.fixture(scope="module")
def more_root(tmp_path_factory):
    """ROOT with Aircraft, Caltech101, Food101, OxfordPet, StanfordCars and SUN397 in torchvision's layouts."""
    from scipy.io import savemat

    root = tmp_path_factory.mktemp("torchvision-more")
    image = photos(1)[0]

    data = root / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True)
    variants = ["707-320", "A300B4", "Cessna 172"]
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    for split, ids in (("train", range(100, 106)), ("test", range(200, 203))):
        lines = [f"{1000000 + i} {variants[i % 3]}" for i in ids]
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
        for i in ids:
            (data / "images" / f"{1000000 + i}.jpg").write_bytes(image)

    categories = root / "caltech101" / "101_ObjectCategories"
    for name in ["BACKGROUND_Google"] + [f"category{c:03d}" for c in range(101)]:
        (categories / name).mkdir(parents=True)
        for i in range(1, 3):
            (categories / name / f"image_{i:04d}.jpg").write_bytes(image)

    food = root / "food-101"
    (food / "meta").mkdir(parents=True)
    for split, ids in (("train", range(4)), ("test", range(4, 6))):
        meta = {name: [f"{name}/{name_id}" for name_id in (f"{k}{i}" for i in ids for k in "12")]
                for name in ("apple_pie", "baby_back_ribs")}
        (food / "meta" / f"{split}.json").write_text(json.dumps(meta))
        for entries in meta.values():
            for entry in entries:
                (food / "images" / entry).parent.mkdir(parents=True, exist_ok=True)
                (food / "images" / f"{entry}.jpg").write_bytes(image)

    pet = root / "oxford-iiit-pet"
    (pet / "images").mkdir(parents=True)
    (pet / "annotations").mkdir()
    for split, ids in (("trainval", range(1, 4)), ("test", range(4, 6))):
        lines = [f"{breed}_{i} {label} {species} 1" for i in ids
                 for breed, label, species in (("Abyssinian", 1, 1), ("american_bulldog", 2, 2))]
        (pet / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
        for line in lines:
            (pet / "images" / f"{line.split()[0]}.jpg").write_bytes(image)

    cars = root / "stanford_cars"
    (cars / "devkit").mkdir(parents=True)
    savemat(cars / "devkit" / "cars_meta.mat",
            {"class_names": np.array([["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]], dtype=object)})
    fields = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    for folder, mat, count in (("cars_train", "devkit/cars_train_annos.mat", 4),
                               ("cars_test", "cars_test_annos_withlabels.mat", 2)):
        (cars / folder).mkdir()
        rows = np.array([(0, 0, 9, 9, 1 + i % 2, f"{i + 1:05d}.jpg") for i in range(count)], dtype=fields)
        savemat(cars / mat, {"annotations": rows.reshape(1, -1)})
        for i in range(count):
            (cars / folder / f"{i + 1:05d}.jpg").write_bytes(image)

    sun = root / "SUN397"
    sun.mkdir()
    (sun / "ClassName.txt").write_text("/a/abbey\n/b/bakery/shop\n")
    for relative in ("a/abbey", "b/bakery/shop"):
        (sun / relative).mkdir(parents=True)
        for i in range(5):
            (sun / relative / f"sun_{relative[0]}{i:03d}.jpg").write_bytes(image)
    return root


OTHERS = ["fgvc-aircraft", "caltech101", "food101", "oxford-pet", "stanford-cars", "sun397"]


def test_mtil_reads_the_other_torchvision_layouts(more_root, tmp_path):
    import torch

    spec = load_stream(build_mtil(more_root, tmp_path / "mtil", tasks=OTHERS, order="II"))
    assert [t.name for t in spec.tasks] == ["stanford-cars", "food101", "oxford-pet", "sun397", "fgvc-aircraft",
                                            "caltech101"]  # Order II, subset
    tasks = {t.name: t for t in spec.tasks}
    from streams.mtil_classes import CALTECH_CLASSES

    assert tasks["fgvc-aircraft"].classes == ["707-320", "A300B4", "Cessna 172"]
    assert tasks["caltech101"].classes == CALTECH_CLASSES
    assert tasks["food101"].classes == ["apple pie", "baby back ribs"]
    assert tasks["oxford-pet"].classes == ["Abyssinian", "American Bulldog"]
    assert tasks["stanford-cars"].classes == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    assert tasks["sun397"].classes == ["abbey", "bakery/shop"]
    counts = {name: (t.train.samples, t.eval.samples) for name, t in tasks.items()}
    assert counts == {"fgvc-aircraft": (6, 3), "caltech101": (161, 41), "food101": (16, 8), "oxford-pet": (6, 4),
                      "stanford-cars": (4, 2), "sun397": (8, 2)}
    assert all(task.templates == TEMPLATES[name] for name, task in tasks.items())
    assert check_stream(spec).ok

    # Caltech101: the harness's random_split over torchvision's order (sorted categories, image_0001, ...).
    order = torch.randperm(202, generator=torch.Generator().manual_seed(42)).tolist()
    index = [(c, i) for c in range(101) for i in (1, 2)]
    expected = sorted(f"caltech101_101_ObjectCategories_category{index[p][0]:03d}_image_{index[p][1]:04d}_jpg"
                      for p in order[161:])
    assert sorted(k for k, _ in split_samples(spec, tasks["caltech101"].eval)) == expected
    for key, files in split_samples(spec, tasks["caltech101"].eval):
        meta = json.loads(files["json"])
        assert meta["class"] == CALTECH_CLASSES[int(key.split("category")[1][:3])]
    labels = {key: json.loads(f["json"])["class"] for key, f in split_samples(spec, tasks["oxford-pet"].train)}
    assert labels["oxford-iiit-pet_images_american_bulldog_1_jpg"] == "American Bulldog"
    assert {f["txt"].decode() for _, f in split_samples(spec, tasks["stanford-cars"].eval)} == \
        {"a photo of a AM General Hummer SUV 2000, a type of car.", "a photo of a Acura RL Sedan 2012, a type of car."}
