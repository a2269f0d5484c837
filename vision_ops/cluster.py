"""Cluster launcher configs: validated with Ray's own schema, and the capacity they can bring up."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import yaml

from vision_ops.errors import EXIT_CLUSTER_TOO_SMALL, VisionOpsError
from vision_ops.pool import Nodes

log = logging.getLogger(__name__)
# Where `ray up` leaves the launcher config on the head, for the autoscaler it starts there
# (cluster.yaml's `--autoscaling-config`).
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


class ClusterConfigError(VisionOpsError, ValueError):
    """A cluster.yaml that Ray's launcher would refuse, or that cannot run the job."""

    exit_code = EXIT_CLUSTER_TOO_SMALL


def load_cluster_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a launcher config against the schema inside the installed `ray`: the
    config as Ray's launcher reads it, its defaults filled in (max_workers 2 where unset)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        reason = "not found" if isinstance(err, FileNotFoundError) else f"cannot read: {err}"
        raise ClusterConfigError(f"--cluster {path}: {reason}") from None
    if not isinstance(config, dict):
        raise ClusterConfigError(
            f"--cluster {path}: expected a mapping, found {type(config).__name__}"
        )
    try:
        prepared: dict[str, Any] = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except Exception as err:  # jsonschema.ValidationError, ValueError: Ray's own messages
        first_line = str(err).splitlines()[0]
        raise ClusterConfigError(f"{path}: not a valid Ray cluster config: {first_line}") from None
    return prepared


def node_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(config.get("available_node_types", {}))


def max_capacity(config: dict[str, Any]) -> dict[str, float]:
    """CPU and GPU totals of a config as `load_cluster_config` reads it, at full scale
    (`full_scale_nodes`)."""
    totals = {"CPU": 0.0, "GPU": 0.0}
    for resources, count in full_scale_nodes(config):
        for resource in totals:
            totals[resource] += count * resources[resource]
    return totals


def full_scale_nodes(config: dict[str, Any]) -> Nodes:
    """The nodes of a config as `load_cluster_config` reads it, at full scale: the head, and
    every node type's workers at its max_workers (the head's type too: Ray launches workers of
    it beside the head), within the config's cluster-wide max_workers (filled with the
    GPU-richest types first: the most the job can get); as (one node's CPU and GPU, nodes)."""
    types = node_types(config)
    nodes = [(_cpu_and_gpu(types[config["head_node_type"]]), 1.0)]
    left = float(config["max_workers"])  # Ray's schema refuses a negative one
    workers = sorted(types.items(), key=lambda w: (-_amount(w[1], "GPU"), -_amount(w[1], "CPU")))
    for name, node in workers:
        count = min(_max_workers(node, name), left)
        left -= count
        if count:
            nodes.append((_cpu_and_gpu(node), count))
    return nodes


def _cpu_and_gpu(node: dict[str, Any]) -> dict[str, float]:
    return {resource: _amount(node, resource) for resource in ("CPU", "GPU")}


def _amount(node: dict[str, Any], resource: str) -> float:
    return float(node.get("resources", {}).get(resource, 0))


def _max_workers(node: dict[str, Any], name: str) -> float:
    """A worker type's max_workers, which Ray's schema lets be negative."""
    count = node.get("max_workers", 0)
    if count < 0:
        raise ClusterConfigError(f"{name}: max_workers {count}, expected 0 or more")
    return float(count)


def head_resources(config: dict[str, Any]) -> dict[str, float]:
    head = node_types(config)[config["head_node_type"]]
    return {k: float(v) for k, v in head.get("resources", {}).items()}


def reachable_nodes(
    path: str | Path = BOOTSTRAP_CONFIG,
) -> Nodes | None:
    """The nodes an autoscaling cluster can reach (`full_scale_nodes` of its launcher config),
    where that config is on this machine: the driver on the head `ray up` started, as
    `vision-ops submit` runs it. None elsewhere (a driver off the head, KubeRay), or where the
    config does not read (said in the log): the pool is then sized on the nodes up."""
    try:
        found = Path(path).expanduser()
    except RuntimeError:  # no home to expand `~` to (a container's uid without one)
        return None
    if not found.is_file():
        return None
    try:
        return full_scale_nodes(load_cluster_config(found))
    except ClusterConfigError as err:
        log.warning("runtime.autoscaling: the cluster's launcher config is not used: %s", err)
        return None
