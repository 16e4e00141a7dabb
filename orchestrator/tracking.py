"""MLflow, in one place: where runs go, how they are named, and what each run holds.

Conventions (see DESIGN.md): experiment = the stream's name; run name `<method>-<stream>-s<seed>`;
params = the flattened config; metrics `eval/<task>/<metric>` and `cl/<metric>` with step = tasks
trained, losses `train/<term>` with step = optimizer step; artifacts `matrix.json`, `matrix.png`,
`matrix_table.json`, `config.yaml`, `checkpoints/task_<i>/`.

Only this module imports mlflow (the read side of `vlcl report` and `vlcl ui` aside): the driver
starts a run with `Tracker.start_sequence`, and rank 0 of the training workers logs into it through
a `Tracker` bound to the same run id.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import tempfile
from pathlib import Path

from orchestrator.config import RunConfig, flatten, to_yaml


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be reached or used; the message names the URI."""


def resolve_tracking_uri(config: RunConfig | None = None) -> str:
    uri = (config.tracking.uri if config else None) or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    elif uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"  # workers run in other folders
    return uri


def default_artifact_root(uri: str) -> str | None:
    """Artifacts beside a local sqlite store (./mlruns); a server decides its own."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "mlruns")
    return None


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, before any training, when an MLflow server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            if response.status != 200:
                raise TrackingError(f"MLflow server {uri} answered {response.status} on /health")
    except (urllib.error.URLError, OSError) as err:
        raise TrackingError(
            f"MLflow server {uri} is unreachable ({err}). Start it (`mlflow server --host 127.0.0.1 --port 5000`), "
            f"fix tracking.uri / MLFLOW_TRACKING_URI, or unset them to use the local sqlite store.") from None


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    mlflow_client = client(uri)
    try:
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        return mlflow_client.create_experiment(name, artifact_location=_artifact_location(uri))
    except Exception as err:  # mlflow raises several types for an unusable store
        raise TrackingError(f"cannot use MLflow tracking store {uri}: {err}") from None


def _artifact_location(uri: str) -> str | None:
    root = default_artifact_root(uri)
    return Path(root).as_uri() if root else None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def default_run_name(config: RunConfig, stream_name: str) -> str:
    return config.tracking.run_name or f"{config.method.name}-{stream_name}-s{config.train.seed}"


def stream_digest(stream) -> str:
    """Digest of the stream's content description: shard lists and counts per task."""
    parts = [(t.name, t.kind, t.train.shards, t.train.samples, t.eval.shards, t.eval.samples, t.classes) for t in stream.tasks]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Tracker:
    """One MLflow run's record, and the one object that talks to MLflow for it.

    The driver creates the run (so it exists before any worker starts and a resumed run continues
    the same one); rank 0 of the training workers logs into it through a Tracker of its own."""

    def __init__(self, uri: str, run_id: str = "", experiment_id: str = "", skip_logged_steps: bool = False):
        """`skip_logged_steps`: for a run resumed from a checkpoint older than what it logged (a sweep
        whose driver was killed after a trial logged a task and before Tune recorded its checkpoint
        trains that task again). MLflow appends every point, so a key's point at a step the run
        already holds is not logged again; the task trained again gives the same values (its
        randomness depends on the seed and the task only)."""
        self.uri, self.run_id, self.experiment_id = uri, run_id, experiment_id
        self.client = client(uri)
        self.logged_steps: dict[str, set[int]] | None = {} if skip_logged_steps else None

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, tags: dict[str, str], *,
              description: str = "", parent_run_id: str | None = None) -> "Tracker":
        """A new run in `experiment` (created when missing)."""
        check_reachable(uri)
        experiment_id = ensure_experiment(uri, experiment)
        tags = {"mlflow.runName": run_name, **({"mlflow.note.content": description} if description else {}), **tags}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = client(uri).create_run(experiment_id, run_name=run_name, tags=tags)
        return cls(uri, run.info.run_id, experiment_id)

    @classmethod
    def start_sequence(cls, plan, *, parent_run_id: str | None = None, run_name_suffix: str = "",
                       extra_tags: dict | None = None) -> "Tracker":
        """The run of one task sequence, with every resolved setting as a param and the stream as
        its input dataset."""
        from streams.manifest import load_stream

        config = plan.config
        description = config.tracking.description or (
            f"{config.method.name} on {plan.stream_name} ({len(plan.tasks)} tasks), model {config.model.name}, "
            f"seed {config.train.seed}")
        tags = {"vlcl.kind": "run", "vlcl.method": config.method.name, "vlcl.stream": plan.stream_name,
                "vlcl.model": config.model.name, "vlcl.seed": str(config.train.seed), "vlcl.git_commit": git_commit(),
                **(extra_tags or {})}
        tracker = cls.start(plan.tracking_uri, config.tracking.experiment or plan.stream_name,
                            default_run_name(config, plan.stream_name) + run_name_suffix, tags,
                            description=description, parent_run_id=parent_run_id)
        tracker.log_params(flatten(config))
        tracker.log_text(to_yaml(config), "config.yaml")
        tracker.log_stream_input(load_stream(plan.manifest), plan.manifest)
        return tracker

    # ---- writing -------------------------------------------------------------------------------
    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        entries = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(entries), 100):
            self.client.log_batch(self.run_id, params=entries[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and not math.isnan(float(v))]
        if self.logged_steps is not None:
            entries = [entry for entry in entries if step not in self._steps_logged(entry.key)]
        for i in range(0, len(entries), 500):
            self.client.log_batch(self.run_id, metrics=entries[i:i + 500])
        if self.logged_steps is not None:
            for entry in entries:
                self.logged_steps[entry.key].add(step)

    def _steps_logged(self, key: str) -> set[int]:
        if key not in self.logged_steps:
            self.logged_steps[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}
        return self.logged_steps[key]

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_dict(self, data: dict, path: str) -> None:
        self.client.log_dict(self.run_id, data, path)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_stream_input(self, stream, manifest_path: str) -> None:
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        dataset = MetaDataset(LocalArtifactDatasetSource(str(manifest_path)), name=stream.name,
                              digest=stream_digest(stream))
        entry = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "train+eval")])
        try:
            self.client.log_inputs(self.run_id, datasets=[entry])
        except Exception as err:
            # Runs started side by side (a sweep's trials) race to insert the experiment's one row for
            # this stream; the loser finds the winner's row on the second try.
            if "UNIQUE constraint failed: datasets" not in str(err):
                raise
            self.client.log_inputs(self.run_id, datasets=[entry])

    def log_matrix(self, task_names: list[str], rows: list[list[float]], control_names: list[str] = (),
                   control_rows: list[list[float]] = ()) -> None:
        """matrix.json (+ control sets' rows), replaced after every evaluation."""
        self.log_dict(matrix_payload(task_names, rows, control_names, control_rows), "matrix.json")

    def log_final_matrix(self, task_names: list[str], rows: list[list[float]], control_names: list[str] = (),
                         control_rows: list[list[float]] = ()) -> None:
        """The finished matrix as an MLflow table (matrix_table.json) and the heatmap (matrix.png),
        once, when the run ends: MLflow appends to a table logged again (a per-task table repeats
        its rows), and a heatmap costs a matplotlib figure (0.3-0.5 s) that a per-task log paid 14
        times on mini-mtil. During the run, and for a trial a sweep stopped, matrix.json holds it."""
        import pandas as pd

        payload = matrix_payload(task_names, rows, control_names, control_rows)
        table = pd.DataFrame(rows, columns=task_names)
        for column, name in enumerate(control_names):
            table[f"control: {name}"] = [r[column] for r in control_rows]
        table.insert(0, "after", payload["row_labels"])
        # A run that ends twice (a sweep trial finished again after its driver was killed) logs it once.
        if "matrix_table.json" not in {a.path for a in self.client.list_artifacts(self.run_id)}:
            self.client.log_table(self.run_id, table, "matrix_table.json")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "matrix.png"
            plot_matrix(task_names, rows, path, control_names, control_rows)
            self.log_artifact(str(path))

    def log_checkpoint(self, directory: str, task_index: int) -> None:
        self.client.log_artifacts(self.run_id, directory, f"checkpoints/task_{task_index}")

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def mark_shared(self, what: str, computed_by: str | None) -> None:
        """Tag `vlcl.<what>` with where a result a sweep's trials share came from: "shared: computed by
        run <id>" when another trial's run computed it, "computed" when this run did."""
        self.set_tag(f"vlcl.{what}", f"shared: computed by run {computed_by}" if computed_by else "computed")

    def set_running(self) -> None:
        self.client.update_run(self.run_id, status="RUNNING")

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def system_monitor(self, resume: bool):
        """CPU, memory and (with pynvml) GPU of this node, logged as system/* metrics of the run."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        class SystemMonitor(SystemMetricsMonitor):
            """MLflow's monitor publishes a sample only after each full sampling interval (10 s), so
            a run shorter than that logged nothing; this one also publishes the sample it holds
            when it stops, if it has published none."""

            def start(self):
                self._first_step = self._logging_step
                super().start()

            def finish(self):
                super().finish()
                if self._logging_step == self._first_step:
                    self.publish_metrics(self.aggregate_metrics())
                    self.mlflow_logger.flush()

        return SystemMonitor(self.run_id, resume_logging=resume, tracking_uri=self.uri)


class SweepTracker(Tracker):
    """A sweep's parent run and the child runs of its trials (each trial's own Tracker writes those)."""

    @classmethod
    def start_sweep(cls, uri: str, experiment: str, sweep_id: str, description: str, tags: dict[str, str],
                    params: dict[str, str], files: dict[str, str]) -> "SweepTracker":
        tracker = cls.start(uri, experiment, sweep_id, {"vlcl.kind": "sweep", "vlcl.sweep_id": sweep_id,
                                                        "vlcl.git_commit": git_commit(), **tags},
                            description=description)
        tracker.log_params(params)
        for path, text in files.items():
            tracker.log_text(text, path)
        return tracker

    def latest_child_runs(self) -> dict:
        """trial id -> the newest child run of that trial. An older attempt still RUNNING (a trial
        restarted by --resume, or continued by a PBT exploit) is ended KILLED."""
        children = self.client.search_runs([self.experiment_id],
                                           filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}'",
                                           max_results=5000, order_by=["attributes.start_time ASC"])
        latest: dict = {}
        for run in children:
            trial_id = run.data.tags.get("vlcl.trial_id")
            if not trial_id:
                continue
            if trial_id in latest and latest[trial_id].info.status == "RUNNING":
                self.client.set_terminated(latest[trial_id].info.run_id, status="KILLED")
            latest[trial_id] = run
        return latest

    def end_child(self, run, trial_status: str, final_status: str | None) -> None:
        """Tag a child run with its trial's outcome and, unless None, end it with `final_status`."""
        self.client.set_tag(run.info.run_id, "vlcl.trial_status", trial_status)
        if final_status and run.info.status != final_status:
            self.client.set_terminated(run.info.run_id, status=final_status)

    def log_table(self, frame, path: str) -> None:
        self.client.log_table(self.run_id, frame, path)


