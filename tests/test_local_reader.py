"""The in-process reader of small splits: fixed rows, disjoint complete shares, a capped selection
that ignores read order, and bad samples named or counted. No Ray."""
import random
import shutil

import numpy as np
import pytest

from methods.models import TokenizerFactory
from streams.check import read_shard_samples
from streams.errors import ShardError
from streams.local_reader import capped_selection, iter_split, read_split, row_id
from streams.manifest import load_stream
from streams.samples import RowDecoder
from test_streams_check import rewrite_shard


def decoder(classes, **options):
    return RowDecoder(32, TokenizerFactory("vlcl-tiny"), list(classes), **options)


def test_capped_selection_is_the_same_for_any_order_of_the_rows():
    # 1000 rows written class by class, as eval shards usually are: a prefix of 200 would be 2 classes
    ids = [f"eval-{i // 250:06d}.tar/{i:06d}" for i in range(1000)]
    chosen = capped_selection(ids, 200)
    rng = random.Random(0)
    for _ in range(5):
        shuffled = ids[:]
        rng.shuffle(shuffled)  # blocks arriving in another order
        assert capped_selection(shuffled, 200) == chosen
    assert len(chosen) == 200
    assert {int(i.rsplit("/", 1)[1]) // 100 for i in chosen} == set(range(10))  # spread over every class
    assert capped_selection(ids[:150], 200) == set(ids[:150])


def test_capped_eval_set_spans_every_class_and_is_the_same_each_run(digits_manifest):
    spec = load_stream(digits_manifest)
    urls = [u for t in spec.tasks for u in spec.shard_urls(t.eval)]  # the five tasks' eval sets, one after another
    classes = spec.tasks[0].classes  # every shard labels its rows 0/1
    task_of = {key: url for url in urls for key, _ in read_shard_samples(url)}
    whole = read_split(urls, decoder(classes), cap=60)
    assert len(whole) == 60
    assert {task_of[k] for k in whole.keys} == set(urls)  # a spread over every task, not a prefix
    # Any world size: the shares are disjoint and together the same 60 rows, in every run.
    for world in (1, 2, 3):
        shares = [read_split(urls, decoder(classes), cap=60, share=(rank, world)) for rank in range(world)]
        keys = [k for share in shares for k in share.keys]
        assert len(keys) == len(set(keys)) == 60
        assert set(keys) == set(whole.keys)
    # Reading the shards in reverse order (other block order) keeps the same rows.
    assert set(read_split(urls[::-1], decoder(classes), cap=60).keys) == set(whole.keys)


def test_shares_are_disjoint_hold_every_row_and_chunks_add_up(digits_manifest):
    spec = load_stream(digits_manifest)
    task = spec.tasks[1]
    urls = spec.shard_urls(task.eval)
    whole = read_split(urls, decoder(task.classes))
    assert len(whole) == task.eval.samples
    assert whole.pixels.shape == (task.eval.samples, 32, 32, 3) and whole.pixels.dtype.is_floating_point is False
    shares = [read_split(urls, decoder(task.classes), share=(rank, 2)) for rank in range(2)]
    assert shares[0].keys == whole.keys[0::2] and shares[1].keys == whole.keys[1::2]
    chunks = list(iter_split(urls, decoder(task.classes), chunk_rows=16))
    assert [k for c in chunks for k in c.keys] == whole.keys and max(len(c) for c in chunks) == 16
    assert np.array_equal(np.concatenate([c.pixels.numpy() for c in chunks]), whole.pixels.numpy())
    first_key, files = next(read_shard_samples(urls[0]))
    assert whole.keys[0] == first_key and row_id(urls[0], first_key).startswith("digits-2-3")


def test_bad_sample_is_named_or_skipped_and_listed(digits_manifest, tmp_path):
    spec = load_stream(digits_manifest)
    task = spec.tasks[0]
    shard = str(tmp_path / "broken.tar")
    shutil.copyfile(spec.shard_urls(task.eval)[0], shard)
    keys = [key for key, _ in read_shard_samples(shard)]
    bad = keys[4]
    rewrite_shard(shard, lambda key, files: {**files, "png": b"not a png"} if key == bad else files)
    with pytest.raises(ShardError) as raised:
        read_split([shard], decoder(task.classes))
    assert shard in str(raised.value) and repr(bad) in str(raised.value) and "on_bad_sample: skip" in str(raised.value)
    kept = read_split([shard], decoder(task.classes, on_bad_sample="skip"))
    assert len(kept) == len(keys) - 1 and bad not in kept.keys
    [reason] = kept.skipped
    assert bad in reason and shard in reason


def test_every_caption_of_a_retrieval_image_is_read_with_the_row_it_belongs_to(tmp_path):
    from PIL import Image

    from streams.writer import Sample, write_split

    captions = {"a": ["a red square.", "a square in red.", "red."], "b": ["a blue square."],
                "c": ["a green square.", "green!"]}
    samples = [Sample(key=key, image=Image.new("RGB", (8, 8), color), caption=texts[0],
                      extra=None if key == "b" else {"captions": texts, "image_id": key})  # b: its .txt alone
               for (key, texts), color in zip(captions.items(), ["red", "blue", "green"])]
    urls = [str(p) for p in write_split(samples, tmp_path, "pairs").shards]
    tokenize = TokenizerFactory("vlcl-tiny")()
    split = read_split(urls, decoder([], all_captions=True))
    assert split.keys == ["a", "b", "c"] and split.caption_row.tolist() == [0, 0, 0, 1, 2, 2]
    every = [t for texts in captions.values() for t in texts]
    assert split.caption_text.tolist() == tokenize(every).tolist()
    # an eval batch of rows 1..2 carries their captions, numbered within the batch
    batch = split.rows(slice(1, 3))
    assert batch["caption_row"].tolist() == [0, 1, 1] and batch["captions"].tolist() == tokenize(every[3:]).tolist()
    assert read_split(urls, decoder([])).caption_text is None  # training reads one caption per image

    bad = [Sample(key="d", image=Image.new("RGB", (8, 8)), caption="x", extra={"captions": []})]
    bad_urls = [str(p) for p in write_split(bad, tmp_path / "bad", "pairs").shards]
    with pytest.raises(ShardError, match=r"sample 'd': .json `captions` must be a non-empty list"):
        read_split(bad_urls, decoder([], all_captions=True))
