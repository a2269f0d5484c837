"""The predictor pool sized from a cluster's resources, and refused before any work where it
cannot be scheduled (pure arithmetic: no Ray)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vision_ops.cluster import reachable_nodes
from vision_ops.config import DRIVER_MAX_INPUTS, JobSpec, RuntimeSpec, parse_spec
from vision_ops.pool import (
    ClusterTooSmall,
    PoolPlan,
    placed_for_units,
    placed_on_cluster,
    plan_pool,
    pool_for_inputs,
)


@pytest.mark.parametrize(
    ("runtime", "resources", "expected"),
    [
        # CPU actors share the cores with decoding: threads = CPUs / actors; reads get the rest.
        # On a fixed cluster a pool whose smallest size is left open is fixed at its largest.
        ({}, {"CPU": 2}, (1, 1, 1.0, 0.0, 2, 1)),
        ({}, {"CPU": 16, "GPU": 4}, (4, 4, 1.0, 1.0, None, 12)),
        ({"min_actors": 1}, {"CPU": 16, "GPU": 4}, (1, 4, 1.0, 1.0, None, 12)),
        ({"max_actors": 2}, {"CPU": 16, "GPU": 4}, (2, 2, 1.0, 1.0, None, 14)),
        ({"num_gpus_per_actor": 0.25}, {"CPU": 16, "GPU": 2}, (8, 8, 1.0, 0.25, None, 8)),
        ({"num_cpus_per_actor": 2, "reserved_cpus": 2}, {"CPU": 10}, (4, 4, 2.0, 0.0, 2, 2)),
        ({"device": "cpu"}, {"CPU": 8, "GPU": 1}, (7, 7, 1.0, 0.0, 1, 1)),
        # Where the cluster adds nodes on demand the pool starts small and grows.
        ({"autoscaling": True, "max_actors": 8}, {"CPU": 2}, (1, 8, 1.0, 0.0, None, None)),
    ],
)
def test_pool_is_sized_from_cluster_resources(runtime, resources, expected):
    plan = plan_pool(RuntimeSpec(**runtime), resources)
    sizing = (plan.min_size, plan.max_size, plan.num_cpus, plan.num_gpus)
    assert (*sizing, plan.threads, plan.read_tasks) == expected


@pytest.mark.parametrize(
    ("runtime", "inputs", "expected"),
    [
        ({}, 10_000, (4, 4)),  # 40 calls of 256: the whole pool
        ({}, 513, (3, 4)),  # 3 calls: 3 actors start, a fourth may join
        ({}, 256, (1, 4)),
        ({}, 0, (1, 4)),
        ({"min_actors": 1}, 10_000, (1, 4)),  # the spec's own smallest size stands
        ({"min_actors": 2}, 1, (2, 4)),
    ],
)
def test_a_pool_left_open_starts_no_more_actors_than_the_run_has_model_calls(
    runtime, inputs, expected
):
    spec = RuntimeSpec(batch_size=256, **runtime)
    plan = pool_for_inputs(plan_pool(spec, {"CPU": 16, "GPU": 4}), spec, inputs)
    assert (plan.min_size, plan.max_size) == expected


@pytest.mark.parametrize(
    ("runtime", "resources", "message"),
    [
        ({}, {"CPU": 1}, "expected min_actors <= 0. Lower runtime.min_actors or runtime.num_cpus"),
        ({"min_actors": 3}, {"CPU": 8, "GPU": 2}, "expected min_actors <= 2"),
        (
            {"num_gpus_per_actor": 1},
            {"CPU": 8},
            r"0 GPUs.* Lower runtime.num_gpus_per_actor \(no node has 1 GPU; unset, it follows",
        ),
        ({"device": "cuda", "num_gpus_per_actor": 0}, {"CPU": 8}, "device is cuda"),
    ],
)
def test_pool_that_cannot_run_is_refused(runtime, resources, message):
    with pytest.raises(ClusterTooSmall, match=message):
        plan_pool(RuntimeSpec(**runtime), resources)


def test_a_fixed_pool_is_bounded_node_by_node() -> None:
    """Two nodes of 8 CPUs: 16 CPUs in all, but no node holds an actor of 12 (Ray would leave
    it pending until the stall timeout)."""
    two_nodes = [({"CPU": 8.0, "GPU": 0.0}, 1.0), ({"CPU": 8.0, "GPU": 0.0}, 1.0)]
    wide = RuntimeSpec(num_cpus_per_actor=12)
    with pytest.raises(ClusterTooSmall, match=r"each actor on one node.* <= 0\."):
        plan_pool(wide, {"CPU": 16}, nodes_up=two_nodes)
    two_gpu_nodes = [({"CPU": 8, "GPU": 1}, 2.0)]  # 2 GPUs in all, one a node
    with pytest.raises(ClusterTooSmall, match=r"Lower runtime.num_gpus_per_actor \(no node has 2"):
        plan_pool(RuntimeSpec(num_gpus_per_actor=2), {"CPU": 16, "GPU": 2}, None, two_gpu_nodes)
    assert plan_pool(wide, {"CPU": 16}).max_size == 1  # the totals alone let it through
    plan = plan_pool(RuntimeSpec(num_cpus_per_actor=3), {"CPU": 16}, nodes_up=two_nodes)
    assert (plan.min_size, plan.max_size) == (4, 4)  # 2 a node; the totals would give 5


@pytest.mark.parametrize(
    ("runtime", "warned"),
    [
        ({"autoscaling": True}, ["no GPU is up", "capped at the 1 actor(s)"]),
        ({"autoscaling": True, "num_gpus_per_actor": 1}, ["capped at the 1 actor(s)"]),
        ({"autoscaling": True, "max_actors": 8, "device": "cpu"}, []),
    ],
)
def test_an_autoscaling_pool_sized_on_the_nodes_up_says_so(runtime, warned, caplog) -> None:
    """The shipped cluster starts from no workers (head CPU: 0): sized on what is up, the pool
    is one actor asking for no GPU, which the autoscaler never starts a GPU worker for."""
    with caplog.at_level("WARNING", logger="vision_ops.pool"):
        plan = plan_pool(RuntimeSpec(**runtime), {"CPU": 0})
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == len(warned)
    assert all(part in line for part, line in zip(warned, said, strict=True))
    assert plan.min_size == 1


SHIPPED_CLUSTER = Path(__file__).parent.parent / "cluster.yaml"


@pytest.mark.parametrize(
    ("runtime", "expected"),
    [
        # cluster.yaml: 8 GPU workers of 8 CPUs, 16 CPU workers of 16: one actor per GPU
        ({"autoscaling": True}, (1, 8, 1.0, 1.0)),
        ({"autoscaling": True, "min_actors": 2, "max_actors": 4}, (2, 4, 1.0, 1.0)),
        ({"autoscaling": True, "max_actors": 20}, (1, 8, 1.0, 1.0)),  # capped: 8 GPUs
        ({"autoscaling": True, "device": "cpu", "num_cpus_per_actor": 4}, (1, 79, 4.0, 0.0)),
    ],
)
def test_an_autoscaling_pool_is_sized_on_what_the_launcher_config_can_reach(
    runtime, expected, tmp_path, caplog
) -> None:
    """The driver on the head reads the config `ray up` left there: the pool asks for the GPUs
    the autoscaler can start, and grows to what fits at full scale, though nothing is up."""
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    shutil.copy(SHIPPED_CLUSTER, bootstrap)
    reachable = reachable_nodes(bootstrap)
    gpu_worker, cpu_worker = {"CPU": 8.0, "GPU": 1.0}, {"CPU": 16.0, "GPU": 0.0}
    assert reachable == [({"CPU": 0.0, "GPU": 0.0}, 1.0), (gpu_worker, 8.0), (cpu_worker, 16.0)]
    with caplog.at_level("WARNING", logger="vision_ops.pool"):
        plan = plan_pool(RuntimeSpec(**runtime), {"CPU": 0}, reachable)
    assert (plan.min_size, plan.max_size, plan.num_cpus, plan.num_gpus) == expected
    said = [r.getMessage() for r in caplog.records if r.name == "vision_ops.pool"]
    assert said == (
        ["runtime.max_actors=20 capped to the 8 actors it can reach"]
        * (runtime.get("max_actors") == 20)
    )
    with pytest.raises(ClusterTooSmall, match=r"min_actors=9 .* even at full scale.* <= 8\."):
        plan_pool(RuntimeSpec(autoscaling=True, min_actors=9), {"CPU": 0}, reachable)
    wide = RuntimeSpec(autoscaling=True, num_cpus_per_actor=12)  # 16 GPU-worker CPUs in all
    with pytest.raises(ClusterTooSmall, match=r"8 CPUs, 1 GPUs; 16 CPUs, 0 GPUs each\) hold 0"):
        plan_pool(wide, {"CPU": 0}, reachable)  # no node holds 12 CPUs and a GPU


def test_without_a_launcher_config_the_pool_is_sized_on_the_nodes_up(tmp_path, caplog) -> None:
    assert reachable_nodes(tmp_path / "absent.yaml") is None  # a driver off the head
    broken = tmp_path / "broken.yaml"
    broken.write_text("available_node_types: 3\n")
    with caplog.at_level("WARNING", logger="vision_ops.cluster"):
        assert reachable_nodes(broken) is None
    assert "launcher config is not used" in caplog.text
    plan = plan_pool(RuntimeSpec(autoscaling=True, max_actors=4), {"CPU": 0}, None)
    assert (plan.min_size, plan.max_size, plan.num_gpus) == (1, 4, 0.0)
    fixed = plan_pool(RuntimeSpec(), {"CPU": 4}, [({"CPU": 8, "GPU": 1}, 8)])  # not autoscaling
    assert (fixed.max_size, fixed.num_gpus) == (3, 0.0)


ONE_CPU_NODE = [({"CPU": 8.0, "GPU": 0.0}, 1.0)]
CPU_POOL, GPU_POOL = PoolPlan(1, 4, 2, 0), PoolPlan(1, 1, 1, 1)
DETECTOR = {"architecture": "fasterrcnn_resnet50_fpn", "weights": "w.pt"}


def auto_spec(runtime: dict | None = None, **parts: dict) -> JobSpec:
    values = {
        "input": {"uris": ["s3://b/photos/"]},
        "model": {"architecture": "resnet50"},
        "runtime": {"predict_in": "auto"} | (runtime or {}),
        "output": {"uri": "s3://b/out"},
    }
    return parse_spec(values | parts)


@pytest.mark.parametrize(
    ("spec", "plan", "nodes", "placed"),
    [
        (auto_spec(), CPU_POOL, ONE_CPU_NODE, "auto"),  # settled by the run's size
        (auto_spec(), GPU_POOL, ONE_CPU_NODE, "actors"),
        (auto_spec(), CPU_POOL, ONE_CPU_NODE * 2, "actors"),
        (auto_spec({"autoscaling": True}), CPU_POOL, ONE_CPU_NODE, "actors"),
        (auto_spec({"driver_max_inputs": 0}), CPU_POOL, ONE_CPU_NODE, "actors"),
        (auto_spec({"compile": True, "compile_min_inputs": 0}), CPU_POOL, ONE_CPU_NODE, "actors"),
        (  # a tiled scene's rows are merged after the pool
            auto_spec(
                input={"uris": ["s3://b/scenes/"], "tiling": {"size": 512}},
                task={"kind": "detection"},
                model=DETECTOR,
            ),
            CPU_POOL,
            ONE_CPU_NODE,
            "actors",
        ),
        (  # a DICOM instance's frames are counted only as it is read
            auto_spec(input={"uris": ["s3://b/scans/"], "dicom": {}}),
            CPU_POOL,
            ONE_CPU_NODE,
            "actors",
        ),
        (auto_spec({"predict_in": "actors"}), CPU_POOL, ONE_CPU_NODE, "actors"),
        (auto_spec({"predict_in": "driver"}), CPU_POOL, ONE_CPU_NODE, "driver"),
    ],
)
def test_auto_runs_in_actors_where_the_cluster_or_the_spec_rules_the_driver_out(
    spec, plan, nodes, placed
) -> None:
    """`predict_in: auto` is settled to actors as soon as the cluster is known where the
    driver's threads cannot be the pool: GPUs for it, more than one node, autoscaling; a spec
    no run of which goes to the driver; a tiled detection; DICOM input. An explicit choice is
    kept."""
    assert placed_on_cluster(spec, plan, nodes).predict_in == placed


@pytest.mark.parametrize(
    ("runtime", "units", "placed"),
    [
        ({}, 1, "driver"),
        ({}, DRIVER_MAX_INPUTS, "driver"),
        ({}, DRIVER_MAX_INPUTS + 1, "actors"),
        ({"driver_max_inputs": 10}, 10, "driver"),
        ({"driver_max_inputs": 10}, 11, "actors"),
        ({"compile": True}, 10, "driver"),  # under compile_min_inputs: it would not compile
        ({"compile": True, "compile_min_inputs": 10}, 9, "driver"),
        ({"compile": True, "compile_min_inputs": 10}, 10, "actors"),  # it compiles from 10
        ({"predict_in": "actors"}, 1, "actors"),
        ({"predict_in": "driver"}, 10**6, "driver"),
    ],
)
def test_auto_runs_a_short_run_in_the_driver_and_a_long_one_in_actors(
    runtime, units, placed, caplog
) -> None:
    """Where the cluster allows the driver, `auto` settles by the units the run processes:
    the driver's threads for at most `driver_max_inputs` (fewer than `compile_min_inputs` with
    compile on: from there the run compiles, which the driver never does), else actors; it
    says which, and why."""
    spec = RuntimeSpec(**({"predict_in": "auto"} | runtime))
    with caplog.at_level("INFO", logger="vision_ops.pool"):
        settled = placed_for_units(spec, units)
    assert settled.predict_in == placed
    assert settled.model_copy(update={"predict_in": spec.predict_in}) == spec  # nothing else
    if spec.predict_in == "auto":
        where = "the driver's threads" if placed == "driver" else "predictor actors"
        assert f"{units} units to process" in caplog.text and where in caplog.text
