"""cluster.yaml is checked offline against Ray's own launcher schema, as `ray up` would before launching."""
import copy
import re
from pathlib import Path

import pytest
import yaml

from orchestrator.cluster import ClusterConfigError, load_cluster_config, validate_cluster_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster_config():
    return load_cluster_config(CLUSTER_YAML)


def test_cluster_yaml_passes_rays_launcher_schema(cluster_config):
    prepared = validate_cluster_config(cluster_config, str(CLUSTER_YAML))
    assert prepared["provider"]["type"] == "aws"
    head = prepared["head_node_type"]
    workers = {name: spec for name, spec in prepared["available_node_types"].items() if name != head}
    assert workers, "cluster.yaml declares no worker node types"
    # Autoscaling is bounded and an idle cluster is just the head.
    assert all(spec["min_workers"] == 0 for spec in workers.values())
    assert 0 < sum(spec["max_workers"] for spec in workers.values())
    assert prepared["max_workers"] >= max(spec["max_workers"] for spec in workers.values())


def test_worker_types_are_gpu_instances_and_the_head_is_not(cluster_config):
    types = cluster_config["available_node_types"]
    head_type = types[cluster_config["head_node_type"]]["node_config"]["InstanceType"]
    assert not re.match(r"(g\d|p\d)", head_type), f"head {head_type} should be a CPU instance"
    for name, spec in types.items():
        if name != cluster_config["head_node_type"]:
            assert re.match(r"(g\d|p\d)", spec["node_config"]["InstanceType"]), name


def test_mlflow_server_and_dashboard_bind_to_localhost_on_the_head(cluster_config):
    head_commands = cluster_config["head_start_ray_commands"]
    mlflow_command = next(c for c in head_commands if "mlflow server" in c)
    assert re.search(r"--host 127\.0\.0\.1\b", mlflow_command)
    assert "sqlite:///" in mlflow_command and "--artifacts-destination" in mlflow_command
    # The GPU nodes reach it through a relay on the head's private address, never on all interfaces.
    relay = next(c for c in head_commands if "socat" in c)
    assert "bind=$(hostname -I" in relay and "TCP:127.0.0.1:5000" in relay
    assert "socat" in " ".join(cluster_config["head_setup_commands"])
    ray_start = next(c for c in head_commands if "ray start --head" in c)
    assert "--dashboard-host=127.0.0.1" in ray_start
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in ray_start
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in " ".join(cluster_config["worker_start_ray_commands"])
    assert "0.0.0.0" not in " ".join(head_commands)
    # Token authentication stays on everywhere.
    assert all("RAY_AUTH_MODE=token" in " ".join(cluster_config[key])
               for key in ("head_start_ray_commands", "worker_start_ray_commands"))


def test_setup_installs_this_project_from_the_synced_checkout(cluster_config):
    mounted = [remote for remote, local in cluster_config["file_mounts"].items() if local == "."]
    assert mounted, "cluster.yaml must sync the checkout ('.') to the nodes"
    installs = [c for c in cluster_config["setup_commands"] if "pip install" in c]
    assert any(mounted[0] in c for c in installs), f"no setup command pip-installs {mounted[0]}"


def test_commented_on_prem_alternative_is_a_valid_local_provider_config(cluster_config):
    text = CLUSTER_YAML.read_text()
    block = text.split("# provider:\n", 1)[1].split("# ----", 1)[0]
    on_prem = yaml.safe_load("provider:\n" + re.sub(r"^# ?", "", block, flags=re.M))
    local = copy.deepcopy(cluster_config)
    for key in ("available_node_types", "head_node_type"):
        local.pop(key)
    local.update(on_prem)
    prepared = validate_cluster_config(local, "on-prem block of cluster.yaml")
    assert prepared["provider"]["type"] == "local"


def test_a_typo_is_reported_with_its_field(cluster_config):
    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["head.cpu"]["min_wokers"] = 0
    with pytest.raises(ClusterConfigError, match=r"available_node_types\.head\.cpu.*min_wokers"):
        validate_cluster_config(broken)
    wrong_type = copy.deepcopy(cluster_config)
    wrong_type["max_workers"] = "eight"
    with pytest.raises(ClusterConfigError, match="field max_workers"):
        validate_cluster_config(wrong_type)
