"""Retrieval-protocol streams (Karpathy JSON, P9D, CC3M chunks) and ZSCL reference data, built from
real images (scikit-learn's handwritten digits: nothing to install) laid out as each release ships them."""
import argparse
import json
from collections import Counter

import pytest
from PIL import Image

from streams.check import check_stream, read_shard_samples
from streams.converters import safe_name
from streams.cli import add_streams_commands
from streams.errors import SourceError
from streams.manifest import load_stream
from streams.protocols import (P9D_INDUSTRIES, build_reference, caption_class, from_cc3m, from_p9d, pre_caption,
                               read_class_vocabulary, reference_captions)
from streams.writer import Sample, write_split


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="vlcl")
    add_streams_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def samples(spec, shard_set):
    return [(key, files) for url in spec.shard_urls(shard_set) for key, files in read_shard_samples(url)]


@pytest.fixture(scope="module")
def digit_photos(tmp_path_factory):
    """[(caption, JPEG path)] for 24 real handwritten digits (even and odd alternating, in folders
    even/ and odd/), 48 px JPEGs; the caption's second word is the digit ("A seven, handwritten.")."""
    from sklearn.datasets import load_digits

    from streams.builtin import DIGIT_NAMES, digit_image

    folder = tmp_path_factory.mktemp("digit-photos")
    digits = load_digits()
    out = []
    for index in range(24):
        label = int(digits.target[index])
        path = folder / ("even" if label % 2 == 0 else "odd") / f"digit{index:04d}.jpg"
        path.parent.mkdir(exist_ok=True)
        digit_image(digits.images[index]).resize((48, 48)).save(path, quality=85)
        out.append((f"A {DIGIT_NAMES[label]}, handwritten (number {index}).", path))
    return out


def karpathy_json(path, entries, dataset, with_filepath):
    images = []
    for index, (caption, image_path, split) in enumerate(entries):
        sentences = [{"raw": caption, "tokens": caption.lower().split()},
                     {"raw": f"a picture of {caption.lower()}", "tokens": []},
                     {"raw": f"  {caption.upper()}  ", "tokens": []}]
        entry = {"filename": image_path.name, "imgid": index, "split": split, "sentences": sentences}
        if with_filepath:
            entry["filepath"] = image_path.parent.name
        images.append(entry)
    path.write_text(json.dumps({"images": images, "dataset": dataset}))
    return path


def test_karpathy_json_becomes_contiguous_phases_with_the_test_split_as_eval(digit_photos, tmp_path):
    flickr_entries = [(c, p, s) for (c, p), s in zip(digit_photos[:14], ["train"] * 6 + ["val"] * 2 + ["train"] * 3
                                                      + ["test"] * 3)]
    flickr = karpathy_json(tmp_path / "dataset_flickr30k.json",
                           [(c, p.parent.parent / p.parent.name / p.name, s) for c, p, s in flickr_entries],
                           "flickr30k", with_filepath=False)
    # Flickr30K: filename only (images under IMAGES/); make the flat image root.
    flat = tmp_path / "flickr-images"
    flat.mkdir()
    for _, path, _ in flickr_entries:
        (flat / path.name).write_bytes(path.read_bytes())
    coco = karpathy_json(tmp_path / "dataset_coco.json",
                         [(c, p, s) for (c, p), s in zip(digit_photos[14:20], ["train", "restval", "test", "test", "val",
                                                                         "test"])], "coco", with_filepath=True)
    coco_root = digit_photos[14][1].parent.parent
    assert run_cli(["streams", "build", "karpathy", str(flickr), "--images", str(flat), "--out", str(tmp_path / "s"),
                    "--chunks", "3", "--train-splits", "train,val", "--control", str(coco), str(coco_root)]) == 0
    spec = load_stream(tmp_path / "s" / "manifest.yaml")
    assert spec.name == "flickr30k-3-phases"
    assert [(t.name, t.kind, t.train.samples) for t in spec.tasks] == \
        [("flickr30k-1", "retrieval", 3), ("flickr30k-2", "retrieval", 4), ("flickr30k-3", "retrieval", 4)]
    train_keys = [k for t in spec.tasks for k, _ in samples(spec, t.train)]
    assert train_keys == [p.name.replace(".", "_") for _, p, s in flickr_entries if s in ("train", "val")]  # JSON order
    assert all(t.eval == spec.tasks[0].eval for t in spec.tasks) and spec.tasks[0].eval.samples == 3
    for key, files in samples(spec, spec.tasks[0].eval):
        meta = json.loads(files["json"])
        caption = next(c for c, p, _ in flickr_entries if p.name.replace(".", "_") == key)
        assert meta == {"captions": [caption, f"a picture of {caption.lower()}", caption.upper()], "image_id": key}
        assert files["txt"].decode() == caption  # eval text = the first caption
        assert files["jpg"] == (flat / key.replace("_jpg", ".jpg")).read_bytes()
    for task in spec.tasks:
        for _, files in samples(spec, task.train):
            assert files["txt"].decode() in json.loads(files["json"])["captions"]
    [control] = spec.control
    assert control.name == "coco-test" and control.eval.samples == 3 and control.train is None
    assert check_stream(spec).ok
    # A second build draws the same training captions.
    again = load_stream(run_and_manifest(flickr, flat, tmp_path / "again"))
    assert [f["txt"] for t in again.tasks for _, f in samples(again, t.train)] == \
        [f["txt"] for t in spec.tasks for _, f in samples(spec, t.train)]

    (flat / flickr_entries[-1][1].name).unlink()
    with pytest.raises(SourceError, match=r"1 of 14 image files do not exist, e\.g\. .*flickr-images/"):
        run_and_manifest(flickr, flat, tmp_path / "broken")
    assert not (tmp_path / "broken").exists()


