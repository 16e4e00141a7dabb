"""Sweeps: config parsing and space building (fast), then a small end-to-end sweep on Ray (slow)."""
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from orchestrator.sweep import format_leaderboard
from orchestrator.sweep_config import (
    ObjectiveSettings,
    ParamSpec,
    StopRule,
    SweepConfigError,
    load_sweep_config,
    plan_sweep,
    run_config_key,
)
from orchestrator.sweep_objective import OBJECTIVE_KEY, ZERO_SHOT_DROP_KEY, TrialOutcome, derived_metrics, rank_trials
from orchestrator.sweep_tune import derive_max_concurrent_trials, trial_reservation, trial_resources, tune_param_space

REPO = Path(__file__).resolve().parents[1]
TINY_BASE = {"stream": "builtin:digits", "model": {"name": "vlcl-tiny"}, "method": {"name": "finetune"},
             "train": {"max_steps_per_task": 2, "epochs_per_task": 1}}


# ---- parsing and space building --------------------------------------------------------------

def test_example_sweep_file_loads_with_the_default_space_overridden_per_key():
    plan = load_sweep_config(REPO / "examples" / "sweep_digits.yaml")
    default = yaml.safe_load((REPO / "tune_spaces" / "finetune.yaml").read_text())["space"]
    assert plan.name == "sweep_digits"
    # train.lr comes from the sweep file, label_smoothing from tune_spaces/finetune.yaml.
    assert plan.space["train.lr"] == ParamSpec(type="loguniform", lower=1e-5, upper=1e-2)
    assert plan.space["method.hparams.label_smoothing"] == ParamSpec(**default["label_smoothing"])
    assert plan.base.train.num_workers == 1 and plan.base.train.cpus_per_worker == 1.0


def test_bare_keys_are_method_hparams_and_dotted_keys_run_config_fields():
    assert run_config_key("label_smoothing") == "method.hparams.label_smoothing"
    assert run_config_key("train.lr") == "train.lr"
    assert run_config_key("data.decoders") == "data.decoders"


def test_space_keys_can_be_dropped_fixed_or_replaced():
    plan = plan_sweep({"base": TINY_BASE, "space": {"label_smoothing": None, "train.seed": 3,
                                                      "train.weight_decay": {"type": "uniform", "lower": 0.0, "upper": 0.1}}})
    assert set(plan.space) == {"train.lr", "train.seed", "train.weight_decay"}
    space = tune_param_space(plan)
    assert space["train.seed"] == 3
    assert space["train.weight_decay"].lower == 0.0 and space["train.weight_decay"].upper == 0.1


def test_grid_search_expands_choices_and_rejects_continuous_ranges():
    plan = plan_sweep({"base": TINY_BASE, "use_default_space": False, "search": {"algorithm": "grid"},
                       "space": {"train.lr": {"type": "choice", "values": [1e-4, 1e-2]}}})
    assert tune_param_space(plan)["train.lr"] == {"grid_search": [1e-4, 1e-2]}
    with pytest.raises(SweepConfigError, match=r"space train\.lr: grid search needs `type: choice`"):
        plan_sweep({"base": TINY_BASE, "search": {"algorithm": "grid"}})


def test_a_space_value_the_method_rejects_names_the_space_key():
    with pytest.raises(SweepConfigError, match=r"space\.label_smoothing .*value 1\.5"):
        plan_sweep({"base": TINY_BASE, "space": {"label_smoothing": {"type": "choice", "values": [0.0, 1.5]}}})
    with pytest.raises(SweepConfigError, match=r"space\.no_such_field"):
        plan_sweep({"base": TINY_BASE, "space": {"no_such_field": {"type": "choice", "values": [1]}}})
    with pytest.raises(SweepConfigError, match=r"space\.train\.lr: .*lower. > 0"):
        plan_sweep({"base": TINY_BASE, "space": {"train.lr": {"type": "loguniform", "lower": 0, "upper": 1}}})


def test_settings_errors_name_the_field():
    with pytest.raises(SweepConfigError, match=r"objective\.name"):
        plan_sweep({"base": TINY_BASE, "objective": {"name": "accuracy"}})
    with pytest.raises(SweepConfigError, match=r"stop\.0\.metric"):
        plan_sweep({"base": TINY_BASE, "stop": [{"metric": "loss", "max": 1}]})
    with pytest.raises(SweepConfigError, match=r"base: run config .*missing\.yaml does not exist"):
        plan_sweep({"base": "missing.yaml"}, relative_to=REPO)
    with pytest.raises(SweepConfigError, match=r"base.*train\.lr"):
        plan_sweep({"base": {**TINY_BASE, "train": {"lr": -1}}})
    with pytest.raises(SweepConfigError, match=r"search\.algorithm.*optuna.*not installed"):
        plan_sweep({"base": TINY_BASE, "search": {"algorithm": "optuna"}})
    with pytest.raises(SweepConfigError, match=r"(top level|resources).*(extra|Extra)"):
        plan_sweep({"base": TINY_BASE, "resources": {"gpus": 1}})


