"""Population-based training over task boundaries, on Ray: the exploit copies a stronger trial's whole
state (model, teacher, exemplar memory, matrix so far), and the winner's per-task schedule replays
as one `vlcl run` config with the same matrix. Synchronous halving, which holds trials at a rung as
PBT holds them at a boundary, stops the weaker there.""" 
import hashlib
import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from tests.test_sweep import sweep_command, three_task_digits, two_lr_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def pbt_sweep(ray_session, digits_manifest, tmp_path_factory):
    """Two trials of iCaRL (a distillation teacher = the previous task's model, and a herding exemplar
    memory) on two digit tasks: lr 1e-7 learns nothing, lr 1e-3 learns task 1. After task 1 the weak
    trial (the bottom half) must continue from the strong one's state."""
    from orchestrator.sweep import run_sweep
    from orchestrator.sweep_config import plan_sweep

    folder = tmp_path_factory.mktemp("pbt")
    raw = {
        "name": "digits2-pbt",
        "base": {"stream": str(three_task_digits(digits_manifest, folder, count=2)), "model": {"name": "vlcl-tiny"},
                 "method": {"name": "icarl", "hparams": {"teacher": "previous", "memory_size": 40}},
                 "train": {"batch_size": 32, "max_steps_per_task": 20, "epochs_per_task": 10, "log_every_steps": 10},
                 "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "pbt-test", "checkpoints": "all"},
                 "output_dir": str(folder / "runs")},
        "use_default_space": False,
        "space": {"train.lr": {"type": "choice", "values": [1e-7, 1e-3]}},
        "search": {"algorithm": "grid", "num_samples": 1},
        "objective": {"name": "seen_avg"},
        "scheduler": {"type": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5, "resample_probability": 0.0},
        "resources": {"workers": 1, "cpus_per_worker": 0.5, "trial_cpus": 0, "max_concurrent_trials": 2},
        "storage_path": str(folder / "sweeps"),
    }
    plan = plan_sweep(raw, source="pbt test")
    copies_before = _checkpoint_copies()
    result = run_sweep(plan, quiet=True)
    return plan, result, folder, _checkpoint_copies() - copies_before


def _checkpoint_copies() -> set[Path]:
    """Ray's `Checkpoint.to_directory` copies into the temporary folder under this prefix."""
    return set(Path(tempfile.gettempdir()).glob("checkpoint_tmp_*"))


def _checkpoint(client, run_id: str, task: int, folder: Path) -> tuple[dict, dict, dict]:
    """(model state, method state, progress) of a run's task checkpoint logged to MLflow."""
    local = Path(client.download_artifacts(run_id, f"checkpoints/task_{task}", str(folder)))
    load = lambda name: torch.load(local / name, map_location="cpu", weights_only=True)  # noqa: E731
    return load("model.pt"), load("method.pt"), json.loads((local / "progress.json").read_text())


def _memory_rows(method_state: dict) -> list[tuple[int, str]]:
    """The exemplar memory in stored order (herding rank within each task): (label, pixels digest)."""
    samples = method_state["replay"]["memory"]["samples"]
    return [(int(label), hashlib.sha1(pixels.numpy().tobytes()).hexdigest())
            for label, pixels in zip(samples["label"], samples["pixels"])]


