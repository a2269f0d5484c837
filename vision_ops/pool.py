"""The predictor actor pool sized from the cluster's resources, refused before any work where
it cannot be scheduled; where it runs (`runtime.predict_in`: actors, or the driver's threads
where the cluster allows them)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vision_ops.config import MERGED_AFTER_THE_POOL, JobSpec, RuntimeSpec
from vision_ops.errors import EXIT_BAD_SPEC, EXIT_CLUSTER_TOO_SMALL, VisionOpsError

log = logging.getLogger(__name__)


class ClusterTooSmall(VisionOpsError, RuntimeError):
    """The actor pool the spec asks for cannot be scheduled on this cluster."""

    exit_code = EXIT_CLUSTER_TOO_SMALL


class NotInTheDriver(VisionOpsError, ValueError):
    """`runtime.predict_in: driver` on a cluster whose pool the driver's threads cannot be."""

    exit_code = EXIT_BAD_SPEC


@dataclass(frozen=True)
class PoolPlan:
    """The predictor pool, the torch threads of each actor and the read tasks beside it."""

    min_size: int
    max_size: int
    num_cpus: float
    num_gpus: float
    threads: int | None = None  # None: the actor's CPUs (Ray's OMP_NUM_THREADS)
    read_tasks: int | None = None  # None: as many as Ray Data scales to


# Nodes a cluster can reach: (one node's CPU and GPU, how many such nodes).
Nodes = Sequence[tuple[Mapping[str, float], float]]


def plan_pool(
    runtime: RuntimeSpec,
    resources: Mapping[str, float],
    reachable: Nodes | None = None,
    nodes_up: Nodes | None = None,
) -> PoolPlan:
    """Size the predictor pool from the cluster; refuse, before any work, one that cannot run.
    On a fixed cluster a pool whose smallest size the spec leaves open is fixed at its largest:
    every actor starts at once (Ray Data would otherwise start one and add the others only as
    its queue backs up, each a model load later) and none is stopped mid-run. On an
    autoscaling cluster whose launcher config is known, the nodes it can reach
    (cluster.reachable_nodes) size it instead of the nodes up (`_plan_to_reach`). `nodes_up`,
    where given, bounds it node by node (an actor is placed on one node: 2 nodes of 8 CPUs
    hold no actor of 12)."""
    if runtime.autoscaling and reachable is not None:
        return _plan_to_reach(runtime, reachable)
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    num_gpus = gpus_per_actor(runtime, gpus)
    fits = _actors_that_fit(runtime, num_gpus, cpus, gpus)
    if nodes_up is not None:
        fits = min(fits, _actors_on_nodes(nodes_up, runtime, num_gpus))
    smallest = runtime.min_actors or 1
    if smallest > fits and not runtime.autoscaling:
        most_gpus = most_gpus_on_a_node(nodes_up) if nodes_up else gpus
        raise ClusterTooSmall(_too_small_message(runtime, num_gpus, cpus, gpus, fits, most_gpus))
    top = runtime.max_actors or max(fits, smallest)
    if top > fits and not runtime.autoscaling:
        log.warning("runtime.max_actors=%d capped to the %d actors that fit", top, fits)
        top = fits
    if runtime.autoscaling:  # the nodes up now say nothing of the nodes to come
        _warn_of_nodes_not_up(runtime, num_gpus, top)
        return PoolPlan(smallest, top, runtime.num_cpus_per_actor, num_gpus)
    left = math.floor(cpus - top * runtime.num_cpus_per_actor + 1e-9)
    return PoolPlan(
        runtime.min_actors or top,
        top,
        runtime.num_cpus_per_actor,
        num_gpus,
        threads=None if num_gpus else max(1, math.floor(cpus / top + 1e-9)),
        read_tasks=max(1, left),
    )


def check_in_driver(runtime: RuntimeSpec, plan: PoolPlan, nodes: Nodes) -> None:
    """`predict_in: driver` runs the pool as threads of the driver, on its node's CPUs:
    refused, before any work, where the cluster rules them out (`driver_ruled_out`). (A driver
    off the cluster, through Ray Client, is refused for any run: `connect.refuse_ray_client`.)"""
    if runtime.predict_in != "driver":
        return
    found = driver_ruled_out(runtime, plan, nodes)
    if found is not None:
        raise NotInTheDriver(
            "runtime.predict_in: driver runs the model in the driver's threads on its node's "
            f"CPUs; {found}: expected predict_in: actors"
        )


def driver_ruled_out(runtime: RuntimeSpec, plan: PoolPlan, nodes: Nodes) -> str | None:
    """Why the driver's threads cannot be this pool (GPUs for it, more than one node, or
    more to come), as found; None where they can."""
    count = round(sum(number for _, number in nodes))
    if plan.num_gpus:
        return "this cluster has GPUs for the predictor pool"
    if runtime.autoscaling or count > 1:
        found = f"this cluster has {count} node{'s' if count != 1 else ''}"
        return found + (", autoscaling" if runtime.autoscaling else "")
    return None


