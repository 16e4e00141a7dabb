"""What a person sees while a run goes: a header, one live progress line per task, each task's eval
row, the final matrix. Everything else (Ray's, MLflow's and the libraries' own logging) goes to the
run's log file; `--verbose` shows it here too.

Rank 0 of the training workers sends `StepProgress` and `TaskEvaluated` records to a `ProgressSink`
actor (fire and forget: a step never waits on the console); the driver drains it while the trainer
runs and draws the lines.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

LIBRARY_LOGGERS = ("ray", "mlflow", "alembic", "py.warnings", "urllib3", "filelock", "fsspec")


@dataclass(frozen=True)
class StepProgress:
    task_index: int
    task: str
    step: int
    steps: int
    loss: float
    images_per_second: float
    eta_seconds: float


@dataclass(frozen=True)
class TaskEvaluated:
    task_index: int  # -1: the zero-shot row before training
    task: str
    row: tuple[float, ...]
    control_row: tuple[float, ...]
    train_seconds: float


class ProgressSink:
    """A mailbox between rank 0 and the driver's console: a Ray actor (`start_progress_sink`) when
    training runs on Ray Train workers, the object itself when it runs in the driver's process
    (`drain` swaps the list whole, so a record put meanwhile lands in the list returned or the next)."""

    def __init__(self):
        self.records: list = []

    def put(self, record) -> None:
        self.records.append(record)

    def drain(self) -> list:
        records, self.records = self.records, []
        return records


def start_progress_sink(in_process: bool = False):
    if in_process:
        return ProgressSink()
    import ray

    return ray.remote(num_cpus=0)(ProgressSink).remote()


def sink_drain(sink):
    """A Console's `drain` for a ProgressSink (actor or in-process)."""
    if isinstance(sink, ProgressSink):
        return sink.drain

    def drain() -> list:
        import ray

        try:
            return ray.get(sink.drain.remote(), timeout=10)
        except Exception:  # the sink is gone with a failed run: nothing more to draw
            return []
    return drain


def sink_put(sink):
    """Rank 0's `put` for a ProgressSink: fire and forget to the actor, a plain call in-process."""
    return sink.put if isinstance(sink, ProgressSink) else sink.put.remote


@contextlib.contextmanager
def library_logs_to(log_file: Path, verbose: bool):
    """While inside: the libraries' logging (and Python warnings) goes to `log_file`, and to stderr
    only with `verbose`. On exit every logger is as it was. Yields the file handler.

    Ray and MLflow install their own stderr handlers on their loggers when imported: both are
    imported first, so that those handlers are the ones set aside."""
    import mlflow  # noqa: F401
    import ray  # noqa: F401

    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = []
    was_capturing = getattr(logging, "_warnings_showwarning", None) is not None
    logging.captureWarnings(True)
    root = logging.getLogger()
    root_level = root.level
    for name in ("", *LIBRARY_LOGGERS):
        logger = logging.getLogger(name)
        # the libraries' console handlers (Ray's is a StreamHandler subclass, MLflow's writes through a
        # stream of its own); a test runner's capture handlers and any file handler stay where they are
        console_handlers = [] if verbose else [
            h for h in logger.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            and type(h).__module__.split(".")[0] in ("logging", "ray", "mlflow")]
        saved.append((logger, list(logger.handlers), logger.propagate))
        for old in console_handlers:
            logger.removeHandler(old)
        logger.addHandler(handler)
        if name:
            logger.propagate = False
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers  # as they were, in their order
            logger.propagate = propagate
        root.setLevel(root_level)
        logging.captureWarnings(was_capturing)
        handler.close()


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds}s"


def format_scores(row) -> str:
    return " ".join(f"{100 * v:5.1f}" for v in row)


class Console:
    """Draws progress records on stdout while the trainer runs: `drain()` returns the records that
    arrived since its last call (from a ProgressSink: `sink_drain(sink)`), polled by a daemon thread."""

    def __init__(self, drain, num_tasks: int, stream=None, interval_s: float = 0.5):
        self.drain, self.num_tasks, self.interval_s = drain, num_tasks, interval_s
        self.out = stream or sys.stdout
        self.live = self.out.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="vlcl-console", daemon=True)
        self._last: StepProgress | None = None
        self._open_line = False

    def header(self, lines: list[tuple[str, str]]) -> None:
        width = max(len(k) for k, _ in lines)
        for key, value in lines:
            print(f"{key.ljust(width)}  {value}", file=self.out)
        print(file=self.out, flush=True)

    def __enter__(self) -> "Console":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._draw(self.drain())  # records that arrived after the last poll
        self._end_line()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._draw(self.drain())

    def _draw(self, records: list) -> None:
        for record in records:
            if isinstance(record, StepProgress):
                self._last = record
                if self.live:
                    self._write(self._progress_line(record), end="\r")
                    self._open_line = True
            elif isinstance(record, TaskEvaluated):
                if record.task_index >= 0:
                    if self._last is not None and self._last.task_index == record.task_index:
                        self._write(self._progress_line(self._last, done_s=record.train_seconds))
                        self._open_line = False
                    label = f"after {record.task}"
                else:
                    label = "zero-shot"
                self._end_line()
                control = f"  | control {format_scores(record.control_row)}" if record.control_row else ""
                self._write(f"  eval {label}: {format_scores(record.row)}{control}")
        self.out.flush()

    def _progress_line(self, p: StepProgress, done_s: float | None = None) -> str:
        head = f"task {p.task_index + 1}/{self.num_tasks} {p.task}"
        timing = f"{format_duration(done_s)}" if done_s is not None else f"ETA {format_duration(p.eta_seconds)}"
        return (f"{head}  step {p.step}/{p.steps}  loss {p.loss:.4f}  {p.images_per_second:,.0f} img/s  "
                f"{timing}").ljust(100)

    def _write(self, text: str, end: str = "\n") -> None:
        self.out.write(text + end)

    def _end_line(self) -> None:
        if self._open_line:
            self.out.write("\n")
            self._open_line = False


class ProgressReporter:
    """Rank 0's side: throttled StepProgress records, and one TaskEvaluated per evaluation."""

    def __init__(self, sink, min_interval_s: float = 0.5):
        self.sink, self.min_interval_s = sink, min_interval_s
        self._put = sink_put(sink) if sink is not None else None
        self._sent_at = 0.0
        self._task_started = time.time()

    def task_started(self) -> None:
        self._task_started = time.time()

    def step(self, task_index: int, task: str, step: int, steps: int, loss: float, batch_size: int) -> None:
        now = time.time()
        if self.sink is None or (now - self._sent_at < self.min_interval_s and step < steps):
            return
        elapsed = max(now - self._task_started, 1e-9)
        self._put(StepProgress(task_index, task, step, steps, loss, step * batch_size / elapsed,
                                          elapsed / step * (steps - step)))
        self._sent_at = now

    def evaluated(self, task_index: int, task: str, row, control_row, train_seconds: float = 0.0) -> None:
        if self.sink is not None:
            self._put(TaskEvaluated(task_index, task, tuple(row), tuple(control_row), train_seconds))
