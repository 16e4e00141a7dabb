"""`vlcl report EXPERIMENT`: the table papers print, computed from what MLflow holds.

Every finished training run (tag `vlcl.kind` = run) of the experiment contributes its accuracy
matrix (`matrix.json`, or the `eval/<task>/<metric>` histories for another `--metric`); the metrics
come from `orchestrator/metrics.py`, so the report agrees with what each run logged.

Rows: one per *variant* = runs that differ only in their seed. Runs are told apart by their run
name with the `-s<seed>` part removed (`ewc-digits-s1` → `ewc-digits`; a sweep trial
`ewc-digits-s0-trial_3` → `ewc-digits-trial_3`), within their method tag `vlcl.method`. Each cell is
the mean ± sample standard deviation (n-1) over the variant's seeds; with one seed, the mean alone.
Best mean per column in bold: higher is better for Transfer, Avg, Last and BWT, lower for
forgetting. Runs that did not finish (failed, running, stopped early by a sweep scheduler: fewer
than T+1 matrix rows) are left out and listed under the table.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator import metrics
from orchestrator.tracking import TrackingError

# (column title, metric function over a full matrix, higher is better)
COLUMNS: list[tuple[str, callable, bool]] = [
    ("Transfer", metrics.transfer, True),
    ("Avg", metrics.average, True),
    ("Last", metrics.last, True),
    ("BWT", metrics.backward_transfer, True),
    ("Forgetting", metrics.forgetting, False),
]


class ReportError(TrackingError):
    """The experiment's runs cannot be turned into a report; the message names run and artifact."""


@dataclass
class RunRecord:
    run_id: str
    run_name: str
    method: str
    seed: str
    variant: str
    tasks: list[str]
    rows: list[list[float]]


@dataclass
class ReportRow:
    method: str
    variant: str
    seeds: list[str]
    run_ids: list[str]
    values: dict[str, list[float]]  # column → per-seed values, in `seeds` order
    seen_avg_curves: list[list[float]]  # per seed: seen-task average after task 1..T

    def mean(self, column: str) -> float:
        finite = [v for v in self.values[column] if not math.isnan(v)]
        return statistics.fmean(finite) if finite else math.nan

    def std(self, column: str) -> float:
        finite = [v for v in self.values[column] if not math.isnan(v)]
        return statistics.stdev(finite) if len(finite) >= 2 else math.nan


@dataclass
class Report:
    experiment: str
    experiment_id: str
    metric: str
    tasks: list[str]
    rows: list[ReportRow]
    left_out: list[str] = field(default_factory=list)  # "run name (why)"

    def best(self, column: str) -> float:
        higher_better = next(h for name, _, h in COLUMNS if name == column)
        means = [m for m in (row.mean(column) for row in self.rows) if not math.isnan(m)]
        if not means:
            return math.nan
        return max(means) if higher_better else min(means)

    def is_best(self, row: ReportRow, column: str) -> bool:
        best = self.best(column)
        return not math.isnan(best) and math.isclose(row.mean(column), best, rel_tol=0, abs_tol=1e-12)


# ----------------------------------------------------------------------------------------------
# reading MLflow
# ----------------------------------------------------------------------------------------------

def variant_name(run_name: str, seed: str) -> str:
    """The run name without its `-s<seed>` part: runs of one variant differ only there."""
    return re.sub(rf"-s{re.escape(seed)}(?=-|$)", "", run_name, count=1)


