"""A sweep survives its driver: `kill -9` of `vlcl sweep` mid-sweep, then `vlcl sweep --resume`.
The finished trial is not run again, the interrupted one continues from its last task checkpoint
in the same MLflow run, and the parent run and leaderboard end complete."""
import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_sweep import sweep_command, three_task_digits, two_lr_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _trial_dirs(storage: Path) -> list[Path]:
    return sorted(storage.glob("*/tune/run_trial_*"))


def _wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"vlcl sweep exited ({process.returncode}) before {what}:\n"
                                 f"{process.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _tune_recorded_first_checkpoint(trial_dir: Path) -> bool:
    """The trial wrote its task-1 checkpoint, and Tune's experiment state (saved every 10 s or more,
    unless TUNE_GLOBAL_CHECKPOINT_S says otherwise) was written after it: a driver killed now
    leaves a record of that checkpoint."""
    checkpoints = list(trial_dir.glob("checkpoint_000000"))
    states = list(trial_dir.parent.glob("experiment_state-*.json"))
    return bool(checkpoints) and any(s.stat().st_mtime > checkpoints[0].stat().st_mtime + 1 for s in states)


@contextlib.contextmanager
def _killed_with_9_at_the_end(command: list[str], cwd: Path, env: dict):
    """`vlcl sweep` runs while inside; leaving the block sends it SIGKILL (and kills it, however the
    block is left)."""
    driver = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield driver
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()


def test_kill_9_of_the_driver_then_resume_finishes_the_sweep_without_rerunning(digits_manifest,
                                                                              tmp_path):
    from mlflow.tracking import MlflowClient

    # Two trials, one at a time, on two tasks; the second task is long (per_task), so the driver is
    # killed while the second trial trains it, after Tune recorded its first task's checkpoint.
    # Tune saves its experiment state every 10 s or more (TUNE_GLOBAL_CHECKPOINT_S=auto); every
    # second here, so the kill comes a second or two after that checkpoint and the task outlasts
    # it at 800 steps (about 16 s on 2 cores; it took 2500 steps with the default period).
    sweep = two_lr_sweep("driver-kill", three_task_digits(digits_manifest, tmp_path, count=2), tmp_path,
                         train={"batch_size": 32, "max_steps_per_task": 4, "epochs_per_task": 400,
                                "log_every_steps": 50},
                         per_task={"1": {"train.max_steps_per_task": 800}}, scheduler={"type": "none"}, concurrent=1)
    storage, uri = tmp_path / "sweeps", sweep["base"]["tracking"]["uri"]
    # its own local Ray, as a user's `vlcl sweep` starts
    command, env = sweep_command(sweep, tmp_path, TUNE_GLOBAL_CHECKPOINT_S="1")
    with _killed_with_9_at_the_end(command, tmp_path, env) as driver:
        _wait_for(lambda: len(_trial_dirs(storage)) == 2 and _tune_recorded_first_checkpoint(_trial_dirs(storage)[1]),
                  "Tune's record of the second trial's first task checkpoint", driver)
    trials = _trial_dirs(storage)
    first_result = [json.loads(line) for line in (trials[0] / "result.json").read_text().splitlines()]
    second_result = [json.loads(line) for line in (trials[1] / "result.json").read_text().splitlines()]
    assert [r["task"] for r in first_result] == [1, 2] and [r["task"] for r in second_result] == [1], \
        "precondition: killed with one trial finished and one mid-way"

    resumed = subprocess.run(command + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "2 trials, 4 trial-tasks trained" in resumed.stdout

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("driver-kill")
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("vlcl.kind") == "sweep")
    assert parent.info.status == "FINISHED" and parent.data.tags["vlcl.sweep_state"] == "finished"
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    # One run per trial: the finished one was not started again, the interrupted one went on in its run.
    assert sorted(c.data.params["train.lr"] for c in children) == ["0.0001", "0.001"]
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        # Each task scored once: the interrupted trial did not train its first task again.
        history = client.get_metric_history(child.info.run_id, "cl/seen_avg")
        assert sorted(m.step for m in history) == [1, 2]
    board = json.loads(Path(client.download_artifacts(parent.info.run_id, "leaderboard.json", str(tmp_path))).read_text())
    rows = [dict(zip(board["columns"], row)) for row in board["data"]]
    assert [r["status"] for r in rows] == ["completed", "completed"] and all(r["tasks_trained"] == 2 for r in rows)


