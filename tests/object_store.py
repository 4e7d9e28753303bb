"""Real local servers for object-storage tests: moto's S3, a fault-injecting proxy, static HTTP.

Nothing here mocks a client library: tests talk HTTP to processes and threads bound to
127.0.0.1 on ports the OS picks, so boto3, s3fs and plain HTTP clients run their real code
paths (signing, retries, connection pools) without ever reaching the internet.

- `moto_endpoint` (session fixture): a `python -m moto.server` subprocess, its URL.
- `s3` (function fixture): AWS env pointed at that server and a fresh, uniquely named bucket.
- `FaultProxy`: a reverse proxy that adds latency, S3 error replies and connection resets.
- `StaticServer`: a read-only HTTP file server with Content-Length, ETag, Last-Modified, Range.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import http.client
import importlib.util
import mimetypes
import os
import re
import shutil
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, TypeVar

import pytest

LOOPBACK = "127.0.0.1"

# RFC 9110 7.6.1 hop-by-hop fields, plus Expect: the proxy answers 100-continue itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)

FAULT_KINDS = ("slowdown", "forbidden", "reset", "timeout", "disconnect", "lost")

# Real S3 error replies, so clients run their actual error parsing and retry classification.
S3_ERRORS: dict[str, tuple[int, str, str, str]] = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "forbidden": (403, "Forbidden", "AccessDenied", "Access Denied"),
}


# Moto only checks that object requests carry *some* Authorization header (it does not verify
# signatures); a raw request without one gets 403 with an empty body on a private object.
MOTO_AUTH = {
    "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/s3/aws4_request, "
    "SignedHeaders=host, Signature=0"
}


def free_port() -> int:
    """A port the OS just handed out on loopback (for servers that must be told one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def s3_error_xml(code: str, message: str, request_id: str = "") -> bytes:
    """The XML body S3 sends with an error status (botocore reads Code and Message from it)."""
    request_id = request_id or uuid.uuid4().hex[:16].upper()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<RequestId>{request_id}</RequestId><HostId>{request_id}</HostId></Error>"
    ).encode()


def _answers_http(url: str, timeout: float = 1.0) -> bool:
    """Whether anything at `url` sends back an HTTP status line (any status will do)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or LOOPBACK, parts.port, timeout=timeout)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
    return True


# --------------------------------------------------------------------------- moto server


class MotoServer:
    """`python -m moto.server` in a subprocess: a real HTTP S3 endpoint, not in-process patching,
    so aiobotocore (s3fs) and botocore clients in any thread or event loop can reach it."""

    def __init__(self, log_dir: Path, startup_timeout_s: float = 20.0) -> None:
        self.log_dir = Path(log_dir)
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / "moto-server.log"

    def start(self) -> str:
        """Start the server and wait until it answers HTTP; returns its URL.

        The port comes from the OS but is free only until moto binds it, so a lost race is
        retried with a new port rather than failing the session."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):
            self.port = free_port()
            if self._spawn_and_wait():
                return self.url
            self.stop()
        log = self.log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"moto server did not start on {LOOPBACK}; its log:\n{log}")

    def _spawn_and_wait(self) -> bool:
        # The log is a file, not a pipe: a pipe nobody reads fills up and blocks the server.
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_moto_env(),
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # exited: port taken, or moto is broken (the log says which)
            if _answers_http(self.url, timeout=0.5):
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """Terminate; kill if it ignores SIGTERM for 5 s. Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _moto_env() -> dict[str, str]:
    """The child's environment, minus AWS settings of the developer's that moto might read."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of one moto S3 server shared by the session (buckets keep tests apart)."""
    if importlib.util.find_spec("moto") is None:
        pytest.skip("moto is not installed")
    with MotoServer(tmp_path_factory.mktemp("moto")) as server:
        yield server.url


# --------------------------------------------------------------------------- s3 bucket


@dataclass
class Store:
    """A bucket or container the tests made, named by its URL."""

    name: str
    scheme: ClassVar[str]

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.name}"

    def uri(self, key: str) -> str:
        """`scheme://name/key` for one object."""
        return f"{self.url}/{key.lstrip('/')}"