def test_objectives_from_a_per_task_report():
    report = {"cl/avg": 0.6, "cl/last": 0.5, "cl/seen_avg": 0.7, "cl/forgetting": 0.2, "cl/zero_shot": 0.3}
    value = lambda **kw: derived_metrics(report, ObjectiveSettings(**kw))[OBJECTIVE_KEY]
    assert value(name="avg") == 0.6 and value(name="last") == 0.5 and value(name="seen_avg") == 0.7
    assert value(name="neg_forgetting") == -0.2
    assert value(name="weighted", accuracy_weight=2.0, forgetting_weight=0.5) == pytest.approx(2 * 0.7 - 0.5 * 0.2)
    assert derived_metrics(report, ObjectiveSettings())[ZERO_SHOT_DROP_KEY] == pytest.approx(0.3 - 0.5)
    # After the first task forgetting is undefined (NaN): nothing has been forgotten yet.
    first = {**report, "cl/forgetting": math.nan}
    assert derived_metrics(first, ObjectiveSettings(name="weighted"))[OBJECTIVE_KEY] == pytest.approx(0.7)


def test_stop_rule_fires_only_after_its_task_and_above_its_bound():
    rule = StopRule(metric="cl/forgetting", max=0.3, after_task=2)
    assert not rule.violated({"task": 1, "cl/forgetting": 0.9})
    assert not rule.violated({"task": 2, "cl/forgetting": 0.3})
    assert rule.violated({"task": 2, "cl/forgetting": 0.31})
    assert not rule.violated({"task": 3, "cl/forgetting": math.nan})


def test_max_concurrent_trials_from_cluster_resources():
    plan = plan_sweep({"base": TINY_BASE, "resources": {"workers": 2, "cpus_per_worker": 4, "use_gpu": True,
                                                         "trial_cpus": 1}})
    per_trial = trial_resources(plan, cluster_has_gpus=True)
    assert per_trial == {"CPU": 9.0, "GPU": 2.0}
    assert derive_max_concurrent_trials(per_trial, {"CPU": 96.0, "GPU": 8.0}) == 4  # GPU-bound
    assert derive_max_concurrent_trials(per_trial, {"CPU": 20.0, "GPU": 8.0}) == 2  # CPU-bound
    assert derive_max_concurrent_trials(per_trial, {"CPU": 8.0}) == 1  # autoscaler will add GPU nodes
    cpu_plan = plan_sweep({"base": TINY_BASE, "resources": {"cpus_per_worker": 0.5, "trial_cpus": 0.5}})
    assert derive_max_concurrent_trials(trial_resources(cpu_plan, cluster_has_gpus=False), {"CPU": 2.0}) == 2
    assert plan_sweep({"base": TINY_BASE}).config.resources.trial_cpus == 0.0
    # Where the trial trains decides what its own process reserves: in it, all of it; beside Ray
    # Train's workers, its own CPUs only (one byte of memory where it holds none: Tune refuses zero).
    one_worker = trial_resources(cpu_plan, cluster_has_gpus=False)
    assert trial_reservation(one_worker, "in_process", 0.5) == {"CPU": 1.0}
    assert trial_reservation(one_worker, "ray", 0.5) == {"CPU": 0.5}
    assert trial_reservation(one_worker, "ray", 0.0) == {"memory": 1.0}
    gpu_plan = plan_sweep({"base": TINY_BASE, "resources": {"cpus_per_worker": 4, "use_gpu": True, "trial_cpus": 1}})
    assert trial_reservation(trial_resources(gpu_plan, cluster_has_gpus=True), "in_process", 1.0) == \
        {"CPU": 5.0, "GPU": 1.0}


def test_ranking_puts_completed_trials_first_by_final_objective():
    trials = [TrialOutcome("a", {}, [0.5, 0.9], 2, "stopped (rule)"),
              TrialOutcome("b", {}, [0.5, 0.4, 0.3], 3, "completed"),
              TrialOutcome("c", {}, [0.6, 0.6, 0.7], 3, "completed"),
              TrialOutcome("d", {}, [0.1], 1, "stopped (asha)")]
    assert [t.trial_id for t in rank_trials(trials)] == ["c", "b", "a", "d"]


# ---- end to end ------------------------------------------------------------------------------

def test_pbt_perturbs_only_keys_that_can_change_between_tasks():
    from orchestrator.sweep_config import pbt_keys

    plan = plan_sweep({"base": {**TINY_BASE, "method": {"name": "er"}}, "use_default_space": False,
                       "scheduler": {"type": "pbt"},
                       "space": {"train.lr": {"type": "loguniform", "lower": 1e-5, "upper": 1e-2},
                                 "memory_size": {"type": "choice", "values": [20, 40]},
                                 "train.batch_size": {"type": "choice", "values": [16, 32]}}})
    # memory_size shapes the replay memory a trial carries across tasks; batch size is not per-task.
    assert pbt_keys(plan) == ["train.lr"]
    with pytest.raises(SweepConfigError, match=r"resources.max_concurrent_trials: pbt compares the whole population"):
        plan_sweep({"base": TINY_BASE, "scheduler": {"type": "pbt"}, "search": {"num_samples": 4},
                    "resources": {"max_concurrent_trials": 1}})
    with pytest.raises(SweepConfigError, match=r"scheduler pbt .*no key of the space can change"):
        plan_sweep({"base": {**TINY_BASE, "method": {"name": "er"}}, "use_default_space": False,
                    "scheduler": {"type": "pbt"}, "space": {"memory_size": {"type": "choice", "values": [20, 40]}}})


