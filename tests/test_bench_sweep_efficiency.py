"""The sweep benchmark's replay of successive-halving rules on a grid's per-task records, against
a hand-worked grid (no Ray: the records are given)."""
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import sweep_efficiency  # noqa: E402

from orchestrator.sweep_objective import TrialOutcome  # noqa: E402


def test_halving_rules_count_trial_tasks_and_break_ties_against_the_rule(capsys):
    # four configurations over three tasks: all tie after task 1; a leads after task 2 but ends
    # worst; c ends best (0.95)
    # worst (a) last, so that keeping the first of a tie would keep another one
    records = {"b": [1.0, 0.8, 0.9], "c": [1.0, 0.7, 0.95], "d": [1.0, 0.6, 0.6], "a": [1.0, 0.9, 0.5]}
    grid = SimpleNamespace(trials=[TrialOutcome(trial_id=name, params={"name": name}, objective_per_task=scores,
                                                tasks_trained=3, status="completed")
                                   for name, scores in records.items()])
    rules = {(tuple(r["rungs"]), tuple(r["keeps"])): r for r in sweep_efficiency.halving_rules(grid, 3)}
    # one rung after task 1 or 2 keeping 1-3, or both rungs each keeping fewer than the last
    assert sorted(rules) == sorted([((1,), (k,)) for k in (1, 2, 3)] + [((2,), (k,)) for k in (1, 2, 3)]
                                   + [((1, 2), keeps) for keeps in ((2, 1), (3, 1), (3, 2))])
    # after task 1 all tie: keep 1 keeps the worst final (a), 4 + 1 x 2 trial-tasks of 12
    assert (rules[(1,), (1,)]["trial_tasks"], rules[(1,), (1,)]["best"]) == (6, 0.5)
    assert rules[(1,), (1,)]["compute_ratio"] == 0.5
    # after task 2 keep 3: a, b, c go on; 4 x 2 + 3
    assert (rules[(2,), (3,)]["trial_tasks"], rules[(2,), (3,)]["best"]) == (11, 0.95)
    # after task 1 keep 3 (a, d, b), after task 2 keep 2 (a, b): 4 + 3 + 2
    assert (rules[(1, 2), (3, 2)]["trial_tasks"], rules[(1, 2), (3, 2)]["best"]) == (9, 0.9)

    found = sweep_efficiency.print_halving_rules("grid", list(rules.values()), grid_best=0.95)
    assert found["best_at_half"] is rules[(1,), (1,)]
    assert found["cheapest_within_one_point"] is rules[(2,), (3,)]
    out = capsys.readouterr().out
    assert "best at <= 0.5 of the trial-tasks: after task 1 keep 1: ratio 0.50, best 0.5000 (-0.4500)" in out
    assert "cheapest within one point: after task 2 keep 3: ratio 0.92, best 0.9500 (+0.0000)" in out


def test_halving_rules_replay_only_configurations_that_trained_every_task():
    records = {"a": [1.0, 0.5], "b": [1.0]}  # b errored during task 2
    grid = SimpleNamespace(trials=[TrialOutcome(trial_id=name, params={}, objective_per_task=scores,
                                                tasks_trained=len(scores),
                                                status="completed" if len(scores) == 2 else "error")
                                   for name, scores in records.items()])
    assert sweep_efficiency.halving_rules(grid, 2) == []  # one finished configuration: nothing to cut
