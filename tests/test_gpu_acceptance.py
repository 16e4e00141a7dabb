"""bench/gpu_acceptance.sh, the one device call of issue #23: its --smoke mode runs every step on this
CPU (vlcl-tiny, in process, no Ray start) and must leave the figures files the GPU run leaves."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_acceptance_summary  # noqa: E402

METHODS = ["finetune", "zscl", "ctp", "modx", "lwf", "er"]


@pytest.mark.slow
def test_smoke_run_writes_every_figure_under_out(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_acceptance.sh"), "--smoke"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    files = {p.name for p in out.iterdir()}
    assert files == {"summary.md", "summary.json", "log.txt", "environment.txt", "throughput-vlcl-tiny.json",
                     "method_cost.json"}                      # the device tool returns at most 8 files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["missing"] == [] and summary["mode"] == "smoke"
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [
        ("environment", "ok"), ("throughput vlcl-tiny batch 16", "ok"), ("method_cost", "ok")]
    assert "imports: ok" in (out / "environment.txt").read_text()

    throughput = json.loads((out / "throughput-vlcl-tiny.json").read_text())
    assert summary["throughput"] == [throughput]
    assert throughput["device"] == "cpu" and throughput["flops_per_image"] > 0
    plain = throughput["plain"]
    assert set(throughput["vlcl"]) == {"cpu", "device"}
    for run in [plain, *throughput["vlcl"].values()]:
        assert run["images_per_second"] > 0
        # MFU is against the GPU's dense bf16 peak on every device: a fraction, tiny on a CPU
        assert run["mfu"] == pytest.approx(run["images_per_second"] * throughput["flops_per_image"] / 989e12)
        assert 0 < run["mfu"] <= 1
        assert run["peak_memory_bytes"] is None and run["device_memory_peak_bytes"] is None   # n/a off CUDA
    for run in throughput["vlcl"].values():
        assert run["ratio_to_plain"] == pytest.approx(run["images_per_second"] / plain["images_per_second"])
        assert run["launch"] == "in_process"                  # tiny cached tasks: no Ray start on this CPU

    cost = json.loads((out / "method_cost.json").read_text())
    rows = {row["name"]: row for row in cost["methods"]}
    assert list(rows) == METHODS and summary["method_cost"] == cost
    assert rows["finetune"]["flop_ratio"] == 1.0 and rows["finetune"]["time_ratio"] == 1.0
    assert all(row["flop_ratio"] > 0 and row["step_seconds"] > 0 for row in rows.values())
    # their teachers and second views run extra forward passes on task index 1
    assert all(rows[name]["flop_ratio"] > 1.05 for name in ("zscl", "ctp", "modx", "lwf"))
    table = (out / "summary.md").read_text()
    for name, row in rows.items():
        assert f"| {name} | {1000 * row['step_seconds']:.1f} | {row['time_ratio']:.2f} |" in table
    assert "| vlcl-tiny | 16 | fp32 |" in table and "says nothing about the CPU" in table


def test_summary_names_each_missing_figure_and_fails(tmp_path):
    """A step that failed or ran out of time leaves some figures out: the summary says which, exits 1."""
    plain = {"images_per_second": 100.0, "mfu": 0.1, "peak_memory_bytes": 2**30, "device_memory_peak_bytes": 2**31}
    (tmp_path / "throughput-ViT-B-32.json").write_text(json.dumps({
        "model": "ViT-B-32", "batch": 512, "precision": "bf16", "device": "cuda", "device_name": "NVIDIA H100",
        "flops_per_image": 5e10, "plain": plain,
        "vlcl": {"cpu": {**plain, "images_per_second": 50.0, "ratio_to_plain": 0.5, "launch": "ray"},
                 "device": {"error": "RuntimeError: nvjpeg"}}}))
    (tmp_path / "method_cost.json").write_text(json.dumps({
        "model": "ViT-B-32", "batch": 512, "precision": "bf16", "device_name": "NVIDIA H100", "methods": [
            {"name": "finetune", "step_seconds": 0.1, "flops_per_step": 10, "peak_memory_bytes": 2**30,
             "time_ratio": 1.0, "flop_ratio": 1.0, "time_per_flop_ratio": 1.0},
            {"name": "zscl", "error": "OutOfMemoryError: CUDA out of memory"}]}))
    steps = tmp_path / "steps.tsv"
    steps.write_text("throughput ViT-B-32 batch 512\tfailed\t1\t80\t140\n"
                     "throughput ViT-B-16 batch 256\ttimed_out\t124\t140\t140\nmethod_cost\tfailed\t1\t60\t95\n")
    code = gpu_acceptance_summary.main([
        "--out", str(tmp_path), "--steps", str(steps), "--mode", "gpu", "--seconds", "400",
        "--throughput", "throughput-ViT-B-32.json", "throughput-ViT-B-16.json", "--decode", "cpu", "device",
        "--method-cost", "method_cost.json", "--methods", "finetune", "zscl", "er"])
    assert code == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["missing"] == ["throughput-ViT-B-32.json: vlcl run data.decode=device (RuntimeError: nvjpeg)",
                                  "throughput-ViT-B-16.json: not written",
                                  "method_cost.json: zscl (OutOfMemoryError: CUDA out of memory)",
                                  "method_cost.json: er"]
    assert not summary["complete"] and summary["steps"][1]["status"] == "timed_out"
    table = (tmp_path / "summary.md").read_text()
    assert "| ViT-B-32 | 512 | bf16 | NVIDIA H100 | vlcl data.decode=cpu | 50.0 | 0.500 | 10% | 1.00 | 2.00 | ray |" in table
    assert "failed: RuntimeError: nvjpeg" in table and "says nothing about the CPU" not in table