class Population:
    """Tune's controller reduced to what Ray's PBT scheduler asks of it, recording what it is asked
    to do to the trials' processes."""
    search_alg = None

    def __init__(self, trials):
        self.trials = trials
        self.calls: list[tuple[str, str]] = []

    def get_trials(self):
        return self.trials

    def get_live_trials(self):  # as Tune's: an errored trial stays in it
        from ray.tune.experiment import Trial

        return {trial for trial in self.trials if trial.status != Trial.TERMINATED}

    def pause_trial(self, trial, should_checkpoint=True):
        from ray.tune.experiment import Trial

        self.calls.append(("pause", trial.trial_id))
        trial.set_status(Trial.PAUSED)

    def _schedule_trial_save(self, trial, result=None):  # a function trainable saves its last report
        self.calls.append(("save", trial.trial_id))
        return trial.checkpoint

    def _schedule_trial_train(self, trial):
        self.calls.append(("train", trial.trial_id))

    def stop_trial(self, trial):
        from ray.tune.experiment import Trial

        self.calls.append(("stop", trial.trial_id))
        trial.set_status(Trial.TERMINATED)


def report_task(scheduler, population, trial, task: int, objective: float) -> str:
    """The trial reports the task with its checkpoint; Tune acts on PBT's decision as its
    controller does: PAUSE pauses the trial, CONTINUE schedules its next step, NOOP does nothing."""
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint
    from ray.tune.schedulers import TrialScheduler

    trial.run_metadata.checkpoint_manager.register_checkpoint(
        _TrainingResult(checkpoint=Checkpoint(f"/checkpoints/{trial.trial_id}/task_{task}"), metrics={"task": task}))
    decision = scheduler.on_trial_result(population, trial, {"task": task, OBJECTIVE_KEY: objective})
    if decision == TrialScheduler.PAUSE:
        population.pause_trial(trial)
    elif decision == TrialScheduler.CONTINUE:
        population._schedule_trial_train(trial)
    return decision


def pbt_population(trial_ids: str, quantile_fraction: float):
    from ray.tune.experiment import Trial

    from orchestrator.sweep_tune import synchronous_pbt

    scheduler = synchronous_pbt(
        time_attr="task", metric=OBJECTIVE_KEY, mode="max", perturbation_interval=1, quantile_fraction=quantile_fraction,
        hyperparam_mutations={"train.lr": [1e-4, 1e-3, 1e-2]}, resample_probability=0.0, log_config=False)
    population = Population([Trial("run_trial", config={"train.lr": 1e-3}, trial_id=name, stub=True)
                             for name in trial_ids])
    for trial in population.trials:
        scheduler.on_trial_add(population, trial)
        trial.set_status(Trial.RUNNING)
    return scheduler, population


@pytest.mark.parametrize("arrivals", ["abcd", "abdc", "bcda"], ids=["a-middle-trial-last", "the-exploited-last",
                                                                   "the-donor-last"])
