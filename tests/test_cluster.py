"""cluster.yaml: valid for Ray's launcher, and its resources fit what the job assumes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from vision_ops.cli import EXIT_BAD_SPEC, EXIT_CLUSTER_TOO_SMALL, EXIT_OK, main
from vision_ops.cluster import (
    ClusterConfigError,
    head_resources,
    load_cluster_config,
    max_capacity,
    node_types,
)
from vision_ops.config import RuntimeSpec
from vision_ops.pool import plan_pool

ROOT = Path(__file__).parents[1]
CLUSTER = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return load_cluster_config(CLUSTER)


def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_head_schedules_no_inference_and_workers_autoscale_from_zero(config) -> None:
    assert head_resources(config) == {"CPU": 0.0}
    types = node_types(config)
    assert types["gpu_worker"]["min_workers"] == 0 and types["gpu_worker"]["resources"]["GPU"] == 1
    assert types["cpu_worker"]["min_workers"] == 0 and "GPU" not in types["cpu_worker"]["resources"]
    profiles = {n["node_config"]["IamInstanceProfile"]["Arn"] for n in types.values()}
    assert len(profiles) == 1  # S3 through one instance profile, no keys


def test_the_default_job_fits_the_cluster_at_full_scale(config) -> None:
    capacity = max_capacity(config)
    assert capacity == {"CPU": 8 * 8 + 16 * 16, "GPU": 8}
    plan = plan_pool(RuntimeSpec(), capacity)
    assert (plan.max_size, plan.num_gpus, plan.num_cpus) == (8, 1.0, 1.0)  # one actor per GPU
    gpu_node_cpus = node_types(config)["gpu_worker"]["resources"]["CPU"]
    assert gpu_node_cpus >= plan.num_cpus + 1  # the actor, and decoding beside it


def test_the_clusters_own_max_workers_caps_the_capacity(config) -> None:
    """A cluster-wide max_workers below the types' sum: the GPU nodes first, then the rest
    (it planned 8 GPUs and 320 CPUs on a cluster of 2 workers)."""
    config = config | {"max_workers": 2}
    assert max_capacity(config) == {"CPU": 2 * 8, "GPU": 2}
    config["max_workers"] = 10
    assert max_capacity(config) == {"CPU": 8 * 8 + 2 * 16, "GPU": 8}


def test_max_workers_unset_or_negative_is_read_as_rays_launcher_reads_it(config, tmp_path) -> None:
    """Unset: Ray's default of 2 (a type without its own takes the cluster's); negative: the
    cluster's is refused by Ray's schema, a type's by the capacity."""
    unset = copy.deepcopy(config)
    del unset["max_workers"], unset["available_node_types"]["gpu_worker"]["max_workers"]
    assert max_capacity(load_cluster_config(write(tmp_path, unset))) == {"CPU": 2 * 8, "GPU": 2}
    negative = copy.deepcopy(config) | {"max_workers": -1}
    with pytest.raises(ClusterConfigError, match="-1 is less than the minimum of 0"):
        load_cluster_config(write(tmp_path, negative))
    negative = copy.deepcopy(config)
    negative["available_node_types"]["gpu_worker"]["max_workers"] = -3
    with pytest.raises(ClusterConfigError, match="gpu_worker: max_workers -3, expected 0 or more"):
        max_capacity(load_cluster_config(write(tmp_path, negative)))


def test_workers_of_the_heads_own_type_count(config, tmp_path) -> None:
    """A one-type cluster: Ray launches up to the head type's max_workers beside the head (it
    was read as the head alone, too small for any pool)."""
    one_type = copy.deepcopy(config) | {"max_workers": 5}
    gpu_node = one_type["available_node_types"]["gpu_worker"] | {"max_workers": 3}
    one_type["available_node_types"] = {"gpu_node": gpu_node}
    one_type["head_node_type"] = "gpu_node"
    assert max_capacity(load_cluster_config(write(tmp_path, one_type))) == {
        "CPU": 8 + 3 * 8,
        "GPU": 1 + 3,
    }