def run_and_manifest(flickr, images, out):
    from streams.protocols import from_karpathy

    return from_karpathy(flickr, images, out, chunks=3, train_splits=["train", "val"])


def write_p9d_release(root, photos):
    """P9D's release layout for 15 (caption, JPEG) pairs: 3 industries, 4 train items and 1 test item each."""
    (root / "json").mkdir(parents=True)
    for folder in ("train_images", "gallery_images"):
        (root / folder).mkdir()
    industries = ["家居用品", "家装家饰", "食品/保健"]
    train, test = {i: {} for i in industries}, {}
    for index, (caption, path) in enumerate(photos[:15]):
        industry, item_id = industries[index % 3], str(600000 + index)
        info = {"title": f"{caption} (Item #{index}):  NEW!", "cate_name": f"cate{index % 2}"}
        if index < 12:
            train[industry][item_id] = info
            (root / "train_images" / f"{item_id}.jpg").write_bytes(path.read_bytes())
        else:
            test[item_id] = {**info, "industry_name": industry}
            (root / "gallery_images" / f"{item_id}.jpg").write_bytes(path.read_bytes())
    (root / "json" / "train.json").write_text(json.dumps(train, ensure_ascii=False))
    (root / "json" / "test.json").write_text(json.dumps(test, ensure_ascii=False))
    return root


def test_p9d_release_becomes_nine_industry_tasks_in_ctp_order(digit_photos, tmp_path):
    root = write_p9d_release(tmp_path / "Product9D", digit_photos)
    spec = load_stream(from_p9d(root, tmp_path / "p9d"))
    assert spec.name == "p9d" and [t.name for t in spec.tasks] == ["household", "furnishings", "food"]
    assert [(t.train.samples, t.eval.samples) for t in spec.tasks] == [(4, 1), (4, 1), (4, 1)]
    key, files = samples(spec, spec.tasks[0].train)[0]
    assert key == "600000"
    assert files["txt"].decode() == pre_caption(f"{digit_photos[0][0]} (Item #0):  NEW!")
    assert json.loads(files["json"]) == {"item_id": "600000", "cate_name": "cate0", "industry": "家居用品"}
    assert files["jpg"] == (root / "train_images" / "600000.jpg").read_bytes()
    assert check_stream(spec).ok
    reverse = load_stream(from_p9d(root, tmp_path / "p9d-reverse", order="reverse"))
    assert reverse.name == "p9d-reverse" and [t.name for t in reverse.tasks] == ["food", "furnishings", "household"]
    assert list(P9D_INDUSTRIES.values()) == ["household", "furnishings", "food", "beauty", "clothing", "auto",
                                             "parenting", "outdoor", "electronics"]
    (root / "gallery_images" / "600012.jpg").unlink()
    with pytest.raises(SourceError, match=r"P9D 家居用品 test: 1 of 1 image files do not exist"):
        from_p9d(root, tmp_path / "never")


def test_pre_caption_is_ctps():
    assert pre_caption('A "Red" Mug!  (new)  ') == "a red mug new"
    assert pre_caption(" ".join(f"w{i}" for i in range(40))) == " ".join(f"w{i}" for i in range(30))


@pytest.fixture(scope="module")
def img2dataset_shards(digit_photos, tmp_path_factory):
    """Shards as img2dataset writes them: {key}.jpg, .txt, .json with url/caption/status."""
    folder = tmp_path_factory.mktemp("cc3m")
    pairs = [Sample(key=f"{i:09d}", image=path.read_bytes(), caption=caption,
                    extra={"url": f"http://example.com/{i}.jpg", "caption": caption, "status": "success"})
             for i, (caption, path) in enumerate(digit_photos)]
    write_split(pairs, folder, "part", max_samples_per_shard=10)
    return str(folder / "part-{000000..000002}.tar"), {s.key: s.caption for s in pairs}


