"""A fault-injecting HTTP proxy in front of an S3 server, for the fault tests.

`FaultyS3(upstream)` listens on 127.0.0.1 and forwards every request byte for byte (method,
path, query, headers with the Host header as the client sent it, body) to the upstream S3
server, so SigV4 signatures made for the proxy's host:port still verify upstream. It injects,
deterministically, on every n-th request that `faulty` selects, counting each HTTP method and
bucket apart (so reads of the inputs and writes of the output each get their share):

* `slowdown_every`: a 503 SlowDown with an S3 XML error body (the request never goes upstream);
* `reset_every`: a TCP reset (SO_LINGER 0, close) before the request goes upstream;
* `drop_response_every`: the request goes upstream and is carried out, then the connection is
  reset instead of relaying the response (the client cannot tell it succeeded);

and answers 403 AccessDenied to every request `deny` selects (a permanent error), and, with
`conditional_writes=False`, 501 NotImplemented to every write with an `If-Match` or
`If-None-Match` header (a store without conditional writes). `requests`
and `faults` count what it saw and did, so a test can check that faults really happened.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

# Headers that belong to one connection, not to the request (RFC 9110 7.6.1); `Expect` too:
# this proxy answers 100-continue itself and sends upstream the whole body at once.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"}
)
SLOWDOWN, RESET, DROPPED_RESPONSE, DENIED = "slowdown", "reset", "dropped_response", "denied"


@dataclass(frozen=True)
class S3Request:
    """A request as the proxy sees it (path-style addressing: /bucket/key?query)."""

    method: str
    bucket: str
    key: str
    query: str

    @classmethod
    def parse(cls, method: str, target: str) -> S3Request:
        parts = urlsplit(target)
        bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
        return cls(method, bucket, key, parts.query)

    @property
    def is_write(self) -> bool:
        return self.method in ("PUT", "POST", "DELETE")


def writes_under(bucket: str, prefix: str = "") -> Callable[[S3Request], bool]:
    """Selects writes (PUT, POST, DELETE) to keys of `bucket` starting with `prefix`."""
    return lambda r: r.is_write and r.bucket == bucket and r.key.startswith(prefix)


def reads_of(bucket: str, key: str) -> Callable[[S3Request], bool]:
    """Selects GET and HEAD of one object (not listings of its bucket)."""
    return lambda r: r.method in ("GET", "HEAD") and (r.bucket, r.key) == (bucket, key)


def error_body(code: str, message: str, resource: str, request_id: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()


class FaultyS3:
    """The proxy; use as a context manager and point clients at `endpoint_url`."""

    def __init__(
        self,
        upstream_url: str,
        *,
        slowdown_every: int = 0,
        reset_every: int = 0,
        drop_response_every: int = 0,
        faulty: Callable[[S3Request], bool] | None = None,
        deny: Callable[[S3Request], bool] | None = None,
        conditional_writes: bool = True,
    ) -> None:
        upstream = urlsplit(upstream_url)
        if upstream.scheme != "http" or not upstream.hostname:
            raise ValueError(f"expected an http:// upstream, found {upstream_url!r}")
        self.upstream = (upstream.hostname, upstream.port or 80)
        self.slowdown_every = slowdown_every
        self.reset_every = reset_every
        self.drop_response_every = drop_response_every
        self.faulty = faulty or (lambda _: True)
        self.deny = deny or (lambda _: False)
        self.conditional_writes = conditional_writes
        self.requests: Counter[str] = Counter()  # by method, every request received
        self.faults: Counter[tuple[str, str]] = Counter()  # by (fault, method)
        self.log: list[tuple[str, str, str]] = []  # (method, path, outcome) in arrival order
        self._eligible: Counter[tuple[str, str]] = Counter()  # by (method, bucket), if `faulty`
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def storage_options(self) -> dict[str, str]:
        return {"endpoint_url": self.endpoint_url}

    def fault_count(self, kind: str, method: str | None = None) -> int:
        return sum(n for (k, m), n in self.faults.items() if k == kind and method in (None, m))

    def decide(self, request: S3Request) -> str | None:
        """The fault for this request, if any; counts it."""
        with self._lock:
            self.requests[request.method] += 1
            if self.deny(request):
                outcome: str | None = DENIED
            elif self.faulty(request):
                self._eligible[request.method, request.bucket] += 1
                nth = self._eligible[request.method, request.bucket]
                outcome = next(
                    (
                        kind
                        for kind, every in (
                            (RESET, self.reset_every),
                            (SLOWDOWN, self.slowdown_every),
                            (DROPPED_RESPONSE, self.drop_response_every),
                        )
                        if every and nth % every == 0
                    ),
                    None,
                )
            else:
                outcome = None
            if outcome:
                self.faults[outcome, request.method] += 1
            return outcome

    def record(self, method: str, path: str, outcome: str) -> None:
        with self._lock:
            self.log.append((method, path, outcome))

    def start(self) -> FaultyS3:
        proxy = self

        class Handler(ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="faulty-s3", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            open_connections, self._connections = list(self._connections), set()
        for connection in open_connections:  # keep-alive clients: nothing reaches upstream now
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None

    def __enter__(self) -> FaultyS3:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class ProxyHandler(BaseHTTPRequestHandler):
    owner: FaultyS3
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    timeout = 120  # an idle keep-alive connection is closed after this
    _upstream: http.client.HTTPConnection | None = None

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._connections.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):  # the socket may be gone: a reset
            super().finish()
        with self.owner._lock:
            self.owner._connections.discard(self.connection)
        if self._upstream is not None:
            self._upstream.close()

    def log_message(self, format: str, *args: object) -> None:
        pass  # the counters and `owner.log` say what happened

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _proxy(self) -> None:
        body = self._read_body()
        request = S3Request.parse(self.command, self.path)
        outcome = self.owner.decide(request)
        if outcome == DENIED:
            self._answer_error(403, "AccessDenied", "Access Denied", request)
        elif self._unsupported_condition(request):
            outcome = "not_implemented"
            self._answer_error(
                501,
                "NotImplemented",
                "A header you provided implies functionality that is not implemented",
                request,
            )
        elif outcome == SLOWDOWN:
            self._answer_error(503, "SlowDown", "Please reduce your request rate.", request)
        elif outcome == RESET:
            self._reset()
        else:
            status, reason, headers, content = self._forward(body)
            if outcome == DROPPED_RESPONSE:
                self._reset()
            else:
                self._relay(status, reason, headers, content)
        self.owner.record(self.command, self.path, outcome or "forwarded")

    def _unsupported_condition(self, request: S3Request) -> bool:
        conditions = {"if-match", "if-none-match"} & {name.lower() for name in self.headers}
        return request.is_write and bool(conditions) and not self.owner.conditional_writes

    def _read_body(self) -> bytes:
        """The request body as sent: Content-Length bytes, or the chunked framing unchanged."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()
            while True:
                size_line = self.rfile.readline(65537)
                raw += size_line
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailer fields, then the empty line that ends the body
                        line = self.rfile.readline(65537)
                        raw += line
                        if line in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += self.rfile.read(size + 2)  # the chunk and its CRLF
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the request upstream with its own headers (Host included); one retry on a
        connection upstream closed while idle."""
        for attempt in range(2):
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=120)
            try:
                self._upstream.putrequest(
                    self.command, self.path, skip_host=True, skip_accept_encoding=True
                )
                for name, value in self.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        self._upstream.putheader(name, value)
                self._upstream.endheaders(body or None)
                response = self._upstream.getresponse()
                content = response.read()
            except (http.client.RemoteDisconnected, ConnectionError):
                self._upstream.close()
                self._upstream = None
                if attempt:
                    raise
                continue
            if response.will_close:
                self._upstream.close()
                self._upstream = None
            return response.status, response.reason, response.getheaders(), content
        raise AssertionError("unreachable")

    def _relay(
        self, status: int, reason: str, headers: list[tuple[str, str]], content: bytes
    ) -> None:
        self.send_response_only(status, reason)
        bodiless = self.command == "HEAD" or status in (204, 304) or 100 <= status < 200
        for name, value in headers:
            lower = name.lower()
            if lower in HOP_BY_HOP or lower == "transfer-encoding":
                continue
            if lower == "content-length" and not bodiless:
                continue  # set below from the body as read (upstream may have sent it chunked)
            self.send_header(name, value)
        if not bodiless:
            self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if not bodiless:
            self.wfile.write(content)

    def _answer_error(self, status: int, code: str, message: str, request: S3Request) -> None:
        request_id = f"faulty-s3-{sum(self.owner.requests.values())}"
        resource = f"/{request.bucket}/{request.key}".rstrip("/")
        content = error_body(code, message, resource, request_id)
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    def _reset(self) -> None:
        """Abort the connection with a TCP RST, no response."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()
        self.rfile.close()  # the last reference to the socket: now it really closes (RST)
