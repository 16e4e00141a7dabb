"""The built-in demo (`vlcl run` with no config, what `make demo` runs first) learns every task."""
import pytest

from orchestrator.config import load_run_config
from orchestrator.run import run_sequence

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_demo_learns_every_task_in_three_seeds_and_then_forgets(ray_session, tmp_path, digits_manifest):
    diagonals, last_rows = {}, {}
    for seed in (0, 1, 2):
        # The demo's own settings (DEMO_DEFAULTS); only where the data and the records go differ.
        config = load_run_config(None, [f"stream={digits_manifest}", f"train.seed={seed}",
                                        f"output_dir={tmp_path / 'runs'}",
                                        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
        result = run_sequence(config, quiet=True)
        rows = result.matrix[1:]  # row 0 is the zero-shot row
        diagonals[seed] = [round(100 * rows[t][t], 1) for t in range(len(rows))]
        last_rows[seed] = [round(100 * v, 1) for v in rows[-1]]
    assert all(score >= 90 for diagonal in diagonals.values() for score in diagonal), diagonals
    # fine-tuning forgets: every seed ends with some earlier task well below the score it had
    assert all(min(last[t] - diagonals[seed][t] for t in range(4)) < -20 for seed, last in last_rows.items()), (
        diagonals, last_rows)