def test_a_pbt_sweep_killed_while_a_trial_is_ahead_of_its_checkpoint_stops_and_resumes_with_exact_records(
        digits_manifest, tmp_path):
    """Two PBT trials on three tasks, compared after task 2. The first trial to log task 2's scores
    holds there (VLCL_HOLD_AFTER_TASK), before its checkpoint reaches Tune; once Tune has recorded
    its task-1 checkpoint, `vlcl sweep` is killed with -9. `--stop` ends what the killed driver's
    Ray left running; `--resume` restarts that trial from task 1 in its own MLflow run, so it trains
    task 2 again: its run still holds one point per task, and the sweep ends with both trials done
    and none of its Ray processes left."""
    from mlflow.tracking import MlflowClient

    from orchestrator.runtime import owned_ray_processes

    sweep = two_lr_sweep("pbt-kill", three_task_digits(digits_manifest, tmp_path), tmp_path,
                         train={"batch_size": 32, "max_steps_per_task": 4, "epochs_per_task": 10, "log_every_steps": 2},
                         scheduler={"type": "pbt", "perturbation_interval": 2, "quantile_fraction": 0.5,
                                    "resample_probability": 0.0},
                         concurrent=2)
    storage, uri = tmp_path / "sweeps", sweep["base"]["tracking"]["uri"]
    command, env = sweep_command(sweep, tmp_path)
    marker = tmp_path / "held"
    held_env = {**env, "VLCL_HOLD_AFTER_TASK": "2", "VLCL_HOLD_MARKER": str(marker)}
    client = MlflowClient(uri)
    with _killed_with_9_at_the_end(command, tmp_path, held_env) as driver:
        _wait_for(lambda: marker.exists() and marker.read_text(), "a trial holding after task 2", driver)
        held_run = client.get_run(marker.read_text())
        held_trial = held_run.data.tags["vlcl.trial_id"]
        assert [m.step for m in client.get_metric_history(held_run.info.run_id, "cl/seen_avg")] == [1, 2]
        trial_dir = next(storage.glob(f"*/tune/run_trial_{held_trial}*"))
        _wait_for(lambda: _tune_recorded_first_checkpoint(trial_dir), "Tune's record of the held trial's task-1 checkpoint",
                  driver)
    state_dir = next(storage.glob("pbt-kill-*")).resolve()

    stopped = subprocess.run(command + ["--stop"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0 and "--resume` continues it" in stopped.stdout, stopped.stdout + stopped.stderr
    assert owned_ray_processes(str(state_dir)) == []
    parent_id = json.loads((state_dir / "vlcl_sweep.json").read_text())["parent_run_id"]
    assert client.get_run(parent_id).info.status == "KILLED"

    resumed = subprocess.run(command + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert owned_ray_processes(str(state_dir)) == []
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["vlcl.sweep_state"] == "finished"
    board = json.loads(Path(client.download_artifacts(parent_id, "leaderboard.json", str(tmp_path))).read_text())
    rows = [dict(zip(board["columns"], row)) for row in board["data"]]
    assert [(r["status"], r["tasks_trained"]) for r in rows] == [("completed", 3)] * 2
    # The held trial trained task 2 again in its own run, which holds each task's scores once.
    assert [m.step for m in client.get_metric_history(held_run.info.run_id, "cl/seen_avg")] in ([1, 2], [1, 2, 3])
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    for child in children:
        for key in ("cl/seen_avg", "train/loss"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert len(steps) == len(set(steps)), (child.data.tags["vlcl.trial_id"], key, sorted(steps))
    attempts = [json.loads(path.read_text()) for path in (tmp_path / "runs" / "runs").glob(f"*{held_trial}*.json")]
    # (--resume's start; at the boundary after task 2 a trial goes on in its process, or starts a new run when exploited)
    continued = sorted((a for a in attempts if a["run_id"] == held_run.info.run_id and a["previous"]),
                       key=lambda a: a["ray_name"])
    assert continued, "precondition: --resume continued the held trial's run"
    assert (tmp_path / "runs" / continued[0]["ray_name"] / "checkpoint_task_002").is_dir(), \
        "precondition: ... and trained task 2 again"
