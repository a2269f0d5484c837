"""The driver's connection to Ray, and the start-up work it overlaps.

Starting the embedded local cluster takes seconds in which the driver mostly waits for Ray's
processes; importing torch, torchvision and the pipeline and checking the job's model take
seconds of the driver's CPU. `connect_while` does the second in a thread during the first (Ray
itself wants the main thread: it sets its SIGTERM handler there). No torch here: the command
line imports this module before the model stack.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator

import ray

from vision_ops.errors import EXIT_BAD_SPEC, VisionOpsError
from vision_ops.pool import Nodes
from vision_ops.runstats import StartupClock
from vision_ops.storage import address_userinfo

REACH_TIMEOUT_S = 10.0  # for a cluster address to accept a connection


class ClusterUnreachable(VisionOpsError, ConnectionError):
    """RAY_ADDRESS names a cluster that does not answer."""


class ThroughRayClient(VisionOpsError, ValueError):
    """RAY_ADDRESS is a Ray Client address (`ray://`), through which the job cannot run."""

    exit_code = EXIT_BAD_SPEC


def connect_ray(dashboard: bool = False) -> None:
    """Join RAY_ADDRESS when set, else start (or reuse) the embedded local cluster, with its
    dashboard (on 127.0.0.1 only) where `dashboard` asks for it (`runtime.local_dashboard`;
    Ray itself turns token authentication on for a new local cluster unless RAY_AUTH_MODE says
    otherwise). Ray Data's stack traces then go to its log file only."""
    if not ray.is_initialized():
        with sigterm_handler_kept():
            _init_ray(dashboard)
    stack_traces_to_ray_datas_log()


@contextlib.contextmanager
def sigterm_handler_kept() -> Iterator[None]:
    """The process's own SIGTERM handler, where it set one, put back after `ray.init` (which
    sets Ray's: `sys.exit(15)`): the command line's turns a SIGTERM into the run's own stop,
    also where Ray starts only once the run knows it needs it (`runtime.runner: auto`)."""
    in_main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if in_main else None
    try:
        yield
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)


def nodes_up() -> Nodes:
    """The cluster's live nodes, one by one: (a node's CPU and GPU, 1)."""
    return [
        ({name: float(node["Resources"].get(name, 0)) for name in ("CPU", "GPU")}, 1.0)
        for node in ray.nodes()
        if node.get("Alive")
    ]


def _init_ray(dashboard: bool) -> None:
    address = os.environ.get("RAY_ADDRESS")
    if address:
        refuse_ray_client(address)
        require_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as err:  # `auto` finding none; a token the cluster refuses
            raise ClusterUnreachable(
                f"RAY_ADDRESS={shown_address(address)}: Ray could not join the cluster ({err}); "
                "a cluster with token authentication needs its token (RAY_AUTH_TOKEN, or "
                "~/.ray/auth_token); nothing was done"
            ) from None
        return
    include = None if dashboard else False  # None: where ray[default] is installed
    ray.init(include_dashboard=include, dashboard_host="127.0.0.1", log_to_driver=True)


class _WithoutStackTrace(logging.Formatter):
    """Another formatter's lines, less the stack trace a record carries."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            bare = {"exc_info": None, "exc_text": None, "stack_info": None}
            record = logging.makeLogRecord(record.__dict__ | bare)
        return self.inner.format(record)


def stack_traces_to_ray_datas_log() -> None:
    """Ray Data's console lines without the stack traces its records carry (a read task's
    error as its dataset aborts, an error of Ray's own); its log file (the Ray session's
    logs/ray-data) keeps them: the job says what failed in one line of its own. Its console
    handler is the stream handler that writes to no file."""
    import ray.data  # noqa: F401  (it sets up its logging as it is imported)

    for handler in logging.getLogger("ray.data").handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        )
        if console and not isinstance(handler.formatter, _WithoutStackTrace):
            handler.setFormatter(_WithoutStackTrace(handler.formatter or logging.Formatter()))


def refuse_ray_client(address: str) -> None:
    """A Ray Client address (`ray://host:port`) refused before any work: Ray Data's executor
    fails through Ray Client (Ray 2.60: `'Worker' object has no attribute 'core_worker'` as the
    listing starts), and a driver off the cluster would move every batch over the network."""
    if address.strip().lower().startswith("ray://"):
        raise ThroughRayClient(
            f"RAY_ADDRESS={shown_address(address)}: a Ray Client address, through which Ray "
            "Data does not run; expected the cluster's GCS address (host:6379, or auto) from a "
            "node of the cluster, or `vision-ops submit` from elsewhere; nothing was done"
        )


def shown_address(address: str) -> str:
    """A cluster address as a message says it: without the user and password it may hold, of
    a URL (`http://user:password@head:8265`) or of a bare `user:password@head:6379` alike."""
    found = address_userinfo(address)
    return address.replace(f"{found}@", "", 1) if found else address


def require_reachable(address: str) -> None:
    """A `host:port` (or `http://host:port`) cluster address that accepts a connection, else
    ClusterUnreachable naming it: `ray.init` would retry for minutes, and a nightly run would
    hang on a cluster that is down. `auto` and other forms are left to Ray."""
    shown = shown_address(address)
    host, _, port = shown.split("://", 1)[-1].split("/", 1)[0].rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as err:
        raise ClusterUnreachable(
            f"RAY_ADDRESS={shown}: no Ray cluster answers there ({err}); nothing was done"
        ) from None


def connect_while(
    prepare: Callable[[], None], clock: StartupClock, dashboard: bool = False
) -> None:
    """Connect to Ray (timed as the `ray_connect` stage; `dashboard` as `connect_ray` takes it)
    while `prepare` runs in a thread; then wait for `prepare`, and raise what it raised, with
    the cluster started here (if one was) shut down again. A failure to connect is raised
    first."""
    failed: list[BaseException] = []
    was_connected = ray.is_initialized()

    def work() -> None:
        try:
            prepare()
        except BaseException as err:  # re-raised in the caller's thread
            failed.append(err)

    worker = threading.Thread(target=work, name="vision-ops-prepare", daemon=True)
    worker.start()
    try:
        with clock.stage("ray_connect"):
            connect_ray(dashboard)
    finally:
        worker.join()
    if failed:
        if not was_connected:
            ray.shutdown()
        raise failed[0]
