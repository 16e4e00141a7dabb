"""What a stream is: a YAML manifest naming its tasks, in order, and each task's shards.

    name: digits
    eval_classifier: stream        # zero-shot over all classes of the stream (class-incremental)
    tasks:                         # ... or `task`: over the task's own classes (MTIL-style)
      - name: digits-0-1
        kind: classification       # or retrieval (image-text pairs, R@K)
        classes: [zero, one]       # label i in a shard's json means classes[i]
        templates: ["a photo of the digit {}."]
        train: {shards: ["train/digits-0-1-{000000..000001}.tar"], samples: 288}
        eval:  {shards: ["eval/digits-0-1-000000.tar"], samples: 72}
    control:                       # optional: held-out sets never trained on, scored after every task
      - {name: held-out, kind: classification, classes: [...], eval: {shards: [...]}}

Shard entries are local paths (relative to the manifest's folder), globs, brace patterns, or
fsspec URLs (s3://, gs://, http://...). Shards are webdataset tars as img2dataset writes them:
`{key}.jpg|png` image, `{key}.txt` caption, `{key}.json` with `label` (int) and/or `class` (str).
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Literal

import braceexpand
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streams.errors import ManifestError

BUILTIN_PREFIX = "builtin:"


class ShardSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shards: list[str] = Field(min_length=1, description="shard paths, globs, brace patterns or fsspec URLs")
    samples: int | None = Field(None, ge=1, description="number of samples (checked by `vlcl streams check`)")


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    kind: Literal["classification", "retrieval"]
    classes: list[str] = Field(default_factory=list, description="class names; label i means classes[i]")
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."], description="prompt templates with {}")
    train: ShardSet | None = Field(None, description="training shards (required for tasks, absent for control sets)")
    eval: ShardSet

    @model_validator(mode="after")
    def _classes_for_classification(self):
        if self.kind == "classification" and not self.classes:
            raise ValueError(f"task {self.name!r} is a classification task but lists no `classes`")
        if any("{}" not in t for t in self.templates):
            raise ValueError(f"task {self.name!r}: every template needs a '{{}}' where the class name goes")
        return self


class StreamSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    eval_classifier: Literal["task", "stream"] = Field(
        "task", description="zero-shot over the task's own classes (task) or all classes of the stream (stream)")
    tasks: list[TaskSpec] = Field(min_length=1)
    control: list[TaskSpec] = Field(
        default_factory=list, description="held-out sets never trained on, evaluated after every task (retention)")
    root: str = Field("", description="folder relative shard paths resolve against (set by load_stream)")

    @model_validator(mode="after")
    def _unique_task_names(self):
        untrainable = [t.name for t in self.tasks if t.train is None]
        if untrainable:
            raise ValueError(f"tasks {untrainable} have no `train` shards; a set that is only evaluated belongs "
                             f"under `control:`")
        names = [t.name for t in self.tasks + self.control]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique; repeated: {dupes}")
        return self

    def stream_classes(self) -> list[str]:
        """All class names of the stream's classification tasks, in first-seen order."""
        seen: dict[str, None] = {}
        for task in self.tasks:
            for c in task.classes:
                seen.setdefault(c, None)
        return list(seen)

    def shard_urls(self, shard_set: ShardSet) -> list[str]:
        return expand_shards(shard_set.shards, self.root)


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def expand_shards(patterns: list[str], root: str = "") -> list[str]:
    """Brace patterns and globs -> a concrete, ordered list of shard paths or URLs.

    Local paths resolve against `root`; a local pattern that matches nothing is an error (remote
    URLs are checked when read).
    """
    urls: list[str] = []
    for pattern in patterns:
        for item in braceexpand.braceexpand(pattern):
            if is_url(item):
                urls.append(item)
                continue
            item = item.removeprefix("file://")
            path = item if os.path.isabs(item) or not root else os.path.join(root, item)
            if glob.has_magic(path):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise ManifestError(f"shard pattern {pattern!r} matches no file (looked for {path})")
                urls.extend(matches)
            else:
                if not os.path.exists(path):
                    raise ManifestError(f"shard {path} does not exist (from pattern {pattern!r}); "
                                        f"build it with `vlcl streams build` or fix the manifest")
                urls.append(path)
    return urls


def load_stream(path: str | os.PathLike) -> StreamSpec:
    """Load a stream manifest file. (`builtin:<name>` streams: `streams.builtin.open_stream`.)"""
    source = str(path)
    path = Path(source)
    if not path.is_file():
        raise ManifestError(f"stream manifest {source} does not exist; give a manifest YAML path or builtin:<name>")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ManifestError(f"stream manifest {source} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"stream manifest {source} must be a mapping with `name` and `tasks`")
    raw.setdefault("root", str(path.parent.resolve()))
    try:
        return StreamSpec(**raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ManifestError(f"stream manifest {source}: {problems}") from None


def write_manifest(spec: StreamSpec, path: str | os.PathLike) -> Path:
    """Write `spec` as YAML; shard paths under the manifest's folder are stored relative to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = spec.model_dump(exclude={"root"})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
