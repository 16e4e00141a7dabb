"""Write one task split as webdataset tar shards, in the layout img2dataset produces.

Each sample becomes `{key}.png|jpg` (the encoded image), `{key}.txt` (the caption) and, when it has
one, `{key}.json` with `label` (index into the task's classes) and/or `class` (the class name).
Shards are written into a temporary folder beside the destination and renamed into place only when
the whole split is written, so a crash never leaves a half-written split that looks complete.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import webdataset
from PIL import Image

from streams.errors import SourceError

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")
# A fixed whole-second mtime for every tar member (as reproducible builds do): the same samples give
# byte-identical shards, and no PAX header is needed for a fractional time.time(), which otherwise
# adds 1 KiB to every member (a 28x28 PNG sample went from 6 KiB to 3 KiB).
MEMBER_MTIME = 0
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_DIGITS = 6


@dataclass(frozen=True)
class Sample:
    """One image-text pair. `image` is a PIL image (encoded as PNG) or already-encoded JPEG/PNG bytes.
    `extra`: more JSON-able fields for the sample's .json (e.g. all captions of a retrieval image)."""

    key: str
    image: Image.Image | bytes
    caption: str
    label: int | None = None
    class_name: str | None = None
    extra: dict | None = None


@dataclass(frozen=True)
class WrittenSplit:
    shards: list[Path]
    samples: int


def image_extension(encoded: bytes) -> str:
    """The webdataset extension for encoded image bytes, read from the file signature."""
    if encoded.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if encoded.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if encoded[:4] == b"RIFF" and encoded[8:12] == b"WEBP":
        return "webp"
    raise SourceError("image bytes are neither PNG, JPEG nor WebP (by their signature); decode and pass a PIL image")


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sample_record(sample: Sample) -> dict[str, bytes | str]:
    """The webdataset record (extension -> bytes) for one sample; checks what a reader relies on."""
    if not KEY_PATTERN.match(sample.key):
        raise SourceError(f"sample key {sample.key!r} may only hold letters, digits, '_' and '-' "
                          f"(webdataset splits keys at the first '.')")
    if not sample.caption or not sample.caption.strip():
        raise SourceError(f"sample {sample.key!r} has an empty caption")
    if isinstance(sample.image, Image.Image):
        encoded, extension = encode_png(sample.image), "png"
    else:
        try:
            extension = image_extension(sample.image)
        except SourceError as err:
            raise SourceError(f"sample {sample.key!r}: {err}") from None
        encoded = sample.image
    record: dict[str, bytes | str] = {"__key__": sample.key, extension: encoded, "txt": sample.caption.encode("utf-8")}
    meta = dict(sample.extra or {})
    if {"label", "class"} & set(meta):
        raise SourceError(f"sample {sample.key!r}: `extra` may not set label or class (use the fields)")
    if sample.label is not None:
        meta["label"] = int(sample.label)
    if sample.class_name is not None:
        meta["class"] = sample.class_name
    if meta:
        record["json"] = json.dumps(meta).encode("utf-8")
    return record


def write_split(samples: Iterable[Sample], out_dir: str | os.PathLike, prefix: str,
                max_samples_per_shard: int = 1000) -> WrittenSplit:
    """Write `samples` as `out_dir/{prefix}-000000.tar`, ... and return the shard paths and the count.

    The shards appear in `out_dir` only once all of them are written. Keys must be unique.
    """
    if not KEY_PATTERN.match(prefix):
        raise SourceError(f"shard prefix {prefix!r} may only hold letters, digits, '_' and '-'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{prefix}-", suffix=".partial", dir=out_dir))
    written: list[Path] = []
    seen_keys: set[str] = set()
    writer = None
    try:
        for sample in samples:
            if sample.key in seen_keys:
                raise SourceError(f"sample key {sample.key!r} appears twice in split {prefix!r}; keys must be unique")
            seen_keys.add(sample.key)
            record = sample_record(sample)
            if writer is None:
                # Opened lazily: ShardWriter creates its first shard on construction, and an empty
                # split must fail instead of leaving an empty tar behind.
                writer = webdataset.ShardWriter(str(staging / f"{prefix}-%0{SHARD_DIGITS}d.tar"),
                                                maxcount=max_samples_per_shard, verbose=0, mtime=MEMBER_MTIME,
                                                post=lambda name: written.append(Path(name)))
            writer.write(record)
        if writer is None:
            raise SourceError(f"split {prefix!r} has no samples; nothing to write")
        writer.close()
        writer = None
        final = []
        for shard in written:
            target = out_dir / shard.name
            os.replace(shard, target)
            final.append(target)
        return WrittenSplit(shards=final, samples=len(seen_keys))
    finally:
        if writer is not None:
            try:
                writer.close()
            except OSError:  # already failing; the staging folder is removed below
                pass
        shutil.rmtree(staging, ignore_errors=True)


def publish_directory(staging: Path, final: Path) -> bool:
    """Atomically move a fully built folder into place; False when another process got there first."""
    try:
        os.rename(staging, final)
        return True
    except OSError:
        if final.exists():
            shutil.rmtree(staging, ignore_errors=True)
            return False
        raise


def staging_directory(final: Path) -> Path:
    """A fresh, unique folder beside `final` to build into before `publish_directory`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    return staging
