import io
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from streams.check import read_shard_samples
from streams.errors import SourceError
from streams.writer import Sample, write_split


def digit_samples(count):
    digits = load_digits()
    for i in range(count):
        pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
        yield Sample(key=f"d{i:03d}", image=Image.fromarray(pixels).convert("RGB"),
                     caption=f"a handwritten {digits.target[i]}.", label=int(digits.target[i]) % 2,
                     class_name=str(digits.target[i]))


def test_round_trip_gives_back_images_captions_and_labels(tmp_path):
    samples = list(digit_samples(25))
    written = write_split(samples, tmp_path, "task-a", max_samples_per_shard=10)
    assert written.samples == 25
    assert [p.name for p in written.shards] == ["task-a-000000.tar", "task-a-000001.tar", "task-a-000002.tar"]
    read = [item for shard in written.shards for item in read_shard_samples(str(shard))]
    assert [key for key, _ in read] == [s.key for s in samples]
    for sample, (key, files) in zip(samples, read):
        assert set(files) == {"png", "txt", "json"}
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(files["png"]))), np.asarray(sample.image))
        assert files["txt"].decode() == sample.caption
        assert json.loads(files["json"]) == {"label": sample.label, "class": sample.class_name}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_encoded_jpeg_bytes_are_stored_unchanged(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 30, 30)).save(buffer, format="JPEG")
    written = write_split([Sample(key="red", image=buffer.getvalue(), caption="a red box")], tmp_path, "jpg")
    [(key, files)] = list(read_shard_samples(str(written.shards[0])))
    assert files["jpg"] == buffer.getvalue() and "json" not in files


@pytest.mark.parametrize("samples, message", [
    ([], "has no samples"),
    ([Sample("a", Image.new("RGB", (4, 4)), "x"), Sample("a", Image.new("RGB", (4, 4)), "y")], "appears twice"),
    ([Sample("a.b", Image.new("RGB", (4, 4)), "x")], "'a.b'"),
    ([Sample("a", Image.new("RGB", (4, 4)), "  ")], "empty caption"),
    ([Sample("a", b"not an image", "x")], "neither PNG"),
])
def test_bad_input_fails_and_leaves_no_shards(tmp_path, samples, message):
    with pytest.raises(SourceError, match=message):
        write_split(samples, tmp_path, "bad")
    assert list(tmp_path.iterdir()) == []
