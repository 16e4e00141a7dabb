import argparse
import shutil

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from streams.cli import add_streams_commands
from streams.manifest import load_stream


def run(argv):
    parser = argparse.ArgumentParser(prog="vlcl")
    add_streams_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_build_digits_then_check_passes(tmp_path, capsys):
    assert run(["streams", "build", "digits", "--data-root", str(tmp_path)]) == 0
    manifest = capsys.readouterr().out.strip()
    assert load_stream(manifest).name == "digits"
    assert run(["streams", "check", manifest]) == 0
    out = capsys.readouterr().out
    assert "digits-8-9/eval: 1 shards, 71 samples (manifest: 71)" in out and "no problems" in out


def test_check_exits_1_and_prints_each_problem(digits_manifest, tmp_path, capsys):
    shutil.copytree(digits_manifest.parent, tmp_path / "digits")
    shard = tmp_path / "digits" / "eval" / "digits-0-1-000000.tar"
    shard.write_bytes(shard.read_bytes()[:20000])
    assert run(["streams", "check", str(tmp_path / "digits" / "manifest.yaml"), "--no-decode"]) == 1
    out = capsys.readouterr().out
    assert "2 problems" in out and f"digits-0-1/eval shard {shard} key 'digit" in out


def test_build_imagefolder_from_the_command_line(tmp_path, capsys):
    digits = load_digits()
    for digit in range(4):
        (tmp_path / "src" / f"d{digit}").mkdir(parents=True)
        for index in np.flatnonzero(digits.target == digit)[:6]:
            Image.fromarray((digits.images[index] * 15).astype(np.uint8)).save(tmp_path / "src" / f"d{digit}" / f"{index}.png")
    assert run(["streams", "build", "imagefolder", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                "--classes-per-task", "2", "--template", "a digit {}.", "--eval-fraction", "0.3"]) == 0
    spec = load_stream(capsys.readouterr().out.strip())
    assert [t.classes for t in spec.tasks] == [["d0", "d1"], ["d2", "d3"]]
    assert spec.tasks[0].templates == ["a digit {}."]
