"""Continual-learning metrics against hand computations on known matrices."""
import math

import numpy as np
import pytest

from orchestrator import metrics

# 3 tasks; row 0 = zero-shot, row i = after task i.
R = [
    [0.30, 0.20, 0.10],
    [0.90, 0.25, 0.15],
    [0.60, 0.80, 0.20],
    [0.50, 0.70, 0.95],
]


def test_full_matrix_by_hand():
    # Transfer: task 2 <- R[1][1]=0.25; task 3 <- mean(R[1][2], R[2][2]) = 0.175 -> mean 0.2125
    assert metrics.transfer(R) == pytest.approx((0.25 + 0.175) / 2)
    # Avg: column means over rows 1..3: (0.9+0.6+0.5)/3, (0.25+0.8+0.7)/3, (0.15+0.2+0.95)/3
    assert metrics.average(R) == pytest.approx(np.mean([2.0 / 3, 1.75 / 3, 1.30 / 3]))
    assert metrics.last(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    # BWT: (0.5-0.9 + 0.7-0.8)/2 = -0.25
    assert metrics.backward_transfer(R) == pytest.approx(-0.25)
    # Forgetting: task1 max(0.9,0.6)-0.5=0.4; task2 max(0.8)-0.7=0.1 -> 0.25
    assert metrics.forgetting(R) == pytest.approx(0.25)
    assert metrics.zero_shot(R) == pytest.approx(0.2)
    assert metrics.seen_average(R) == pytest.approx(metrics.last(R))


def test_partial_matrix_after_two_tasks():
    partial = R[:3]
    assert metrics.seen_average(partial) == pytest.approx((0.60 + 0.80) / 2)
    assert metrics.backward_transfer(partial) == pytest.approx(0.60 - 0.90)
    assert metrics.forgetting(partial) == pytest.approx(0.90 - 0.60)
    # transfer over rows trained so far: task2 <- 0.25, task3 <- mean(0.15, 0.20)
    assert metrics.transfer(partial) == pytest.approx((0.25 + 0.175) / 2)


def test_zero_shot_only_row():
    summary = metrics.summarize(R[:1])
    assert summary["cl/zero_shot"] == pytest.approx(0.2)
    assert math.isnan(summary["cl/avg"]) and math.isnan(summary["cl/bwt"])


def test_no_forgetting_when_scores_never_drop():
    flat = [[0.1, 0.1], [0.8, 0.1], [0.8, 0.9]]
    assert metrics.backward_transfer(flat) == 0.0
    assert metrics.forgetting(flat) == 0.0


def test_rejects_malformed_matrix():
    with pytest.raises(ValueError, match="shape"):
        metrics.as_matrix([[0.1, 0.2], [0.1, 0.2], [0.1, 0.2], [0.1, 0.2]])


def test_control_retention_is_the_share_of_the_start_score_left():
    from orchestrator.metrics import summarize_control

    control = [[0.50, 0.20, 0.0],   # before training; the third set starts at 0 and is left out
               [0.40, 0.20, 0.1],
               [0.25, 0.30, 0.3]]
    metrics = summarize_control(control)
    assert metrics["cl/control"] == pytest.approx((0.25 + 0.30 + 0.3) / 3)
    assert metrics["cl/control_retention"] == pytest.approx((0.25 / 0.50 + 0.30 / 0.20) / 2)
    assert summarize_control([[], []]) == {}
