"""One webdataset sample's files -> uint8 pixels, caption token ids and label, in plain Python.

Shared by every reader: Ray Data's decoding actors (streams/ray_reader.py) and the in-process reader
that training workers use for small splits (streams/local_reader.py). No Ray here.
"""
from __future__ import annotations

import io
import json
from typing import Callable, Literal

import numpy as np
from PIL import Image

from streams.errors import ShardError
from streams.image_decode import decode_to_pixels
from streams.writer import IMAGE_EXTENSIONS


def bad_sample_error(shard, key, reason) -> ShardError:
    return ShardError(f"shard {shard} sample {key!r}: {reason}. Rebuild the shard (`vlcl streams check` lists every "
                      f"bad sample) or set `on_bad_sample: skip` to drop such samples")


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))


def _parsed_json(row: dict):
    """The sample's .json, parsed (None when it has none); ValueError when it does not parse."""
    meta = row.get("json")
    if not _present(meta):
        return None
    try:
        return json.loads(meta)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f".json does not parse ({err})") from None


class RowDecoder:
    """Raw webdataset columns -> `pixels` (N,H,W,3) uint8, `text` (N,L) int64, `label` (N,) int64, `key`.

    With `ship_encoded`, `encoded` (the image file's bytes, for decoding on the training device)
    replaces `pixels`; the image is then only checked to be one (its header parses), not decoded."""

    def __init__(self, image_size: int, tokenizer_factory: Callable[[], Callable], classes: list[str],
                 on_bad_sample: Literal["error", "skip"] = "error", ship_encoded: bool = False,
                 all_captions: bool = False):
        self.image_size = image_size
        self.all_captions = all_captions  # retrieval eval: every caption of an image (see captions_of)
        self.ship_encoded = ship_encoded
        self.tokenizer = tokenizer_factory()
        # An all-bad batch still returns (0, L) token ids, so every block has the same tensor shape.
        self.context_length = self.tokenize([""]).shape[1]
        self.classes = list(classes)
        self.class_index = {name: i for i, name in enumerate(self.classes)}
        self.on_bad_sample = on_bad_sample

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

    def captions_of(self, row: dict, caption: str) -> list[str]:
        """Every caption of the sample's image: its .json `captions` list (COCO and Flickr30K write
        all five) or, without one, the .txt alone (P9D: one title per image)."""
        meta = _parsed_json(row)
        captions = meta.get("captions") if isinstance(meta, dict) else None
        if captions is None:
            return [caption]
        if not (isinstance(captions, list) and captions and all(isinstance(c, str) and c.strip() for c in captions)):
            raise ValueError(f".json `captions` must be a non-empty list of non-empty strings (got {captions!r})")
        return captions

    def label_of(self, row: dict) -> int:
        if not self.classes:
            return -1
        if not _present(row.get("json")):
            raise ValueError("no .json with `label` or `class` in a classification task")
        meta = _parsed_json(row)
        label = meta.get("label") if isinstance(meta, dict) else None
        if isinstance(label, int) and not isinstance(label, bool):
            if not 0 <= label < len(self.classes):
                raise ValueError(f"label {label} is out of range for {len(self.classes)} classes")
            return label
        class_name = meta.get("class") if isinstance(meta, dict) else None
        if class_name in self.class_index:
            return self.class_index[class_name]
        raise ValueError(f"neither an integer `label` nor a known `class` (got {meta!r}; classes {self.classes})")
