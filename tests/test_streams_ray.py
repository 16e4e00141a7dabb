import functools
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from streams.check import read_shard_samples
from streams.errors import ShardError
from streams.manifest import load_stream
from streams.image_decode import resize_center_crop
from test_streams_check import rewrite_shard


def tokenizer_factory():
    import open_clip

    return functools.partial(open_clip.get_tokenizer, "ViT-B-32", context_length=16)


def test_resize_center_crop_keeps_the_middle_of_a_wide_image():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 10:30] = 255  # a white square in the middle of a black 40x20 image
    out = resize_center_crop(Image.fromarray(pixels), 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert out[:, 1:-1].min() > 240  # the crop is the white middle (edges may blend)
    tall = resize_center_crop(Image.fromarray(np.zeros((50, 30), np.uint8)), 12)
    assert tall.shape == (12, 12, 3)


@pytest.mark.ray
def test_digits_task_reads_as_uint8_pixels_tokens_and_labels(ray_session, digits_manifest):
    from streams.ray_reader import task_dataset

    spec = load_stream(digits_manifest)
    task = spec.tasks[1]
    urls = spec.shard_urls(task.eval)
    expected = {key: files for url in urls for key, files in read_shard_samples(url)}
    dataset = task_dataset(["file://" + u for u in urls], image_size=32, tokenizer_factory=tokenizer_factory(),
                           classes=task.classes, train=False, decoder_cpus=0.5)
    batches = list(dataset.iter_batches(batch_size=32, batch_format="numpy"))
    pixels = np.concatenate([b["pixels"] for b in batches])
    text = np.concatenate([b["text"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    keys = [str(k) for b in batches for k in b["key"]]
    assert pixels.shape == (task.eval.samples, 32, 32, 3) and pixels.dtype == np.uint8
    assert text.shape == (task.eval.samples, 16) and text.dtype == np.int64
    assert labels.dtype == np.int64 and sorted(keys) == sorted(expected)
    tokenize = tokenizer_factory()()
    for i, key in enumerate(keys):
        files = expected[key]
        assert labels[i] == json.loads(files["json"])["label"]
        assert np.array_equal(pixels[i], np.asarray(Image.open(io.BytesIO(files["png"])).convert("RGB")))
        assert np.array_equal(text[i], tokenize([files["txt"].decode()])[0].numpy())
    assert set(labels.tolist()) == {0, 1}


def copy_first_eval_shard(spec, folder) -> str:
    """A copy of the first task's first eval shard, to break on purpose."""
    shard = str(folder / "broken.tar")
    shutil.copyfile(spec.shard_urls(spec.tasks[0].eval)[0], shard)
    return shard


@pytest.mark.ray
def test_bad_sample_raises_shard_error_or_is_skipped_and_counted(ray_session, digits_manifest, tmp_path):
    import ray

    from streams.ray_reader import SkipCounter, task_dataset

    spec = load_stream(digits_manifest)
    task, shard = spec.tasks[0], copy_first_eval_shard(spec, tmp_path)
    keys = [key for key, _ in read_shard_samples(shard)]
    bad_key, class_only_key = keys[5], keys[6]

    def corrupt(key, files):
        if key == bad_key:
            return {**files, "png": b"definitely not a png"}
        if key == class_only_key:  # `class` without `label` maps through the task's classes
            return {**files, "json": json.dumps({"class": json.loads(files["json"])["class"]}).encode()}
        return files

    rewrite_shard(shard, corrupt)
    counter = SkipCounter.remote()
    rows = task_dataset([shard], 32, tokenizer_factory(), task.classes, train=True, on_bad_sample="skip",
                        skip_counter=counter, decoder_cpus=0.5).take_all()
    assert len(rows) == len(keys) - 1 and bad_key not in {r["key"] for r in rows}
    assert ray.get(counter.total.remote()) == 1
    [reason] = ray.get(counter.reasons.remote())
    assert bad_key in reason and "does not decode" in reason
    expected_class = json.loads(dict(read_shard_samples(spec.shard_urls(task.eval)[0]))[class_only_key]["json"])
    assert next(r["label"] for r in rows if r["key"] == class_only_key) == expected_class["label"]

    # Last: a failed dataset holds its decoder actor until it is garbage-collected.
    with pytest.raises(ShardError) as raised:
        task_dataset([shard], 32, tokenizer_factory(), task.classes, train=False,
                     decoder_cpus=0.5).materialize()
    message = str(raised.value)
    assert bad_key in message and shard in message and "on_bad_sample: skip" in message


def test_skip_without_a_counter_is_refused():
    from streams.ray_reader import task_dataset

    with pytest.raises(ValueError, match="needs a skip_counter"):
        task_dataset(["x.tar"], 32, tokenizer_factory(), [], train=False, on_bad_sample="skip")


@pytest.mark.ray
def test_shipping_encoded_images_checks_them_and_keeps_their_bytes(ray_session, digits_manifest, tmp_path):
    import ray

    from streams.ray_reader import SkipCounter, task_dataset

    spec = load_stream(digits_manifest)
    task, shard = spec.tasks[0], copy_first_eval_shard(spec, tmp_path)
    original = dict(read_shard_samples(shard))
    bad_key = sorted(original)[3]
    rewrite_shard(shard, lambda key, files: {**files, "png": b"not an image"} if key == bad_key else files)
    counter = SkipCounter.remote()
    rows = task_dataset([shard], 32, tokenizer_factory(), task.classes, train=False, on_bad_sample="skip",
                        skip_counter=counter, decoder_cpus=0.5, ship_encoded=True).take_all()
    assert "pixels" not in rows[0]
    assert {r["key"]: bytes(r["encoded"]) for r in rows} == {k: f["png"] for k, f in original.items() if k != bad_key}
    [reason] = ray.get(counter.reasons.remote())
    assert bad_key in reason and "not an image" in reason
