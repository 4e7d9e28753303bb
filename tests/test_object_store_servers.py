"""The test-side object-store servers work as real servers: moto over HTTP, the fault proxy's
faults and latency, and the static file server's headers. Also pins how boto3 and s3fs surface
each fault, since storage code classifies those exceptions."""

from __future__ import annotations

import errno
import http.client
import importlib.util
import io
import os
import re
import socket
import sys
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.object_store import MOTO_AUTH, Bucket, FaultProxy, StaticServer

if importlib.util.find_spec("moto") is None:  # moto runs in a subprocess: no need to import it
    pytest.skip("moto is not installed", allow_module_level=True)
boto3 = pytest.importorskip("boto3")
s3fs = pytest.importorskip("s3fs")
from botocore.config import Config  # noqa: E402
from botocore.exceptions import (  # noqa: E402
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    HTTPClientError,
)

# python -X dev or PYTHONASYNCIODEBUG=1: aiohttp then parses responses strictly (not "lax").
AIOHTTP_STRICT = sys.flags.dev_mode or bool(os.environ.get("PYTHONASYNCIODEBUG"))
NO_RETRIES = Config(retries={"total_max_attempts": 1, "mode": "standard"})


def request(
    url: str,
    method: str = "GET",
    path: str = "/",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, lower-cased headers, body). It carries an
    Authorization header, which moto wants (and the static server ignores)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={**MOTO_AUTH, **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


@pytest.fixture
def proxy(s3: Bucket) -> Iterator[FaultProxy]:
    with FaultProxy(s3.endpoint) as server:
        yield server
        assert server.errors == []


def s3fs_through(proxy: FaultProxy, retries: int = 1) -> Any:
    """A fresh (uncached) s3fs filesystem aimed at the proxy. botocore's own retries are off
    (their backoff sleeps for seconds); s3fs's loop makes `retries` attempts."""
    fs = s3fs.S3FileSystem(
        endpoint_url=proxy.url,
        skip_instance_cache=True,
        config_kwargs={"retries": {"total_max_attempts": 1}},
    )
    fs.retries = retries  # a class attribute: the constructor passes unknown kwargs to aiobotocore
    return fs


def boto_through(proxy: FaultProxy) -> Any:
    return boto3.session.Session().client("s3", endpoint_url=proxy.url, config=NO_RETRIES)


# --------------------------------------------------------------------------- moto + s3 fixture


def test_bucket_put_get_keys_with_boto3(s3: Bucket) -> None:
    assert re.fullmatch(r"bs-[0-9a-f]{8}", s3.name)
    assert s3.url == f"s3://{s3.name}"
    assert s3.uri("/a/b.png") == f"s3://{s3.name}/a/b.png"
    for key in ["b/2.bin", "a/1.bin", "b/1.bin", "top.bin"]:
        s3.put(key, key.encode())
    assert s3.get("b/2.bin") == b"b/2.bin"
    assert s3.keys() == ["a/1.bin", "b/1.bin", "b/2.bin", "top.bin"]
    assert s3.keys("b/") == ["b/1.bin", "b/2.bin"]
    assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint


def test_keys_paginates(s3: Bucket) -> None:
    for i in range(7):
        s3.put(f"many/{i}", b"")
    assert s3.keys("many/", page_size=2) == [f"many/{i}" for i in range(7)]


@pytest.mark.xfail(
    AIOHTTP_STRICT,
    reason="moto sends two Server fields; aiohttp's strict (debug-mode) parser rejects that",
    raises=HTTPClientError,
    strict=True,
)
def test_s3fs_finds_moto_from_the_environment_alone(s3: Bucket) -> None:
    fs = s3fs.S3FileSystem()  # endpoint and credentials come from the env the fixture set
    fs.pipe(f"{s3.name}/dir/x.txt", b"via s3fs")
    assert fs.cat(f"{s3.name}/dir/x.txt") == b"via s3fs"
    assert fs.ls(f"{s3.name}/dir") == [f"{s3.name}/dir/x.txt"]
    assert s3.get("dir/x.txt") == b"via s3fs"


def test_each_test_gets_a_new_bucket(s3: Bucket) -> None:
    assert s3.keys() == []


# --------------------------------------------------------------------------- proxy pass-through


def test_proxy_passes_s3fs_writes_lists_and_reads(s3: Bucket, proxy: FaultProxy) -> None:
    fs = s3fs_through(proxy)
    big = os.urandom(6 * 2**20)  # above s3fs's 5 MiB block: a multipart upload
    fs.pipe(f"{s3.name}/p/small.txt", b"small")
    with fs.open(f"{s3.name}/p/big.bin", "wb", block_size=5 * 2**20) as f:
        f.write(big)
    assert fs.ls(f"{s3.name}/p", detail=False) == [f"{s3.name}/p/big.bin", f"{s3.name}/p/small.txt"]
    assert fs.cat(f"{s3.name}/p/small.txt") == b"small"
    fs.invalidate_cache()  # else info() answers from the listing, with no HEAD
    assert fs.info(f"{s3.name}/p/big.bin")["size"] == len(big)
    with fs.open(f"{s3.name}/p/big.bin", "rb") as f:
        f.seek(3 * 2**20)
        assert f.read(1000) == big[3 * 2**20 : 3 * 2**20 + 1000]
    assert s3.get("p/big.bin") == big
    methods = {method for method, _ in proxy.requests}
    assert {"PUT", "POST", "GET", "HEAD"} <= methods
    assert proxy.count("uploads", "POST") >= 1


def test_proxy_forwards_query_headers_and_chunked_bodies(s3: Bucket, proxy: FaultProxy) -> None:
    s3.put("q/a", b"1")
    s3.put("q/b", b"2")
    status, _, body = request(proxy.url, path=f"/{s3.name}?list-type=2&prefix=q%2F&max-keys=1")
    assert status == 200
    assert body.count(b"<Key>") == 1
    assert b"<IsTruncated>true</IsTruncated>" in body

    parts = urllib.parse.urlsplit(proxy.url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:  # chunked upload, then a HEAD on the same keep-alive connection
        conn.request(
            "PUT",
            f"/{s3.name}/q/chunked",
            body=iter([b"ab", b"cd"]),
            headers=MOTO_AUTH,
            encode_chunked=True,
        )
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        conn.request("HEAD", f"/{s3.name}/q/chunked", headers=MOTO_AUTH)
        response = conn.getresponse()
        assert response.read() == b""
        assert response.getheader("Content-Length") == "4"
        assert response.getheader("ETag")
    finally:
        conn.close()
    assert s3.get("q/chunked") == b"abcd"


def test_proxy_passes_boto3_puts_that_expect_100_continue(s3: Bucket, proxy: FaultProxy) -> None:
    data = os.urandom(2 * 2**20)
    client = boto_through(proxy)
    try:  # botocore sends "Expect: 100-continue" with any file-like body
        client.put_object(Bucket=s3.name, Key="e/big", Body=io.BytesIO(data))
        assert client.get_object(Bucket=s3.name, Key="e/big")["Body"].read() == data
    finally:
        client.close()
    assert s3.get("e/big") == data


def test_proxy_works_in_front_of_any_http_server(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_bytes(b"static")
    with StaticServer(tmp_path) as static, FaultProxy(static.url) as proxy:
        assert request(proxy.url, path="/f.txt")[2] == b"static"
        status, headers, body = request(proxy.url, "HEAD", "/f.txt")
        assert (status, headers["content-length"], body) == (200, "6", b"")
        assert request(proxy.url, path="/nope")[0] == 404
        assert static.requests == [("GET", "/f.txt"), ("HEAD", "/f.txt"), ("GET", "/nope")]


# --------------------------------------------------------------------------- faults


def test_slowdown_is_sent_times_then_requests_pass(s3: Bucket, proxy: FaultProxy) -> None:
    s3.put("k", b"payload")
    fault = proxy.add_fault("/k", "slowdown", times=2)
    parts = urllib.parse.urlsplit(proxy.url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:  # one keep-alive connection: error replies must keep it usable
        for _ in range(2):
            conn.request("GET", f"/{s3.name}/k", headers=MOTO_AUTH)
            response = conn.getresponse()
            body = response.read()
            assert response.status == 503
            assert response.getheader("Content-Type") == "application/xml"
            assert b"<Code>SlowDown</Code>" in body
            assert b"<Message>Please reduce your request rate.</Message>" in body
        conn.request("GET", f"/{s3.name}/k", headers=MOTO_AUTH)
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"payload")
    finally:
        conn.close()
    assert (fault.hits, fault.times) == (2, 0)
    assert proxy.count("/k", "GET") == 3

    proxy.add_fault("/k", "slowdown", times=1)
    client = boto_through(proxy)
    try:
        with pytest.raises(ClientError) as caught:
            client.get_object(Bucket=s3.name, Key="k")
        assert caught.value.response["Error"]["Code"] == "SlowDown"
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert client.get_object(Bucket=s3.name, Key="k")["Body"].read() == b"payload"
    finally:
        client.close()


def test_s3fs_retries_slowdown_until_it_passes(s3: Bucket, proxy: FaultProxy) -> None:
    s3.put("k", b"payload")
    proxy.add_fault("/k", "slowdown", times=2, method="GET")
    fs = s3fs_through(proxy, retries=5)
    assert fs.cat_file(f"{s3.name}/k") == b"payload"
    assert proxy.count("/k", "GET") == 3


def test_forbidden_gives_403_and_permission_error(s3: Bucket, proxy: FaultProxy) -> None:
    s3.put("secret", b"x")
    proxy.add_fault("/secret", "forbidden", times=-1)
    status, headers, body = request(proxy.url, path=f"/{s3.name}/secret")
    assert status == 403
    assert b"<Code>AccessDenied</Code>" in body
    assert int(headers["content-length"]) == len(body)
    status, headers, body = request(proxy.url, "HEAD", f"/{s3.name}/secret")
    assert (status, body) == (403, b"")  # S3 sends HEAD errors without a body

    client = boto_through(proxy)
    try:
        with pytest.raises(ClientError) as caught:
            client.get_object(Bucket=s3.name, Key="secret")
        assert caught.value.response["Error"]["Code"] == "AccessDenied"
        with pytest.raises(ClientError) as caught:
            client.head_object(Bucket=s3.name, Key="secret")
        assert caught.value.response["Error"]["Code"] == "403"  # no body, so no S3 code
    finally:
        client.close()

    fs = s3fs_through(proxy)
    with pytest.raises(PermissionError):
        fs.cat_file(f"{s3.name}/secret")
    with pytest.raises(PermissionError):
        fs.info(f"{s3.name}/secret")
    with pytest.raises(PermissionError):
        fs.pipe_file(f"{s3.name}/secret", b"y")
    assert proxy.count("/secret") == 7  # forever: every request was refused


def test_missing_key_through_proxy(s3: Bucket, proxy: FaultProxy) -> None:
    fs = s3fs_through(proxy)
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{s3.name}/missing")
    with pytest.raises(FileNotFoundError):
        fs.info(f"{s3.name}/missing")


def test_fault_method_filter(s3: Bucket, proxy: FaultProxy) -> None:
    s3.put("m", b"m")
    proxy.add_fault("/m", "forbidden", times=-1, method="head")
    assert request(proxy.url, "HEAD", f"/{s3.name}/m")[0] == 403
    assert request(proxy.url, "GET", f"/{s3.name}/m")[0] == 200
    with pytest.raises(ValueError, match="unknown fault kind"):
        proxy.add_fault("/m", "explode", times=1)


def test_reset_aborts_the_connection_then_passes(s3: Bucket, proxy: FaultProxy) -> None:
    s3.put("r", b"ok")
    proxy.add_fault("/r", "reset", times=1)
    with pytest.raises(ConnectionResetError) as caught:
        request(proxy.url, path=f"/{s3.name}/r")
    assert caught.value.errno == errno.ECONNRESET  # a real RST, not a clean close
    assert not isinstance(caught.value, http.client.RemoteDisconnected)
    assert request(proxy.url, path=f"/{s3.name}/r")[2] == b"ok"

    proxy.add_fault("/r", "reset", times=-1)
    client = boto_through(proxy)
    try:
        with pytest.raises(ConnectionClosedError):
            client.get_object(Bucket=s3.name, Key="r")
    finally:
        client.close()
    with pytest.raises(EndpointConnectionError) as raised:
        s3fs_through(proxy).cat_file(f"{s3.name}/r")
    assert raised.value.kwargs["error"].errno == errno.ECONNRESET  # aiohttp.ClientOSError


def test_disconnect_closes_without_a_reply(s3: Bucket, proxy: FaultProxy) -> None:
    s3.put("d", b"ok")
    proxy.add_fault("/d", "disconnect", times=1)
    with pytest.raises(http.client.RemoteDisconnected):
        request(proxy.url, path=f"/{s3.name}/d")
    proxy.add_fault("/d", "disconnect", times=-1)
    with pytest.raises(ConnectionClosedError):
        s3fs_through(proxy).cat_file(f"{s3.name}/d")


def test_timeout_stalls_then_resets_and_close_does_not_wait(s3: Bucket) -> None:
    s3.put("t", b"ok")
    proxy = FaultProxy(s3.endpoint)
    try:
        proxy.add_fault("/t", "timeout", times=-1, delay_s=30)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            request(proxy.url, path=f"/{s3.name}/t", timeout=0.3)
        assert time.monotonic() - start < 2
    finally:
        start = time.monotonic()
        proxy.close()  # the handler is still asleep in its 30 s stall
        assert time.monotonic() - start < 2
    proxy.close()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        request(proxy.url, timeout=1)


def test_latency_delays_requests_in_parallel(s3: Bucket, proxy: FaultProxy) -> None:
    s3.put("lat", b"L")
    proxy.latency_s = 0.2
    assert proxy.latency_s == 0.2
    start = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: request(proxy.url, path=f"/{s3.name}/lat"), range(20)))
    elapsed = time.monotonic() - start
    assert [(status, body) for status, _, body in results] == [(200, b"L")] * 20
    assert 0.2 <= elapsed < 1.5, elapsed
    proxy.latency_s = 0
    start = time.monotonic()
    request(proxy.url, path=f"/{s3.name}/lat")
    assert time.monotonic() - start < 0.2


# --------------------------------------------------------------------------- static server


def test_static_server_get_head_404_and_validators(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    photo = tmp_path / "sub" / "a b.png"
    photo.write_bytes(b"0123456789")
    (tmp_path.parent / "outside.txt").write_bytes(b"secret")
    with StaticServer(tmp_path) as server:
        assert server.url_for("sub/a b.png") == f"{server.url}/sub/a%20b.png"
        status, headers, body = request(server.url, path="/sub/a%20b.png")
        assert (status, body) == (200, b"0123456789")
        assert headers["content-length"] == "10"
        assert headers["content-type"] == "image/png"
        assert re.fullmatch(r'"[0-9a-f]+-[0-9a-f]+"', headers["etag"])
        assert headers["last-modified"].endswith(" GMT")
        etag = headers["etag"]

        status, headers, body = request(server.url, "HEAD", "/sub/a%20b.png")
        assert (status, body, headers["content-length"], headers["etag"]) == (200, b"", "10", etag)

        status, headers, body = request(
            server.url, path="/sub/a%20b.png", headers={"Range": "bytes=2-4"}
        )
        assert (status, body, headers["content-range"]) == (206, b"234", "bytes 2-4/10")
        assert (
            request(server.url, path="/sub/a%20b.png", headers={"Range": "bytes=-3"})[2] == b"789"
        )
        assert request(server.url, path="/sub/a%20b.png", headers={"Range": "bytes=20-"})[0] == 416

        for missing in [
            "/nope.png",
            "/sub",
            "/sub/",
            "/../outside.txt",
            "/sub/%2e%2e/../outside.txt",
        ]:
            assert request(server.url, path=missing)[0] == 404, missing
        status, _, body = request(server.url, "HEAD", "/nope.png")
        assert (status, body) == (404, b"")
        assert request(server.url, "PUT", "/sub/a%20b.png", body=b"x")[0] == 405

        photo.write_bytes(b"changed, and longer")
        status, headers, _ = request(server.url, "HEAD", "/sub/a%20b.png")
        assert headers["etag"] != etag
        assert server.count("a%20b.png", "GET") == 4
        assert server.errors == []


def test_static_server_keeps_connections_alive(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"x" * 100)
    with StaticServer(tmp_path) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            for path in ["/x", "/missing", "/x"]:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
            assert response.status == 200
            assert conn.sock is not None  # still the first connection
            local = conn.sock.getsockname()
            conn.request("HEAD", "/x")
            conn.getresponse().read()
            assert conn.sock.getsockname() == local
        finally:
            conn.close()
        with pytest.raises(NotADirectoryError):
            StaticServer(tmp_path / "x")


def test_close_ends_idle_keep_alive_connections(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"x")
    server = StaticServer(tmp_path)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    with sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
        reply = b""
        while not reply.endswith(b"\r\n\r\nx"):
            reply += sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        server.close()
        assert time.monotonic() - start < 2
        assert sock.recv(4096) == b""  # the server ended the idle connection