@dataclass
class Bucket(Store):
    """A fresh bucket on the moto server, with the few helpers tests need to seed and check it."""

    scheme: ClassVar[str] = "s3"
    endpoint: str
    client: Any  # boto3 S3 client bound to `endpoint`

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        body = self.client.get_object(Bucket=self.name, Key=key)["Body"]
        with contextlib.closing(body):
            data: bytes = body.read()
        return data

    def keys(self, prefix: str = "", page_size: int = 1000) -> list[str]:
        """Every key under `prefix`, sorted (paginated, so past 1000 keys too)."""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.name, Prefix=prefix, PaginationConfig={"PageSize": page_size}
        )
        found: list[str] = []
        for page in pages:
            found.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(found)


AWS_ENV_UNSET = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",  # would win over AWS_ENDPOINT_URL for S3 clients
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CA_BUNDLE",
)


def _clear_s3fs_cache() -> None:
    """s3fs caches filesystem instances by their arguments, not by env: a cached one would keep
    the previous test's endpoint and credentials."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bucket]:
    """AWS env aimed at moto with dummy credentials, and a new bucket named `bs-<8 hex>`."""
    boto3 = pytest.importorskip("boto3")

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # No developer config or instance metadata lookups can leak in.
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in AWS_ENV_UNSET:
        monkeypatch.delenv(name, raising=False)
    _clear_s3fs_cache()

    client = boto3.session.Session().client("s3", endpoint_url=moto_endpoint)
    bucket = Bucket(name=f"bs-{uuid.uuid4().hex[:8]}", endpoint=moto_endpoint, client=client)
    client.create_bucket(Bucket=bucket.name)
    try:
        yield bucket
    finally:
        client.close()
        _clear_s3fs_cache()


# --------------------------------------------------------------------------- shared server


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that tracks its connections, so close() can end keep-alive ones."""

    daemon_threads = True
    request_queue_size = 128  # the default 5 drops SYNs when 20 clients connect at once

    def __init__(self, handler: type[BaseHTTPRequestHandler], owner: _ThreadedServer) -> None:
        self.owner = owner
        self._lock = threading.Lock()
        self._live: set[threading.Thread] = set()
        self._sockets: set[socket.socket] = set()
        super().__init__((LOOPBACK, 0), handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup that can stall offline.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._run, args=(request, client_address), daemon=True, name="test-http"
        )
        with self._lock:
            self._live.add(thread)
            self._sockets.add(request)
        thread.start()

    def _run(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._live.discard(threading.current_thread())
                self._sockets.discard(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up is normal here (resets, timeouts); anything else is recorded."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)) or (
            isinstance(exc, OSError) and exc.errno in {errno.EBADF, errno.ENOTCONN}
        ):
            return
        with self.owner._lock:
            self.owner._errors.append(traceback.format_exc())

    def close_all(self, timeout_s: float) -> None:
        """Shut the listening socket, then every open connection, then join handler threads."""
        self.shutdown()
        self.server_close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._live)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


_S = TypeVar("_S", bound="_ThreadedServer")


class _ThreadedServer:
    """Start/stop plumbing shared by FaultProxy and StaticServer."""

    handler: ClassVar[type[BaseHTTPRequestHandler]]

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._requests: list[tuple[str, str]] = []
        self._errors: list[str] = []
        self._server = _Server(self.handler, self)
        self.port: int = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path with query) of every request received, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def errors(self) -> list[str]:
        """Tracebacks of unexpected handler errors (client disconnects are not errors)."""
        with self._lock:
            return list(self._errors)

    def count(self, match: str = "", method: str | None = None) -> int:
        """How many requests had `match` in their path (and `method`, if given)."""
        return sum(
            1 for m, p in self.requests if match in p and (method is None or m == method.upper())
        )

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self._requests.append((method, path))

    def close(self) -> None:
        """Stop serving and end open connections; sleeping handlers wake up. Idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._server.close_all(timeout_s=5.0)
        self._thread.join(5.0)

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 handler with quiet logs and body reading that keeps keep-alive in sync."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def read_body(self) -> bytes:
        """The whole request body: Content-Length or chunked (every byte must be consumed, or
        the next request on this connection would start mid-body)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailer fields
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send_bytes(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        reason: str = "",
        length: int | None = None,
    ) -> None:
        """A complete response with Content-Length (`length` if given, for HEAD, else the
        body's); HEAD gets the headers only."""
        self.send_response(status, reason or None)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and status >= 200 and status not in {204, 304}:
            self.wfile.write(body)

    def reset_connection(self) -> None:
        """Abort the TCP connection with RST (SO_LINGER 0), no response at all, like a dying
        load balancer. The fd is detached and closed here so the stdlib cannot send a FIN first."""
        self.close_connection = True
        sock: socket.socket = self.connection
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            socket.socket(fileno=sock.detach()).close()