def _matrix_from_artifact(mlflow_client, run, workdir: Path) -> tuple[list[str], list[list[float]]]:
    run_id, name = run.info.run_id, run.info.run_name
    try:
        local = mlflow_client.download_artifacts(run_id, "matrix.json", str(workdir))
    except Exception as err:  # mlflow raises several types for a missing artifact
        raise ReportError(f"run {name} ({run_id}) has no readable matrix.json artifact: {err}") from None
    try:
        payload = json.loads(Path(local).read_text())
        tasks, rows = list(payload["tasks"]), [[float(v) for v in row] for row in payload["rows"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ReportError(f"matrix.json of run {name} ({run_id}) is malformed ({err!r}); expected "
                          '{"tasks": [...], "metric": "score", "rows": [[...], ...]}') from None
    return tasks, rows


def _matrix_from_histories(mlflow_client, run, tasks: list[str], metric: str) -> list[list[float]]:
    """Rebuild the matrix from `eval/<task>/<metric>` logged with step = tasks trained."""
    per_task: list[dict[int, float]] = []
    for task in tasks:
        history = mlflow_client.get_metric_history(run.info.run_id, f"eval/{task}/{metric}")
        if not history:
            raise ReportError(f"run {run.info.run_name} ({run.info.run_id}) has no metric eval/{task}/{metric}; "
                              "pick a per-task metric the runs logged (score, top1, r_mean, i2t_r1, ...)")
        per_task.append({m.step: m.value for m in history})
    steps = sorted(set.intersection(*(set(h) for h in per_task)))
    if steps != list(range(len(steps))):
        raise ReportError(f"run {run.info.run_name}: eval/*/{metric} steps {steps} are not 0..k")
    return [[history[step] for history in per_task] for step in steps]


def collect_runs(tracking_uri: str, experiment: str, metric: str = "score",
                 parent_run_id: str | None = None) -> tuple[str, list[RunRecord], list[str]]:
    """(experiment id, finished runs with full matrices, left-out runs with the reason)."""
    from orchestrator.tracking import client

    # one download per run: MLflow's per-download progress bars would bury the table
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow_client = client(tracking_uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        known = sorted(e.name for e in mlflow_client.search_experiments())
        raise ReportError(f"no MLflow experiment named {experiment!r} in {tracking_uri}; known: {', '.join(known) or 'none'}")
    query = "tags.`vlcl.kind` = 'run'"
    if parent_run_id:
        query += f" AND tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs = mlflow_client.search_runs([found.experiment_id], filter_string=query,
                                     order_by=["attributes.start_time DESC"], max_results=5000)
    records: list[RunRecord] = []
    left_out: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    with tempfile.TemporaryDirectory() as tmp:
        for index, run in enumerate(runs):
            name = run.info.run_name
            if run.info.status != "FINISHED":
                left_out.append(f"{name} (status {run.info.status})")
                continue
            method = run.data.tags.get("vlcl.method")
            seed = run.data.tags.get("vlcl.seed")
            if method is None or seed is None:
                raise ReportError(f"run {name} ({run.info.run_id}) lacks the tag vlcl.method or vlcl.seed "
                                  "that vlcl runs carry; tag it or delete it from the experiment")
            workdir = Path(tmp) / str(index)
            workdir.mkdir()
            tasks, rows = _matrix_from_artifact(mlflow_client, run, workdir)
            if metric != "score":
                rows = _matrix_from_histories(mlflow_client, run, tasks, metric)
            if len(rows) != len(tasks) + 1:
                left_out.append(f"{name} (stopped after {len(rows) - 1} of {len(tasks)} tasks)")
                continue
            order = run.data.tags.get("vlcl.order")  # a study's runs: grouped by method and task order
            variant = f"order {order}" if order else variant_name(name, seed)
            if (method, variant, seed) in seen:  # runs are newest first: a rerun replaces the older one
                left_out.append(f"{name} ({run.info.run_id}: an older run of the same variant and seed)")
                continue
            seen.add((method, variant, seed))
            records.append(RunRecord(run.info.run_id, name, method, seed, variant, tasks, rows))
    return found.experiment_id, records, left_out


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------

def build_report(experiment: str, experiment_id: str, records: list[RunRecord], left_out: list[str],
                 metric: str = "score") -> Report:
    if not records:
        raise ReportError(f"experiment {experiment!r} has no finished vlcl runs with a full accuracy matrix"
                          + (f" (left out: {'; '.join(left_out)})" if left_out else ""))
    task_lists = {tuple(sorted(r.tasks)) for r in records}  # a study's task orders differ; its tasks do not
    if len(task_lists) > 1:
        raise ReportError(f"runs of experiment {experiment!r} cover different task lists {sorted(task_lists)}; "
                          "report one stream per experiment (tracking.experiment)")
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for record in sorted(records, key=lambda r: (r.method, r.variant, _seed_key(r.seed))):
        groups.setdefault((record.method, record.variant), []).append(record)
    rows = []
    for (method, variant), members in groups.items():
        values = {name: [function(r.rows) for r in members] for name, function, _ in COLUMNS}
        curves = [[metrics.seen_average(r.rows[:k + 1]) for k in range(1, len(r.rows))] for r in members]
        rows.append(ReportRow(method, variant, [r.seed for r in members], [r.run_id for r in members], values, curves))
    return Report(experiment, experiment_id, metric, list(records[0].tasks), rows, left_out)


def _seed_key(seed: str):
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def row_label(report: Report, row: ReportRow) -> str:
    """The method alone when it has one variant; else the variant too."""
    variants = sum(1 for other in report.rows if other.method == row.method)
    return row.method if variants == 1 else f"{row.method} ({row.variant})"


def format_cell(report: Report, row: ReportRow, column: str) -> str:
    mean, std = row.mean(column), row.std(column)
    if math.isnan(mean):
        return "–"
    text = f"{100 * mean:.2f}" if math.isnan(std) else f"{100 * mean:.2f} ± {100 * std:.2f}"
    return f"**{text}**" if report.is_best(row, column) else text


def to_markdown(report: Report) -> str:
    titles = [name for name, _, _ in COLUMNS]
    lines = [
        f"# {report.experiment}: continual-learning results",
        "",
        f"Scores × 100 from the per-task `{report.metric}` matrix over {len(report.tasks)} tasks "
        f"({', '.join(report.tasks)}); mean ± std (n−1) over seeds; best in bold "
        "(higher is better, except Forgetting).",
        "",
        "| Method | Seeds | " + " | ".join(titles) + " |",
        "|---|---|" + "---:|" * len(titles),
    ]
    for row in report.rows:
        cells = [format_cell(report, row, title) for title in titles]
        lines.append(f"| {row_label(report, row)} | {', '.join(row.seeds)} | " + " | ".join(cells) + " |")
    if report.left_out:
        lines += ["", "Left out: " + "; ".join(report.left_out)]
    return "\n".join(lines) + "\n"


def write_csv(report: Report, path: Path) -> None:
    titles = [name for name, _, _ in COLUMNS]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "variant", "n_seeds", "seeds", "run_ids",
                         *[f"{t.lower()}_{stat}" for t in titles for stat in ("mean", "std")]])
        for row in report.rows:
            numbers = []
            for title in titles:
                numbers += [_number(row.mean(title)), _number(row.std(title))]
            writer.writerow([row.method, row.variant, len(row.seeds), " ".join(row.seeds), " ".join(row.run_ids), *numbers])


