"""Stream recipes over packaged data: built on small subsets and checked against the sources themselves."""
import functools
import hashlib
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streams import recipes, sources
from streams.builtin import DIGIT_NAMES, DIGIT_TEMPLATES, open_stream
from streams.check import check_stream, read_shard_samples
from streams.cli import RECIPE_COMMANDS
from streams.errors import MissingSourceError, SourceError
from streams.manifest import load_stream
from streams.recipes import (EMOJI_TEMPLATES, FASHION_TEMPLATES, MTIL_EMOJI_TASKS, MTIL_TUX_CATEGORIES,
                             PRETRAIN_EMOJI_CATEGORIES, Recipe, build_recipe, build_split_fmnist, pretrain_stamps)
from streams.sources import FASHION_CLASSES, Sources


SOURCE_CHECKS = {
    "fashion-mnist": lambda found: found.debian_path(sources.FASHION_MNIST_DIR, "dataset-fashion-mnist"),
    "digits": lambda found: found.debian_path(sources.OPENCV_DIGITS, "opencv-doc"),
    "tuxpaint": lambda found: found.debian_path(sources.TUXPAINT_STAMPS, "tuxpaint-stamps-default"),
    "rsvg-convert": lambda found: found.require_rsvg("SVGs"),
    **{package: functools.partial(lambda package, found: found.npm_path(package), package)
       for package in sources.NPM_PACKAGES},
}


def offline_data(*needed):
    """Mark a test that reads the real sources (all unless named); it skips only where one of them is
    absent, with the reason naming the command that installs it."""
    def missing():
        found = Sources()
        for name in needed or SOURCE_CHECKS:
            try:
                SOURCE_CHECKS[name](found)
            except MissingSourceError as err:
                return str(err)
        return None

    reason = missing()

    def mark(test):
        return pytest.mark.offline_data(pytest.mark.skipif(reason is not None, reason=f"{reason}")(test))

    return mark


def samples(spec, shard_set):
    """[(key, image as PIL, caption, meta)] of one split, in shard order."""
    out = []
    for url in spec.shard_urls(shard_set):
        for key, files in read_shard_samples(url):
            meta = json.loads(files["json"]) if "json" in files else {}
            out.append((key, Image.open(io.BytesIO(files["png"])), files["txt"].decode(), meta))
    return out