# --------------------------------------------------------------------------- fault proxy


@dataclass
class Fault:
    """One injected failure: requests whose path contains `match` (and whose method is
    `method`, if set) get `kind` instead of the upstream reply, `times` times (-1: forever)."""

    match: str
    kind: str
    times: int
    method: str | None = None
    delay_s: float = 10.0
    hits: int = field(default=0)

    def applies(self, method: str, path: str) -> bool:
        return (
            self.times != 0
            and self.match in path
            and (self.method is None or self.method.upper() == method)
        )


class _ProxyHandler(_Handler):
    server: _Server

    def do_GET(self) -> None:
        self.handle_proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def handle_proxy(self) -> None:
        proxy: FaultProxy = self.server.owner  # type: ignore[assignment]
        body = self.read_body()
        proxy._record(self.command, self.path)
        latency = proxy.latency_s
        if latency > 0:
            proxy._closing.wait(latency)  # per handler thread: parallel requests overlap
        fault = proxy._take_fault(self.command, self.path)
        if fault is None:
            self.forward(proxy, body)
        elif fault.kind == "lost":  # the request lands upstream; its answer never comes back
            self.forward(proxy, body, relay=False)
            self.reset_connection()
        elif fault.kind in S3_ERRORS:
            status, reason, code, message = S3_ERRORS[fault.kind]
            self.send_bytes(
                status,
                s3_error_xml(code, message),
                {"Content-Type": "application/xml", "x-amz-request-id": "FAULTPROXY"},
                reason,
            )
        elif fault.kind == "disconnect":
            self.close_connection = True  # the stdlib then sends FIN: EOF instead of a reply
        else:
            if fault.kind == "timeout":
                proxy._closing.wait(fault.delay_s)
            self.reset_connection()

    def forward(self, proxy: FaultProxy, body: bytes, *, relay: bool = True) -> None:
        """Replay the request upstream on a fresh connection and relay the reply, whole
        (or drop it, `relay=False`)."""
        listed = {
            token.strip().lower()
            for value in self.headers.get_all("Connection", [])
            for token in value.split(",")
        }
        skip = HOP_BY_HOP | listed | {"content-length"}
        has_body = bool(body) or "Content-Length" in self.headers or self.command in {"PUT", "POST"}
        conn = http.client.HTTPConnection(
            proxy.upstream_host, proxy.upstream_port, timeout=proxy.upstream_timeout_s
        )
        try:
            conn.putrequest(
                self.command,
                proxy.upstream_prefix + self.path,
                skip_host="Host" in self.headers,
                skip_accept_encoding=True,
            )
            for name, value in self.headers.items():
                if name.lower() not in skip:
                    conn.putheader(name, value)
            if has_body:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body if has_body else None)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.send_bytes(502, f"upstream failed: {exc!r}".encode(), reason="Bad Gateway")
            return
        finally:
            conn.close()
        if not relay:
            return
        self.send_response_only(response.status, response.reason)
        for name, value in _relayable(response.getheaders()):
            self.send_header(name, value)
        no_body = self.command == "HEAD" or response.status < 200 or response.status in {204, 304}
        if no_body:
            length = response.getheader("Content-Length")
            if length is not None:
                self.send_header("Content-Length", length)
        else:
            self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not no_body:
            self.wfile.write(data)