def test_no_credentials_in_the_file() -> None:
    text = CLUSTER.read_text().lower()
    for word in ("aws_secret", "aws_access_key", "akia", "secret_access"):
        assert word not in text


def misspelt_field(config: dict) -> None:
    config["available_node_types"]["gpu_worker"]["min_wokers"] = 1


def unknown_head_type(config: dict) -> None:
    config["head_node_type"] = "missing"


def more_min_workers_than_max(config: dict) -> None:
    config["max_workers"] = 1
    config["available_node_types"]["cpu_worker"]["min_workers"] = 2


def no_provider_type(config: dict) -> None:
    del config["provider"]["type"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (misspelt_field, "min_wokers"),
        (unknown_head_type, "head_node_type"),
        (more_min_workers_than_max, "max_workers"),
        (no_provider_type, "type"),
    ],
)
def test_invalid_edits_fail_rays_validation(config, tmp_path, edit, message) -> None:
    broken = copy.deepcopy(config)
    edit(broken)
    with pytest.raises(ClusterConfigError, match=message):
        load_cluster_config(write(tmp_path, broken))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "not found"),
        ("head_node_type: [\n", "cannot read: while parsing a flow"),
        ("- a list\n", "expected a mapping, found list"),
    ],
)
def test_a_cluster_file_that_cannot_be_read_is_refused(tmp_path, text, message) -> None:
    path = tmp_path / "cluster.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ClusterConfigError) as caught:
        load_cluster_config(path)
    assert str(caught.value).startswith(f"--cluster {path}: {message}")


