"""End-to-end continual runs on Ray Train (CPU): 2 workers, MLflow contents, crash + resume."""
import json

import pytest

from orchestrator.config import load_run_config
from orchestrator.run import run_sequence
from streams.manifest import load_stream, write_manifest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def three_task_manifest(digits_manifest):
    """The first three digit tasks, beside the built-in manifest so shard paths stay valid, and the
    6-vs-7 eval set as a control set that is never trained on."""
    spec = load_stream(digits_manifest)
    control = spec.tasks[3].model_copy(update={"name": "held-out-6-7", "train": None})
    small = spec.model_copy(update={"name": "digits3", "tasks": spec.tasks[:3], "control": [control]})
    return str(write_manifest(small, digits_manifest.parent / "digits3.yaml"))


def _config(tmp_path, manifest, *overrides):
    return load_run_config(None, [
        f"stream={manifest}", f"output_dir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "train.batch_size=32", "train.lr=2e-3", "train.cpus_per_worker=0.5", "train.shuffle_buffer=256",
        *overrides])


def test_two_workers_full_stream_lands_in_mlflow(ray_session, tmp_path, digits_manifest):
    from mlflow.tracking import MlflowClient

    config = _config(tmp_path, digits_manifest, "train.num_workers=2", "train.max_steps_per_task=6",
                     "tracking.checkpoints=last", "tracking.system_metrics=true")
    result = run_sequence(config, quiet=True)

    assert len(result.matrix) == 6 and all(len(row) == 5 for row in result.matrix)
    assert all(0.0 <= v <= 1.0 for row in result.matrix for v in row)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "finetune-digits-s0"
    assert run.data.tags["vlcl.method"] == "finetune" and run.data.params["train.num_workers"] == "2"
    first_task = result.tasks[0]
    history = client.get_metric_history(result.run_id, f"eval/{first_task}/score")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2, 3, 4, 5]
    assert run.data.metrics["cl/bwt"] == pytest.approx(result.summary["cl/bwt"])
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"matrix.json", "matrix.png", "config.yaml", "checkpoints"} <= artifacts
    checkpoints = {a.path for a in client.list_artifacts(result.run_id, "checkpoints")}
    assert checkpoints == {"checkpoints/task_5"}  # tracking.checkpoints=last
    matrix = json.loads(client.download_artifacts(result.run_id, "matrix.json", str(tmp_path)) and
                        (tmp_path / "matrix.json").read_text())
    assert matrix["rows"] == result.matrix and matrix["tasks"] == result.tasks
    assert run.inputs.dataset_inputs[0].dataset.name == "digits"
    assert any(key.startswith("system/cpu") for key in run.data.metrics)  # tracking.system_metrics=true


def test_crash_then_resume_equals_uninterrupted_run(ray_session, tmp_path, three_task_manifest, monkeypatch):
    steps = ["train.max_steps_per_task=80"]
    reference = run_sequence(_config(tmp_path / "a", three_task_manifest, *steps), quiet=True)
    # Fine-tuning forgets: old tasks drop once later tasks are trained.
    assert reference.summary["cl/bwt"] < -0.2

    monkeypatch.setenv("VLCL_FAULT_AFTER_TASK", "1")
    interrupted = _config(tmp_path / "b", three_task_manifest, *steps)
    with pytest.raises(Exception, match="injected fault"):
        run_sequence(interrupted, quiet=True)
    monkeypatch.delenv("VLCL_FAULT_AFTER_TASK")
    resumed = run_sequence(interrupted, resume=True, quiet=True)

    flat = lambda matrix: [v for row in matrix for v in row]  # noqa: E731
    assert flat(resumed.matrix) == pytest.approx(flat(reference.matrix), abs=1e-6)
    assert resumed.run_id != reference.run_id

    # The control set is scored before training and after every task, and resumes like the matrix.
    assert reference.control_tasks == ["held-out-6-7"]
    assert len(reference.control_matrix) == 4 and all(len(row) == 1 for row in reference.control_matrix)
    assert flat(resumed.control_matrix) == pytest.approx(flat(reference.control_matrix), abs=1e-6)
    start, end = reference.control_matrix[0][0], reference.control_matrix[-1][0]
    assert reference.summary["cl/control"] == pytest.approx(end)
    assert reference.summary["cl/control_retention"] == pytest.approx(end / start)


