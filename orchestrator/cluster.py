"""Offline checks of a Ray cluster launcher YAML (cluster.yaml).

`ray up` has no dry run, and a typo in cluster.yaml otherwise shows up minutes into a launch.
Ray's own check lives in a private module (`ray.autoscaler._private.util`); this is the one place
vlcl touches it, so an upgrade that moves it breaks here and nowhere else.
"""
from __future__ import annotations

import copy
import os
from typing import Any

from orchestrator.config import read_yaml_mapping


class ClusterConfigError(ValueError):
    """A cluster launcher config that Ray would reject; the message names the file and the field."""


def load_cluster_config(path: str | os.PathLike) -> dict[str, Any]:
    return read_yaml_mapping(path, ClusterConfigError, "cluster config", "cluster_name, provider, ...")


def validate_cluster_config(config: dict[str, Any], source: str = "cluster config") -> dict[str, Any]:
    """Fill in the provider's defaults and validate against Ray's launcher schema, as `ray up` does
    before it contacts the cloud. Returns the filled-in config."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as err:
        field = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ClusterConfigError(f"{source}: field {field}: {err.message}") from None
    except (ValueError, KeyError, RuntimeError) as err:
        raise ClusterConfigError(f"{source}: {err}") from None
    return prepared
