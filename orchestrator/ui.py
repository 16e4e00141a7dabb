"""`vlcl ui`: the MLflow UI on vlcl's tracking store, opened where runs are compared.

A fresh browser opens an MLflow 3 experiment in its GenAI (traces) view, which is empty for
training runs; the runs table with one chart per metric and one curve per run (step = tasks
trained) lives behind `runs_chart_url`, so that is the link we print everywhere.

With the embedded sqlite store, `vlcl ui` starts `mlflow server` on 127.0.0.1 (one web worker: a
laptop or a 2-core CI box) and stops it on Ctrl-C; with an http(s) tracking server configured it
starts nothing and prints that server's link.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from orchestrator.tracking import TrackingError

DEFAULT_PORT = 5000
SERVER_START_TIMEOUT_S = 120.0


class UIError(TrackingError):
    """The UI cannot be started or pointed at an experiment; the message says what to do.

    A TrackingError, so `vlcl` prints it as a user error rather than a traceback."""


def runs_chart_url(base_url: str, experiment_id: str) -> str:
    """The experiment's runs in chart mode: one chart per metric, one curve per run."""
    return (f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
            "?workflowType=machine_learning&compareRunsMode=CHART")


def is_server_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def local_base_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def ui_hint(tracking_uri: str, experiment_id: str, port: int = DEFAULT_PORT) -> str:
    """One line telling the user how to see a finished run in the UI."""
    if is_server_uri(tracking_uri):
        return f"Open the UI: {runs_chart_url(tracking_uri, experiment_id)}"
    from orchestrator.tracking import resolve_tracking_uri

    command = "vlcl ui" if tracking_uri == resolve_tracking_uri(None) else f"vlcl ui --tracking-uri {tracking_uri}"
    return f"Open the UI: {command}  → then {runs_chart_url(local_base_url(port), experiment_id)}"


def print_ui_hint(tracking_uri: str, experiment_id: str, port: int = DEFAULT_PORT) -> None:
    """What `vlcl run` and `vlcl sweep` print last."""
    print(ui_hint(tracking_uri, experiment_id, port), flush=True)


# ----------------------------------------------------------------------------------------------
# which experiment to open
# ----------------------------------------------------------------------------------------------

def pick_experiment(tracking_uri: str, name: str | None) -> tuple[str, str] | None:
    """(id, name) of the named experiment, else of the one holding the newest run; None when the
    store has no runs at all."""
    from orchestrator.tracking import client

    mlflow_client = client(tracking_uri)
    if name:
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            known = sorted(e.name for e in mlflow_client.search_experiments())
            raise UIError(f"no MLflow experiment named {name!r} in {tracking_uri}; known: {', '.join(known) or 'none'}")
        return experiment.experiment_id, experiment.name
    experiment_ids = [e.experiment_id for e in mlflow_client.search_experiments()]
    if not experiment_ids:
        return None
    newest = mlflow_client.search_runs(experiment_ids, order_by=["attributes.start_time DESC"], max_results=1)
    if not newest:
        return None
    experiment_id = newest[0].info.experiment_id
    return experiment_id, mlflow_client.get_experiment(experiment_id).name


# ----------------------------------------------------------------------------------------------
# the local server
# ----------------------------------------------------------------------------------------------

