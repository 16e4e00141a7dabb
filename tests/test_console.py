"""What a person sees: progress and eval lines from the workers' records, and library logs kept off
the console (in the run's log file) and restored afterwards. No Ray."""
import io
import logging
import warnings

from orchestrator.cli import format_matrix
from orchestrator.console import Console, StepProgress, TaskEvaluated, library_logs_to


def test_one_progress_line_and_one_eval_row_per_task():
    records = [[TaskEvaluated(-1, "zero-shot", (0.5, 0.25), (0.1,), 0.0)],
               [StepProgress(0, "digits-0-1", 10, 40, 0.7312, 850.0, 12.0),
                StepProgress(0, "digits-0-1", 40, 40, 0.4101, 900.0, 0.0)],
               [TaskEvaluated(0, "digits-0-1", (0.975, 0.0), (0.2,), 3.4)]]
    out = io.StringIO()  # not a terminal: no carriage-return redraws, only each task's final line
    console = Console(lambda: records.pop(0) if records else [], num_tasks=2, stream=out, interval_s=0.01)
    console.header([("run", "abc"), ("stream", "digits: 2 tasks")])
    with console:
        while records:
            pass
    lines = [line.rstrip() for line in out.getvalue().splitlines() if line.strip()]
    assert lines[0] == "run     abc" and lines[1] == "stream  digits: 2 tasks"
    assert lines[2] == "  eval zero-shot:  50.0  25.0  | control  10.0"
    assert lines[3] == "task 1/2 digits-0-1  step 40/40  loss 0.4101  900 img/s  3s"
    assert lines[4] == "  eval after digits-0-1:  97.5   0.0  | control  20.0"
    assert len(lines) == 5 and "\r" not in out.getvalue()


def test_matrix_keeps_full_task_names():
    text = format_matrix(["digits-0-1", "a-much-longer-task-name"], [[0.1, 0.2], [0.9, 0.3], [0.5, 0.8]],
                         ["held-out"], [[0.4], [0.4], [0.2]])
    header, *rows = text.splitlines()
    assert "a-much-longer-task-name" in header and "control: held-out" in header
    assert rows[2].startswith("after a-much-longer-task-name") and rows[2].split()[-3:] == ["50.0", "80.0", "20.0"]


def test_library_logs_go_to_the_log_file_and_every_logger_is_restored(tmp_path, capfd):
    import ray  # noqa: F401  (installs Ray's own stderr handler, as in a run)

    ray_logger = logging.getLogger("ray")
    before = (list(ray_logger.handlers), ray_logger.propagate, list(logging.getLogger().handlers))
    log_file = tmp_path / "run" / "vlcl.log"
    with library_logs_to(log_file, verbose=False):
        logging.getLogger("ray.train").warning("placement group cleaner says hello")
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
        with warnings.catch_warnings():  # pytest records warnings itself; here they take their usual path
            warnings.simplefilter("always")
            warnings.warn("a library's deprecation", DeprecationWarning)
    captured = capfd.readouterr()
    assert "hello" not in captured.err + captured.out and "MLflow database" not in captured.err + captured.out
    text = log_file.read_text()
    assert "placement group cleaner says hello" in text and "Creating initial MLflow database tables" in text
    assert "a library's deprecation" in text
    assert (list(ray_logger.handlers), ray_logger.propagate, list(logging.getLogger().handlers)) == before
