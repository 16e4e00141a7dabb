"""The benchmarks of bench/ in tiny CPU mode: every method gets a time and a FLOP ratio to
fine-tuning; the throughput benchmark reports both loops' img/s and their ratio."""
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import method_cost  # noqa: E402
import throughput  # noqa: E402

from methods import METHODS  # noqa: E402

pytestmark = pytest.mark.slow
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


def test_method_cost_prints_a_time_and_flop_ratio_per_method(capsys):
    costs = method_cost.main(["--model", "vlcl-tiny", "--batch", "4", "--steps", "1", "--warmup", "0",
                              "--device", "cpu", "--precision", "fp32"])
    table = capsys.readouterr().out
    rows = {}
    for line in table.splitlines():
        match = re.match(rf"\| (\w+) \| {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER} \|$", line)
        if match:
            rows[match.group(1)] = [float(v) for v in match.groups()[1:]]
    assert set(rows) == set(METHODS)
    assert rows["finetune"][1] == 1.0 and rows["finetune"][3] == 1.0
    assert all(ms > 0 and gflop > 0 for ms, _, gflop, _, _ in rows.values())
    # Teachers run forward passes on task index 1, so distillation methods cost more FLOPs than fine-tuning.
    assert rows["lwf"][3] > 1.05 and rows["zscl"][3] > 1.05
    assert [c.name for c in costs][0] == "finetune" and all(c.peak_memory_bytes is None for c in costs)


def test_method_cost_rejects_an_unknown_method():
    from methods import UnknownMethodError

    with pytest.raises(UnknownMethodError, match="no_such_method"):
        method_cost.main(["--methods", "no_such_method", "--device", "cpu"])


@pytest.mark.ray
def test_throughput_prints_both_loops_and_their_ratio(ray_session, tmp_path, capsys):
    result = throughput.main(["--model", "vlcl-tiny", "--batch", "16", "--steps", "3", "--warmup", "1",
                              "--device", "cpu", "--precision", "fp32", "--decoders", "1",
                              "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    plain = re.search(rf"\| plain PyTorch [^|]*\| {NUMBER} \| {NUMBER}% \|", out)
    vlcl = re.search(rf"\| vlcl run [^|]*\| {NUMBER} \| {NUMBER}% \|", out)
    ratio = re.search(rf"ratio vlcl/plain \(data.decode=cpu\): {NUMBER}", out)
    assert plain and vlcl and ratio, out
    assert float(plain.group(1)) > 0 and float(vlcl.group(1)) > 0
    # The table rounds img/s to one decimal, so a ratio of the printed numbers can be off by several
    # percent at CPU speeds; the printed ratio is checked against the unrounded numbers the bench returns.
    assert result["ratio"] == pytest.approx(result["vlcl_images_per_second"] / result["plain_images_per_second"])
    assert float(ratio.group(1)) == pytest.approx(result["ratio"], abs=0.00051)
    assert float(plain.group(1)) == pytest.approx(result["plain_images_per_second"], abs=0.0501)
    assert float(vlcl.group(1)) == pytest.approx(result["vlcl_images_per_second"], abs=0.0501)
    assert result["flops_per_image"] > 0
    # The vlcl number is the trainer's MLflow metric, read back from the store in the work dir.
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "stream" / "manifest.yaml").is_file()


def test_offline_benchmark_table_has_the_start_row_and_each_method():
    import offline_benchmark

    from orchestrator.run import SequenceResult

    start = [0.30, 0.20]
    result = SequenceResult(run_id="r", experiment_id="e", tasks=["a", "b"],
                            matrix=[start, [0.9, 0.25], [0.5, 0.8]],
                            summary={"cl/transfer": 0.25, "cl/avg": 0.6125, "cl/last": 0.65, "cl/bwt": -0.4,
                                     "cl/forgetting": 0.4, "cl/control": 0.3, "cl/control_retention": 0.75},
                            wall_seconds=12.0, control_tasks=["held-out"], control_matrix=[[0.4], [0.35], [0.3]])
    table = offline_benchmark.markdown_table(result.tasks, start, result.control_tasks, [0.4], [("finetune", result)])
    lines = table.splitlines()
    assert lines[2] == "| finetune | 25.0 | 61.3 | 65.0 | -40.0 | 40.0 | 30.0 | 0.75 | 12 |"
    assert "| pretrained start (zero-shot) | 30.0 | 20.0 | 40.0 |" in lines
    assert "| finetune (after all) | 50.0 | 80.0 | 30.0 |" in lines


def test_offline_benchmark_scales_the_weight_ensemble_to_the_task_length(tmp_path):
    import argparse

    import offline_benchmark

    args = argparse.Namespace(batch_size=32, steps=30, lr=5e-5, seed=0, output_dir=str(tmp_path), experiment="x",
                              overrides=[])
    checkpoint = tmp_path / "start.pt"
    zscl = offline_benchmark.run_config("zscl", checkpoint, args, "sqlite:///x.db")
    assert zscl.method.hparams.avg_freq == 3 and zscl.data.reference == offline_benchmark.PRETRAIN_STREAM
    assert "avg_freq" not in offline_benchmark.run_config("finetune", checkpoint, args, "sqlite:///x.db").method.hparams
    args.overrides = ["method.hparams.avg_freq=7"]                     # a --set still wins
    assert offline_benchmark.run_config("we", checkpoint, args, "sqlite:///x.db").method.hparams.avg_freq == 7


def test_offline_benchmark_resume_finds_the_unfinished_parent_and_reads_back_its_finished_methods(tmp_path):
    import argparse

    import offline_benchmark

    from orchestrator import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment = tracking.ensure_experiment(uri, "bench")
    args = argparse.Namespace(steps=30, batch_size=32, lr=5e-5, seed=0, overrides=["data.eval_max_samples=200"])
    settings = offline_benchmark.benchmark_settings(args, Path("start.pt"))

    def parent(status, params):
        run = client.create_run(experiment, tags={"vlcl.kind": "benchmark"})
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, status=status)
        return run.info.run_id

    parent("FINISHED", settings)                                                     # finished: nothing to resume
    parent("FAILED", {**settings, "lr": "1e-05"})                                    # other settings
    interrupted = parent("FAILED", settings)
    assert offline_benchmark.unfinished_benchmark(client, experiment, settings).info.run_id == interrupted
    assert offline_benchmark.unfinished_benchmark(client, experiment, {**settings, "seed": "1"}) is None

    def child(method, status):
        run = client.create_run(experiment, tags={"mlflow.parentRunId": interrupted, "vlcl.method": method})
        client.log_dict(run.info.run_id, {"tasks": ["a", "b"], "rows": [[0.3, 0.2], [0.9, 0.1], [0.5, 0.8]],
                                          "control_tasks": ["c"], "control_rows": [[0.4], [0.3], [0.2]]}, "matrix.json")
        client.log_metric(run.info.run_id, "cl/bwt", -0.4)
        client.log_metric(run.info.run_id, "train/loss", 1.0)
        client.set_terminated(run.info.run_id, status=status)

    child("finetune", "FINISHED")
    child("zscl", "FAILED")                                                         # interrupted: runs again
    done = offline_benchmark.finished_methods(client, experiment, interrupted, tmp_path)
    assert set(done) == {"finetune"}
    result = done["finetune"]
    assert result.matrix == [[0.3, 0.2], [0.9, 0.1], [0.5, 0.8]] and result.summary == {"cl/bwt": -0.4}
    assert result.control_tasks == ["c"] and result.control_matrix[-1] == [0.2] and result.wall_seconds >= 0
