import io
import json
import os
import shutil
import tarfile
import time

import pytest

from streams.check import check_stream, read_shard_samples
from streams.manifest import load_stream


@pytest.fixture
def stream_copy(digits_manifest, tmp_path):
    """A private copy of the digits stream that a test may corrupt."""
    shutil.copytree(digits_manifest.parent, tmp_path / "digits")
    return load_stream(tmp_path / "digits" / "manifest.yaml")


def rewrite_shard(path, edit):
    """Rewrite a shard, passing each sample's files through `edit(key, files)` (None drops the sample)."""
    samples = [(key, edit(key, dict(files))) for key, files in read_shard_samples(path)]
    with tarfile.open(path, "w") as archive:
        for key, files in samples:
            for extension, data in (files or {}).items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def first_key(path):
    return next(read_shard_samples(path))[0]


def test_builtin_stream_has_no_problems_and_checks_fast(digits_manifest):
    started = time.perf_counter()
    report = check_stream(digits_manifest)
    seconds = time.perf_counter() - started
    assert report.ok, report.problems
    assert len(report.splits) == 10 and sum(s.samples for s in report.splits) == 1797
    assert seconds < 10


def test_truncated_shard_is_named_with_the_cut_sample(stream_copy):
    shard = stream_copy.shard_urls(stream_copy.tasks[0].train)[0]
    data = open(shard, "rb").read()
    keys = [key for key, _ in read_shard_samples(shard)]
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
    cut_member = next(m for m in members[len(members) // 2:] if m.name.endswith(".png"))
    open(shard, "wb").write(data[: cut_member.offset_data + cut_member.size // 2])  # cut inside a member
    report = check_stream(stream_copy)
    [problem] = [p for p in report.problems if p.key is not None]
    assert problem.shard == shard and problem.key in keys and "truncated" in problem.message
    assert any("manifest says 288" in p.message for p in report.problems)  # the count is short too


def test_shard_cut_at_a_member_boundary_is_still_truncated(stream_copy):
    shard = stream_copy.shard_urls(stream_copy.tasks[1].eval)[0]
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
    cut = members[9].offset  # header of the 10th member: the tar ends cleanly mid-stream
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[:cut])
    problems = [p for p in check_stream(stream_copy).problems if p.shard == shard]
    assert problems and "end-of-archive" in problems[0].message
    assert problems[0].key == members[8].name.split(".")[0]


@pytest.mark.parametrize("corruption, expected", [
    (lambda files: {**files, "png": b"this is text, not a png"}, "png does not decode"),
    (lambda files: {k: v for k, v in files.items() if k != "txt"}, "no caption"),
    (lambda files: {**files, "json": json.dumps({"label": 5, "class": "zero"}).encode()}, "label 5 is out of range"),
    (lambda files: {**files, "json": json.dumps({"class": "eleven"}).encode()}, "class 'eleven' is not one"),
    (lambda files: {k: v for k, v in files.items() if k != "json"}, "without `label` or `class`"),
])
def test_bad_sample_is_named_by_shard_and_key(stream_copy, corruption, expected):
    shard = stream_copy.shard_urls(stream_copy.tasks[0].eval)[0]
    bad_key = first_key(shard)
    rewrite_shard(shard, lambda key, files: corruption(files) if key == bad_key else files)
    report = check_stream(stream_copy)
    assert not report.ok
    assert [(p.shard, p.key) for p in report.problems] == [(shard, bad_key)]
    assert expected in report.problems[0].message
    assert shard in str(report.problems[0]) and bad_key in str(report.problems[0])


def test_missing_sample_shows_as_a_count_mismatch(stream_copy):
    shard = stream_copy.shard_urls(stream_copy.tasks[4].eval)[0]
    dropped = first_key(shard)
    rewrite_shard(shard, lambda key, files: None if key == dropped else files)
    [problem] = check_stream(stream_copy).problems
    assert (problem.task, problem.split) == ("digits-8-9", "eval")
    assert "70 samples in the shards but the manifest says 71" in problem.message


def test_missing_shard_file_is_a_problem_not_a_crash(stream_copy):
    shard = stream_copy.shard_urls(stream_copy.tasks[2].train)[1]
    os.remove(shard)
    [problem] = check_stream(stream_copy).problems
    assert "does not exist" in problem.message and shard in problem.message
