"""Shared test fixtures. Ray is started once per session, small, and only by tests that ask for it."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_session():
    """One small local Ray instance for every test marked `ray`; shut down at the end of the session."""
    import ray

    # Ray workers are fresh processes: let them import this checkout's packages even when vlcl
    # is not installed into the environment.
    repo_root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_manifest(tmp_path_factory):
    """The built-in digits stream, materialised once per session in a private data root."""
    from streams.builtin import materialize_builtin

    return materialize_builtin("digits", tmp_path_factory.mktemp("vlcl-data"))


def pytest_collection_modifyitems(config, items):
    """Tiers stay honest: a test that uses the shared Ray instance must carry the `ray` mark."""
    unmarked = [item.nodeid for item in items if "ray_session" in getattr(item, "fixturenames", ())
                and item.get_closest_marker("ray") is None]
    if unmarked:
        raise pytest.UsageError("tests using ray_session without @pytest.mark.ray: " + ", ".join(unmarked))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """...and a test that starts Ray some other way fails unless it is marked `ray` too."""
    import sys

    started_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    outcome = yield
    ray = sys.modules.get("ray")
    if ray is not None and not started_before and ray.is_initialized() and item.get_closest_marker("ray") is None:
        outcome.force_exception(AssertionError(f"{item.nodeid} started Ray but is not marked @pytest.mark.ray"))