@pytest.mark.parametrize("launch", ["in_process", "ray"])
def test_worker_failure_recovers_from_last_task_checkpoint(ray_session, tmp_path, three_task_manifest, monkeypatch,
                                                           launch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("VLCL_FAULT_AFTER_TASK", "2")
    monkeypatch.setenv("VLCL_FAULT_MARKER", str(tmp_path / "fault-fired"))
    result = run_sequence(_config(tmp_path, three_task_manifest, "train.max_steps_per_task=5", "train.max_failures=1",
                                  f"train.launch={launch}"), quiet=True)
    assert (tmp_path / "fault-fired").exists()  # the fault really happened, and the run still finished
    assert len(result.matrix) == 4
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result.run_id)
    assert run.data.tags["vlcl.launch"] == launch and run.info.status == "FINISHED"
    # the restart went on from task 2's checkpoint: task 3 trained once, tasks 1 and 2 were not redone
    assert [s["task"] for s in result.task_settings] == result.tasks


@pytest.fixture(scope="module")
def two_task_manifest(digits_manifest):
    spec = load_stream(digits_manifest)
    return str(write_manifest(spec.model_copy(update={"name": "digits2", "tasks": spec.tasks[:2]}),
                              digits_manifest.parent / "digits2.yaml"))


def test_decode_location_data_path_and_worker_count_leave_the_scores_unchanged(ray_session, tmp_path,
                                                                                 two_task_manifest):
    # data.decode=device keeps the file bytes and decodes each batch in the worker (nvjpeg on a GPU;
    # here the CPU): the same pixels as decoding them up front, so the same matrix to the last digit.
    steps = ["train.max_steps_per_task=8"]
    on_host = run_sequence(_config(tmp_path / "a", two_task_manifest, *steps), quiet=True)
    on_device = run_sequence(_config(tmp_path / "b", two_task_manifest, *steps, "data.decode=device"), quiet=True)
    assert on_device.matrix == on_host.matrix
    assert len(on_device.matrix) == 3 and on_device.matrix[1] != on_device.matrix[0]  # it trained
    # One worker trains in this process (train.launch=auto: Ray Train's local mode); on a Ray Train
    # worker actor it is the same run, to the last digit.
    on_ray = run_sequence(_config(tmp_path / "r", two_task_manifest, *steps, "train.launch=ray"), quiet=True)
    assert on_ray.matrix == on_host.matrix
    # data.cache=never: the training splits stream from their shards through Ray Data (the path of
    # tasks too large to keep decoded), on the one CPU the training worker leaves here. Other batches
    # (Ray Data's seeded local shuffle), the same start.
    streamed = run_sequence(_config(tmp_path / "s", two_task_manifest, *steps, "data.cache=never"), quiet=True)
    assert streamed.matrix[0] == on_host.matrix[0] and streamed.matrix[1] != streamed.matrix[0]
    # Two workers each score a share of every eval set; before training they hold the same seeded
    # model as the one-worker run, so the start row is the same over the same rows. (A run of one
    # step: only its start row is compared.)
    two_workers = run_sequence(_config(tmp_path / "c", two_task_manifest, "train.max_steps_per_task=1",
                                       "train.num_workers=2"), quiet=True)
    assert two_workers.matrix[0] == pytest.approx(on_host.matrix[0], abs=1e-6)
    for task in load_stream(two_task_manifest).tasks:
        assert two_workers.eval_details["0"][task.name]["samples"] == task.eval.samples
