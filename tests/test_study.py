"""Studies: the (method, order, seed) grid is laid out and validated before Ray starts."""
from pathlib import Path

import pytest

from orchestrator.study import StudyConfigError, plan_study


def test_every_method_order_and_seed_is_one_validated_run(digits_manifest):
    plan = plan_study({"name": "orders", "base": {"stream": str(digits_manifest), "train": {"max_steps_per_task": 3}},
                       "methods": ["finetune", "lwf"], "orders": {"default": "default", "reverse": "reverse"},
                       "seeds": [0, 1], "resources": {"workers": 1, "cpus_per_worker": 0.5}})
    assert len(plan.runs) == 8
    names = [r.config.tracking.run_name for r in plan.runs]
    assert len(set(names)) == 8 and "lwf-digits-reverse-s1" in names
    by_name = {r.config.tracking.run_name: r for r in plan.runs}
    forward = by_name["finetune-digits-default-s0"].config.task_order
    assert forward == [f"digits-{i}-{i + 1}" for i in range(0, 10, 2)]
    assert by_name["finetune-digits-reverse-s0"].config.task_order == forward[::-1]
    assert {r.config.tracking.experiment for r in plan.runs} == {"orders"}
    assert all(r.config.train.max_steps_per_task == 3 and r.config.train.cpus_per_worker == 0.5 for r in plan.runs)
    assert by_name["lwf-digits-default-s1"].config.train.seed == 1


def test_bad_axes_are_named_before_any_work(digits_manifest):
    base = {"stream": str(digits_manifest)}
    with pytest.raises(StudyConfigError, match=r"orders.odd: task_order: \['digits-0-9'\] are not tasks"):
        plan_study({"base": base, "methods": ["finetune"], "orders": {"odd": ["digits-0-9"]}})
    with pytest.raises(StudyConfigError, match=r"(?s)method .nope.*unknown method"):
        plan_study({"base": base, "methods": ["nope"]})
    with pytest.raises(StudyConfigError, match="methods"):
        plan_study({"base": base, "methods": []})
    with pytest.raises(StudyConfigError, match="data.reference"):  # zscl needs reference data: said per run
        plan_study({"base": base, "methods": ["zscl"]})
    # the base run config, as a sweep's: a missing file and a bad field are named under `base`
    with pytest.raises(StudyConfigError, match=r"study.yaml: base: run config .*missing.yaml does not exist"):
        plan_study({"base": "missing.yaml", "methods": ["finetune"]}, source="study.yaml", relative_to=Path("/tmp"))
    with pytest.raises(StudyConfigError, match=r"base.train.lr"):
        plan_study({"base": {**base, "train": {"lr": -1}}, "methods": ["finetune"]})


@pytest.mark.ray
@pytest.mark.slow
def test_a_study_runs_each_order_and_seed_and_reports_them_grouped(ray_session, tmp_path, digits_manifest, capfd):
    from mlflow.tracking import MlflowClient

    from orchestrator.report import build_report, collect_runs, to_markdown
    from orchestrator.study import run_study

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plan = plan_study({"name": "orders", "methods": ["finetune"], "seeds": [0, 1],
                       "orders": {"default": ["digits-0-1", "digits-2-3"], "reverse": ["digits-2-3", "digits-0-1"]},
                       "base": {"stream": str(digits_manifest), "output_dir": str(tmp_path / "runs"),
                                "tracking": {"uri": uri}, "train": {"max_steps_per_task": 2, "cpus_per_worker": 0.5}},
                       "storage_path": str(tmp_path / "studies"), "resources": {"max_concurrent_trials": 2}})
    run_study(plan)
    lines = [line for line in capfd.readouterr().out.splitlines() if line.startswith("run ")]
    assert sorted(line.split("done")[0].split()[2:] for line in lines) == [
        ["finetune", "order", "default", "seed", "0"], ["finetune", "order", "default", "seed", "1"],
        ["finetune", "order", "reverse", "seed", "0"], ["finetune", "order", "reverse", "seed", "1"]]
    experiment_id, records, left_out = collect_runs(uri, "orders")
    assert not left_out and len(records) == 4
    runs = MlflowClient(uri).search_runs([experiment_id])  # one worker each: in its trial's own process
    assert [r.data.tags["vlcl.launch"] for r in runs] == ["in_process"] * 4
    assert {tuple(r.tasks) for r in records} == {("digits-0-1", "digits-2-3"), ("digits-2-3", "digits-0-1")}
    report = build_report("orders", experiment_id, records, left_out)
    assert sorted((row.variant, tuple(row.seeds)) for row in report.rows) == [
        ("order default", ("0", "1")), ("order reverse", ("0", "1"))]
    table = to_markdown(report)
    assert "| finetune (order default) | 0, 1 |" in table and " ± " in table
