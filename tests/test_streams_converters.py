import csv
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from streams.check import check_stream, read_shard_samples
from streams.converters import from_image_folder, from_img2dataset, from_table, is_eval_key
from streams.errors import SourceError
from streams.manifest import load_stream

NAMES = ["zero", "one", "two", "three", "four", "five"]


def digit_image(index):
    pixels = (load_digits().images[index] * 255 / 16).astype(np.uint8)
    return Image.fromarray(pixels).resize((16, 16)).convert("RGB")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/<class>/<image>: six digit classes, 8 real images each (PNG, and BMP for class 'one')."""
    root = tmp_path_factory.mktemp("folder") / "digits"
    digits = load_digits()
    for digit, name in enumerate(NAMES):
        (root / name).mkdir(parents=True)
        indices = np.flatnonzero(digits.target == digit)[:8]
        for index in indices:
            suffix = "bmp" if name == "one" else "png"
            digit_image(index).save(root / name / f"img {index}.{suffix}")
    return root


def all_samples(spec, shard_set):
    return [item for url in spec.shard_urls(shard_set) for item in read_shard_samples(url)]


def test_hash_split_is_deterministic_and_near_the_fraction():
    keys = [f"key{i}" for i in range(4000)]
    chosen = [is_eval_key(k, 0.25, seed=3) for k in keys]
    assert chosen == [is_eval_key(k, 0.25, seed=3) for k in keys]
    assert 0.22 < sum(chosen) / len(keys) < 0.28
    assert chosen != [is_eval_key(k, 0.25, seed=4) for k in keys]


def test_image_folder_becomes_class_incremental_tasks(image_folder, tmp_path):
    manifest = from_image_folder(image_folder, tmp_path / "out", classes_per_task=2,
                                 templates=["a photo of the digit {}.", "a handwritten {}."], eval_fraction=0.25)
    spec = load_stream(manifest)
    assert spec.name == "digits" and spec.eval_classifier == "stream"
    assert [t.classes for t in spec.tasks] == [["five", "four"], ["one", "three"], ["two", "zero"]]
    assert [t.train.samples + t.eval.samples for t in spec.tasks] == [16, 16, 16]
    assert check_stream(spec).ok
    for task in spec.tasks:
        for key, files in all_samples(spec, task.train) + all_samples(spec, task.eval):
            meta = json.loads(files["json"])
            assert meta["class"] == task.classes[meta["label"]] and key.startswith(meta["class"])
            assert files["txt"].decode() in {f"a photo of the digit {meta['class']}.", f"a handwritten {meta['class']}."}
            assert "png" in files  # BMP sources are re-encoded as PNG
    key, files = all_samples(spec, spec.tasks[0].train)[0]
    source = image_folder / key.split("_", 1)[0] / (key.split("_", 1)[1].replace("_png", ".png").replace("_", " "))
    assert files["png"] == source.read_bytes()  # PNG sources are stored byte for byte
    assert [k for k, _ in all_samples(spec, spec.tasks[0].eval)] == \
        [k for k, _ in all_samples(load_stream(from_image_folder(
            image_folder, tmp_path / "again", classes_per_task=2, eval_fraction=0.25)), spec.tasks[0].eval)]


def test_image_folder_names_the_unreadable_file(image_folder, tmp_path):
    broken = tmp_path / "broken"
    for name in ("cat", "dog"):
        (broken / name).mkdir(parents=True)
        digit_image(0).save(broken / name / "ok.png")
    (broken / "dog" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SourceError, match=r"dog/bad\.jpg is not a readable image"):
        from_image_folder(broken, tmp_path / "out")
    (broken / "dog" / "bad.jpg").unlink()
    (broken / "dog" / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match=r"notes\.txt is not an image file"):
        from_image_folder(broken, tmp_path / "out")


def write_table(path, rows, kind):
    if kind == "csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Real photos (sklearn's china.jpg and flower.jpg) and digits, as files a table can point at."""
    from sklearn.datasets import load_sample_images

    folder = tmp_path_factory.mktemp("photos")
    (folder / "images").mkdir()
    for name, array in zip(("china", "flower"), load_sample_images().images):
        Image.fromarray(array).resize((64, 43)).save(folder / "images" / f"{name}.jpg", quality=90)
    for i in range(30):
        digit_image(i).save(folder / "images" / f"digit{i}.png")
    return folder


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_table_with_labels_is_classification(photo_folder, tmp_path, kind):
    digits = load_digits()
    rows = [{"image": f"images/digit{i}.png", "caption": f"a handwritten {NAMES[digits.target[i] % 6]}",
             "label": NAMES[digits.target[i] % 6]} for i in range(30)]
    table = photo_folder / f"labels.{kind}"
    write_table(table, rows, kind)
    spec = load_stream(from_table(table, tmp_path / "out", eval_fraction=0.3))
    [task] = spec.tasks
    assert task.kind == "classification" and task.classes == sorted({r["label"] for r in rows})
    samples = all_samples(spec, task.train) + all_samples(spec, task.eval)
    assert len(samples) == 30 and check_stream(spec).ok
    by_key = {key: files for key, files in samples}
    files = by_key["images_digit7_png"]
    assert files["txt"].decode() == rows[7]["caption"]
    assert json.loads(files["json"]) == {"label": task.classes.index(rows[7]["label"]), "class": rows[7]["label"]}


