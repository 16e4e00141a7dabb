"""Starting or joining Ray, once, with settings that suit a laptop and a cluster alike."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])


def ensure_ray(address: str | None = None, verbose: bool = False) -> None:
    """Join the cluster at `address` / $RAY_ADDRESS, or start a small local Ray.

    Workers' output stays in Ray's session logs unless `verbose` (the console is for vlcl's own
    lines). The local instance runs Ray's dashboard process: Ray Train's placement-group cleaner
    asks the State API, which the dashboard serves, whether the train controller is alive; without
    it that query fails every second of a run ("Failed to query Ray Train Controller actor state")."""
    import ray

    if ray.is_initialized():
        return
    # Workers must import vlcl even when it is run from a checkout rather than installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=verbose)
    else:
        cpus = os.cpu_count() or 2
        ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=verbose,
                 object_store_memory=min(2 * 2**30, max(300 * 2**20, cpus * 256 * 2**20)))
    # Per-operator progress bars from every worker drown the run's own output; vlcl prints a line per task.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