def server_command(tracking_uri: str, artifact_root: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", tracking_uri,
            "--default-artifact-root", artifact_root,
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class LocalServer:
    """`mlflow server` in its own process group, so stopping it also ends its workers."""

    def __init__(self, tracking_uri: str, artifact_root: str, port: int, log_path: Path):
        self.command = server_command(tracking_uri, artifact_root, port)
        self.base_url = local_base_url(port)
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
        if _port_in_use(self.port):
            raise UIError(f"port {self.port} on 127.0.0.1 is already in use; pass another one with --port")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UIError(f"mlflow server exited with code {self.process.returncode} before answering; "
                              f"its log ({self.log_path}) ends with:\n{self._log_tail()}")
            if _answers(self.base_url + "/health") and _answers(self.base_url + "/"):
                return
            time.sleep(0.5)
        self.stop()
        raise UIError(f"mlflow server did not answer on {self.base_url} within {timeout_s:.0f} s; "
                      f"its log ({self.log_path}) ends with:\n{self._log_tail()}")

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        group = os.getpgid(self.process.pid)  # == pid: the server leads its own session
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self.process.wait()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _artifact_root_for(tracking_uri: str) -> str:
    from orchestrator.tracking import default_artifact_root

    root = default_artifact_root(tracking_uri)
    if root is None:
        raise UIError(f"cannot serve {tracking_uri} locally: use a sqlite store (sqlite:///path/mlflow.db) "
                      "or an http(s) MLflow server")
    return root


def _check_local_store(tracking_uri: str) -> None:
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
        if not path.exists():
            raise UIError(f"no MLflow store at {path}: train first (`vlcl run`), run `vlcl ui` in the folder "
                          "that holds mlflow.db, or point --tracking-uri / --config / MLFLOW_TRACKING_URI at it")


# ----------------------------------------------------------------------------------------------
# command
# ----------------------------------------------------------------------------------------------

def add_ui_commands(subparsers) -> None:
    ui = subparsers.add_parser("ui", help="open the MLflow UI on the tracking store, at the runs' per-task charts")
    ui.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"local port for the UI (default {DEFAULT_PORT})")
    ui.add_argument("--config", help="run config whose tracking.uri to use (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    ui.add_argument("--tracking-uri", help="tracking URI to open (overrides --config)")
    ui.add_argument("--experiment", help="experiment to link to (default: the one with the newest run)")
    ui.set_defaults(handler=command_ui)


def _tracking_uri_from(args) -> str:
    from orchestrator.tracking import resolve_tracking_uri

    if args.tracking_uri:
        if is_server_uri(args.tracking_uri):
            return args.tracking_uri
        from orchestrator.config import load_run_config

        return resolve_tracking_uri(load_run_config(None, [f"tracking.uri={args.tracking_uri}"]))
    if args.config:
        from orchestrator.config import load_run_config

        return resolve_tracking_uri(load_run_config(args.config, []))
    return resolve_tracking_uri(None)


def command_ui(args) -> int:
    tracking_uri = _tracking_uri_from(args)
    if is_server_uri(tracking_uri):
        from orchestrator.tracking import check_reachable

        check_reachable(tracking_uri)
        chosen = pick_experiment(tracking_uri, args.experiment)
        link = runs_chart_url(tracking_uri, chosen[0]) if chosen else tracking_uri.rstrip("/") + "/#/experiments"
        print(f"Runs are tracked on the MLflow server {tracking_uri}; nothing to start here.")
        print(f"Open: {link}", flush=True)
        return 0

    _check_local_store(tracking_uri)
    chosen = pick_experiment(tracking_uri, args.experiment)
    log_path = Path(tempfile.gettempdir()) / f"vlcl-ui-{args.port}.log"
    server = LocalServer(tracking_uri, _artifact_root_for(tracking_uri), args.port, log_path)
    # SIGTERM (a supervisor, a test) stops the server as cleanly as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        print(f"Starting the MLflow UI on {tracking_uri} (log: {log_path}) ...", flush=True)
        server.start()
        print(f"MLflow server pid {server.process.pid} on {server.base_url}", flush=True)
        if chosen:
            print(f"Experiment {chosen[1]!r}: {runs_chart_url(server.base_url, chosen[0])}", flush=True)
        else:
            print(f"No runs yet; experiments: {server.base_url}/#/experiments", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        code = server.wait()
        raise UIError(f"mlflow server stopped by itself (exit code {code}); log: {log_path}")
    except KeyboardInterrupt:
        print("Stopping the MLflow UI.", flush=True)
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """`python -m orchestrator.ui ...` (same as `vlcl ui ...`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="vlcl")
    add_ui_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ui", *(argv if argv is not None else sys.argv[1:])])
    try:
        return args.handler(args)
    except UIError as err:
        print(f"vlcl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