def test_validate_sizes_the_pool_on_the_cluster(capsys, tmp_path) -> None:
    spec = ROOT / "jobs" / "classify.yaml"
    no_holdout = ["--set", "evaluate=null"]  # its hold-out is in a bucket this test cannot reach
    assert main(["validate", str(spec), "--cluster", str(CLUSTER), *no_holdout]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "(320 CPUs, 8 GPUs): 8-8 predictor actors of 1 CPU, 1 GPU; 256 images per model " in (
        printed  # the spec leaves batch_size to the device: a whole GPU's classification batch
    )
    half = ["--set", "runtime.num_gpus_per_actor=0.5", "--set", "runtime.decode=device"]
    assert main(["validate", str(spec), "--cluster", str(CLUSTER), *no_holdout, *half]) == EXIT_OK
    assert "16-16 predictor actors of 1 CPU, 0.5 GPU; 128 images per model call, 512 files " in (
        capsys.readouterr().out
    )
    too_many = [*no_holdout, "--set", "runtime.min_actors=9"]
    assert main(["validate", str(spec), "--cluster", str(CLUSTER), *too_many]) == (
        EXIT_CLUSTER_TOO_SMALL
    )
    assert "expected min_actors <= 8" in capsys.readouterr().err
    autoscaling = [*no_holdout, "--set", "runtime.autoscaling=true"]
    assert main(["validate", str(spec), "--cluster", str(CLUSTER), *autoscaling]) == EXIT_OK
    assert "1-8 predictor actors of 1 CPU, 1 GPU" in capsys.readouterr().out  # as the run plans
    wide = [*autoscaling, "--set", "runtime.num_cpus_per_actor=12"]  # a GPU node has 8 CPUs
    assert main(["validate", str(spec), "--cluster", str(CLUSTER), *wide]) == (
        EXIT_CLUSTER_TOO_SMALL
    )
    assert "cannot be scheduled even at full scale" in capsys.readouterr().err


def test_validate_plans_the_model_in_the_driver_on_a_one_node_cluster_only(
    capsys, tmp_path, config
) -> None:
    """`predict_in: driver` on a launcher config: the driver's threads where the cluster is
    one CPU node at full scale; refused (exit 2, as the run would be) where it has more."""
    spec = ROOT / "jobs" / "classify.yaml"
    in_driver = ["--set", "evaluate=null", "--set", "runtime.predict_in=driver"]
    assert main(["validate", str(spec), "--cluster", str(CLUSTER), *in_driver]) == EXIT_BAD_SPEC
    assert "this cluster has GPUs for the predictor pool: expected predict_in: actors" in (
        capsys.readouterr().err
    )
    one_node = config | {"max_workers": 0}
    one_node["available_node_types"] = {"head": {"resources": {"CPU": 8}, "node_config": {}}}
    path = write(tmp_path, one_node)
    assert main(["validate", str(spec), "--cluster", str(path), *in_driver]) == EXIT_OK
    assert "(8 CPUs, 0 GPUs): 7 predictor threads in the driver of 1 torch threads each; " in (
        capsys.readouterr().out
    )


def test_validate_plans_auto_by_the_cluster_and_the_runs_size(capsys, tmp_path, config) -> None:
    """`predict_in: auto` on a launcher config: the actor pool where the cluster has GPUs for
    it; on one CPU node, the driver's threads for a run within driver_max_inputs, else the
    pool."""
    spec = ROOT / "jobs" / "classify.yaml"
    auto = ["--set", "evaluate=null", "--set", "runtime.predict_in=auto"]
    assert main(["validate", str(spec), "--cluster", str(CLUSTER), *auto]) == EXIT_OK
    assert "(320 CPUs, 8 GPUs): 8-8 predictor actors of 1 CPU, 1 GPU; " in capsys.readouterr().out
    one_node = config | {"max_workers": 0}
    one_node["available_node_types"] = {"head": {"resources": {"CPU": 8}, "node_config": {}}}
    path = write(tmp_path, one_node)
    limit = ["--set", "runtime.driver_max_inputs=700"]
    assert main(["validate", str(spec), "--cluster", str(path), *auto, *limit]) == EXIT_OK
    assert (
        "(8 CPUs, 0 GPUs): 7 predictor threads in the driver of 1 torch threads each for a run "
        "of at most 700 units to process (runtime.predict_in: auto), else 7-7 predictor actors "
        "of 1 CPU, 0 GPU; "
    ) in capsys.readouterr().out
    never = ["--set", "runtime.driver_max_inputs=0"]  # no run small enough: the pool alone
    assert main(["validate", str(spec), "--cluster", str(path), *auto, *never]) == EXIT_OK
    assert "(8 CPUs, 0 GPUs): 7-7 predictor actors of 1 CPU, 0 GPU; " in capsys.readouterr().out


def test_validate_says_where_the_runner_takes_a_run_off_the_cluster(
    capsys, tmp_path, config
) -> None:
    """`runtime.runner` on a launcher config: in_process says the cluster is not used; auto,
    the most inputs a run lists to go in the driver's process; ray, nothing more."""
    spec = ROOT / "jobs" / "classify.yaml"
    base = ["--set", "evaluate=null"]
    one_node = config | {"max_workers": 0}
    one_node["available_node_types"] = {"head": {"resources": {"CPU": 8}, "node_config": {}}}
    path = write(tmp_path, one_node)
    in_process = ["--set", "runtime.runner=in_process"]
    assert main(["validate", str(spec), "--cluster", str(path), *base, *in_process]) == EXIT_OK
    assert "runtime.runner: in_process: the run goes in the driver's one process" in (
        capsys.readouterr().out
    )
    auto = ["--set", "runtime.runner=auto", "--set", "runtime.driver_max_inputs=700"]
    assert main(["validate", str(spec), "--cluster", str(path), *base, *auto]) == EXIT_OK
    assert "runtime.runner: auto: a run listing at most 700 inputs goes in the driver's" in (
        capsys.readouterr().out
    )
    assert main(["validate", str(spec), "--cluster", str(path), *base]) == EXIT_OK
    assert "runtime.runner" not in capsys.readouterr().out
