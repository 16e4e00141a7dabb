"""`vlcl report`: known MLflow runs (two methods × two seeds, hand-made matrices) → the table by hand."""
import argparse
import csv
import math
import statistics

import pytest

from orchestrator import report as rpt

TASKS = ["t1", "t2", "t3"]
ZERO = [0.1, 0.1, 0.1]
# Rows: zero-shot, after t1, after t2, after t3.
MATRICES = {
    ("finetune", "0"): [ZERO, [0.8, 0.2, 0.1], [0.6, 0.9, 0.3], [0.5, 0.7, 0.9]],
    ("finetune", "1"): [ZERO, [0.6, 0.6, 0.1], [0.4, 0.7, 0.1], [0.3, 0.5, 0.8]],
    ("ewc", "0"): [ZERO, [0.7, 0.3, 0.2], [0.7, 0.8, 0.2], [0.6, 0.8, 0.7]],
    ("ewc", "1"): [ZERO, [0.5, 0.3, 0.2], [0.6, 0.6, 0.2], [0.4, 0.6, 0.6]],
}
# Worked out on paper from the definitions in orchestrator/metrics.py:
# Transfer = mean_j>=2 mean_{1<=i<j} R[i,j]; Avg = mean of rows 1..T; Last = row T;
# BWT = mean_{j<T} R[T,j]-R[j,j]; Forgetting = mean_{j<T} max_{j<=i<T} R[i,j] - R[T,j].
PER_RUN = {
    ("finetune", "0"): {"Transfer": (0.2 + 0.2) / 2, "Avg": 5.0 / 9, "Last": 2.1 / 3, "BWT": -0.25, "Forgetting": 0.25},
    ("finetune", "1"): {"Transfer": (0.6 + 0.1) / 2, "Avg": 4.1 / 9, "Last": 1.6 / 3, "BWT": -0.25, "Forgetting": 0.25},
    ("ewc", "0"): {"Transfer": (0.3 + 0.2) / 2, "Avg": 5.0 / 9, "Last": 2.1 / 3, "BWT": -0.05, "Forgetting": 0.05},
    ("ewc", "1"): {"Transfer": (0.3 + 0.2) / 2, "Avg": 4.0 / 9, "Last": 1.6 / 3, "BWT": -0.05, "Forgetting": 0.1},
}
# mean ± sample std over the two seeds, by hand: std of two values = |a - b| / sqrt(2)
EXPECTED = {
    "finetune": {"Transfer": (0.275, 0.15 / math.sqrt(2)), "Avg": (9.1 / 18, 0.1 / math.sqrt(2)),
                 "Last": (3.7 / 6, (0.5 / 3) / math.sqrt(2)), "BWT": (-0.25, 0.0), "Forgetting": (0.25, 0.0)},
    "ewc": {"Transfer": (0.25, 0.0), "Avg": (0.5, (1 / 9) / math.sqrt(2)),
            "Last": (3.7 / 6, (0.5 / 3) / math.sqrt(2)), "BWT": (-0.05, 0.0), "Forgetting": (0.075, 0.05 / math.sqrt(2))},
}
# finetune: better Transfer and Avg; ewc: better BWT and (lower) Forgetting; Last is a tie.
BOLD = {"finetune": {"Transfer", "Avg", "Last"}, "ewc": {"Last", "BWT", "Forgetting"}}


