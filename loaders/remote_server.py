"""A local S3-compatible server for tests and benchmarks, on 127.0.0.1 only.

``LocalS3Server`` runs moto's S3 server (``moto[server]``, the ``dev`` extra) in a child
process on a free loopback port; ``RecordingProxy`` sits in front of it and records every
request (method, path, Range header, status, body bytes sent back), so tests and benchmarks
count what a read fetched on the server side, and it can fail every n-th request (a 503
SlowDown or a connection reset, alternately) to exercise retries. Both are context managers
that stop what they started.
"""

from __future__ import annotations

import http.client
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["DUMMY_AWS_ENV", "LocalS3Server", "Record", "RecordingProxy", "free_port"]

_HOST = "127.0.0.1"
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
"""Environment for talking to ``LocalS3Server``: dummy credentials, nothing from the
machine's AWS configuration."""
_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_HOST, 0))
        return int(s.getsockname()[1])


class LocalS3Server:
    """moto's S3 server in a child process on 127.0.0.1.

    Args:
        env: extra environment of the server (e.g. ``INITIAL_NO_AUTH_ACTION_COUNT`` to make
            it check credentials).
        start_timeout: seconds to wait for it to answer.
    """

    def __init__(self, *, env: dict[str, str] | None = None, start_timeout: float = 60.0):
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{_HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs (benchmarks read its CPU time)."""
        return None if self._proc is None else self._proc.pid

    def start(self) -> LocalS3Server:
        for _ in range(3):  # a port taken between free_port() and the bind: another one
            self.port = free_port()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", _HOST, "-p", str(self.port)],
                env={**os.environ, **self.env},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + self.start_timeout
            while self._proc.poll() is None and time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=2)
                    return self
                except OSError:
                    time.sleep(0.1)
            self.stop()
        raise RuntimeError(
            f"moto's S3 server did not start on {_HOST} (is moto[server] installed?)"
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Record:
    """One request that reached the proxy.

    Attributes:
        method: HTTP method.
        path: the URL path (``/bucket/key``), without the query.
        query: the query string.
        range: the Range header, or None.
        status: the status sent back (0: the connection was reset instead).
        nbytes: body bytes sent back.
    """

    method: str
    path: str
    query: str
    range: str | None
    status: int
    nbytes: int


class RecordingProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that records every request.

    Args:
        upstream: ``http://127.0.0.1:PORT`` of the server.
        fail_every: answer every this-many-th request with a failure instead of forwarding
            it (503 SlowDown and a connection reset, alternately); 0: never.
    """

    def __init__(self, upstream: str, *, fail_every: int = 0):
        host, port = upstream.split("://", 1)[1].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.fail_every = int(fail_every)
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._count = 0
        self._failures = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://{_HOST}:{self._server.server_address[1]}"

    def clear(self) -> None:
        """Forget the records (the failure count goes on)."""
        with self._lock:
            self.records.clear()

    def gets(self) -> list[Record]:
        """The GET requests answered with data (200 or 206), in order."""
        with self._lock:
            return [r for r in self.records if r.method == "GET" and r.status in (200, 206)]

    def _next(self) -> str | None:
        """'503', 'reset' or None (forward) for the next request."""
        with self._lock:
            self._count += 1
            if not self.fail_every or self._count % self.fail_every:
                return None
            self._failures += 1
            return "503" if self._failures % 2 else "reset"

    def _record(self, record: Record) -> None:
        with self._lock:
            self.records.append(record)

    def start(self) -> RecordingProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts: list[bytes] = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self) -> None:
                body = self._body()
                path, _, query = self.path.partition("?")
                rng = self.headers.get("Range")
                fate = proxy._next()
                if fate == "reset":
                    proxy._record(Record(self.command, path, query, rng, 0, 0))
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.close_connection = True
                    self.connection.close()
                    return
                if fate == "503":
                    proxy._record(Record(self.command, path, query, rng, 503, 0))
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(_SLOW_DOWN)
                    return
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("transfer-encoding", "connection", "content-length")
                }
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out_headers = resp.getheaders()
                finally:
                    conn.close()
                sent = 0 if self.command == "HEAD" else len(data)
                proxy._record(Record(self.command, path, query, rng, resp.status, sent))
                self.send_response(resp.status)
                for k, v in out_headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = dict((k.lower(), v) for k, v in out_headers).get("content-length")
                self.send_header(
                    "Content-Length", length if self.command == "HEAD" and length else str(sent)
                )
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer((_HOST, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> RecordingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