def matrix_payload(task_names: list[str], rows: list[list[float]], control_names=(), control_rows=()) -> dict:
    payload = {"tasks": list(task_names), "metric": "score", "rows": rows,
               "row_labels": ["zero-shot"] + [f"after {name}" for name in task_names[:len(rows) - 1]]}
    if control_names:
        payload["control_tasks"], payload["control_rows"] = list(control_names), control_rows
    return payload


def plot_matrix(task_names: list[str], rows: list[list[float]], path: Path, control_names: list[str] = (),
                control_rows: list[list[float]] = ()) -> None:
    """Heatmap of the accuracy matrix: rows = after which task, columns = evaluated task, then the
    control sets right of a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = list(task_names) + [f"control: {n}" for n in control_names]
    data = np.full((len(task_names) + 1, len(columns)), np.nan)
    data[:len(rows), :len(task_names)] = rows
    if control_names:
        data[:len(control_rows), len(task_names):] = control_rows
    labels = ["zero-shot"] + [f"after {n}" for n in task_names]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(columns), 1.0 + 0.6 * len(labels)))
    image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    if control_names:
        ax.axvline(len(task_names) - 0.5, color="white", linestyle="--", linewidth=1.5)
    for i in range(len(rows)):
        for j in range(len(columns)):
            ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center",
                    color="white" if data[i, j] < 0.6 else "black", fontsize=8)
    ax.set_xlabel("evaluated task")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