def test_cc3m_instance_split_puts_every_pair_in_exactly_one_task_and_split(img2dataset_shards, tmp_path):
    pattern, captions = img2dataset_shards
    spec = load_stream(from_cc3m([pattern], tmp_path / "inst", tasks=3, split="instance", eval_fraction=0.25))
    assert spec.name == "cc3m-instance-3" and [t.name for t in spec.tasks] == ["cc3m-1", "cc3m-2", "cc3m-3"]
    seen = Counter(k for t in spec.tasks for part in (t.train, t.eval) for k, _ in samples(spec, part))
    assert seen == Counter(list(captions))
    for task in spec.tasks:
        for key, files in samples(spec, task.train) + samples(spec, task.eval):
            assert files["txt"].decode() == captions[key] and "json" not in files
    assert check_stream(spec).ok


def test_caption_class_takes_the_earliest_whole_word_match(tmp_path):
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("# animals first\ndog: puppy, hot dog\ncat\nbird: parrot\n\ncar: truck, fire engine\n")
    vocabulary = read_class_vocabulary(classes_file)
    assert [name for name, _ in vocabulary] == ["dog", "cat", "bird", "car"]
    assert caption_class("a cat chasing a puppy", vocabulary) == 1
    assert caption_class("A red fire engine near a parrot.", vocabulary) == 3
    assert caption_class("catalogue of dogs", vocabulary) is None  # whole words only
    assert caption_class("a hot dog stand", vocabulary) == 0


def test_cc3m_class_split_groups_classes_into_contiguous_tasks(img2dataset_shards, tmp_path):
    pattern, captions = img2dataset_shards
    words = sorted({c.split()[1].strip(".,!").lower() for c in captions.values()})  # "A frog." -> frog
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("\n".join(words) + "\n")
    spec = load_stream(from_cc3m([pattern], tmp_path / "cls", tasks=2, split="class", classes_file=classes_file,
                                 eval_fraction=0.5))
    half = len(words) // 2
    assert [t.name for t in spec.tasks] == [f"cc3m-{safe_name(words[0])}-to-{safe_name(words[half - 1])}",
                                            f"cc3m-{safe_name(words[half])}-to-{safe_name(words[-1])}"]
    vocabulary = read_class_vocabulary(classes_file)
    for index, task in enumerate(spec.tasks):
        for key, files in samples(spec, task.train) + samples(spec, task.eval):
            assert (caption_class(files["txt"].decode(), vocabulary) >= half) == index
    kept = {k for t in spec.tasks for part in (t.train, t.eval) for k, _ in samples(spec, part)}
    assert kept == {k for k, c in captions.items() if caption_class(c, vocabulary) is not None}
    with pytest.raises(SourceError, match="needs a class list"):
        from_cc3m([pattern], tmp_path / "x", tasks=2, split="class")


def test_reference_pairs_folder_images_with_shuffled_captions(digit_photos, tmp_path):
    images = digit_photos[0][1].parent.parent  # even/, odd/: class folders
    tsv = tmp_path / "Validation_GCC-1.1.0-Validation.tsv"
    captions = [f"caption number {i} of a scene" for i in range(10)]
    tsv.write_text("".join(f"{c}\thttp://example.com/{i}.jpg\n" for i, c in enumerate(captions)))
    assert run_cli(["streams", "build", "reference", "--images", str(images), "--captions", str(tsv),
                    "--out", str(tmp_path / "ref"), "--samples", "20", "--seed", "3"]) == 0
    spec = load_stream(tmp_path / "ref" / "manifest.yaml")
    [task] = spec.tasks
    assert task.kind == "retrieval" and task.train.samples == 20 and task.eval == task.train
    pairs = samples(spec, task.train)
    assert Counter(f["txt"].decode() for _, f in pairs) == Counter({c: 2 for c in captions})  # each dealt twice
    assert reference_captions(tmp_path / "ref" / "manifest.yaml") == captions
    assert reference_captions(tmp_path / "manifest.yaml") is None
    files_by_key = {p.relative_to(images).as_posix().replace("/", "_").replace(".", "_"): p for _, p in digit_photos}
    assert all(f["jpg"] == files_by_key[k].read_bytes() for k, f in pairs)
    assert check_stream(spec).ok
    plain = tmp_path / "captions.txt"
    plain.write_text("\n".join(captions[:3]) + "\n\n")
    again = load_stream(build_reference(images, plain, tmp_path / "ref2", samples=20, seed=3))
    assert [k for k, _ in samples(again, again.tasks[0].train)] == [k for k, _ in pairs]  # same seeded draw
    assert {f["txt"].decode() for _, f in samples(again, again.tasks[0].train)} == set(captions[:3])
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(SourceError, match="empty.txt holds no caption"):
        build_reference(images, tmp_path / "empty.txt", tmp_path / "ref3")
