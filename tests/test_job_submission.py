"""The cluster path on one machine: a Ray head and a second node started with `ray start`, a
`vlcl run` submitted with `ray job submit` to the head's job server, the run found in MLflow.

Mirrors the README's cluster steps (cluster.yaml): token authentication on, the dashboard and its
job server bound to 127.0.0.1. Every process this test starts is found through its private Ray
temp folder and ended by process id; other Ray instances on the machine are left alone (`ray stop`
would end them all).
"""
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def processes_using(folder: str) -> list[int]:
    import psutil

    pids = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(folder in part for part in process.info["cmdline"] or []):
                pids.append(process.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def end_processes(pids: list[int], grace_s: float = 10.0) -> None:
    import psutil

    alive = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            process.send_signal(signal.SIGTERM)
            alive.append(process)
        except psutil.NoSuchProcess:
            pass
    _, still_alive = psutil.wait_procs(alive, timeout=grace_s)
    for process in still_alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def two_task_manifest(digits_manifest: Path, folder: Path) -> Path:
    from streams.manifest import load_stream

    stream = load_stream(digits_manifest)
    data = stream.model_dump(exclude={"root"})
    data["name"] = "digits2"
    data["tasks"] = data["tasks"][:2]
    for task in data["tasks"]:
        for split in ("train", "eval"):
            task[split]["shards"] = [str(Path(stream.root) / s) for s in task[split]["shards"]]
    path = folder / "digits2.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def two_node_ray(tmp_path):
    """A head (1 CPU, dashboard with job server on 127.0.0.1) and a second node (1 CPU)."""
    # Unix socket paths must stay short: the temp folder goes under /tmp, not pytest's deep tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="vlcljob-", dir="/tmp")
    gcs, dashboard, client, head_agent, head_agent_grpc, worker_agent, worker_agent_grpc, head_rt, worker_rt, \
        head_metrics, worker_metrics = free_ports(11)
    env = dict(os.environ)
    env.update({
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
        "PATH": os.pathsep.join((str(VENV_BIN), env.get("PATH", ""))),
        "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
    })
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(VENV_BIN / "ray")
    common = ["--disable-usage-stats"]
    try:
        subprocess.run([ray_cli, "start", "--head", f"--port={gcs}", "--num-cpus=1", f"--temp-dir={temp_dir}",
                        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={head_agent}",
                        f"--dashboard-agent-grpc-port={head_agent_grpc}", f"--runtime-env-agent-port={head_rt}",
                        f"--metrics-export-port={head_metrics}", "--object-store-memory=100000000", *common],
                       env=env, check=True, capture_output=True, text=True, timeout=180)
        subprocess.run([ray_cli, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1",
                        f"--dashboard-agent-listen-port={worker_agent}", f"--dashboard-agent-grpc-port={worker_agent_grpc}",
                        f"--runtime-env-agent-port={worker_rt}", f"--metrics-export-port={worker_metrics}",
                        "--object-store-memory=100000000", *common],
                       env=env, check=True, capture_output=True, text=True, timeout=180)
        yield {"env": env, "gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dashboard}", "ray": ray_cli}
    except subprocess.CalledProcessError as err:
        pytest.fail(f"ray start failed: {err.stdout}\n{err.stderr}")
    finally:
        end_processes(processes_using(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_nodes(env: dict, gcs: str, count: int, timeout_s: float = 60.0) -> None:
    probe = ("import ray; ray.init(address='%s', log_to_driver=False); "
             "print(sum(1 for n in ray.nodes() if n['Alive'])); ray.shutdown()" % gcs)
    deadline = time.time() + timeout_s
    alive = 0
    while time.time() < deadline:
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        alive = int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0
        if alive >= count:
            return
        time.sleep(2)
    raise AssertionError(f"only {alive} of {count} Ray nodes joined")


@pytest.mark.ray
@pytest.mark.slow
def test_vlcl_run_submitted_as_a_ray_job_lands_in_mlflow(two_node_ray, digits_manifest, tmp_path):
    from mlflow.tracking import MlflowClient

    wait_for_nodes(two_node_ray["env"], two_node_ray["gcs"], 2)
    manifest = two_task_manifest(digits_manifest, tmp_path)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = f"job-{uuid.uuid4().hex[:8]}"
    config = {
        "stream": str(manifest), "model": {"name": "vlcl-tiny"}, "method": {"name": "finetune"},
        "train": {"batch_size": 32, "max_steps_per_task": 2, "epochs_per_task": 1, "cpus_per_worker": 0.5},
        "tracking": {"uri": tracking_uri, "experiment": experiment, "checkpoints": "none"},
        "output_dir": str(tmp_path / "runs"),
    }
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config))

    submitted = subprocess.run(
        [two_node_ray["ray"], "job", "submit", "--address", two_node_ray["dashboard"],
         "--submission-id", f"vlcl-{experiment}", "--", "vlcl", "run", str(config_path)],
        env=two_node_ray["env"], capture_output=True, text=True, timeout=480)
    logs = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, logs[-4000:]
    assert f"Job 'vlcl-{experiment}' succeeded" in logs, logs[-4000:]
    assert "Accuracy matrix" in logs  # the job's own output was streamed back

    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["vlcl.kind"] == "run"
    history = client.get_metric_history(run.info.run_id, "cl/seen_avg")
    assert [m.step for m in history] == [1, 2]
    assert "matrix.json" in {a.path for a in client.list_artifacts(run.info.run_id)}