def test_table_without_labels_is_retrieval_and_keeps_jpeg_bytes(photo_folder, tmp_path):
    rows = [{"image": "images/china.jpg", "caption": "a pagoda behind trees", "task": "places"},
            {"image": "images/flower.jpg", "caption": "a pink flower", "task": "places"}]
    rows += [{"image": f"images/digit{i}.png", "caption": f"digit number {i}", "task": "numbers"} for i in range(20)]
    table = photo_folder / "pairs.jsonl"
    write_table(table, rows, "jsonl")
    spec = load_stream(from_table(table, tmp_path / "out", eval_fraction=0.5, seed=1))
    assert [(t.name, t.kind, t.classes) for t in spec.tasks] == [("places", "retrieval", []),
                                                                 ("numbers", "retrieval", [])]
    places = all_samples(spec, spec.tasks[0].train) + all_samples(spec, spec.tasks[0].eval)
    assert {key: files["jpg"] for key, files in places} == {
        "images_china_jpg": (photo_folder / "images/china.jpg").read_bytes(),
        "images_flower_jpg": (photo_folder / "images/flower.jpg").read_bytes()}
    assert check_stream(spec).ok


@pytest.mark.parametrize("rows, message", [
    ([{"picture": "images/digit0.png", "caption": "x"}], r"row 2 has no column 'image'"),
    ([{"image": "images/digit0.png", "caption": "x"}, {"image": "images/missing.png", "caption": "y"}],
     r"row 3: image file .*missing\.png does not exist"),
    ([{"image": "images/digit0.png", "caption": ""}], r"row 2 has an empty caption"),
    ([{"image": "images/digit0.png", "caption": "x", "label": ""}], r"row 2 has an empty 'label'"),
])
def test_table_problems_name_the_row(photo_folder, tmp_path, rows, message):
    table = tmp_path / "bad.csv"
    write_table(table, rows, "csv")
    (tmp_path / "images").symlink_to(photo_folder / "images")
    with pytest.raises(SourceError, match=message):
        from_table(table, tmp_path / "out")


def test_img2dataset_shards_with_eval_are_pointed_at(digits_manifest, tmp_path):
    digits = load_stream(digits_manifest)
    task = digits.tasks[1]
    train, evaluation = digits.shard_urls(task.train), digits.shard_urls(task.eval)
    train_pattern = train[0].replace("000000.tar", "{000000..000001}.tar")
    spec = load_stream(from_img2dataset([("two-three", train_pattern, evaluation[0])], tmp_path / "out",
                                        name="mine", templates=["a handwritten {}."]))
    [converted] = spec.tasks
    # Class order follows the shards' own (label, class) pairs, not the sorted names.
    assert converted.kind == "classification" and converted.classes == ["two", "three"]
    assert (converted.train.samples, converted.eval.samples) == (task.train.samples, task.eval.samples)
    assert spec.shard_urls(converted.train) == train
    assert check_stream(spec).ok
    # Given classes in another order contradict the shards' labels, and check says where.
    swapped = load_stream(from_img2dataset([("two-three", train_pattern, evaluation[0])], tmp_path / "swapped",
                                           name="mine", classes={"two-three": ["three", "two"]}, copy=True))
    assert swapped.tasks[0].train.shards == ["train/two-three-000000.tar", "train/two-three-000001.tar"]
    problems = check_stream(swapped).problems
    assert len(problems) == task.train.samples + task.eval.samples
    assert "label 0 means 'three' but class says 'two'" in {p.message for p in problems}


def test_img2dataset_shards_without_eval_are_resplit(digits_manifest, tmp_path):
    digits = load_stream(digits_manifest)
    task = digits.tasks[0]
    spec = load_stream(from_img2dataset([("zero-one", digits.shard_urls(task.train)[0], None)], tmp_path / "out",
                                        name="resplit", eval_fraction=0.25))
    [converted] = spec.tasks
    assert converted.train.samples + converted.eval.samples == 200  # the first shard holds 200 samples
    assert converted.classes == ["zero", "one"]
    report = check_stream(spec)
    assert report.ok, report.problems
    original = dict(read_shard_samples(digits.shard_urls(task.train)[0]))
    for key, files in all_samples(spec, converted.eval):
        assert files["png"] == original[key]["png"] and files["txt"] == original[key]["txt"]
        assert json.loads(files["json"])["class"] == json.loads(original[key]["json"])["class"]


def test_img2dataset_integer_labels_need_class_names(tmp_path):
    from streams.writer import Sample, write_split

    written = write_split([Sample(f"s{i}", digit_image(i), f"digit {i}", label=i % 2) for i in range(10)],
                          tmp_path / "raw", "raw")
    with pytest.raises(SourceError, match="integer labels but no class names"):
        from_img2dataset([("t", str(written.shards[0]), str(written.shards[0]))], tmp_path / "out", name="x")
