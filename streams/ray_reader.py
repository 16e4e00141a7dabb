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

import io
import json
from typing import Callable, Literal

import numpy as np
import ray
from PIL import Image

from streams.errors import ShardError
from streams.image_decode import decode_to_pixels
from streams.writer import IMAGE_EXTENSIONS

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


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))


class SampleDecoder:
    """Raw webdataset columns -> `pixels` (N,H,W,3) uint8, `text` (N,L) int64, `label` (N,) int64, `key`.

    With `ship_encoded`, `encoded` (the image file's bytes, for decoding on the training device)
    replaces `pixels`; the image is then only checked to be one (its header parses), not decoded."""

    def __init__(self, image_size: int, tokenizer_factory: Callable[[], Callable], classes: list[str],
                 on_bad_sample: Literal["error", "skip"], skip_counter=None, ship_encoded: bool = False):
        self.image_size = image_size
        self.ship_encoded = ship_encoded
        self.tokenizer = tokenizer_factory()
        # An all-bad batch still returns (0, L) token ids, so every block has the same tensor shape.
        self.context_length = self.tokenize([""]).shape[1]
        self.classes = list(classes)
        self.class_index = {name: i for i, name in enumerate(self.classes)}
        self.on_bad_sample = on_bad_sample
        self.skip_counter = skip_counter

    def tokenize(self, captions: list[str]) -> np.ndarray:
        tokens = self.tokenizer(captions)
        tokens = tokens.numpy() if hasattr(tokens, "numpy") else np.asarray(tokens)
        return tokens.astype(np.int64)

    def decode_row(self, row: dict) -> tuple[np.ndarray, str, int]:
        """One sample's pixels, caption and label; raises ValueError saying what is wrong."""
        encoded = next((row[ext] for ext in IMAGE_EXTENSIONS if _present(row.get(ext))), None)
        if encoded is None:
            raise ValueError(f"no image ({'/'.join(IMAGE_EXTENSIONS)})")
        if self.ship_encoded:
            try:
                Image.open(io.BytesIO(encoded)).close()  # reads the header only
            except (OSError, ValueError, SyntaxError) as err:
                raise ValueError(f"not an image ({type(err).__name__}: {err})") from None
            pixels = bytes(encoded)
        else:
            pixels = decode_to_pixels(encoded, self.image_size)
        caption = row.get("txt")
        if not _present(caption):
            raise ValueError("no caption (.txt)")
        caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        if not caption.strip():
            raise ValueError("empty caption (.txt)")
        return pixels, caption, self.label_of(row)

    def label_of(self, row: dict) -> int:
        if not self.classes:
            return -1
        meta = row.get("json")
        if not _present(meta):
            raise ValueError("no .json with `label` or `class` in a classification task")
        try:
            meta = json.loads(meta)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f".json does not parse ({err})") from None
        label = meta.get("label") if isinstance(meta, dict) else None
        if isinstance(label, int) and not isinstance(label, bool):
            if not 0 <= label < len(self.classes):
                raise ValueError(f"label {label} is out of range for {len(self.classes)} classes")
            return label
        class_name = meta.get("class") if isinstance(meta, dict) else None
        if class_name in self.class_index:
            return self.class_index[class_name]
        raise ValueError(f"neither an integer `label` nor a known `class` (got {meta!r}; classes {self.classes})")

    def __call__(self, batch) -> dict[str, np.ndarray]:
        rows = batch.to_dict("records")
        pixels, captions, labels, keys, skipped = [], [], [], [], []
        for row in rows:
            key, shard = row.get("__key__"), row.get("__url__")
            try:
                image, caption, label = self.decode_row(row)
            except ValueError as err:
                if self.on_bad_sample == "error":
                    raise ShardError(f"shard {shard} sample {key!r}: {err}. Rebuild the shard (`vlcl streams check` "
                                     f"lists every bad sample) or set `on_bad_sample: skip` to drop such samples") \
                        from None
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
                 decoders: int = 1, decoder_cpus: float = 1.0, batch_size: int = 256,
                 filesystem=None, ship_encoded: bool = False) -> "ray.data.Dataset":
    """A lazy dataset over one task split's shards.

    `urls`: local paths or fsspec/pyarrow URLs (s3://, gs://, file://...), as `StreamSpec.shard_urls`
    gives them; `filesystem` optionally a pyarrow filesystem for them. `tokenizer_factory` is a
    picklable zero-argument callable returning a tokenizer (list of str -> (N, L) ids). `train`
    shuffles the order of the shards; shuffle rows with the iterator's local shuffle buffer.
    `decoders` is the number of decoding actors (each holds one tokenizer), each reserving
    `decoder_cpus` CPUs (lower it where training workers need the cores). `ship_encoded`: rows carry
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
                                   shuffle="files" if train else None)
    decoded = raw.map_batches(
        SampleDecoder,
        fn_constructor_kwargs={"image_size": image_size, "tokenizer_factory": tokenizer_factory,
                               "classes": list(classes), "on_bad_sample": on_bad_sample,
                               "skip_counter": skip_counter, "ship_encoded": ship_encoded},
        batch_format="pandas",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=decoders),
        num_cpus=decoder_cpus,
    )
    # This dataset's own context (a copy, not the global one): a bad sample surfaces as the
    # ShardError itself rather than wrapped in Ray Data's generic UserCodeException.
    decoded.context.raise_original_map_exception = True
    return decoded