def placed_on_cluster(spec: JobSpec, plan: PoolPlan, nodes: Nodes) -> RuntimeSpec:
    """The spec's runtime with `predict_in: auto` settled to actors where the driver's threads
    cannot serve: the cluster rules them out (`driver_ruled_out`) or the spec does
    (`_driver_ruled_out_by`). Otherwise the runtime as it is: auto is settled for the run's
    size once its units are known (`placed_for_units`)."""
    runtime = spec.runtime
    if runtime.predict_in != "auto":
        return runtime
    found = driver_ruled_out(runtime, plan, nodes) or _driver_ruled_out_by(spec)
    if found is None and units_for_the_driver(runtime) < 1:
        found = "no run is small enough for the driver's threads"
    if found is None:
        return runtime
    log.info("runtime.predict_in: auto: the model runs in predictor actors (%s)", found)
    return runtime.model_copy(update={"predict_in": "actors"})


def _driver_ruled_out_by(spec: JobSpec) -> str | None:
    """Why `auto` takes the pool whatever the run's size, for this spec: a tiled detection's
    rows are merged in Ray after the pool; a DICOM instance's frames are counted only as it is
    read (one may hold hundreds), so the run's units are not known before it starts."""
    if spec.merges_scene_rows:
        return MERGED_AFTER_THE_POOL
    if spec.input.dicom is not None:
        return "a DICOM run's frames are not counted before it starts"
    return None


def units_for_the_driver(runtime: RuntimeSpec) -> int:
    """The most units `predict_in: auto` hands to the driver's threads: driver_max_inputs,
    and with compile on fewer than compile_min_inputs (from there the run compiles, which the
    driver never does: `RuntimeSpec.fewest_units_compiled`)."""
    compiled_from = runtime.fewest_units_compiled
    if compiled_from is None:
        return runtime.driver_max_inputs
    return min(runtime.driver_max_inputs, compiled_from - 1)


def placed_for_units(runtime: RuntimeSpec, units: int) -> RuntimeSpec:
    """`predict_in: auto` (on a cluster `placed_on_cluster` left it to) settled for a run of
    `units` to process: the driver's threads for at most `units_for_the_driver`, else actors.
    driver and actors as they are."""
    if runtime.predict_in != "auto":
        return runtime
    limit = units_for_the_driver(runtime)
    in_driver = units <= limit
    log.info(
        "runtime.predict_in: auto: %d units to process, %s the driver's %d "
        "(runtime.driver_max_inputs%s): the model runs in %s",
        units,
        "within" if in_driver else "over",
        limit,
        ", under compile_min_inputs with compile on" if runtime.compile else "",
        "the driver's threads" if in_driver else "predictor actors",
    )
    return runtime.model_copy(update={"predict_in": "driver" if in_driver else "actors"})


def _plan_to_reach(runtime: RuntimeSpec, nodes: Nodes) -> PoolPlan:
    """An autoscaling pool sized on the nodes the cluster can reach at full scale: from one
    actor (the autoscaler adds nodes as the others wait) up to as many as fit there, node by
    node, each with a GPU where the node types have GPUs (so the autoscaler starts GPU workers
    for them)."""
    cpus = sum(count * node.get("CPU", 0) for node, count in nodes)
    gpus = sum(count * node.get("GPU", 0) for node, count in nodes)
    num_gpus = gpus_per_actor(runtime, gpus)
    on_nodes = _actors_on_nodes(nodes, runtime, num_gpus)
    fits = min(on_nodes, _actors_that_fit(runtime, num_gpus, cpus, gpus))
    smallest = runtime.min_actors or 1
    if smallest > fits:
        raise ClusterTooSmall(_unreachable_message(runtime, num_gpus, nodes, fits))
    top = runtime.max_actors or fits
    if top > fits:
        log.warning("runtime.max_actors=%d capped to the %d actors it can reach", top, fits)
        top = fits
    return PoolPlan(smallest, top, runtime.num_cpus_per_actor, num_gpus)


def _actors_on_nodes(nodes: Nodes, runtime: RuntimeSpec, num_gpus: float) -> int:
    """Actors of the spec's size the nodes hold, each on one node."""
    return int(sum(count * _actors_on(node, runtime, num_gpus) for node, count in nodes))


def _actors_on(node: Mapping[str, float], runtime: RuntimeSpec, num_gpus: float) -> int:
    """Actors of the spec's size one node holds."""
    by_cpu = math.floor(node.get("CPU", 0) / runtime.num_cpus_per_actor + 1e-9)
    by_gpu = math.floor(node.get("GPU", 0) / num_gpus + 1e-9) if num_gpus else by_cpu
    return max(0, min(by_cpu, by_gpu))


def _actors_that_fit(runtime: RuntimeSpec, num_gpus: float, cpus: float, gpus: float) -> int:
    """Actors of the spec's size on `cpus` and `gpus` as one, `reserved_cpus` kept free."""
    return _actors_on({"CPU": cpus - runtime.reserved_cpus, "GPU": gpus}, runtime, num_gpus)


