"""`vlcl ui` without a browser: the link, the hint, which experiment opens, and the error cases."""
import argparse
import socket
import time

import pytest

from orchestrator import ui
from orchestrator.tracking import TrackingError


def _args(*argv):
    parser = argparse.ArgumentParser()
    ui.add_ui_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["ui", *argv])


def test_runs_chart_url_opens_the_runs_in_chart_mode():
    assert ui.runs_chart_url("http://127.0.0.1:5000/", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning&compareRunsMode=CHART")


def test_hint_names_the_command_or_the_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert ui.ui_hint(default, "3") == (
        "Open the UI: vlcl ui  → then http://127.0.0.1:5000/#/experiments/3/runs"
        "?workflowType=machine_learning&compareRunsMode=CHART")
    elsewhere = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    assert ui.ui_hint(elsewhere, "3").startswith(f"Open the UI: vlcl ui --tracking-uri {elsewhere}  → then ")
    assert ui.ui_hint("http://mlflow.example:5000", "3") == (
        "Open the UI: http://mlflow.example:5000/#/experiments/3/runs?workflowType=machine_learning&compareRunsMode=CHART")


def test_pick_experiment_defaults_to_the_newest_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    assert ui.pick_experiment(uri, None) is None  # only the empty Default experiment
    older = client.create_experiment("older", artifact_location=(tmp_path / "mlruns").as_uri())
    newer = client.create_experiment("newer", artifact_location=(tmp_path / "mlruns").as_uri())
    client.create_run(newer, run_name="a")
    time.sleep(0.01)
    client.create_run(older, run_name="b")  # the newest run is in "older"
    assert ui.pick_experiment(uri, None) == (older, "older")
    assert ui.pick_experiment(uri, "newer") == (newer, "newer")
    with pytest.raises(ui.UIError, match=r"no MLflow experiment named 'nope'.*newer, older"):
        ui.pick_experiment(uri, "nope")


def test_missing_store_says_what_to_do(tmp_path):
    with pytest.raises(ui.UIError, match="no MLflow store at .*missing.db.*vlcl run"):
        ui.command_ui(_args("--tracking-uri", f"sqlite:///{tmp_path / 'missing.db'}"))
    assert not (tmp_path / "missing.db").exists()  # asking must not create an empty store


def test_unreachable_server_is_named():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TrackingError, match=f"127.0.0.1:{port}"):
        ui.command_ui(_args("--tracking-uri", f"http://127.0.0.1:{port}"))


def test_busy_port_is_refused_before_starting_anything(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = ui.LocalServer(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "mlruns"), port, tmp_path / "log")
        with pytest.raises(ui.UIError, match=f"port {port} .* --port"):
            server.start()
        assert server.process is None
