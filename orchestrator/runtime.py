"""Starting or joining Ray, once, with settings that suit a laptop and a cluster alike; stopping
what a killed sweep driver's Ray left running; what the trials of a sweep share."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])
RAY_OWNER_VARIABLE = "VLCL_RAY_OWNER"  # in the environment of every process of a local Ray a sweep started


def ensure_ray(address: str | None = None, verbose: bool = False, owner: str | None = None) -> None:
    """Join the cluster at `address` / $RAY_ADDRESS, or start a small local Ray.

    Workers' output stays in Ray's session logs unless `verbose` (the console is for vlcl's own
    lines). The local instance runs Ray's dashboard process: Ray Train's placement-group cleaner
    asks the State API, which the dashboard serves, whether the train controller is alive; without
    it that query fails every second of a run ("Failed to query Ray Train Controller actor state").
    `owner`: a local instance's processes carry it in their environment (RAY_OWNER_VARIABLE), so
    that `stop_owned_ray` finds what a driver killed with -9 left running."""
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
        if owner:
            os.environ[RAY_OWNER_VARIABLE] = owner
        ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=verbose,
                 object_store_memory=min(2 * 2**30, max(300 * 2**20, cpus * 256 * 2**20)))
    # Per-operator progress bars from every worker drown the run's own output; vlcl prints a line per task.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def owned_ray_processes(owner: str) -> list:
    """The live processes (psutil) of the local Ray instances started with `owner`, but this one."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get(RAY_OWNER_VARIABLE) == owner:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_owned_ray(owner: str, grace_s: float = 5.0) -> int:
    """Stop every process of the local Ray instances started with `owner` (its head processes,
    agents and workers: a driver killed with -9 takes Ray's core processes with it, but its agents
    outlive it for about a minute); returns how many there were. SIGTERM, then SIGKILL for those
    still alive after `grace_s`."""
    import psutil

    processes = owned_ray_processes(owner)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    return len(processes)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def release_orphaned_placement_groups() -> int:
    """Remove the placement groups whose creating actor has died; returns how many.

    Tune ends a trial (ASHA or a stop rule stops it, PBT pauses or exploits it) by killing its
    process, and Ray Train's controller, an actor of that process, dies with it, leaving its workers'
    reservation behind. Train's own cleaner notices only through the State API, which needs the
    dashboard (tests and some clusters run without one), so the next trial would wait forever.
    The GCS records whether a group's creator actor is dead; a group created by a dead actor and
    not detached is in use by nobody. Groups created by drivers (Tune's own) have no creator actor.
    Reads the GCS table through Ray's internal state accessor (pinned Ray 2.60)."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    nil_actor = ray.ActorID.nil().binary()
    released = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        info = gcs_pb2.PlacementGroupTableData.FromString(raw)
        orphaned = (info.creator_actor_id and info.creator_actor_id != nil_actor and info.creator_actor_dead
                    and not info.is_detached)
        if orphaned and info.state in (gcs_pb2.PlacementGroupTableData.CREATED,
                                       gcs_pb2.PlacementGroupTableData.PENDING,
                                       gcs_pb2.PlacementGroupTableData.PREPARED,
                                       gcs_pb2.PlacementGroupTableData.RESCHEDULING):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(info.placement_group_id)))
            released += 1
    return released


class SharedValues:
    """A key-value store that the trials of one sweep share through Ray (works across nodes): the
    first trial to compute a result every trial would compute the same way puts it; the others get it."""

    def __init__(self):
        self.values: dict = {}

    def get(self, key: str):
        return self.values.get(key)

    def put(self, key: str, value) -> None:
        self.values.setdefault(key, value)


def start_shared_values():
    import ray

    return ray.remote(num_cpus=0)(SharedValues).remote()