def pool_for_inputs(plan: PoolPlan, runtime: RuntimeSpec, inputs: int) -> PoolPlan:
    """The pool of a run of `inputs` units to process (images, tiles), so at least inputs /
    batch model calls (a DICOM file gives one unit or more): where the spec leaves the smallest
    size open, no more actors start than have a call to make (each start is a model load);
    more may still join as the queue backs up. In the driver's threads, which all start at
    once, no more than the model calls."""
    model_calls = math.ceil(inputs / runtime.images_per_call)
    if runtime.predict_in == "driver":  # the driver's threads all load a model at once
        top = max(1, min(plan.max_size, model_calls))
        return dataclasses.replace(plan, min_size=min(plan.min_size, top), max_size=top)
    if runtime.min_actors is not None or plan.min_size <= model_calls:
        return plan
    return dataclasses.replace(plan, min_size=max(1, model_calls))


def gpus_per_actor(runtime: RuntimeSpec, cluster_gpus: float) -> float:
    """The spec's figure, else 1 where the cluster has a GPU and the device allows it."""
    num_gpus = runtime.num_gpus_per_actor
    if num_gpus is None:
        num_gpus = 1.0 if cluster_gpus >= 1 and runtime.device != "cpu" else 0.0
    if runtime.device == "cuda" and num_gpus == 0:
        raise ClusterTooSmall("runtime.device is cuda: expected num_gpus_per_actor > 0 and a GPU")
    return num_gpus


def _warn_of_nodes_not_up(runtime: RuntimeSpec, num_gpus: float, top: int) -> None:
    """On an autoscaling cluster the pool is sized on the nodes up as the run starts: say
    where that leaves it smaller than the spec may mean (a cluster starting from no workers
    gives one CPU actor)."""
    if runtime.num_gpus_per_actor is None and num_gpus == 0 and runtime.device == "auto":
        log.warning(
            "runtime.autoscaling: no GPU is up, so the actors ask for none and run on CPUs (the "
            "autoscaler starts no GPU worker for them); set runtime.num_gpus_per_actor: 1 to "
            "run on GPU workers it starts"
        )
    if runtime.max_actors is None:
        log.warning(
            "runtime.autoscaling: the pool is capped at the %d actor(s) that fit on the nodes "
            "up now; set runtime.max_actors to let it grow onto the nodes the autoscaler adds",
            top,
        )


def _unreachable_message(runtime: RuntimeSpec, num_gpus: float, nodes: Nodes, fits: int) -> str:
    smallest = runtime.min_actors or 1
    kinds = "; ".join(
        f"{node.get('CPU', 0):g} CPUs, {node.get('GPU', 0):g} GPUs" for node, _ in nodes
    )
    return (
        f"runtime.min_actors={smallest} actors of {runtime.num_cpus_per_actor:g} CPU and "
        f"{num_gpus:g} GPU each cannot be scheduled even at full scale: the launcher config's "
        f"nodes ({kinds} each) hold {fits}, {runtime.reserved_cpus:g} CPUs kept free "
        f"(runtime.reserved_cpus); expected min_actors <= {fits}. "
        f"{_lower(num_gpus, most_gpus_on_a_node(nodes))}, or raise the node "
        "types' max_workers"
    )


def most_gpus_on_a_node(nodes: Nodes) -> float:
    """The most GPUs one of `nodes` has (what the largest GPU ask can be)."""
    return max((node.get("GPU", 0) for node, _ in nodes), default=0)


def _lower(num_gpus: float, most_gpus: float) -> str:
    """What to lower where the pool does not fit: the GPUs an actor asks for where no node has
    that many (`most_gpus`: the most a node has), else the actors or their CPUs."""
    if num_gpus > most_gpus:
        return (
            f"Lower runtime.num_gpus_per_actor (no node has {num_gpus:g} GPU; "
            "unset, it follows the GPUs up)"
        )
    return "Lower runtime.min_actors or runtime.num_cpus_per_actor"


def _too_small_message(
    runtime: RuntimeSpec, num_gpus: float, cpus: float, gpus: float, fits: int, most_gpus: float
) -> str:
    """`most_gpus`: the most GPUs one node has (the cluster's, where its nodes are not known)."""
    smallest = runtime.min_actors or 1
    return (
        f"runtime.min_actors={smallest} actors of {runtime.num_cpus_per_actor:g} CPU "
        f"and {num_gpus:g} GPU each cannot be scheduled: the cluster has {cpus:g} CPUs and "
        f"{gpus:g} GPUs, each actor on one node, and {runtime.reserved_cpus:g} CPUs stay free "
        f"for reading and decoding (runtime.reserved_cpus); expected min_actors <= {fits}. "
        f"{_lower(num_gpus, most_gpus)}, add nodes, or set runtime.autoscaling: true"
    )