def test_pbt_holds_a_trial_at_the_boundary_in_its_process_and_pauses_only_the_exploited_one(arrivals):
    """Ray's synchronous PBT pauses every trial at a boundary, and Tune keeps a paused trial's
    process only for a trial staged to take it over: about half the population started a fresh
    process at every boundary. Ours holds the early arrivals (NOOP: RUNNING, no step scheduled),
    and once the last one arrives, whichever it is, saves the donor, pauses only the trial that
    continues from it, and gives every other trial its next step, each once."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    scheduler, population = pbt_population("abcd", quantile_fraction=0.25)
    trials = {trial.trial_id: trial for trial in population.trials}
    objectives = {"a": 0.9, "b": 0.5, "c": 0.1, "d": 0.4}  # a: the top quarter, c: the bottom one
    for name in arrivals[:-1]:
        assert report_task(scheduler, population, trials[name], 1, objectives[name]) == TrialScheduler.NOOP
        assert trials[name].status == Trial.RUNNING
    assert population.calls == [], "nothing is done to a trial that waits for the rest of the population"

    last = arrivals[-1]
    decision = report_task(scheduler, population, trials[last], 1, objectives[last])
    assert decision == (TrialScheduler.NOOP if last == "c" else TrialScheduler.CONTINUE)
    # c continues from a's task-1 state, in a process of its own
    assert trials["c"].status == Trial.PAUSED and trials["c"].checkpoint.path == "/checkpoints/a/task_1"
    calls = population.calls
    assert calls.index(("save", "a")) < calls.index(("pause", "c")) and calls.index(("save", "a")) < calls.index(("train", "a"))
    assert sorted(call for call in calls if call[0] == "train") == [("train", "a"), ("train", "b"), ("train", "d")]
    assert [call for call in calls if call[0] == "pause"] == [("pause", "c")]
    assert all(trials[name].status == Trial.RUNNING for name in "abd")
    assert scheduler.choose_trial_to_run(population) is trials["c"]


def test_pbt_perturbs_the_survivors_when_the_trial_they_waited_for_errors_and_never_clones_it():
    """After task 1 trial e is the best; at task 2, a and b wait, held, for e, and e errors
    instead: a and b must still be perturbed (b, the weaker, continues from a's task-2 state, not
    from e's), and a must go on."""
    from ray.tune.experiment import Trial

    scheduler, population = pbt_population("abe", quantile_fraction=0.5)
    a, b, e = population.trials
    for trial, objective in ((e, 0.9), (a, 0.2), (b, 0.1)):
        report_task(scheduler, population, trial, 1, objective)
    assert b.checkpoint.path == "/checkpoints/e/task_1", "precondition: after task 1, b continues from e"
    assert scheduler.choose_trial_to_run(population) is b
    b.set_status(Trial.RUNNING)
    report_task(scheduler, population, a, 2, 0.3)
    report_task(scheduler, population, b, 2, 0.25)
    scheduler.on_trial_error(population, e)  # as Tune's controller: the scheduler is told, then ERROR
    e.set_status(Trial.ERROR)
    population.calls.clear()

    # Ray's own PopulationBasedTraining returns None here, every step: nobody is ever resumed.
    assert scheduler.choose_trial_to_run(population) is b
    assert b.checkpoint.path == "/checkpoints/a/task_2"  # e's last score (0.9) is the highest, but e ended
    assert a.checkpoint.path == "/checkpoints/a/task_2" and e.status == Trial.ERROR
    assert ("train", "a") in population.calls and a.status == Trial.RUNNING
    assert scheduler.choose_trial_to_run(population) is b, "the perturbation happened once"
    assert population.calls.count(("train", "a")) == 1


def test_pbt_resumes_the_whole_population_after_a_boundary_not_one_trial_at_a_time():
    """Tune stages the one trial `choose_trial_to_run` names per step, and a staged trial is PENDING
    until its actor runs. Ray's choice is the lowest `last_train_time` among PENDING and PAUSED
    trials, so it named the staged trial again and again: measured, 4 trials resumed 7 s apart, each
    once the one before it had trained its task and paused (before trials were held at a boundary;
    exploited trials, and a population that `--resume` restores, are still paused together). Ours
    names a paused trial not yet staged."""
    from ray.tune.experiment import Trial

    scheduler, population = pbt_population("abcd", quantile_fraction=0.25)
    trials = population.trials
    for trial in trials:
        scheduler._trial_state[trial].last_train_time = 1  # every trial reported task 1 and was perturbed
        trial.set_status(Trial.PAUSED)
    scheduler._next_perturbation_sync = 2

    staged = []
    for _ in trials:  # as Tune's controller: stage the named trial (PENDING until its actor starts)
        chosen = scheduler.choose_trial_to_run(population)
        assert chosen is not None and chosen not in staged
        chosen.set_status(Trial.PENDING)
        staged.append(chosen)
    assert sorted(trial.trial_id for trial in staged) == ["a", "b", "c", "d"]


def test_halving_rungs_are_grace_times_powers_of_the_reduction_factor_before_the_last_task():
    from orchestrator.sweep_tune import halving_rungs

    assert halving_rungs(1, 2, 4) == [1, 2]
    assert halving_rungs(1, 2, 8) == [1, 2, 4]
    assert halving_rungs(2, 4, 3) == [2]
    assert halving_rungs(1, 1.5, 4) == [1, 2, 3]  # 1, 1.5 -> 2, 2.25 -> 3 whole tasks
    assert halving_rungs(3, 2, 3) == []


def halving_population(trial_ids: str, reduction_factor: float, num_tasks: int = 4):
    from ray.tune.experiment import Trial

    from orchestrator.sweep_tune import synchronous_halving

    scheduler = synchronous_halving(metric=OBJECTIVE_KEY, time_attr="task", num_tasks=num_tasks, grace_period=1,
                                    reduction_factor=reduction_factor)
    population = Population([Trial("run_trial", config={}, trial_id=name, stub=True) for name in trial_ids])
    for trial in population.trials:
        scheduler.on_trial_add(population, trial)
        trial.set_status(Trial.RUNNING)
    return scheduler, population


def report_rung(scheduler, population, trial, task: int, objective: float) -> str:
    """As Tune's controller: the scheduler decides on the result, then the trial's last result is
    updated; STOP ends the trial, CONTINUE schedules its next step, NOOP leaves it waiting."""
    from ray.tune.schedulers import TrialScheduler

    result = {"task": task, OBJECTIVE_KEY: objective}
    decision = scheduler.on_trial_result(population, trial, result)
    trial.update_last_result(result)
    if decision == TrialScheduler.STOP:
        population.stop_trial(trial)
    elif decision == TrialScheduler.CONTINUE:
        population._schedule_trial_train(trial)
    return decision


@pytest.mark.parametrize("arrivals", ["abcd", "dcba", "cadb"])
def test_halving_holds_every_trial_at_a_rung_until_the_last_arrives_then_keeps_the_top_half(arrivals):
    """Ray's ASHA lets a trial that reaches a rung before its peers go on: with `dcba`, worst
    first, each arrival beats the median of those before it, and ASHA keeps all four. The synchronous cut keeps the same two, a and b, whatever
    the order, and each trial gets exactly one decision."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    scheduler, population = halving_population("abcd", reduction_factor=2)
    trials = {trial.trial_id: trial for trial in population.trials}
    objectives = {"a": 0.9, "b": 0.5, "c": 0.4, "d": 0.1}
    for name in arrivals[:-1]:
        assert report_rung(scheduler, population, trials[name], 1, objectives[name]) == TrialScheduler.NOOP
    assert population.calls == [], "a trial waits at the rung for the rest"
    last = arrivals[-1]
    decision = report_rung(scheduler, population, trials[last], 1, objectives[last])
    assert decision == (TrialScheduler.CONTINUE if last in "ab" else TrialScheduler.STOP)
    assert sorted(population.calls) == [("stop", "c"), ("stop", "d"), ("train", "a"), ("train", "b")]
    assert [trials[n].status for n in "abcd"] == [Trial.RUNNING, Trial.RUNNING, Trial.TERMINATED, Trial.TERMINATED]

    # rung 2 compares the two left: b wins there, a is stopped
    population.calls.clear()
    assert report_rung(scheduler, population, trials["a"], 2, 0.3) == TrialScheduler.NOOP
    assert report_rung(scheduler, population, trials["b"], 2, 0.6) == TrialScheduler.CONTINUE
    assert sorted(population.calls) == [("stop", "a"), ("train", "b")]
    # no rung at task 3 (of 4): b goes on
    assert report_rung(scheduler, population, trials["b"], 3, 0.1) == TrialScheduler.CONTINUE


def test_halving_keeps_every_trial_tied_with_the_last_one_kept():
    """After the first task a replay weight cannot matter yet (the memory is empty), so trials
    that differ only in it score the same: a cut must not pick one of them by arrival order."""
    from ray.tune.schedulers import TrialScheduler

    scheduler, population = halving_population("abcd", reduction_factor=4)  # keeps floor(4 / 4) = 1
    trials = {trial.trial_id: trial for trial in population.trials}
    for name, objective in (("a", 0.7), ("b", 0.7), ("c", 0.2), ("d", 0.2)):
        report_rung(scheduler, population, trials[name], 1, objective)
    assert sorted(population.calls) == [("stop", "c"), ("stop", "d"), ("train", "a"), ("train", "b")]
    assert scheduler.on_trial_result(population, trials["a"], {"task": 2, OBJECTIVE_KEY: 0.1}) == TrialScheduler.CONTINUE


def test_halving_cuts_the_waiting_trials_when_the_one_they_waited_for_ends_before_the_rung():
    """c is stopped by a stop rule (or errors) during task 1: nobody else will report at the rung,
    so the cut happens when Tune next asks the scheduler for a trial to run."""
    from ray.tune.experiment import Trial

    scheduler, population = halving_population("abc", reduction_factor=2)
    a, b, c = population.trials
    report_rung(scheduler, population, a, 1, 0.2)
    report_rung(scheduler, population, b, 1, 0.8)
    assert population.calls == []
    c.set_status(Trial.ERROR)
    scheduler.choose_trial_to_run(population)
    assert sorted(population.calls) == [("stop", "a"), ("train", "b")]
    scheduler.choose_trial_to_run(population)
    assert population.calls.count(("train", "b")) == 1, "the rung is cut once"


def test_a_pbt_schedule_becomes_per_task_settings_of_one_run_config():
    from orchestrator.config import RunConfig
    from orchestrator.sweep_config import schedule_config

    base = RunConfig(**{**TINY_BASE, "method": {"name": "lwf"}})
    settings = [{"task": name, "lr": lr, "weight_decay": 0.0, "hparams": {"image_loss_weight": alpha, "temperature": 2.0}}
                for name, lr, alpha in (("digits-0-1", 1e-3, 0.5), ("digits-2-3", 1.2e-3, 0.4))]
    config = schedule_config(base, {"train.lr": 1.2e-3, "method.hparams.image_loss_weight": 0.4, "train.seed": 3}, settings,
                             ["train.lr", "method.hparams.image_loss_weight"])
    assert config.train.seed == 3
    first, second = config.task_settings("digits-0-1", "0"), config.task_settings("digits-2-3", "1")
    assert (first.lr, first.hparams.image_loss_weight) == (1e-3, 0.5) and (second.lr, second.hparams.image_loss_weight) == (1.2e-3, 0.4)


def three_task_digits(digits_manifest, folder: Path, count: int = 3) -> Path:
    """The first `count` tasks of the built-in digits stream, as a manifest with absolute shard paths,
    scored class-incrementally (over every digit of the stream): the sweep tests' trials were sized
    for the forgetting of that setting (60 steps at lr 1e-3 forget more than the rule's 0.3)."""
    from streams.manifest import load_stream

    stream = load_stream(digits_manifest)
    root = Path(stream.root)
    data = stream.model_dump(exclude={"root"})
    data["name"] = f"digits{count}"
    data["tasks"] = data["tasks"][:count]
    data["eval_classifier"] = "stream"
    for task in data["tasks"]:
        for split in ("train", "eval"):
            task[split]["shards"] = [str(root / s) for s in task[split]["shards"]]
    path = folder / f"digits{count}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def two_lr_sweep(name: str, manifest: Path, folder: Path, *, train: dict, scheduler: dict,
                 concurrent: int, **base) -> dict:
    """A sweep of fine-tuning vlcl-tiny at lr 1e-4 and 1e-3 over `manifest`, with its MLflow store,
    runs and Tune state under `folder`, each trial on half a CPU in its Tune trial's process."""
    return {
        "name": name,
        "base": {"stream": str(manifest), "model": {"name": "vlcl-tiny"}, "method": {"name": "finetune"},
                 "train": train, **base,
                 "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": name, "checkpoints": "none"},
                 "output_dir": str(folder / "runs")},
        "use_default_space": False,
        "space": {"train.lr": {"type": "choice", "values": [1e-4, 1e-3]}},
        "search": {"algorithm": "grid", "num_samples": 1},
        "scheduler": scheduler,
        "resources": {"workers": 1, "cpus_per_worker": 0.5, "trial_cpus": 0, "max_concurrent_trials": concurrent},
        "storage_path": str(folder / "sweeps"),
    }