def _number(value: float) -> str:
    return "" if math.isnan(value) else repr(value)


def plot_seen_average(report: Report, path: Path) -> None:
    """Each variant's average score over the tasks seen so far, after each task (mean ± std band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = np.arange(1, len(report.tasks) + 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for row in report.rows:
        curves = np.asarray(row.seen_avg_curves, dtype=float) * 100
        mean = curves.mean(axis=0)
        ax.plot(steps, mean, marker="o", label=row_label(report, row))
        if len(curves) >= 2:
            std = curves.std(axis=0, ddof=1)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set_xticks(steps, [f"{i}\n{t}" for i, t in zip(steps, report.tasks)], fontsize=8)
    ax.set_xlabel("after task")
    ax.set_ylabel(f"Avg over seen tasks ({report.metric} × 100)")
    ax.set_title(f"{report.experiment}: average over tasks seen so far")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: Report, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "report.md", "csv": out_dir / "report.csv", "plot": out_dir / "avg_per_task.png"}
    paths["markdown"].write_text(to_markdown(report))
    write_csv(report, paths["csv"])
    plot_seen_average(report, paths["plot"])
    return paths


def log_report(tracking_uri: str, report: Report, paths: dict[str, Path], parent_run_id: str | None = None) -> str:
    """Log the files to a new `vlcl.kind`=report run, or under `report/` of the sweep's parent run."""
    from orchestrator.tracking import client, git_commit

    mlflow_client = client(tracking_uri)
    if parent_run_id:
        for path in paths.values():
            mlflow_client.log_artifact(parent_run_id, str(path), "report")
        return parent_run_id
    name = f"report-{report.metric}"
    run = mlflow_client.create_run(report.experiment_id, run_name=name, tags={
        "mlflow.runName": name, "vlcl.kind": "report", "vlcl.git_commit": git_commit(),
        "mlflow.note.content": f"Results table over {sum(len(r.seeds) for r in report.rows)} runs "
                               f"({len(report.rows)} variants), metric {report.metric}",
    })
    for path in paths.values():
        mlflow_client.log_artifact(run.info.run_id, str(path))
    mlflow_client.set_terminated(run.info.run_id)
    return run.info.run_id


# ----------------------------------------------------------------------------------------------
# command
# ----------------------------------------------------------------------------------------------

def add_report_commands(subparsers) -> None:
    report = subparsers.add_parser("report", help="methods × Transfer/Avg/Last/BWT/forgetting table from an experiment's runs")
    report.add_argument("experiment", help="MLflow experiment name (default name of a run: the stream's name)")
    report.add_argument("--metric", default="score",
                        help="per-task score the matrix is built from: score (matrix.json, default) or a logged "
                             "eval/<task>/<metric> such as top1, i2t_r1, r_mean")
    report.add_argument("--out", help="output folder (default vlcl_reports/<experiment>)")
    report.add_argument("--parent-run", help="only the child runs of this sweep parent run; log the report to it")
    report.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    report.add_argument("--no-log", action="store_true", help="write the files only; log nothing to MLflow")
    report.set_defaults(handler=command_report)


def command_report(args) -> int:
    from orchestrator.tracking import check_reachable, resolve_tracking_uri

    if args.tracking_uri:
        from orchestrator.config import load_run_config

        uri = resolve_tracking_uri(load_run_config(None, [f"tracking.uri={args.tracking_uri}"]))
    else:
        uri = resolve_tracking_uri(None)
    check_reachable(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise ReportError(f"no MLflow store at {uri}: run the report where mlflow.db is, or pass --tracking-uri")
    experiment_id, records, left_out = collect_runs(uri, args.experiment, args.metric, args.parent_run)
    report = build_report(args.experiment, experiment_id, records, left_out, args.metric)
    out_dir = Path(args.out) if args.out else Path("vlcl_reports") / _safe(args.experiment)
    paths = write_report(report, out_dir)
    print(paths["markdown"].read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    if not args.no_log:
        run_id = log_report(uri, report, paths, args.parent_run)
        print(f"logged to MLflow run {run_id} in experiment {args.experiment!r}")
    return 0


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)
