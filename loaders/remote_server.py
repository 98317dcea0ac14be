"""Local servers for tests and benchmarks of remote caches, on 127.0.0.1 only.

``LocalS3Server`` runs moto's S3 server (``moto[server]``, the ``dev`` extra) in a child
process on a free loopback port; ``RecordingProxy`` sits in front of it (or of any HTTP
server) and records every request (method, path, Range header, status, body bytes sent
back), so tests and benchmarks count what a read fetched on the server side, and it can
fail every n-th request (a 503 SlowDown or a connection reset, alternately) to exercise
retries.

``RangeServer`` serves the files of a local folder read-only over HTTP/1.1 (GET and HEAD,
one byte range per request, 206 / 404 / 416), so a cache folder can be read as
``http://127.0.0.1:PORT/...``; it records its requests like the proxy. ``LocalHTTPServer``
runs one in a child process (``python -m loaders.remote_server FOLDER --port N``), whose CPU
time a benchmark can read apart from its own. Unlike moto, which materialises the whole
object for every ranged GET and closes the connection after each response, it sends only
the range asked for (``sendfile``) and keeps connections open: the cost of a ranged read on
the server side is what an object store's is, small and independent of the object's size.

All are context managers that stop what they started.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "DUMMY_AWS_ENV",
    "LocalHTTPServer",
    "LocalS3Server",
    "RangeServer",
    "Record",
    "RecordingProxy",
    "free_port",
    "parse_range",
]

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


def _start_child(
    command: Callable[[int], list[str]], probe: str, env: dict[str, str], timeout: float
) -> tuple[subprocess.Popen[bytes], int] | None:
    """Start ``command(port)`` on a free port until it answers ``GET probe`` (any HTTP
    status), trying three ports (one taken between ``free_port()`` and the bind: another);
    None if it never does."""
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen(
            command(port),
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://{_HOST}:{port}{probe}", timeout=2)
                return proc, port
            except urllib.error.HTTPError:  # it answered
                return proc, port
            except OSError:
                time.sleep(0.1)
        _stop_child(proc)
    return None


def _stop_child(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_Server = TypeVar("_Server", bound="_ChildServer")
_Threaded = TypeVar("_Threaded", bound="_RecordingServer")


class _RecordingServer:
    """An HTTP server on 127.0.0.1 in threads of this process that records every request:
    the records, their lock, the endpoint, stop and the context manager. A subclass's
    ``start`` builds its handler and calls ``_serve``."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://{_HOST}:{self._server.server_address[1]}"

    def clear(self) -> None:
        """Forget the records."""
        with self._lock:
            self.records.clear()

    def gets(self) -> list[Record]:
        """The GET requests answered with data (200 or 206), in order."""
        with self._lock:
            return [r for r in self.records if r.method == "GET" and r.status in (200, 206)]

    def _record(self, record: Record) -> None:
        with self._lock:
            self.records.append(record)

    def _serve(self: _Threaded, handler: type[BaseHTTPRequestHandler], port: int) -> _Threaded:
        self._server = ThreadingHTTPServer((_HOST, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def start(self: _Threaded) -> _Threaded:
        raise NotImplementedError

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self: _Threaded) -> _Threaded:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _ChildServer:
    """A server in a child process on 127.0.0.1: the start, stop and context manager that
    ``LocalS3Server`` and ``LocalHTTPServer`` share; each says what to run."""

    _probe = "/"
    """The path whose answer (any HTTP status) says the server is up."""

    def __init__(self, *, start_timeout: float) -> None:
        self.start_timeout = start_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def _command(self, port: int) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return {}

    def _not_started(self) -> str:
        raise NotImplementedError

    @property
    def endpoint(self) -> str:
        return f"http://{_HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs (benchmarks read its CPU time)."""
        return None if self._proc is None else self._proc.pid

    def start(self: _Server) -> _Server:
        started = _start_child(self._command, self._probe, self._env(), self.start_timeout)
        if started is None:
            raise RuntimeError(self._not_started())
        self._proc, self.port = started
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        _stop_child(proc)

    def __enter__(self: _Server) -> _Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalS3Server(_ChildServer):
    """moto's S3 server in a child process on 127.0.0.1.

    Args:
        env: extra environment of the server (e.g. ``INITIAL_NO_AUTH_ACTION_COUNT`` to make
            it check credentials).
        start_timeout: seconds to wait for it to answer.
    """

    _probe = "/moto-api/data.json"

    def __init__(self, *, env: dict[str, str] | None = None, start_timeout: float = 60.0):
        super().__init__(start_timeout=start_timeout)
        self.env = dict(env or {})

    def _command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", _HOST, "-p", str(port)]

    def _env(self) -> dict[str, str]:
        return self.env

    def _not_started(self) -> str:
        return f"moto's S3 server did not start on {_HOST} (is moto[server] installed?)"


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


class RecordingProxy(_RecordingServer):
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
        super().__init__()
        self._count = 0  # requests so far; clear() forgets the records, not this count
        self._failures = 0

    def _next(self) -> str | None:
        """'503', 'reset' or None (forward) for the next request."""
        with self._lock:
            self._count += 1
            if not self.fail_every or self._count % self.fail_every:
                return None
            self._failures += 1
            return "503" if self._failures % 2 else "reset"

    def start(self) -> RecordingProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body: two writes (see RangeServer)

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

        return self._serve(Handler, 0)


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The bytes ``[start, stop)`` a ``Range`` header asks of an object of ``size`` bytes.

    Returns:
        ``(start, stop)``, or None for the whole object (no header, or one this server
        ignores, as RFC 9110 allows: several ranges, another unit, a malformed one).

    Raises:
        ValueError: the range starts past the end, or is an empty suffix (answer 416).
    """
    if header is None:
        return None
    m = _RANGE.match(header.strip())
    if m is None or not (m.group(1) or m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # a suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise ValueError(f"unsatisfiable range {header!r} of {size} bytes")
        return max(size - n, 0), size
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignored
    if start >= size:
        raise ValueError(f"unsatisfiable range {header!r} of {size} bytes")
    return start, size if not last else min(int(last) + 1, size)


def _url(endpoint: str, relative: str | os.PathLike[str]) -> str:
    path = Path(relative).as_posix().strip("/")
    return endpoint if path in ("", ".") else f"{endpoint}/{urllib.parse.quote(path)}"


class RangeServer(_RecordingServer):
    """The files under ``folder``, read-only over HTTP/1.1 on 127.0.0.1, in threads of this
    process; every request is recorded (``records``, as ``RecordingProxy``'s).

    GET and HEAD; a single ``Range: bytes=a-b`` / ``a-`` / ``-n`` is answered 206 with
    ``Content-Range``, past the end 416, a missing file (or a folder, or a path outside
    ``folder``) 404, other methods 405. Connections are kept open between requests.

    Args:
        folder: the folder served at ``/``.
        port: the port (0: a free one).
    """

    def __init__(self, folder: str | os.PathLike[str], *, port: int = 0):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise FileNotFoundError(f"RangeServer: {self.folder} is not a folder")
        self.port = int(port)
        super().__init__()

    def url(self, relative: str | os.PathLike[str] = "") -> str:
        """The URL of ``folder / relative``."""
        return _url(self.endpoint, relative)

    def _target(self, url_path: str) -> Path | None:
        """The file a URL path names, None where there is none (or it is outside)."""
        path = urllib.parse.unquote(url_path)
        target = (self.folder / path.lstrip("/")).resolve()
        if target != self.folder and self.folder not in target.parents:
            return None
        return target if target.is_file() else None

    def start(self) -> RangeServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # TCP_NODELAY: the headers and the sendfile'd body go out as two writes, and with
            # Nagle's algorithm the body's tail waited for the client's delayed ACK of the
            # headers (about 40 ms per request on loopback: a one-process W2 quick sampler
            # waited 41 ms per patch with it, 1.6 ms without)
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _head(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()

            def _serve(self) -> None:
                path, _, query = self.path.partition("?")
                rng = self.headers.get("Range")
                target = server._target(path)
                if target is None:
                    server._record(Record(self.command, path, query, rng, 404, 0))
                    self._head(404, [("Content-Length", "0")])
                    return
                with open(target, "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    try:
                        span = parse_range(rng, size)
                    except ValueError:
                        server._record(Record(self.command, path, query, rng, 416, 0))
                        self._head(
                            416, [("Content-Range", f"bytes */{size}"), ("Content-Length", "0")]
                        )
                        return
                    start, stop = (0, size) if span is None else span
                    status = 200 if span is None else 206
                    headers = [
                        ("Content-Type", "application/octet-stream"),
                        ("Accept-Ranges", "bytes"),
                        ("Content-Length", str(stop - start)),
                    ]
                    if status == 206:
                        headers.append(("Content-Range", f"bytes {start}-{stop - 1}/{size}"))
                    body = stop - start if self.command == "GET" else 0
                    # recorded before the answer, so a client that has it finds the record
                    server._record(Record(self.command, path, query, rng, status, body))
                    self._head(status, headers)
                    if body:
                        self.connection.sendfile(fh, start, body)

            def _refuse(self) -> None:
                path, _, query = self.path.partition("?")
                server._record(Record(self.command, path, query, None, 405, 0))
                self.close_connection = True  # the body, if any, is not read
                self._head(
                    405, [("Allow", "GET, HEAD"), ("Content-Length", "0"), ("Connection", "close")]
                )

            do_GET = do_HEAD = _serve
            do_PUT = do_POST = do_DELETE = do_PATCH = _refuse

        return self._serve(Handler, self.port)

    def serve_forever(self) -> None:
        """Serve in this thread until the process is stopped (a child process's life)."""
        self.start()
        assert self._thread is not None
        self._thread.join()


class LocalHTTPServer(_ChildServer):
    """A ``RangeServer`` of ``folder`` in a child process on 127.0.0.1 (its CPU time is its
    own; count its requests with a ``RecordingProxy`` in front).

    Args:
        folder: the folder served at ``/``.
        start_timeout: seconds to wait for it to answer.
    """

    def __init__(self, folder: str | os.PathLike[str], *, start_timeout: float = 60.0):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise FileNotFoundError(f"LocalHTTPServer: {self.folder} is not a folder")
        super().__init__(start_timeout=start_timeout)

    def url(self, relative: str | os.PathLike[str] = "") -> str:
        """The URL of ``folder / relative``."""
        return _url(self.endpoint, relative)

    def _command(self, port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "loaders.remote_server",
            str(self.folder),
            "--port",
            str(port),
        ]

    def _not_started(self) -> str:
        return f"the range server of {self.folder} did not start on {_HOST}"


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m loaders.remote_server FOLDER --port N``: serve FOLDER on 127.0.0.1:N."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    RangeServer(args.folder, port=args.port).serve_forever()


if __name__ == "__main__":
    main()