def sweep_command(sweep: dict, folder: Path, **variables: str) -> tuple[list[str], dict]:
    """`vlcl sweep` of `sweep` (written to folder/sweep.yaml) and its environment: the sweep starts
    its own local Ray, as a user's does, whose processes see `variables` (a fault to inject)."""
    sweep_file = folder / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), **variables}
    env.pop("RAY_ADDRESS", None)
    return [sys.executable, "-m", "orchestrator.cli", "sweep", str(sweep_file)], env


@pytest.fixture(scope="module")
def finished_sweep(ray_session, digits_manifest, tmp_path_factory):
    """3 trials x 3 tasks: lr 1e-7 (learns nothing, forgets nothing), 1e-3 (learns each task and
    forgets the previous one), 3e-4. The forgetting rule must stop the 1e-3 one after its second task.
    Measured with 8 steps per task: 1e-3 reached only 0.5 on task 1 (no forgetting until task 3) and
    3e-3 collapsed to chance, hence 60 steps (a task is 9 steps per epoch, so 10 epochs capped at 60)."""
    from orchestrator.sweep import run_sweep

    folder = tmp_path_factory.mktemp("sweep")
    manifest = three_task_digits(digits_manifest, folder)
    raw = {
        "name": "digits3-lr",
        "base": {"stream": str(manifest), "model": {"name": "vlcl-tiny"}, "method": {"name": "finetune"},
                 "train": {"batch_size": 32, "max_steps_per_task": 60, "epochs_per_task": 10, "log_every_steps": 10},
                 "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "sweep-test",
                              "checkpoints": "none"},
                 "output_dir": str(folder / "runs")},
        "use_default_space": False,
        "space": {"train.lr": {"type": "choice", "values": [1e-7, 1e-3, 3e-4]}},
        "search": {"algorithm": "grid", "num_samples": 1},
        "objective": {"name": "weighted", "accuracy_weight": 1.0, "forgetting_weight": 1.0},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "stop": [{"metric": "cl/forgetting", "max": 0.3, "after_task": 2}],
        "resources": {"workers": 1, "cpus_per_worker": 0.5, "trial_cpus": 0, "max_concurrent_trials": 1},
        "storage_path": str(folder / "sweeps"),
    }
    plan = plan_sweep(raw, source="test sweep")
    before = ray_train_actors()
    result = run_sweep(plan, quiet=True)
    return plan, result, {actor: name for actor, name in ray_train_actors().items() if actor not in before}


