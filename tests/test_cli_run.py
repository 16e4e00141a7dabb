"""`vlcl run` as a user starts it, in a subprocess: what the console shows. One worker trains in the
CLI's own process (train.launch=auto), so no Ray starts; Ray-path runs are in test_run_e2e."""
import os
import subprocess
import sys

import pytest

from streams.manifest import load_stream, write_manifest

pytestmark = pytest.mark.slow


def test_a_healthy_run_prints_header_progress_rows_and_matrix_and_no_warning(digits_manifest, tmp_path):
    spec = load_stream(digits_manifest)
    manifest = write_manifest(spec.model_copy(update={"name": "digits2", "tasks": spec.tasks[:2]}),
                              digits_manifest.parent / "digits2-cli.yaml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", "--set", f"stream={manifest}",
         "--set", "train.max_steps_per_task=4", "--set", f"output_dir={tmp_path / 'runs'}",
         "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    lines = [line.strip() for line in console.splitlines() if line.strip()]
    assert lines[0].startswith("run ") and "(new)" in lines[0]
    assert any(line.startswith("method") and "workers 1 (in this process)" in line for line in lines)
    progress = [line for line in lines if line.startswith("task ")]
    assert [line.split()[1] for line in progress] == ["1/2", "2/2"] and all("step 4/4" in p for p in progress)
    assert sum(line.startswith("eval ") for line in lines) == 3  # zero-shot + after each task
    assert "after digits-0-1" in console and "transfer" in console and "MLflow run" in console
    noisy = [line for line in lines if any(word in line for word in ("WARNING", "Warning", "ERROR", "Error",
                                                                     "Traceback", "Downloading", "%|"))]
    assert not noisy, noisy
    log = next((tmp_path / "runs").glob("*/vlcl.log"))
    assert "Creating initial MLflow database tables" in log.read_text()  # the libraries' lines went to the log file