def emoji_key(key):
    """`emoji-google-1f468-200d-1f373` -> (`emoji-google`, `1f468-200d-1f373`): style prefix, concept code."""
    first, second, code = key.split("-", 2)
    return f"{first}-{second}", code


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def on_white_by_hand(image):
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:] / 255
    return (rgba[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.int16)


def render(path, size):
    png = subprocess.run(["rsvg-convert", "-w", str(size), "-h", str(size), str(path)], capture_output=True,
                         check=True).stdout
    return Image.open(io.BytesIO(png))


@pytest.fixture(scope="module")
def fmnist_spec(tmp_path_factory):
    return load_stream(build_recipe("split-fmnist", tmp_path_factory.mktemp("fmnist"), train_per_class=4,
                                    eval_per_class=3))


@pytest.fixture(scope="module")
def mtil_spec(tmp_path_factory):
    return load_stream(build_recipe("mini-mtil", tmp_path_factory.mktemp("mtil"), train_per_class=4,
                                    eval_per_class=3, emoji_per_task=4, stamps_per_category=8))


@pytest.fixture(scope="module")
def pretrain_manifest(tmp_path_factory):
    return build_recipe("offline-pretrain", tmp_path_factory.mktemp("pretrain"), emoji_per_category=4,
                        stamps_per_category=3)


# --- split-fmnist ---

@offline_data("fashion-mnist")
def test_split_fmnist_takes_the_first_samples_per_class_with_their_idx_labels_and_pixels(fmnist_spec):
    assert fmnist_spec.eval_classifier == "stream" and check_stream(fmnist_spec).ok
    assert [t.classes for t in fmnist_spec.tasks] == [FASHION_CLASSES[i:i + 2] for i in range(0, 10, 2)]
    assert fmnist_spec.tasks[0].classes == ["t-shirt/top", "trouser"]
    data = {"train": sources.fashion_mnist(Sources(), "train"), "test": sources.fashion_mnist(Sources(), "test")}
    for position, task in enumerate(fmnist_spec.tasks):
        pair = [2 * position, 2 * position + 1]
        for split, file, per_class in (("train", "train", 4), ("eval", "test", 3)):
            images, labels = data[file]
            expected = sorted(i for c in pair for i in np.flatnonzero(labels == c)[:per_class])
            read = samples(fmnist_spec, getattr(task, split))
            assert [int(k.rsplit("-", 1)[1]) for k, *_ in read] == expected
            for key, image, caption, meta in read:
                index = int(key.rsplit("-", 1)[1])
                assert key.startswith(f"fmnist-{file}-")
                assert image.size == (28, 28) and np.array_equal(np.asarray(image.convert("L")), images[index])
                assert meta == {"label": pair.index(int(labels[index])), "class": FASHION_CLASSES[labels[index]]}
                assert caption in [t.format(meta["class"]) for t in FASHION_TEMPLATES]


# --- mini-mtil ---

@offline_data()
def test_mini_mtil_has_six_domains_in_order_and_a_line_art_control_set(mtil_spec):
    report = check_stream(mtil_spec)
    assert report.ok, report.problems
    assert mtil_spec.eval_classifier == "task"
    assert [t.name for t in mtil_spec.tasks] == ["fashion-mnist", "handwritten-digits", *MTIL_EMOJI_TASKS,
                                                 "tuxpaint"]
    assert [t.kind for t in mtil_spec.tasks] == ["classification"] * 5 + ["retrieval"]
    assert mtil_spec.tasks[0].classes == FASHION_CLASSES and mtil_spec.tasks[1].classes == DIGIT_NAMES
    assert [t.train.samples for t in mtil_spec.tasks[:5]] == [40, 40, 8, 8, 8]  # emoji: 4 concepts x 2 styles
    assert [t.eval.samples for t in mtil_spec.tasks[:5]] == [30, 30, 4, 4, 4]
    [control] = mtil_spec.control
    assert control.name == "emoji-lineart" and control.train is None and control.eval.samples == 12
    assert control.classes == [c for t in mtil_spec.tasks[2:5] for c in t.classes]
    assert [s.task for s in report.splits][-1] == "emoji-lineart"


@offline_data()
def test_mini_mtil_digits_are_sheet_cells_and_eval_uses_the_fifth_row_of_each_digit(mtil_spec):
    with Image.open(Sources().debian_root / sources.OPENCV_DIGITS) as sheet:
        grey = np.asarray(sheet.convert("L"))
    task = mtil_spec.tasks[1]
    assert task.templates == DIGIT_TEMPLATES
    for split, expected_columns in (("train", range(4)), ("eval", range(3))):
        read = samples(mtil_spec, getattr(task, split))
        for key, image, caption, meta in read:
            index = int(key.removeprefix("cvdigit-"))
            row, column = divmod(index, 100)
            digit = row // 5
            assert meta == {"label": digit, "class": DIGIT_NAMES[digit]}
            assert row % 5 == (0 if split == "train" else 4) and column in expected_columns
            cell = grey[row * 20:(row + 1) * 20, column * 20:(column + 1) * 20]
            assert np.array_equal(np.asarray(image), cell)
            assert caption in [t.format(DIGIT_NAMES[digit]) for t in DIGIT_TEMPLATES]
        assert sorted(m["label"] for *_, m in read) == sorted(list(range(10)) * len(expected_columns))


@offline_data()
def test_emoji_tasks_train_on_google_and_twitter_and_evaluate_on_openmoji_colour(mtil_spec):
    npm = Sources().sources_dir / "npm"
    entries = {e["unified"].lower(): e for e in json.loads((npm / "emoji-datasource-google/emoji.json").read_text())}
    task = mtil_spec.tasks[2]
    animals = sorted((e for e in entries.values() if e["category"] == "Animals & Nature"),
                     key=lambda e: e["sort_order"])
    assert task.classes == [e["name"].lower() for e in animals[:4]]
    assert task.classes[0] == "monkey face"
    train = samples(mtil_spec, task.train)
    assert sorted(k.split("-")[1] for k, *_ in train) == ["google"] * 4 + ["twitter"] * 4
    for key, image, caption, meta in train:
        prefix, code = emoji_key(key)
        style = prefix.removeprefix("emoji-")
        entry = entries[code]
        assert meta["class"] == entry["name"].lower() == task.classes[meta["label"]]
        with Image.open(npm / f"emoji-datasource-{style}/img/{style}/64/{entry['image']}") as source:
            assert np.abs(pixels(image) - on_white_by_hand(source)).max() <= 1
        assert caption in [t.format(meta["class"]) for t in EMOJI_TEMPLATES]
    table = sources.openmoji_table(Sources())
    for key, image, caption, meta in samples(mtil_spec, task.eval):
        code = key.removeprefix("openmoji-color-")
        hexcode = sources.openmoji_hexcode(entries[code], table)
        expected = on_white_by_hand(render(npm / f"openmoji/color/svg/{hexcode}.svg", 64))
        assert image.size == (64, 64) and np.abs(pixels(image) - expected).max() <= 1
        with Image.open(npm / f"emoji-datasource-google/img/google/64/{entries[code]['image']}") as google:
            assert np.abs(pixels(image) - on_white_by_hand(google)).mean() > 10  # another art style
    for key, image, caption, meta in samples(mtil_spec, mtil_spec.control[0].eval):
        code = key.removeprefix("openmoji-black-")
        hexcode = sources.openmoji_hexcode(entries[code], table)
        expected = on_white_by_hand(render(npm / f"openmoji/black/svg/{hexcode}.svg", 64))
        assert np.abs(pixels(image) - expected).max() <= 1
        assert meta["class"] == entries[code]["name"].lower()


@offline_data()
def test_tuxpaint_task_pairs_each_stamp_with_its_txt_first_line_on_white(mtil_spec):
    found = Sources()
    stamps = {f"tux-{s.key}": s for s in sources.tux_stamps(found, MTIL_TUX_CATEGORIES)}
    task = mtil_spec.tasks[5]
    train, evaluation = samples(mtil_spec, task.train), samples(mtil_spec, task.eval)
    assert len(train) + len(evaluation) == 4 * 8 and {k for k, *_ in train}.isdisjoint(k for k, *_ in evaluation)
    for key, image, caption, meta in train + evaluation:
        stamp = stamps[key]
        assert stamp.category in MTIL_TUX_CATEGORIES and meta == {}
        assert caption == stamp.image.with_suffix(".txt").read_text().splitlines()[0].strip()
        assert image.mode == "RGB" and max(image.size) <= 128
        if not stamp.is_svg:
            with Image.open(stamp.image) as source:
                source = source.convert("RGBA")
            width, height = source.size
            assert max(image.size) == min(128, max(width, height))
            assert abs(image.size[0] / image.size[1] - width / height) < 0.02 * width / height + 1 / min(image.size)
            resized = source.resize(image.size, Image.Resampling.LANCZOS)
            assert np.abs(pixels(image) - on_white_by_hand(resized)).mean() < 2


# --- offline-pretrain ---

@offline_data()
def test_offline_pretrain_concepts_and_stamps_are_disjoint_from_mini_mtil():
    found = Sources()
    mtil_emoji = sources.emoji_concepts(found, MTIL_EMOJI_TASKS.values())
    pretrain_emoji = sources.emoji_concepts(found, PRETRAIN_EMOJI_CATEGORIES)
    assert len(mtil_emoji) == 159 + 131 + 218 and len(pretrain_emoji) == 169 + 386 + 264 + 224 + 85
    assert {e.code for e in mtil_emoji}.isdisjoint(e.code for e in pretrain_emoji)
    assert {e.name for e in mtil_emoji}.isdisjoint(e.name for e in pretrain_emoji)
    mtil_stamps = sources.tux_stamps(found, MTIL_TUX_CATEGORIES)
    stamps, left_out = pretrain_stamps(found, 0)
    assert {s.relative for s in mtil_stamps}.isdisjoint(s.relative for s in stamps)
    assert {s.caption for s in mtil_stamps}.isdisjoint(s.caption for s in stamps)
    assert not any(s.relative.startswith("symbols/alphabets/") for s in stamps)
    assert "seasonal/halloween/spider" in left_out  # captioned "A spider." like an animals stamp

    def digests(paths):
        return {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}

    npm = found.sources_dir / "npm"
    for style in ("google", "twitter"):
        folder = npm / f"emoji-datasource-{style}/img/{style}/64"
        assert digests(folder / e.image for e in mtil_emoji).isdisjoint(digests(folder / e.image for e in pretrain_emoji))
    folder = npm / "openmoji/color/svg"
    assert digests(folder / f"{e.openmoji}.svg" for e in mtil_emoji).isdisjoint(
        digests(folder / f"{e.openmoji}.svg" for e in pretrain_emoji))
    assert digests(s.image for s in mtil_stamps).isdisjoint(digests(s.image for s in stamps))


@offline_data()
def test_offline_pretrain_is_one_retrieval_task_split_by_concept_with_no_image_of_mini_mtil(pretrain_manifest,
                                                                                            mtil_spec):
    spec = load_stream(pretrain_manifest)
    assert check_stream(spec).ok
    [task] = spec.tasks
    assert task.kind == "retrieval" and not spec.control
    train, evaluation = samples(spec, task.train), samples(spec, task.eval)
    emoji = [s for s in train + evaluation if not s[0].startswith("tux-")]
    stamps = [s for s in train + evaluation if s[0].startswith("tux-")]
    assert len(emoji) == 5 * 4 * 3  # 5 categories x 4 concepts x 3 styles
    styles = {}
    for key, *_ in emoji:
        prefix, code = emoji_key(key)
        styles.setdefault(code, set()).add(prefix)
    assert all(s == {"emoji-google", "emoji-twitter", "openmoji-color"} for s in styles.values())
    eval_codes = {emoji_key(k)[1] for k, *_ in evaluation if not k.startswith("tux-")}
    train_codes = {emoji_key(k)[1] for k, *_ in train if not k.startswith("tux-")}
    assert eval_codes and eval_codes.isdisjoint(train_codes)
    found = Sources()
    concepts = {e.code: e for e in sources.emoji_concepts(found, PRETRAIN_EMOJI_CATEGORIES)}
    for key, image, caption, meta in emoji:
        concept = concepts[emoji_key(key)[1]]
        assert concept.name in caption or concept.annotation in caption
    by_key = {f"tux-{s.key}": s for s in pretrain_stamps(found, 3)[0]}
    for key, image, caption, meta in stamps:
        assert caption == by_key[key].caption and by_key[key].category not in MTIL_TUX_CATEGORIES
    assert len(stamps) == len(by_key)

    def image_digests(spec, tasks):
        return {hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()
                for t in tasks for split in (t.train, t.eval) if split for _, image, *_ in samples(spec, split)}

    assert image_digests(spec, spec.tasks).isdisjoint(image_digests(mtil_spec, mtil_spec.tasks + mtil_spec.control))


# --- determinism, defaults, missing sources ---

@offline_data()
def test_building_twice_gives_the_same_manifest_keys_and_bytes(pretrain_manifest, tmp_path):
    again = build_recipe("offline-pretrain", tmp_path, emoji_per_category=4, stamps_per_category=3)
    first = pretrain_manifest.parent
    assert again.read_text() == pretrain_manifest.read_text()
    assert (tmp_path / "build.yaml").read_text() == (first / "build.yaml").read_text()
    shards = sorted(p.relative_to(first) for p in first.rglob("*.tar"))
    assert shards == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.tar"))
    assert all((first / s).read_bytes() == (tmp_path / s).read_bytes() for s in shards)


@offline_data("fashion-mnist")
def test_builtin_recipe_is_built_on_first_use_with_the_recipe_defaults(tmp_path, monkeypatch):
    small = Recipe("split-fmnist", 1, "test", build_split_fmnist, {"train_per_class": 2, "eval_per_class": 1})
    monkeypatch.setitem(recipes.RECIPES, "split-fmnist", small)
    spec = open_stream("builtin:split-fmnist", tmp_path)[1]
    assert Path(spec.root) == (tmp_path / "split-fmnist-v1").resolve()
    assert [t.train.samples for t in spec.tasks] == [4] * 5 and [t.eval.samples for t in spec.tasks] == [2] * 5
    assert "eval_per_class: 1" in (tmp_path / "split-fmnist-v1" / "build.yaml").read_text()


@offline_data("tuxpaint", "rsvg-convert")
def test_svg_only_stamps_are_skipped_without_rsvg_convert():
    with_renderer = Sources()
    stamps = sources.tux_stamps(with_renderer, ["vehicles"])
    svg_only = [s for s in stamps if s.is_svg]
    assert svg_only and len(stamps) == 58
    kept, images = sources.stamp_images(Sources(rsvg_convert=None), stamps[:12] + svg_only[:2], 128)
    assert kept == [s for s in stamps[:12] if not s.is_svg] and len(images) == len(kept)
    kept, images = sources.stamp_images(with_renderer, svg_only[:2], 128)
    assert kept == svg_only[:2] and all(max(i.size) == 128 and i.mode == "RGB" for i in images)


@pytest.mark.parametrize("recipe, roots, command", [
    ("split-fmnist", "empty", "sudo apt-get install -y dataset-fashion-mnist"),
    ("mini-mtil", "empty", "npm pack openmoji@17.0.0"),
    ("mini-mtil", "no-renderer", "sudo apt-get install -y librsvg2-bin"),
    ("offline-pretrain", "empty", "npm pack openmoji@17.0.0"),
])
def test_a_missing_source_names_the_command_that_installs_it(recipe, roots, command, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    found = (Sources(debian_root=empty, sources_dir=empty, rsvg_convert="rsvg-convert") if roots == "empty"
             else Sources(rsvg_convert=None))
    with pytest.raises(MissingSourceError) as raised:
        build_recipe(recipe, tmp_path / "out", sources=found, train_per_class=2) if recipe != "offline-pretrain" \
            else build_recipe(recipe, tmp_path / "out", sources=found)
    assert command in str(raised.value) and "bash streams/install_sources.sh" in str(raised.value)
    assert not list((tmp_path / "out").rglob("*.tar"))


def test_builtin_recipe_with_sources_missing_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("VLCL_DEBIAN_ROOT", str(tmp_path / "nothing"))
    monkeypatch.setenv("VLCL_SOURCES_DIR", str(tmp_path / "nothing"))
    with pytest.raises(MissingSourceError, match=r"fashion-mnist .*apt-get install -y dataset-fashion-mnist"):
        open_stream("builtin:split-fmnist", tmp_path / "data")
    assert list((tmp_path / "data").iterdir()) == []  # no half-built stream left behind


def test_recipe_options_are_checked_by_name_and_range(tmp_path):
    with pytest.raises(SourceError, match=r"recipe 'mini-mtil' has no options \['train_size'\]"):
        build_recipe("mini-mtil", tmp_path, train_size=3)
    with pytest.raises(SourceError, match="unknown stream recipe 'cifar'; known: split-fmnist, mini-mtil"):
        build_recipe("cifar", tmp_path)
    with pytest.raises(SourceError, match=r"train_per_class must be between 1 and 400, got 401"):
        build_recipe("mini-mtil", tmp_path / "a", sources=Sources(), train_per_class=401)


def test_cli_options_are_the_recipes_options():
    assert {name: {o: d for o, d, _ in options} for name, _, options in RECIPE_COMMANDS} == {
        name: recipe.options for name, recipe in recipes.RECIPES.items()}
