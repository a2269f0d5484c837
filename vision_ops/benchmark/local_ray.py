"""The Ray cluster a measurement runs on: a fresh local one started inside the measurement
(`local_ray`: `ray.init` counts in the job's wall), or a long-lived one started before it and
joined (`running_cluster`, then `joined_ray`: a nightly job on a cluster that is already up).
Each has every core and an isolated temp dir, and is shut after."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil

from vision_ops.devstack import free_ports

# How long a started head may take to run its first job (2 busy cores: seconds, usually).
HEAD_READY_TIMEOUT_S = 180
HEAD_STOP_TIMEOUT_S = 60
# The head's ports besides the GCS's: each fresh, so that a cluster already on this machine
# (a test session's, a user's) keeps its own.
HEAD_PORT_FLAGS = (
    "dashboard-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)
# This process's Ray settings the head takes too; the others (RAY_ADDRESS: a cluster of the
# user's) are left out.
KEPT_FOR_HEAD = ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
# A first job on a head: it answers once its raylet has registered and started a worker.
FIRST_JOB = "import ray; ray.init(); ray.get(ray.remote(lambda: 0).remote())"


@contextlib.contextmanager
def local_ray(cores: int) -> Iterator[None]:
    """Ray started here and stopped on exit; RAY_ADDRESS is ignored meanwhile (the bench
    measures this machine, never a remote cluster)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    address = os.environ.pop("RAY_ADDRESS", None)
    temp_dir = private_temp_dir()
    try:
        ray.init(num_cpus=cores, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
        with _quiet_and_shut():
            yield
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
        if address is not None:
            os.environ["RAY_ADDRESS"] = address


@contextlib.contextmanager
def on_cores(cores: int) -> Iterator[None]:
    """This process held to `cores` of the CPUs it may use (as many as a local Ray of `cores`
    CPUs schedules on) and let go on exit, for a run without Ray."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(allowed)[:cores])
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


@contextlib.contextmanager
def joined_ray(address: str) -> Iterator[None]:
    """This process joined to the cluster at `address` (as `run_job` joins RAY_ADDRESS), and
    left on exit; the cluster keeps running."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=address, log_to_driver=False)
    with _quiet_and_shut():
        yield


@contextlib.contextmanager
def _quiet_and_shut() -> Iterator[None]:
    import ray

    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def running_cluster(cores: int) -> Iterator[str]:
    """A long-lived cluster as a scheduled job finds it: `ray start --head --block` (what a
    Ray pod or a service unit runs) on 127.0.0.1 with `cores` CPUs and no dashboard, in a
    private temp dir, up and past a first job before this yields its GCS address. Its
    processes are children of this one, so a measurement of this process's tree holds them
    (their memory is the cluster's, held while the job runs). RAY_ADDRESS names it meanwhile;
    stopped on exit. Its token authentication is this process's (RAY_AUTH_MODE, and the token
    Ray finds for it: RAY_AUTH_TOKEN, its path, else ~/.ray/auth_token); off where this process
    sets none, as Ray then joins an address without a token. A driver whose mode differs from
    the cluster's hangs: its tasks' workers answer it without the token it asks for."""
    gcs_port, *ports = free_ports(1 + len(HEAD_PORT_FLAGS))
    address = f"127.0.0.1:{gcs_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k in KEPT_FOR_HEAD}
    env.setdefault("RAY_AUTH_MODE", "disabled")  # unset, `ray start` would turn tokens on
    saved = os.environ.get("RAY_ADDRESS")
    temp_dir = private_temp_dir()
    head: subprocess.Popen[bytes] | None = None
    try:
        command = [
            ray_command(), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}", f"--num-cpus={cores}", "--include-dashboard=false",
            "--dashboard-host=127.0.0.1", "--disable-usage-stats", f"--temp-dir={temp_dir}",
            *[f"--{flag}={port}" for flag, port in zip(HEAD_PORT_FLAGS, ports, strict=True)],
        ]  # fmt: skip
        head = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own session: Ctrl-C at the terminal is the bench's
            preexec_fn=_stopped_with_its_parent,
        )
        run_first_job(env | {"RAY_ADDRESS": address}, head)
        os.environ["RAY_ADDRESS"] = address
        yield address
    finally:
        if head is not None:
            stop_head(head)
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stopped_with_its_parent() -> None:
    """In the head's keeper, before it runs: SIGTERM to it when the process that started it
    dies without stopping it (killed, or a broken process pool), so that the head's processes
    do not outlive the measurement (`ray start --block` stops them on SIGTERM). Linux only, as
    the bench's memory probes are; elsewhere nothing."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def ray_command() -> str:
    """The `ray` command of this interpreter's environment (its workers run this Python)."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else shutil.which("ray") or "ray"


def run_first_job(env: dict[str, str], head: subprocess.Popen[bytes]) -> None:
    """A first job on the head, run to its end, or RuntimeError where the head cannot take
    one (it exited, or did not answer in time)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", FIRST_JOB],
            env=env,
            capture_output=True,
            text=True,
            timeout=HEAD_READY_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`ray start --head` took no job in {HEAD_READY_TIMEOUT_S} s") from None
    if done.returncode != 0 or head.poll() is not None:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"`ray start --head` took no job: {last}")


def stop_head(head: subprocess.Popen[bytes]) -> None:
    """The head stopped as its keeper stops it (SIGTERM to `ray start --block`), then anything
    of its tree still running killed: its workers may outlive it."""
    tree: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        tree = psutil.Process(head.pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=HEAD_STOP_TIMEOUT_S)
    for process in tree:
        with contextlib.suppress(psutil.Error):
            process.kill()
    if head.poll() is None:
        head.kill()
        head.wait()


def private_temp_dir() -> str:
    """Short and private: no stale `ray_current_cluster`, and unix socket paths stay short."""
    return tempfile.mkdtemp(prefix="vob", dir="/tmp")