def ray_train_actors() -> dict[str, str]:
    """Actor id -> class name of every Ray Train controller and worker the Ray instance has had
    (the GCS keeps dead actors' records too)."""
    from ray._private.state import actors

    return {actor_id: info["ActorClassName"] for actor_id, info in actors().items()
            if info["ActorClassName"] in ("TrainController", "RayTrainWorker")}


@pytest.mark.ray
@pytest.mark.slow
def test_one_worker_trials_train_in_their_trial_process_without_a_train_worker_group(finished_sweep):
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep_tune import trial_reservation, trial_resources

    plan, result, train_actors = finished_sweep
    client = MlflowClient(tracking_uri=plan.base.tracking.uri)
    runs = [client.get_run(t.run_id) for t in result.trials]
    assert [r.data.tags["vlcl.launch"] for r in runs] == ["in_process"] * 3
    assert [r.data.params["train.launch"] for r in runs] == ["in_process"] * 3
    assert train_actors == {}, "a trial started a Ray Train controller or worker"
    # The trial's own reservation holds the worker's CPUs (0.5 here): one bundle, nothing beside it.
    assert trial_reservation(trial_resources(plan, cluster_has_gpus=False), "in_process", 0.0) == {"CPU": 0.5}


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_stops_the_forgetting_trial_and_a_later_trial_still_runs(finished_sweep):
    plan, result, _ = finished_sweep
    print(format_leaderboard(result))
    by_lr = {t.params["train.lr"]: t for t in result.trials}
    assert set(by_lr) == {1e-7, 1e-3, 3e-4} and result.num_tasks == 3
    forgetful = by_lr[1e-3]
    assert forgetful.status == "stopped (rule)" and forgetful.tasks_trained == 2
    assert forgetful.last_metrics["cl/forgetting"] > 0.3
    # Trials run one at a time: the trial after the stopped one got its resources and trained.
    assert by_lr[3e-4].tasks_trained >= 1
    assert by_lr[1e-7].status == "completed" and by_lr[1e-7].tasks_trained == 3
    # The objective is the weighted score recorded after every task.
    tiny = by_lr[1e-7]
    assert len(tiny.objective_per_task) == 3
    assert tiny.objective_per_task[-1] == pytest.approx(
        tiny.last_metrics["cl/seen_avg"] - tiny.last_metrics["cl/forgetting"])
    assert result.trial_tasks_trained == sum(t.tasks_trained for t in result.trials) < 9


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_is_a_parent_run_with_child_trials_and_a_leaderboard(finished_sweep):
    from mlflow.tracking import MlflowClient

    plan, result, _ = finished_sweep
    client = MlflowClient(tracking_uri=plan.base.tracking.uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["vlcl.kind"] == "sweep" and parent.data.tags["vlcl.sweep_id"] == result.sweep_id
    assert parent.data.tags["vlcl.objective"] == "1*seen_avg - 1*forgetting"
    assert parent.data.params["sweep.objective"] == "1*seen_avg - 1*forgetting"
    assert parent.info.status == "FINISHED"
    children = client.search_runs([result.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(children) == 3
    assert {c.data.tags["vlcl.trial_id"] for c in children} == {t.trial_id for t in result.trials}
    assert all(c.data.tags["vlcl.sweep_id"] == result.sweep_id for c in children)
    # Each child holds its own lr and one cl/seen_avg point per task it trained.
    for trial in result.trials:
        child = client.get_run(trial.run_id)
        assert float(child.data.params["train.lr"]) == trial.params["train.lr"]
        history = client.get_metric_history(trial.run_id, "cl/seen_avg")
        assert [m.step for m in history] == list(range(1, trial.tasks_trained + 1))
        assert child.data.tags["vlcl.trial_status"] == trial.status
    stopped = next(t for t in result.trials if t.status == "stopped (rule)")
    assert client.get_run(stopped.run_id).info.status == "KILLED"
    completed = next(t for t in result.trials if t.status == "completed")
    assert client.get_run(completed.run_id).info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"leaderboard.json", "best_config.yaml", "objective_per_task.png", "sweep.yaml"} <= artifacts
    board = json.loads(Path(client.download_artifacts(result.parent_run_id, "leaderboard.json")).read_text())
    rows = [dict(zip(board["columns"], row)) for row in board["data"]]
    assert [r["trial_id"] for r in rows] == [t.trial_id for t in result.trials]
    assert rows[0]["rank"] == 1 and rows[0]["trial_id"] == result.best.trial_id
    best = yaml.safe_load(Path(client.download_artifacts(result.parent_run_id, "best_config.yaml")).read_text())
    assert best["train"]["lr"] == result.best.params["train.lr"]
    assert client.get_metric_history(result.parent_run_id, "sweep/trial_tasks_trained")[-1].value == \
        result.trial_tasks_trained


@pytest.mark.ray
@pytest.mark.slow
def test_resume_of_a_finished_sweep_reruns_no_trial(finished_sweep):
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep import run_sweep

    plan, result, _ = finished_sweep
    resumed = run_sweep(plan, resume=True, quiet=True)
    assert resumed.sweep_id == result.sweep_id and resumed.parent_run_id == result.parent_run_id
    assert {(t.trial_id, t.tasks_trained, t.status) for t in resumed.trials} == \
        {(t.trial_id, t.tasks_trained, t.status) for t in result.trials}
    client = MlflowClient(tracking_uri=plan.base.tracking.uri)
    children = client.search_runs([result.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(children) == 3  # no trial started again


@pytest.mark.ray
@pytest.mark.slow
def test_trials_share_one_zero_shot_row_and_it_is_the_row_each_would_compute(finished_sweep):
    from mlflow.tracking import MlflowClient

    from orchestrator.config import with_overrides
    from orchestrator.run import run_sequence
    from streams.manifest import load_stream

    plan, result, _ = finished_sweep
    client = MlflowClient(tracking_uri=plan.base.tracking.uri)
    runs = [client.get_run(t.run_id) for t in result.trials]
    computed = [r for r in runs if r.data.tags["vlcl.zero_shot"] == "computed"]
    # The trials differ only in lr: one scores the zero-shot row, the others take it.
    assert len(computed) == 1
    assert sorted(r.data.tags["vlcl.zero_shot"] for r in runs if r is not computed[0]) == \
        [f"shared: computed by run {computed[0].info.run_id}"] * 2
    # Every trial holds the same row, and logs it as its own at step 0.
    rows = [t.matrix[0] for t in result.trials]
    assert all(row == rows[0] for row in rows)
    first_task = load_stream(plan.base.stream).tasks[0].name
    for run in runs:
        logged = [m.value for m in client.get_metric_history(run.info.run_id, f"eval/{first_task}/score") if m.step == 0]
        assert logged == [rows[0][0]]
    # ... and it is the row this config scores on its own, outside a sweep.
    alone = run_sequence(with_overrides(plan.base, {"train.max_steps_per_task": 1, "tracking.checkpoints": "none",
                                                    "output_dir": str(Path(plan.base.output_dir).parent / "alone")}),
                         quiet=True)
    assert alone.matrix[0] == rows[0]

    # The decoded eval sets too: the trial that scored the row decoded them, the others took its
    # rows, and a trial scoring on taken rows has the matrix its config has alone.
    assert computed[0].data.tags["vlcl.eval_sets"] == "computed"
    takers = [r for r in runs if r is not computed[0]]
    assert [r.data.tags["vlcl.eval_sets"] for r in takers] == [f"shared: computed by run {computed[0].info.run_id}"] * 2
    taker = next(t for t in result.trials if t.run_id != computed[0].info.run_id and t.tasks_trained == 3)
    same = run_sequence(with_overrides(plan.base, {"train.lr": taker.params["train.lr"], "train.launch": "ray",
                                                   "tracking.checkpoints": "none",
                                                   "output_dir": str(Path(plan.base.output_dir).parent / "same")}),
                        quiet=True)
    assert same.matrix == taker.matrix


def noise_reference_stream(folder: Path) -> Path:
    """A reference stream for ZSCL: 16 noise images (never the training data) and 12 captions."""
    from PIL import Image

    from streams.protocols import build_reference

    generator = np.random.default_rng(0)
    for index in range(16):
        path = folder / "images" / f"group{index % 2}" / f"noise{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    captions = folder / "captions.txt"
    captions.write_text("\n".join(f"a photo of scene number {i}" for i in range(12)) + "\n")
    return build_reference(folder / "images", captions, folder / "reference")


@pytest.mark.ray
@pytest.mark.slow
def test_zscl_trials_share_the_initial_models_reference_text_features_and_they_equal_a_trials_own(
        ray_session, digits_manifest, tmp_path):
    """Two trials (lr 1e-3, 1e-4) of ZSCL on two digits tasks: the first computes the initial
    teacher's features of the reference texts, the second takes them; both record it, with the
    tensors' digest, which equals the features a run's method computes alone; and the sharing trial
    trains exactly as the same config does without a sweep."""
    from mlflow.tracking import MlflowClient

    from methods import get_method
    from methods.models import build_model
    from orchestrator.config import with_overrides
    from orchestrator.data import WorkerData
    from orchestrator.plan import build_plan
    from orchestrator.run import run_sequence
    from orchestrator.sweep import run_sweep
    from orchestrator.trainer import tensor_digest

    manifest = three_task_digits(digits_manifest, tmp_path, count=2)
    raw = {
        "name": "digits2-zscl",
        "base": {"stream": str(manifest), "model": {"name": "vlcl-tiny"},
                 "method": {"name": "zscl", "hparams": {"reference_batch_size": 8, "avg_freq": 2}},
                 "data": {"reference": str(noise_reference_stream(tmp_path)), "reference_samples": 16},
                 "train": {"batch_size": 32, "max_steps_per_task": 3, "epochs_per_task": 1, "log_every_steps": 1},
                 "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "sweep-zscl",
                              "checkpoints": "none"},
                 "output_dir": str(tmp_path / "runs")},
        "use_default_space": False,
        "space": {"train.lr": {"type": "choice", "values": [1e-3, 1e-4]}},
        "search": {"algorithm": "grid", "num_samples": 1},
        "scheduler": {"type": "none"},
        "resources": {"workers": 1, "cpus_per_worker": 0.5, "trial_cpus": 0, "max_concurrent_trials": 1},
        "storage_path": str(tmp_path / "sweeps"),
    }
    plan = plan_sweep(raw, source="test sweep")
    result = run_sweep(plan, quiet=True)
    client = MlflowClient(tracking_uri=plan.base.tracking.uri)
    runs = {t.params["train.lr"]: client.get_run(t.run_id) for t in result.trials}
    tags = sorted(r.data.tags["vlcl.initial_model_features"] for r in runs.values())
    computed = next(r for r in runs.values() if r.data.tags["vlcl.initial_model_features"] == "computed")
    assert tags == ["computed", f"shared: computed by run {computed.info.run_id}"]
    records = [json.loads(Path(client.download_artifacts(r.info.run_id, "initial_model_features.json")).read_text())
               for r in runs.values()]
    assert records[0] == records[1] and set(records[0]) == {"reference_text", "reference_text.tokens"}
    assert records[0]["reference_text"]["shape"][0] == 12  # one row per reference caption

    # The method of a run, on its own (no sweep), computes the same tensors: as a worker builds it.
    config = plan.base
    torch.manual_seed(config.train.seed)
    built = build_model(config.model.name, config.model.pretrained)
    run_plan = build_plan(config, built.image_size)
    method = get_method("zscl")(built.model, built.tokenizer, config.method.hparams)
    method.set_reference_data(*WorkerData(run_plan, 0, 1, torch.device("cpu"), built.image_mean,
                                          built.image_std).reference_data())
    alone_features = method.initial_model_features([])
    assert {name: tensor_digest(t) for name, t in alone_features.items()} == \
        {name: record["sha1"] for name, record in records[0].items()}

    # ... and the trial that took them trains as the same config run outside the sweep.
    shared_run = next(r for r in runs.values() if r is not computed)
    lr = float(shared_run.data.params["train.lr"])
    # (on a Ray Train worker, as the trial: in-process training uses all cores' threads, whose
    # reductions round differently in the last digits of a loss)
    alone = run_sequence(with_overrides(config, {"train.lr": lr, "train.launch": "ray",
                                                 "output_dir": str(tmp_path / "alone")}), quiet=True)
    trial = next(t for t in result.trials if t.run_id == shared_run.info.run_id)
    assert alone.matrix == trial.matrix
    for metric in ("train/distill_image", "train/distill_text", "train/loss"):
        history = [m.value for m in client.get_metric_history(shared_run.info.run_id, metric)]
        assert len(history) == 6 and history == [m.value for m in client.get_metric_history(alone.run_id, metric)]
