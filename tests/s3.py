"""A real S3 API on loopback for tests: moto's S3 server, and a fault-injecting proxy in front of it.

    server = S3Server()                  # moto on 127.0.0.1:<free port>, bucket created
    proxy = FaultProxy(server.address)   # forwards every request, or answers with an injected fault
    proxy.fail("GET", r"/in/part-0001", times=4)   # the next 4 matching GETs get `503 SlowDown`
    proxy.fail("PUT", r"/_delta_log/", times=1, lost=True)   # applied by the server, then answered 503
    uri = proxy.uri("in/")               # "s3://bucket/in/?endpoint_override=127.0.0.1:PORT&scheme=http"

The fixtures `s3_server` (session) and `s3` (a fresh proxy per test, faults cleared) set dummy AWS
credentials in `os.environ` before any Ray started in the same test module, so the workers of an
embedded Ray inherit them; teardown restores the environment and stops exactly what was started.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import random
import re
import socket
import struct
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.fs as pafs
import pytest

BUCKET = "batch-infer-test"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance-metadata lookup
}
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class S3Server:
    """moto's S3 server on 127.0.0.1 (a free port), with one bucket."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.address: tuple[str, int] = self._server.get_host_and_port()
        self.filesystem().create_dir(BUCKET)

    @property
    def endpoint(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def filesystem(self) -> pafs.S3FileSystem:
        """A pyarrow client talking to the server directly (no faults), for setting up and checking."""
        return pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", allow_bucket_creation=True,
                                 access_key=AWS_ENV["AWS_ACCESS_KEY_ID"], secret_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                                 region="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under `prefix` (directory markers left out), sorted."""
        selector = pafs.FileSelector(f"{BUCKET}/{prefix}".rstrip("/"), recursive=True, allow_not_found=True)
        infos = self.filesystem().get_file_info(selector)
        return sorted(i.path[len(BUCKET) + 1:] for i in infos if i.type == pafs.FileType.File)

    def stop(self) -> None:
        self._server.stop()


@dataclasses.dataclass
class Fault:
    """Requests matching `method` and the `path` regex get `status`/`code` (or a TCP reset) instead of an answer."""

    method: str | None  # None: any method
    path: re.Pattern[str]  # searched in the request path ("/bucket/key?query")
    header: tuple[str, re.Pattern[str]] | None  # (name, regex searched in its value), e.g. ("Range", "^bytes=4-")
    times: int | None  # how many matching requests fail; None: every one (subject to `fraction`)
    fraction: float
    status: int
    code: str
    reset: bool  # drop the connection (RST) instead of answering
    hits: int = 0
    stall: threading.Event | None = None  # hold the request until this is set, then forward it
    lost: bool = False  # forward the request (the server applies it), then answer with the fault instead


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int  # what the client got (0 for a reset)
    injected: bool
    range: str = ""  # the Range header, if any


class FaultProxy:
    """A reverse proxy on 127.0.0.1 in front of an S3 endpoint that injects S3 errors on demand.

    Point a client's `endpoint_override` at it (`uri()` builds such URIs). Every request is
    forwarded and logged in `requests`, unless a fault added with `fail()` claims it.
    """

    def __init__(self, upstream: tuple[str, int], *, seed: int = 0) -> None:
        self.upstream = upstream
        self.requests: list[Request] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._server = _QuietServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="s3-fault-proxy",
                                        daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uri(self, key: str) -> str:
        """`s3://BUCKET/key` with the filesystem options that route it through this proxy."""
        return f"s3://{BUCKET}/{key}?endpoint_override={self.endpoint}&scheme=http"

    def fail(self, method: str | None, path: str, *, header: tuple[str, str] | None = None, times: int | None = None,
             fraction: float = 1.0, status: int = 503, code: str = "SlowDown", reset: bool = False,
             lost: bool = False) -> Fault:
        """Inject a fault into matching requests (`times` of them, or all; `fraction` of those at random).
        `lost`: the request reaches the server and takes effect, but its answer is replaced by the fault
        (a response lost on the way back: the client cannot tell whether its request was applied)."""
        matcher = (header[0], re.compile(header[1])) if header else None
        fault = Fault(method, re.compile(path), matcher, times, fraction, status, code, reset, lost=lost)
        with self._lock:
            self._faults.append(fault)
        return fault

    def stall(self, method: str | None, path: str, *, header: tuple[str, str] | None = None,
              times: int | None = None) -> threading.Event:
        """Hold matching requests (`times` of them, or all) unanswered, as a hung mount or store does,
        until the returned event is set (`clear()` and `stop()` set it); then they are forwarded."""
        matcher = (header[0], re.compile(header[1])) if header else None
        release = threading.Event()
        with self._lock:
            self._faults.append(Fault(method, re.compile(path), matcher, times, 1.0, 0, "", False, stall=release))
        return release

    def clear(self) -> None:
        with self._lock:
            for fault in self._faults:
                if fault.stall is not None:
                    fault.stall.set()
            self._faults.clear()
            self.requests.clear()

    def injected(self, method: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.injected and method in (None, r.method)]

    def _claim(self, method: str, path: str, headers: Mapping[str, str]) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method not in (None, method) or not fault.path.search(path):
                    continue
                if fault.header and not fault.header[1].search(headers.get(fault.header[0]) or ""):
                    continue
                if fault.times is not None and fault.hits >= fault.times:
                    continue
                if fault.fraction < 1.0 and self._random.random() >= fault.fraction:
                    continue
                fault.hits += 1
                return fault
        return None

    def _log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def stop(self) -> None:
        self.clear()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hung up (after an injected reset, or at exit) is not news


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the AWS SDK expects

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._body()
        fault = proxy._claim(self.command, self.path, self.headers)
        if fault is not None and fault.stall is not None:
            proxy._log(Request(self.command, self.path, 0, True, self.headers.get("Range", "")))
            fault.stall.wait(600)
            fault = None  # released: answered as if nothing happened
        if fault is not None and fault.lost:
            self._forward(proxy, body, log=False)  # the server applies it; its answer is dropped
        if fault is not None and fault.reset:
            proxy._log(Request(self.command, self.path, 0, True, self.headers.get("Range", "")))
            # SO_LINGER 0: close() sends a TCP RST, as a dropped connection does.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if fault is not None:
            proxy._log(Request(self.command, self.path, fault.status, True, self.headers.get("Range", "")))
            # As long as S3's own error documents (~250 bytes): pyarrow's handling of a body that
            # does not fit the caller's read buffer is part of what is being tested.
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{fault.code}</Code>'
                   f"<Message>Injected by the test proxy; please reduce your request rate.</Message>"
                   f"<RequestId>FAULT{fault.hits:011d}</RequestId><HostId>{'x' * 76}=</HostId></Error>")
            payload = xml.encode()
            self.send_response(fault.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        self._forward(proxy, body)

    def _forward(self, proxy: FaultProxy, body: bytes, *, log: bool = True) -> None:
        """Send the request to the server; answer the client with its response (`log`), or drop it."""
        upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"content-length"}}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        if not log:
            return
        proxy._log(Request(self.command, self.path, response.status, False, self.headers.get("Range", "")))
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP | {"content-length", "date", "server"}:
                self.send_header(key, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle  # noqa: N815 - http.server's names


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server for the whole session, with dummy credentials in the environment.

    Session scope makes pytest set it up before any module-scoped Ray (`ray_shared`) that the
    same test uses, so the Ray workers started there inherit the credentials.
    """
    saved = {key: os.environ.get(key) for key in AWS_ENV}
    os.environ.update(AWS_ENV)
    server = S3Server()
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3(s3_server: S3Server) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the session's S3 server (no faults until `fail()`)."""
    proxy = FaultProxy(s3_server.address)
    try:
        yield proxy
    finally:
        proxy.stop()
