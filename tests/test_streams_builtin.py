import io
import json

import numpy as np
import pytest
from PIL import Image

from streams import builtin
from streams.builtin import DIGIT_NAMES, DIGIT_TEMPLATES, materialize_builtin, open_stream
from streams.check import read_shard_samples
from streams.errors import ManifestError
from streams.manifest import load_stream


def test_digits_stream_has_five_two_class_tasks_and_every_sample_once(digits_manifest):
    spec = load_stream(digits_manifest)
    assert spec.name == "digits" and spec.eval_classifier == "task"
    assert [t.classes for t in spec.tasks] == [DIGIT_NAMES[i:i + 2] for i in range(0, 10, 2)]
    assert spec.stream_classes() == DIGIT_NAMES
    assert all(t.templates == DIGIT_TEMPLATES for t in spec.tasks)
    train = sum(t.train.samples for t in spec.tasks)
    evaluation = sum(t.eval.samples for t in spec.tasks)
    assert train + evaluation == 1797
    assert evaluation == 360  # sklearn's stratified 20 %: ceil(0.2 * 1797)
    keys = set()
    for task in spec.tasks:
        for split in (task.train, task.eval):
            read = [item for url in spec.shard_urls(split) for item in read_shard_samples(url)]
            assert len(read) == split.samples
            for key, files in read:
                meta = json.loads(files["json"])
                assert task.classes[meta["label"]] == meta["class"]
                assert meta["class"] in files["txt"].decode()
                keys.add(key)
    assert len(keys) == 1797


def test_digit_images_are_32px_rgb_and_keep_the_stroke_layout(digits_manifest):
    from sklearn.datasets import load_digits

    spec = load_stream(digits_manifest)
    key, files = next(read_shard_samples(spec.shard_urls(spec.tasks[0].train)[0]))
    image = Image.open(io.BytesIO(files["png"]))
    assert image.size == (32, 32) and image.mode == "RGB"
    original = load_digits().images[int(key.removeprefix("digit"))]
    # Averaging back down to 8x8 must give the original ink pattern (dark ink on white).
    small = 255 - np.asarray(image.convert("L"), dtype=float).reshape(8, 4, 8, 4).mean(axis=(1, 3))
    assert np.corrcoef(small.ravel(), original.ravel())[0, 1] > 0.9


def test_second_call_reuses_the_stream(digits_manifest, monkeypatch):
    def must_not_build(out_dir):
        raise AssertionError("rebuilt a complete stream")

    monkeypatch.setitem(builtin.BUILTINS, "digits", (builtin.DIGITS_VERSION, must_not_build))
    assert materialize_builtin("digits", digits_manifest.parent.parent) == digits_manifest


def test_losing_a_build_race_keeps_the_winner(tmp_path, monkeypatch):
    real_build = builtin.build_digits

    def build_while_another_process_wins(out_dir):
        winner = tmp_path / f"digits-v{builtin.DIGITS_VERSION}"
        winner.mkdir()
        (winner / builtin.COMPLETE_MARKER).write_text("winner\n")
        (winner / "manifest.yaml").write_text("winner")
        return real_build(out_dir)

    monkeypatch.setitem(builtin.BUILTINS, "digits", (builtin.DIGITS_VERSION, build_while_another_process_wins))
    manifest = materialize_builtin("digits", tmp_path)
    assert manifest.read_text() == "winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"digits-v{builtin.DIGITS_VERSION}"]


def test_data_root_defaults_to_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("VLCL_DATA_DIR", str(tmp_path))
    assert builtin.default_data_root() == tmp_path


def test_unknown_builtin_names_the_known_ones(tmp_path):
    with pytest.raises(ManifestError, match="unknown builtin stream 'cifar'; known: digits"):
        materialize_builtin("cifar", tmp_path)
    with pytest.raises(ManifestError, match="known: digits"):
        open_stream("builtin:cifar", tmp_path)