def _log_run(client, experiment_id, method, seed, rows, *, status="FINISHED", kind="run", suffix=""):
    name = f"{method}-digits3-s{seed}{suffix}"
    run = client.create_run(experiment_id, run_name=name, tags={
        "mlflow.runName": name, "vlcl.kind": kind, "vlcl.method": method, "vlcl.stream": "digits3",
        "vlcl.seed": seed, "vlcl.model": "vlcl-tiny"})
    run_id = run.info.run_id
    client.log_dict(run_id, {"tasks": TASKS, "metric": "score", "rows": rows}, "matrix.json")
    for step, row in enumerate(rows):
        for task, value in zip(TASKS, row):
            client.log_metric(run_id, f"eval/{task}/score", value, step=step)
            client.log_metric(run_id, f"eval/{task}/top1", value, step=step)
    client.set_terminated(run_id, status=status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("report-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("digits3", artifact_location=(root / "mlruns").as_uri())
    run_ids = {key: _log_run(client, experiment_id, *key, rows) for key, rows in MATRICES.items()}
    # What the report must leave out: a failed run, a trial stopped after one task, a report run.
    _log_run(client, experiment_id, "ewc", "2", MATRICES[("ewc", "0")], status="FAILED")
    _log_run(client, experiment_id, "ewc", "3", MATRICES[("ewc", "0")][:2])
    _log_run(client, experiment_id, "ewc", "4", MATRICES[("ewc", "0")], kind="report")
    return {"uri": uri, "experiment_id": experiment_id, "run_ids": run_ids, "root": root}


def _report(store, metric="score"):
    experiment_id, records, left_out = rpt.collect_runs(store["uri"], "digits3", metric)
    return rpt.build_report("digits3", experiment_id, records, left_out, metric)


def test_table_equals_hand_computation(store):
    report = _report(store)
    by_method = {row.method: row for row in report.rows}
    assert set(by_method) == {"finetune", "ewc"}
    for method, row in by_method.items():
        assert row.seeds == ["0", "1"] and row.variant == f"{method}-digits3"
        for column, (mean, std) in EXPECTED[method].items():
            assert row.values[column] == pytest.approx([PER_RUN[(method, s)][column] for s in ("0", "1")], abs=1e-12)
            assert row.mean(column) == pytest.approx(mean, abs=1e-12), (method, column)
            assert row.std(column) == pytest.approx(std, abs=1e-12), (method, column)
        # seen-task average after each task: R[k, :k] averaged
        for seed, curve in zip(row.seeds, row.seen_avg_curves):
            rows = MATRICES[(method, seed)]
            assert curve == pytest.approx([rows[1][0], (rows[2][0] + rows[2][1]) / 2, sum(rows[3]) / 3])
    assert sorted(report.left_out) == sorted(["ewc-digits3-s2 (status FAILED)",
                                              "ewc-digits3-s3 (stopped after 1 of 3 tasks)"])


def test_markdown_bolds_best_per_column_and_formats_mean_std(store):
    report = _report(store)
    markdown = rpt.to_markdown(report)
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[3:-1]]
             for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| Method")}
    titles = ["Transfer", "Avg", "Last", "BWT", "Forgetting"]
    for method in ("finetune", "ewc"):
        for title, cell in zip(titles, lines[method]):
            mean, std = EXPECTED[method][title]
            text = f"{100 * mean:.2f} ± {100 * std:.2f}"
            assert cell == (f"**{text}**" if title in BOLD[method] else text), (method, title, cell)
    assert "Left out: " in markdown and "ewc-digits3-s2 (status FAILED)" in markdown


def test_report_from_eval_histories_matches_matrix_artifact(store):
    from_artifact, from_histories = _report(store), _report(store, metric="top1")
    assert [(r.method, r.seeds) for r in from_histories.rows] == [(r.method, r.seeds) for r in from_artifact.rows]
    for a, b in zip(from_artifact.rows, from_histories.rows):
        for column in a.values:
            assert b.values[column] == pytest.approx(a.values[column], abs=1e-12)
    with pytest.raises(rpt.ReportError, match="eval/t1/i2t_r1"):
        _report(store, metric="i2t_r1")


def test_variant_name_strips_only_the_seed():
    assert rpt.variant_name("ewc-digits-s1", "1") == "ewc-digits"
    assert rpt.variant_name("ewc-digits-s0-trial_3", "0") == "ewc-digits-trial_3"
    assert rpt.variant_name("ewc-s1ngle-s1", "1") == "ewc-s1ngle"


def test_command_writes_files_and_logs_a_report_run(store, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    parser = argparse.ArgumentParser()
    rpt.add_report_commands(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["report", "digits3", "--tracking-uri", store["uri"], "--out", str(out)])
    assert args.handler(args) == 0

    with open(out / "report.csv") as handle:
        table = {row["method"]: row for row in csv.DictReader(handle)}
    assert float(table["ewc"]["forgetting_mean"]) == pytest.approx(0.075)
    assert float(table["finetune"]["avg_std"]) == pytest.approx(statistics.stdev([5.0 / 9, 4.1 / 9]))
    assert table["finetune"]["n_seeds"] == "2"
    png = (out / "avg_per_task.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "**" in (out / "report.md").read_text()

    client = MlflowClient(store["uri"])
    reports = client.search_runs([store["experiment_id"]], filter_string="tags.`vlcl.kind` = 'report' AND tags.`mlflow.runName` = 'report-score'")
    assert len(reports) == 1
    assert {a.path for a in client.list_artifacts(reports[0].info.run_id)} == {"report.md", "report.csv", "avg_per_task.png"}
    assert "logged to MLflow run" in capsys.readouterr().out


def test_unknown_experiment_names_the_known_ones(store):
    with pytest.raises(rpt.ReportError, match=r"no MLflow experiment named 'nope'.*digits3"):
        rpt.collect_runs(store["uri"], "nope")


def test_malformed_matrix_names_the_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("bad", artifact_location=(tmp_path / "mlruns").as_uri())
    run = client.create_run(experiment_id, run_name="er-bad-s0", tags={"vlcl.kind": "run", "vlcl.method": "er", "vlcl.seed": "0"})
    client.log_dict(run.info.run_id, {"tasks": ["a"], "rows": "oops"}, "matrix.json")
    client.set_terminated(run.info.run_id)
    with pytest.raises(rpt.ReportError, match="matrix.json of run er-bad-s0"):
        rpt.collect_runs(uri, "bad")
