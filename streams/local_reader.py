"""Read a split's shards in the calling process: the path for splits small enough to decode once.

Training workers hold small splits (every eval and control set, and tasks below the cache limit)
decoded in memory for the whole run: a split is read once, not once per epoch or per evaluation,
and no Ray Data pipeline has to start for it. Large splits stream through Ray Data instead
(streams/ray_reader.py). Rows are in a fixed order (manifest shard order, then tar order), so the
same rows come out in every run, at any world size.

A capped split (`cap`) keeps the `cap` rows whose (shard file name, key) hash lowest: a spread over
the whole split that depends only on which rows exist, never on read order or worker count.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from streams.check import read_shard_samples
from streams.samples import RowDecoder, bad_sample_error


@dataclass
class DecodedSplit:
    """A split's rows: `pixels` uint8 (N,H,W,3), or `encoded` image bytes with `data.decode: device`."""

    text: torch.Tensor
    label: torch.Tensor
    keys: list[str]
    pixels: torch.Tensor | None = None
    encoded: list[bytes] | None = None
    skipped: list[str] = field(default_factory=list)
    # with RowDecoder(all_captions=True): token ids of every caption (M, L) and the row each belongs to (M,)
    caption_text: torch.Tensor | None = None
    caption_row: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self, index: torch.Tensor | slice) -> dict:
        """Rows `index` as a host batch: `pixels` (or `encoded` + `key`), `text`, `label`."""
        batch = {"text": self.text[index], "label": self.label[index]}
        if self.pixels is not None:
            batch["pixels"] = self.pixels[index]
        else:
            positions = range(len(self))[index] if isinstance(index, slice) else index.tolist()
            batch["encoded"] = [self.encoded[i] for i in positions]
            batch["key"] = [self.keys[i] for i in positions]
        if self.caption_text is not None and isinstance(index, slice):  # eval batches are slices
            start, stop, step = index.indices(len(self))
            assert step == 1, "caption rows follow contiguous slices only"
            mine = (self.caption_row >= start) & (self.caption_row < stop)
            batch["captions"] = self.caption_text[mine]
            batch["caption_row"] = self.caption_row[mine] - start
        return batch


def row_id(url: str, key: str) -> str:
    """A row's identity: the shard's file name (not its folder, which moves between machines) and key."""
    return f"{os.path.basename(url)}/{key}"


def capped_selection(row_ids: list[str], cap: int) -> set[str]:
    """The `cap` ids with the lowest SHA-1: the same rows whatever order they are listed in."""
    if len(row_ids) <= cap:
        return set(row_ids)
    return set(sorted(row_ids, key=lambda r: hashlib.sha1(r.encode()).digest())[:cap])


def _raw_rows(urls: list[str]) -> Iterator[tuple[str, str, dict]]:
    for url in urls:
        for key, files in read_shard_samples(url):
            yield url, key, files


def iter_split(urls: list[str], decoder: RowDecoder, *, cap: int | None = None, limit: int | None = None,
               share: tuple[int, int] = (0, 1), chunk_rows: int | None = None) -> Iterator[DecodedSplit]:
    """Decode the rows of `urls` this reader owns, `chunk_rows` at a time (None: all in one).

    `cap`: keep the capped selection of the whole split (see module docstring; costs one extra pass
    over the tar headers). `limit`: keep the first `limit` rows (reference data). `share=(rank,
    world)`: of the kept rows, those at positions rank, rank + world, ...: the shares of different
    ranks are disjoint and together hold every row. Bad samples raise ShardError naming shard and
    key, or are dropped and listed in `skipped` (`decoder.on_bad_sample == "skip"`), each by the
    one rank that owns the row.
    """
    keep = capped_selection([row_id(url, key) for url, key, _ in _raw_rows(urls)], cap) if cap is not None else None
    rank, world = share
    position, pending = 0, []
    for url, key, files in _raw_rows(urls):
        if keep is not None and row_id(url, key) not in keep:
            continue
        if limit is not None and position >= limit:
            break
        if position % world == rank:
            pending.append((url, key, files))
        position += 1
        if chunk_rows and len(pending) >= chunk_rows:
            yield _decode_rows(pending, decoder)
            pending = []
    if pending or not chunk_rows:
        yield _decode_rows(pending, decoder)


def read_split(urls: list[str], decoder: RowDecoder, **options) -> DecodedSplit:
    """All of `iter_split`'s rows at once (the options are its)."""
    return next(iter_split(urls, decoder, **options, chunk_rows=None))


def _decode_rows(raw: list[tuple[str, str, dict]], decoder: RowDecoder) -> DecodedSplit:
    pixels, encoded, captions, labels, keys, skipped = [], [], [], [], [], []
    every_caption, caption_row = [], []
    for url, key, files in raw:
        row = {**files, "__key__": key, "__url__": url}
        try:
            image, caption, label = decoder.decode_row(row)
            image_captions = decoder.captions_of(row, caption) if decoder.all_captions else []
        except ValueError as err:
            if decoder.on_bad_sample == "error":
                raise bad_sample_error(url, key, err) from None
            skipped.append(f"shard {url} sample {key!r}: {err}")
            continue
        (encoded if decoder.ship_encoded else pixels).append(image)
        captions.append(caption)
        labels.append(label)
        caption_row.extend([len(keys)] * len(image_captions))
        every_caption.extend(image_captions)
        keys.append(str(key))
    size = decoder.image_size
    text = (torch.from_numpy(decoder.tokenize(captions)) if captions
            else torch.zeros(0, decoder.context_length, dtype=torch.int64))
    split = DecodedSplit(text=text, label=torch.tensor(labels, dtype=torch.int64), keys=keys, skipped=skipped)
    if decoder.all_captions:
        split.caption_text = (torch.from_numpy(decoder.tokenize(every_caption)) if every_caption
                              else torch.zeros(0, decoder.context_length, dtype=torch.int64))
        split.caption_row = torch.tensor(caption_row, dtype=torch.int64)
    if decoder.ship_encoded:
        split.encoded = encoded
    else:
        split.pixels = (torch.from_numpy(np.stack(pixels)) if pixels
                        else torch.zeros(0, size, size, 3, dtype=torch.uint8))
    return split


def count_rows(urls: list[str]) -> int:
    """Samples in the shards, from the tar headers (for manifests that do not record `samples`)."""
    return sum(1 for _ in _raw_rows(urls))
