"""Check a stream's shards against its manifest before spending cluster time on it.

`check_stream` reads every shard in plain Python (no Ray): tar integrity, sample counts, image
decoding, captions, labels. Every problem names the task, split, shard and (where there is one)
the sample key, so the shard can be rebuilt or the sample removed.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

from PIL import Image, UnidentifiedImageError

from streams.errors import ManifestError, ShardError
from streams.manifest import StreamSpec, TaskSpec, is_url, load_stream
from streams.writer import IMAGE_EXTENSIONS

END_OF_ARCHIVE = b"\0" * 1024


def split_name(member_name: str) -> tuple[str, str] | None:
    """`dir/key.ext.more` -> (`dir/key`, `ext.more`), the webdataset rule (key ends at the first dot)."""
    directory, _, base = member_name.rpartition("/")
    if "." not in base:
        return None
    stem, extension = base.split(".", 1)
    return (f"{directory}/{stem}" if directory else stem), extension


def _open_binary(url: str):
    if is_url(url):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url.removeprefix("file://"), "rb")


class ShardReadError(ShardError):
    """A shard that cannot be read to the end; `key` is the sample being read when it failed."""

    def __init__(self, message: str, shard: str, key: str | None):
        super().__init__(message)
        self.shard, self.key = shard, key

    def __reduce__(self):
        return type(self), (str(self), self.shard, self.key)


def read_shard_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) for each sample of one webdataset shard, in tar order.

    Raises ShardError naming the shard when the tar is corrupt or truncated, and when a key's
    files are not contiguous (readers would split that sample in two).
    """
    finished: set[str] = set()
    key, files = None, {}
    reading = None  # key of the tar member being read, to name the sample a truncation cut
    try:
        with _open_binary(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                if not member.isreg():
                    continue
                parts = split_name(member.name)
                if parts is None:
                    continue
                member_key, extension = parts
                reading = member_key
                data = archive.extractfile(member).read()
                if member_key != key:
                    if key is not None:
                        finished.add(key)
                        yield key, files
                    if member_key in finished:
                        raise ShardReadError(f"shard {url}: the files of sample {member_key!r} are not contiguous; "
                                             f"rebuild the shard with `vlcl streams build`", url, member_key)
                    key, files = member_key, {}
                if extension in files:
                    raise ShardReadError(f"shard {url}: sample {member_key!r} holds {extension!r} twice; "
                                         f"rebuild the shard", url, member_key)
                files[extension] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        if isinstance(err, ShardError):
            raise
        raise ShardReadError(f"shard {url} is corrupt or truncated at sample {reading!r} "
                             f"({type(err).__name__}: {err}); rebuild it with `vlcl streams build`", url, reading) from None
    if key is not None:
        yield key, files
    if not is_url(url):
        path = url.removeprefix("file://")
        if os.path.getsize(path) < len(END_OF_ARCHIVE) or _tail(path) != END_OF_ARCHIVE:
            raise ShardReadError(f"shard {url} has no end-of-archive marker: it was truncated at sample {key!r}; "
                                 f"rebuild it with `vlcl streams build`", url, key)


def _tail(path: str) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(-len(END_OF_ARCHIVE), os.SEEK_END)
        return handle.read()


@dataclass(frozen=True)
class Problem:
    task: str
    split: str
    shard: str | None
    key: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.task}/{self.split}"
        if self.shard:
            where += f" shard {self.shard}"
        if self.key:
            where += f" key {self.key!r}"
        return f"{where}: {self.message}"


@dataclass
class SplitSummary:
    task: str
    split: str
    shards: int
    samples: int
    expected_samples: int | None


@dataclass
class CheckReport:
    stream: str
    splits: list[SplitSummary] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary_lines(self) -> list[str]:
        tasks = {s.task for s in self.splits if s.split == "train"}
        controls = {s.task for s in self.splits} - tasks
        lines = [f"stream {self.stream}: {len(tasks)} tasks" + (f", {len(controls)} control sets" if controls else "")]
        for s in self.splits:
            expected = "" if s.expected_samples is None else f" (manifest: {s.expected_samples})"
            lines.append(f"  {s.task}/{s.split}: {s.shards} shards, {s.samples} samples{expected}")
        lines.append(f"{len(self.problems)} problems" if self.problems else "no problems")
        lines.extend(f"  {p}" for p in self.problems)
        return lines


