"""Shared fixtures: an isolated local Ray, a real SeaweedFS S3 server, sample photographs."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_temp_root import claim, short_temp_dir

from vision_ops.devstack import SeaweedS3, use_local_server

PHOTO_NAMES = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")
# Placeholder credentials for the local server (and its address past any proxy), set before any
# Ray worker starts so workers inherit them exactly as they would a real credential chain's.
use_local_server(os.environ)
# Ray's default temp root, for every Ray process of the session: the suite's, never the host's.
RAY_ROOT = claim(os.environ)
# Ray workers and the tests' own subprocesses import test-only modules (tests/crashing.py,
# tests/scene_plans.py) the way they import user code: whichever test starts one first.
TESTS_DIR = str(Path(__file__).parent)
if TESTS_DIR not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")])
    )


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the session where it wrote into the host's Ray temp root; drop the suite's. In the
    root all of a host's users share (/tmp/ray, TMPDIR unset) another Ray may have written
    what appeared: named, not failed (CI gives the suite a TMPDIR of its own, and fails)."""
    stray = RAY_ROOT.stray_entries()
    RAY_ROOT.release()
    if stray and RAY_ROOT.host_root_is_shared:
        print(f"\nWARNING: new in the host's shared Ray temp root while the suite ran: {stray}")
    elif stray:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nFAILED: the suite wrote into the host's Ray temp root: {stray}")
    EXIT_STATUS.append(int(session.exitstatus))


EXIT_STATUS: list[int] = []  # the session's, for `pytest_unconfigure`


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with the session's status once pytest is done, skipping the interpreter's
    teardown: a suite run once ended in a segmentation fault after its summary (all passed),
    in the native libraries' exit handlers (Ray's, Arrow's and DuckDB's threads)."""
    if EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_STATUS[-1])


@pytest.fixture(scope="session")
def ray_temp_dir() -> Iterator[str]:
    """A short, private Ray temp dir: no stale `ray_current_cluster` from another cluster."""
    path = str(short_temp_dir("vor"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_local_ray(temp_dir: str, gpus: int) -> None:
    """A fresh local Ray of 2 CPUs and `gpus` GPUs (the one before it, if any, shut down)."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, _temp_dir=temp_dir)
    ray.data.DataContext.get_current().enable_progress_bars = False


@pytest.fixture(scope="session")
def ray_local(ray_temp_dir: str) -> Iterator[None]:
    """The embedded local cluster the job starts when RAY_ADDRESS is unset: 2 CPUs, no GPU
    (on a GPU machine too, so the CPU tests' exact comparisons hold there)."""
    import ray

    start_local_ray(ray_temp_dir, gpus=0)
    yield
    ray.shutdown()


@pytest.fixture
def own_ray_root(monkeypatch: pytest.MonkeyPatch, ray_temp_dir: str) -> Iterator[None]:
    """No Ray connection, no RAY_ADDRESS, and a Ray temp root of the test's own, for code that
    starts the embedded local cluster itself (`ray.init()` with no address would otherwise
    join what an earlier test's Cluster left in the suite's root); shut and removed after,
    and the suite's cluster (`ray_local`) back where it was up before."""
    import ray

    was_up = ray.is_initialized()
    if was_up:
        ray.shutdown()
    root = short_temp_dir("voc")
    with monkeypatch.context() as patch:
        patch.setenv("RAY_TMPDIR", str(root))
        patch.delenv("RAY_ADDRESS", raising=False)
        yield
        if ray.is_initialized():
            ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)
    restore_suite_cluster(was_up, ray_temp_dir)


@pytest.fixture
def no_ray(own_ray_root: None) -> Iterator[None]:
    """No Ray connection, and none to be made: `ray.init` (Ray Data's own start included)
    fails the test, for work that must run without Ray (`runtime.runner: in_process`); put
    back before `own_ray_root` brings the suite's cluster back."""
    import ray

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray, "init", refused)
        yield


@pytest.fixture
def ray_with_gpu(ray_temp_dir: str) -> Iterator[None]:
    """2 CPUs and this machine's first GPU for one test; the CPU-only cluster is back after it
    where one was up before."""
    import ray

    was_up = ray.is_initialized()
    start_local_ray(ray_temp_dir, gpus=1)
    yield
    restore_suite_cluster(was_up, ray_temp_dir)


def restore_suite_cluster(was_up: bool, ray_temp_dir: str) -> None:
    """After a test that changed the connection: the suite's CPU-only cluster (`ray_local`,
    session-scoped) up again where it was up before the test, else no connection."""
    import ray

    if was_up:
        start_local_ray(ray_temp_dir, gpus=0)
    elif ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedS3]:
    """A real S3 server on 127.0.0.1 with fresh ports, credentials from the environment."""
    with SeaweedS3(buckets=("images", "models", "out")) as server:
        yield server


@pytest.fixture(scope="session")
def iceberg_s3() -> Iterator[SeaweedS3]:
    """A real S3 server serving its embedded Iceberg REST catalog over the table bucket
    `tables` (SigV4 with the environment's key pair), with buckets for inputs and masks."""
    with SeaweedS3(buckets=("images", "out"), table_bucket="tables") as server:
        yield server


@pytest.fixture(scope="session")
def s3_options(seaweed: SeaweedS3) -> dict[str, dict[str, str]]:
    """`storage_options` for a spec that reads and writes the test server."""
    return {"s3": seaweed.storage_options()}


@pytest.fixture(scope="session")
def photo_paths() -> list[Path]:
    """Real photographs shipped inside scikit-image (and scikit-learn)."""
    import skimage.data
    import sklearn.datasets

    skimage_dir = Path(skimage.data.__file__).parent
    sklearn_dir = Path(sklearn.datasets.__file__).parent / "images"
    return [skimage_dir / name for name in PHOTO_NAMES] + [sklearn_dir / "china.jpg"]


@pytest.fixture(scope="session")
def s3fs_client(seaweed: SeaweedS3):  # type: ignore[no-untyped-def]
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **seaweed.storage_options())


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state_dict of a random mobilenet_v3_small with 4 classes (the weights-file path)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=4).state_dict(), path)
    return path