def _runs_by_trial(client, result) -> dict[str, list]:
    children = client.search_runs([result.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
                                  order_by=["attributes.start_time ASC"])
    runs: dict[str, list] = {}
    for run in children:
        runs.setdefault(run.data.tags["vlcl.trial_id"], []).append(run)
    return runs


def test_the_weak_trial_continues_from_the_strong_trials_teacher_memory_and_matrix(pbt_sweep, tmp_path):
    from mlflow.tracking import MlflowClient

    plan, result, folder, _ = pbt_sweep
    client = MlflowClient(plan.base.tracking.uri)
    runs = _runs_by_trial(client, result)
    start_lr = {trial: float(trial_runs[0].data.params["train.lr"]) for trial, trial_runs in runs.items()}
    weak = next(t for t, lr in start_lr.items() if lr == 1e-7)
    strong = next(t for t, lr in start_lr.items() if lr == 1e-3)
    # The strong trial waited at the boundary in its process and went on there, in its own run: one
    # start of its sequence (a paused trial restarts, continuing its run: a second start record).
    # The weak one was exploited: a new start, in a new run.
    assert len(runs[strong]) == 1 and "vlcl.exploited_from" not in runs[strong][0].data.tags
    starts = lambda trial: list((folder / "runs" / "runs").glob(f"*{trial}*.json"))  # noqa: E731
    assert len(starts(strong)) == 1 and len(starts(weak)) == 2
    own_run, exploit_run = runs[weak]
    assert exploit_run.data.tags["vlcl.exploited_from"] == strong
    assert exploit_run.data.tags["vlcl.exploited_after_task"] == "1"

    donor_model, donor_method, donor_progress = _checkpoint(client, runs[strong][0].info.run_id, 1, tmp_path / "donor")
    _, own_method, _ = _checkpoint(client, own_run.info.run_id, 1, tmp_path / "own")
    _, next_method, next_progress = _checkpoint(client, exploit_run.info.run_id, 2, tmp_path / "next")
    # The teacher of task 2 (teacher: previous) is the donor's model after task 1, not the weak trial's.
    assert next_method["teacher"].keys() == donor_model.keys()
    assert all(torch.equal(next_method["teacher"][k], donor_model[k]) for k in donor_model)
    # Task 1's exemplars in the task-2 memory are the donor's best 20 in herding rank (memory 40, two
    # tasks: 20 each), not the weak trial's own (herding ranks by the model's features).
    donor_rows, own_rows, next_rows = _memory_rows(donor_method), _memory_rows(own_method), _memory_rows(next_method)
    assert len(donor_rows) == len(next_rows) == 40
    assert donor_rows[:20] != own_rows[:20], "precondition: the two trials herded different task-1 exemplars"
    assert next_rows[:20] == donor_rows[:20]
    # The matrix so far came along: zero-shot and after-task-1 rows are the donor's.
    assert next_progress["matrix"][:2] == donor_progress["matrix"][:2]
    # The schedule records the inherited task-1 settings (lr 1e-3) and the explored task-2 lr (a
    # neighbour of the donor's in the choice list), which is the exploited run's config.
    settings = next_progress["task_settings"]
    assert len(settings) == 2 and settings[0]["lr"] == 1e-3
    assert settings[1]["lr"] == float(exploit_run.data.params["train.lr"])
    logged = json.loads(Path(client.download_artifacts(exploit_run.info.run_id, "task_settings.json",
                                                       str(tmp_path / "settings"))).read_text())
    assert logged["tasks"] == settings


def test_trials_restarted_from_a_checkpoint_leave_no_copy_of_it_in_the_temporary_folder(pbt_sweep):
    # the weak trial restarts after task 1 from the strong one's checkpoint; a copy per restart would
    # fill /tmp over a long sweep of big models
    _, result, _, copies_left = pbt_sweep
    assert result.trial_tasks_trained == 2 + 2
    assert copies_left == set()


def test_a_trials_schedule_replays_as_one_run_with_the_same_matrix(pbt_sweep):
    from orchestrator.config import with_overrides
    from orchestrator.sweep_config import pbt_keys, schedule_config
    from orchestrator.run import run_sequence

    plan, result, folder, _ = pbt_sweep
    exploited = next(t for t in result.trials if t.exploited_from)
    config = schedule_config(plan.base, exploited.params, exploited.task_settings, pbt_keys(plan))
    config = with_overrides(config, {"output_dir": str(folder / "replay"), "tracking.checkpoints": "none"})
    replay = run_sequence(config, quiet=True)
    assert replay.task_settings == exploited.task_settings
    flat = lambda rows: [v for row in rows for v in row]  # noqa: E731
    assert len(exploited.matrix) == 3 and flat(replay.matrix) == pytest.approx(flat(exploited.matrix), abs=1e-6)


def test_a_trial_that_errors_leaves_the_rest_of_the_population_to_finish(digits_manifest, tmp_path):
    """Two trials on three digit tasks, compared after task 2 (synch PBT). The first trial to finish
    task 1 crashes (fault injection, once per marker file): it was told to continue, so it errors
    before the boundary, and the other one, paused there, must still be resumed and finish."""
    from mlflow.tracking import MlflowClient

    sweep = two_lr_sweep("pbt-errored", three_task_digits(digits_manifest, tmp_path), tmp_path,
                         train={"batch_size": 32, "max_steps_per_task": 4, "epochs_per_task": 10, "log_every_steps": 2},
                         scheduler={"type": "pbt", "perturbation_interval": 2, "quantile_fraction": 0.5,
                                    "resample_probability": 0.0},
                         concurrent=2)
    marker = tmp_path / "fault-fired"
    # The trials run in Ray's worker processes, which see only the environment Ray started with: the
    # sweep gets its own Ray, started by a `vlcl sweep` that has the fault in its environment.
    command, env = sweep_command(sweep, tmp_path, VLCL_FAULT_AFTER_TASK="1", VLCL_FAULT_MARKER=str(marker))
    # Its own session: on a hang, the driver and the Ray it started go together.
    driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
        output, _ = driver.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)
        output, _ = driver.communicate()
        pytest.fail(f"the sweep did not end within 480 s:\n{output[-3000:]}")
    assert driver.returncode == 0, output[-3000:]
    assert marker.exists(), "precondition: the fault fired"

    client = MlflowClient(sweep["base"]["tracking"]["uri"])
    experiment = client.get_experiment_by_name("pbt-errored")
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("vlcl.kind") == "sweep")
    assert parent.info.status == "FINISHED" and parent.data.tags["vlcl.sweep_state"] == "finished"
    board = json.loads(Path(client.download_artifacts(parent.info.run_id, "leaderboard.json", str(tmp_path))).read_text())
    rows = [dict(zip(board["columns"], values)) for values in board["data"]]
    assert [row["status"] for row in rows] == ["completed", "error"], rows  # ranked: completed trials first
    survivor, errored = rows
    assert survivor["tasks_trained"] == 3 and errored["tasks_trained"] <= 1
    # Each MLflow run ends as its trial did; the survivor went on after the boundary in its own run.
    assert client.get_run(errored["run_id"]).info.status == "FAILED"
    assert client.get_run(survivor["run_id"]).info.status == "FINISHED" and not survivor["exploited_from"]
    # Paused at the boundary after task 2, it trained task 3 once: training waits for Tune's
    # decision after every task (trainer.wait_for_tune), so no task is trained and then thrown away.
    assert sorted(m.step for m in client.get_metric_history(survivor["run_id"], "cl/seen_avg")) == [1, 2, 3]


