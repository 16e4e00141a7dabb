"""Read one task's shards as a Ray Data dataset of fixed-size uint8 images, token ids and labels.

The only vlcl module that touches Ray Data. `read_webdataset(decoder=None)` hands us raw bytes per
extension plus `__key__` and `__url__` (the shard); decoding, resizing and tokenizing run in a pool
of actors so the tokenizer is built once per actor. Pixels stay uint8 HWC: normalising (and any
augmentation) happens on the training device, where it is cheap, and a uint8 batch is a quarter of
a float32 one on the wire. With `ship_encoded` the actors only check and tokenize, and ship each
image's file bytes for the training worker to decode on its device (`data.decode: device`).

Bad samples either raise ShardError naming shard, key and the fix (`on_bad_sample="error"`), or
are dropped and counted in a `SkipCounter` actor the caller reads (`on_bad_sample="skip"`).
A tar that cannot be read at all fails in the read stage; `vlcl streams check` names it.
"""
from __future__ import annotations

from typing import Callable, Literal

import numpy as np
import ray

from streams.samples import RowDecoder, bad_sample_error

OUTPUT_COLUMNS = ("pixels", "text", "label", "key")
SKIP_EXAMPLES_KEPT = 20


@ray.remote(num_cpus=0)
class SkipCounter:
    """Counts the samples a reader dropped (`on_bad_sample="skip"`), with a few examples of why."""

    def __init__(self):
        self.count = 0
        self.examples: list[str] = []

    def add(self, reasons: list[str]) -> None:
        self.count += len(reasons)
        room = SKIP_EXAMPLES_KEPT - len(self.examples)
        self.examples.extend(reasons[:max(room, 0)])

    def total(self) -> int:
        return self.count

    def reasons(self) -> list[str]:
        return list(self.examples)


class SampleDecoder(RowDecoder):
    """A Ray Data batch (pandas) of raw webdataset columns -> decoded columns; see RowDecoder.
    Dropped samples (`on_bad_sample="skip"`) are counted in the `skip_counter` actor."""

    def __init__(self, image_size: int, tokenizer_factory: Callable[[], Callable], classes: list[str],
                 on_bad_sample: Literal["error", "skip"], skip_counter=None, ship_encoded: bool = False):
        super().__init__(image_size, tokenizer_factory, classes, on_bad_sample, ship_encoded)
        self.skip_counter = skip_counter

    def __call__(self, batch) -> dict[str, np.ndarray]:
        rows = batch.to_dict("records")
        pixels, captions, labels, keys, skipped = [], [], [], [], []
        for row in rows:
            key, shard = row.get("__key__"), row.get("__url__")
            try:
                image, caption, label = self.decode_row(row)
            except ValueError as err:
                if self.on_bad_sample == "error":
                    raise bad_sample_error(shard, key, err) from None
                skipped.append(f"shard {shard} sample {key!r}: {err}")
                continue
            pixels.append(image)
            captions.append(caption)
            labels.append(label)
            keys.append(str(key))
        if skipped:
            ray.get(self.skip_counter.add.remote(skipped))
        if not pixels:
            size = self.image_size
            images = ({"encoded": np.array([], dtype=object)} if self.ship_encoded
                      else {"pixels": np.zeros((0, size, size, 3), np.uint8)})
            return {**images, "text": np.zeros((0, self.context_length), np.int64),
                    "label": np.zeros(0, np.int64), "key": np.array([], dtype=object)}
        images = ({"encoded": np.array(pixels, dtype=object)} if self.ship_encoded
                  else {"pixels": np.stack(pixels)})
        return {**images, "text": self.tokenize(captions), "label": np.asarray(labels, np.int64),
                "key": np.asarray(keys, dtype=object)}


def task_dataset(urls: list[str], image_size: int, tokenizer_factory: Callable[[], Callable], classes: list[str],
                 train: bool, on_bad_sample: Literal["error", "skip"] = "error", skip_counter=None,
                 decoders: int = 1, decoder_cpus: float = 1.0, read_cpus: float = 1.0, batch_size: int = 256,
                 filesystem=None, ship_encoded: bool = False) -> "ray.data.Dataset":
    """A lazy dataset over one task split's shards.

    `urls`: local paths or fsspec/pyarrow URLs (s3://, gs://, file://...), as `StreamSpec.shard_urls`
    gives them; `filesystem` optionally a pyarrow filesystem for them. `tokenizer_factory` is a
    picklable zero-argument callable returning a tokenizer (list of str -> (N, L) ids). `train`
    shuffles the order of the shards; shuffle rows with the iterator's local shuffle buffer.
    `decoders` is the number of decoding actors (each holds one tokenizer), each reserving
    `decoder_cpus` CPUs, and each read task (tar bytes to rows) `read_cpus`: lower them where
    training workers hold most cores, since a read task that cannot get its CPU stalls the whole
    pipeline (`orchestrator.run.streaming_cpus` sizes them). `ship_encoded`: rows carry
    the encoded image (`encoded`) instead of `pixels`, for `streams.image_decode.decode_batch` on the
    training device.
    """
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    if on_bad_sample == "skip" and skip_counter is None:
        raise ValueError("on_bad_sample='skip' needs a skip_counter (SkipCounter.remote()) so dropped samples "
                         "are counted, not lost silently")
    if not urls:
        raise ValueError("task_dataset needs at least one shard URL")
    raw = ray.data.read_webdataset(list(urls), decoder=None, filesystem=filesystem,
                                   shuffle="files" if train else None, ray_remote_args={"num_cpus": read_cpus})
    settings = {"image_size": image_size, "tokenizer_factory": tokenizer_factory, "classes": list(classes),
                "on_bad_sample": on_bad_sample, "skip_counter": skip_counter, "ship_encoded": ship_encoded}

    class BoundSampleDecoder(SampleDecoder):
        """The settings travel with the class, not as constructor arguments: Ray Data puts those in
        the object store, and an actor that Ray may restart (Ray Data's default) should not depend
        on objects that can be lost (Ray logs an error line for every such actor)."""

        def __init__(self):
            super().__init__(**settings)

    decoded = raw.map_batches(
        BoundSampleDecoder,
        batch_format="pandas",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=decoders),
        num_cpus=decoder_cpus,
    )
    # This dataset's own context (a copy, not the global one): a bad sample surfaces as the
    # ShardError itself rather than wrapped in Ray Data's generic UserCodeException.
    decoded.context.raise_original_map_exception = True
    return decoded