def sample_problems(task: TaskSpec, files: dict[str, bytes], decode_images: bool) -> list[str]:
    """What is wrong with one sample of `task` (empty when nothing is)."""
    problems = []
    images = [ext for ext in IMAGE_EXTENSIONS if ext in files]
    if not images:
        problems.append(f"no image (expected one of {', '.join(IMAGE_EXTENSIONS)}; found {sorted(files)})")
    elif len(images) > 1:
        problems.append(f"more than one image: {images}")
    elif decode_images:
        try:
            with Image.open(io.BytesIO(files[images[0]])) as image:
                image.load()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            problems.append(f"{images[0]} does not decode as an image ({type(err).__name__}: {err})")
    caption = files.get("txt")
    if caption is None:
        problems.append("no caption (.txt)")
    else:
        try:
            if not caption.decode("utf-8").strip():
                problems.append("empty caption (.txt)")
        except UnicodeDecodeError:
            problems.append("caption (.txt) is not UTF-8")
    meta = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
            if not isinstance(meta, dict):
                problems.append(".json is not an object")
                meta = {}
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            problems.append(f".json does not parse ({err})")
    label, class_name = meta.get("label"), meta.get("class")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        problems.append(f"label {label!r} is not an integer")
        label = None
    if task.kind == "classification":
        if label is None and class_name is None:
            problems.append("classification sample without `label` or `class` in its .json")
        if label is not None and not 0 <= label < len(task.classes):
            problems.append(f"label {label} is out of range for the task's {len(task.classes)} classes")
        if class_name is not None and class_name not in task.classes:
            problems.append(f"class {class_name!r} is not one of the task's classes {task.classes}")
        if (label is not None and class_name is not None and 0 <= label < len(task.classes)
                and task.classes[label] != class_name):
            problems.append(f"label {label} means {task.classes[label]!r} but class says {class_name!r}")
    return problems


def check_split(spec: StreamSpec, task: TaskSpec, split: str, decode_images: bool,
                report: CheckReport) -> None:
    shard_set = getattr(task, split)
    try:
        urls = spec.shard_urls(shard_set)
    except ManifestError as err:
        report.problems.append(Problem(task.name, split, None, None, str(err)))
        report.splits.append(SplitSummary(task.name, split, 0, 0, shard_set.samples))
        return
    count = 0
    seen: dict[str, str] = {}
    for url in urls:
        try:
            for key, files in read_shard_samples(url):
                count += 1
                if key in seen:
                    report.problems.append(Problem(task.name, split, url, key, f"key also appears in {seen[key]}"))
                seen[key] = url
                for message in sample_problems(task, files, decode_images):
                    report.problems.append(Problem(task.name, split, url, key, message))
        except ShardReadError as err:
            report.problems.append(Problem(task.name, split, url, err.key, str(err)))
    if shard_set.samples is not None and count != shard_set.samples:
        report.problems.append(Problem(task.name, split, None, None,
                                       f"{count} samples in the shards but the manifest says {shard_set.samples}"))
    report.splits.append(SplitSummary(task.name, split, len(urls), count, shard_set.samples))


def check_stream(spec: StreamSpec | str | os.PathLike, decode_images: bool = True) -> CheckReport:
    """Read every shard of every task and report each problem (nothing is raised for shard problems)."""
    if not isinstance(spec, StreamSpec):
        spec = load_stream(spec)
    report = CheckReport(stream=spec.name)
    for task in spec.tasks:
        for split in ("train", "eval"):
            check_split(spec, task, split, decode_images, report)
    for task in spec.control:
        check_split(spec, task, "eval", decode_images, report)
    return report


def shard_counts(url: str) -> tuple[int, set[tuple[int | None, str | None]]]:
    """(samples, the distinct (label, class) pairs of their .json) of one shard, for converters."""
    count, pairs = 0, set()
    for key, files in read_shard_samples(url):
        count += 1
        if "json" in files:
            try:
                meta = json.loads(files["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ShardError(f"shard {url}: sample {key!r} has a .json that does not parse ({err})") from None
            if isinstance(meta, dict):
                label, class_name = meta.get("label"), meta.get("class")
                pairs.add((label if isinstance(label, int) else None,
                           class_name if isinstance(class_name, str) else None))
    return count, pairs


__all__ = ["CheckReport", "Problem", "ShardReadError", "SplitSummary", "check_stream", "read_shard_samples",
           "sample_problems", "shard_counts"]