def test_halving_stops_the_weaker_trial_at_the_rung_and_the_stronger_trains_on_in_the_same_process(
        ray_session, digits_manifest, tmp_path):
    """Two trials over three digit tasks, halving at task 1 (reduction factor 2): the first to
    finish task 1 waits, held in its process, for the other; then the one with the lower task-1
    objective is stopped there and the other trains tasks 2 and 3 without a restart."""
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep import run_sweep
    from orchestrator.sweep_config import plan_sweep

    sweep = two_lr_sweep("halving", three_task_digits(digits_manifest, tmp_path), tmp_path,
                         train={"batch_size": 32, "max_steps_per_task": 6, "epochs_per_task": 10, "log_every_steps": 3},
                         scheduler={"type": "halving", "grace_period": 1, "reduction_factor": 2}, concurrent=2)
    result = run_sweep(plan_sweep(sweep, source="halving test"), quiet=True)
    by_status = {trial.status: trial for trial in result.trials}
    assert sorted(by_status) == ["completed", "stopped (halving)"], [(t.status, t.tasks_trained) for t in result.trials]
    kept, cut = by_status["completed"], by_status["stopped (halving)"]
    assert cut.tasks_trained == 1 and kept.tasks_trained == 3
    assert kept.objective_per_task[0] >= cut.objective_per_task[0]
    client = MlflowClient(sweep["base"]["tracking"]["uri"])
    assert sorted(m.step for m in client.get_metric_history(kept.run_id, "cl/seen_avg")) == [1, 2, 3]
    assert sorted(m.step for m in client.get_metric_history(cut.run_id, "cl/seen_avg")) == [1]
    # one task sequence started per trial: nobody was paused and restarted from a checkpoint
    states = [path.name for path in (tmp_path / "runs" / "runs").glob("*.json")]
    assert sum(kept.trial_id in name for name in states) == 1
    assert client.get_run(kept.run_id).info.status == "FINISHED"