# Fields that may appear once. Moto sends Server twice (Werkzeug's and "amazon.com"), which
# aiohttp's strict parser (python -X dev, PYTHONASYNCIODEBUG=1) rejects as a bad message.
SINGLETON_FIELDS = frozenset(
    {"content-location", "content-range", "content-type", "etag", "server", "max-forwards"}
)


def _relayable(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Upstream response fields minus hop-by-hop ones and Content-Length (set by the proxy),
    with one copy of each singleton field (the last, as the app's own comes after the server's)."""
    kept = [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP | {"content-length"}]
    last = {n.lower(): i for i, (n, _) in enumerate(kept) if n.lower() in SINGLETON_FIELDS}
    return [(n, v) for i, (n, v) in enumerate(kept) if last.get(n.lower(), i) == i]


class FaultProxy(_ThreadedServer):
    """A reverse proxy in front of moto (or any HTTP server) that injects the failures real
    object stores produce: latency, 503 SlowDown, 403 AccessDenied, resets and stalls.

    Requests are buffered whole, forwarded with their path, query, headers (hop-by-hop ones
    dropped, Host kept as sent, so signatures stay valid) and body, and answered with the
    upstream status, headers and body. Each client connection has its own handler thread.
    """

    handler = _ProxyHandler

    def __init__(
        self, upstream: str, *, latency_s: float = 0.0, upstream_timeout_s: float = 60.0
    ) -> None:
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        self.upstream = upstream
        self.upstream_host: str = parts.hostname
        self.upstream_port: int = parts.port or 80
        self.upstream_prefix = parts.path.rstrip("/")
        self.upstream_timeout_s = upstream_timeout_s
        self._latency_s = latency_s
        self._faults: list[Fault] = []
        super().__init__()

    @property
    def latency_s(self) -> float:
        """Seconds each request waits before it is forwarded (or faulted)."""
        with self._lock:
            return self._latency_s

    @latency_s.setter
    def latency_s(self, value: float) -> None:
        with self._lock:
            self._latency_s = float(value)

    def add_fault(
        self,
        match: str,
        kind: str,
        times: int = 1,
        *,
        method: str | None = None,
        delay_s: float = 10.0,
    ) -> Fault:
        """Fail the next `times` requests (-1: all) whose path+query contains `match`.

        kind: "slowdown" (503 SlowDown XML), "forbidden" (403 AccessDenied XML), "reset" (TCP
        RST, no reply), "timeout" (no reply for `delay_s`, then RST), "disconnect" (clean FIN,
        no reply: clients raise a different exception than for a reset), "lost" (forwarded:
        the write lands upstream, then RST instead of its reply). HEAD gets the error
        status without a body, as from S3. Faults are checked in the order added; the first
        that applies is used up."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        if times < -1:
            raise ValueError("times must be -1 (forever) or >= 0")
        fault = Fault(match, kind, times, method.upper() if method else None, delay_s)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.applies(method, path):
                    fault.hits += 1
                    if fault.times > 0:
                        fault.times -= 1
                    return fault
        return None


# --------------------------------------------------------------------------- static server

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _StaticHandler(_Handler):
    server: _Server

    def do_GET(self) -> None:
        owner: StaticServer = self.server.owner  # type: ignore[assignment]
        owner._record(self.command, self.path)
        path = owner.resolve(self.path)
        if path is None:
            self.send_bytes(404, b"not found\n", {"Content-Type": "text/plain"})
            return
        stat = path.stat()
        size = stat.st_size
        headers = {
            "Content-Type": mimetypes.guess_type(path.name)[0] or "application/octet-stream",
            "ETag": f'"{size:x}-{stat.st_mtime_ns:x}"',
            "Last-Modified": email.utils.formatdate(stat.st_mtime, usegmt=True),
            "Accept-Ranges": "bytes",
        }
        span = _byte_range(self.headers.get("Range", ""), size)
        if span == "unsatisfiable":
            headers["Content-Range"] = f"bytes */{size}"
            self.send_bytes(416, b"", headers)
            return
        data = path.read_bytes() if self.command == "GET" else b""
        if span is None:
            self.send_bytes(200, data, headers, length=size)
            return
        start, end = span
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self.send_bytes(206, data[start : end + 1], headers, length=end - start + 1)

    do_HEAD = do_GET

    def do_PUT(self) -> None:
        self.read_body()
        self.server.owner._record(self.command, self.path)
        self.send_bytes(405, b"read-only\n", {"Allow": "GET, HEAD", "Content-Type": "text/plain"})

    do_POST = do_DELETE = do_PATCH = do_PUT


def _byte_range(header: str, size: int) -> tuple[int, int] | str | None:
    """A single `bytes=` range as inclusive (start, end); None to send the whole file (no or
    multi-range header, which RFC 9110 lets a server ignore); "unsatisfiable" for 416."""
    found = _RANGE.match(header.strip())
    if not found:
        return None
    first, last = found.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        length = int(last)
        if length == 0:
            return "unsatisfiable"
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        return "unsatisfiable"
    return start, end


class StaticServer(_ThreadedServer):
    """Serves `root` read-only over plain HTTP on loopback: the stand-in for https:// sources.

    GET and HEAD with Content-Length, ETag (size+mtime), Last-Modified and single byte ranges
    (fsspec's HTTP files read in ranges); 404 for anything missing, a folder, or outside root;
    405 for writes. No directory listings."""

    handler = _StaticHandler

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(str(self.root))
        super().__init__()

    def url_for(self, relative: str) -> str:
        """URL of a file under root (path segments percent-encoded)."""
        return f"{self.url}/{urllib.parse.quote(relative.lstrip('/'))}"

    def resolve(self, request_path: str) -> Path | None:
        """The file a request path names, or None (missing, a folder, or escaping root)."""
        raw = urllib.parse.unquote(urllib.parse.urlsplit(request_path).path)
        parts = [part for part in raw.split("/") if part]
        if any(part in {".", ".."} or "\x00" in part for part in parts):
            return None
        candidate = self.root.joinpath(*parts).resolve()
        if not candidate.is_relative_to(self.root) or not candidate.is_file():
            return None
        return candidate


# --------------------------------------------------------------------------- azure (Azurite)

# Azurite's documented development account: a public, well-known key, not a secret.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


@pytest.fixture(scope="session")
def azurite_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Azurite's blob service (npm's `azurite`, installed by .ci/run) on a loopback port."""
    program = shutil.which("azurite-blob")
    if program is None or importlib.util.find_spec("adlfs") is None:
        if os.environ.get("CI"):
            pytest.fail("azurite-blob or adlfs is missing: .ci/run installs both")
        pytest.skip("azurite-blob (npm install -g azurite) or adlfs is not installed")
    folder = tmp_path_factory.mktemp("azurite")
    port = free_port()
    with open(folder / "azurite.log", "wb") as log:
        process = subprocess.Popen(
            [
                program, "--blobHost", LOOPBACK, "--blobPort", str(port),
                "--location", str(folder), "--silent", "--skipApiVersionCheck",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + 30
        while not _answers_http(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"azurite did not start: {(folder / 'azurite.log').read_text()}")
            time.sleep(0.1)
        yield f"{url}/{AZURITE_ACCOUNT}"
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Container(Store):
    """A fresh blob container on Azurite, seeded and checked through adlfs."""

    scheme: ClassVar[str] = "az"
    fs: Any

    def put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(f"{self.name}/{key}", data)

    def keys(self, prefix: str = "") -> list[str]:
        found = self.fs.find(f"{self.name}/{prefix}")
        return sorted(name.split("/", 1)[1] for name in found)


@pytest.fixture
def azure(azurite_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Container]:
    """AZURE_STORAGE_CONNECTION_STRING aimed at Azurite, and a new container `bs-<8 hex>`."""
    import adlfs

    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING",
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
        f"AccountKey={AZURITE_KEY};BlobEndpoint={azurite_endpoint};",
    )
    adlfs.AzureBlobFileSystem.clear_instance_cache()
    fs = adlfs.AzureBlobFileSystem()
    name = f"bs-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    yield Container(name, fs)
    adlfs.AzureBlobFileSystem.clear_instance_cache()
