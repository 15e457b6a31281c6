"""Fault proxies: a real TCP server between a worker and its S3 server that misbehaves on cue.

:class:`StorageProxy` listens on a free loopback port and forwards each HTTP/1.1 request it reads
to the upstream S3 server unchanged (the Host header a SigV4 signature covers is the proxy's on
both sides, so signatures still match). On cue it

- **delays** the answers (``delay``): the upstream has done the request, the client waits for
  the answer; longer than the client's read timeout, the client gives up on a request that was
  in fact done (the nastiest kind of slow);
- **answers 503 SlowDown** itself (``slowdown``) with the S3 XML error body, for some seconds or
  some requests, without forwarding the request;
- **goes down** (``down``/``up``): stops listening and drops every open connection, as a crashed
  server does (connection refused), then listens on the same port again.

It runs an asyncio loop on a thread of its own; the test's thread sets the faults and reads the
counters. Requests are parsed only as far as forwarding needs (head, Content-Length or chunked
body); answers are piped back as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any
from urllib.parse import urlsplit

LOOPBACK = "127.0.0.1"

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>fault-proxy</RequestId></Error>"
)


@dataclass
class _Fault:
    """One fault: active until ``until`` (monotonic) or for ``left`` more requests (None:
    unbounded on that side); ``value`` is the fault's size (a delay in seconds)."""

    until: float | None = None
    left: int | None = None
    value: float = 0.0

    def take(self) -> bool:
        if self.until is not None and time.monotonic() >= self.until:
            return False
        if self.left is not None:
            if self.left <= 0:
                return False
            self.left -= 1
        return True


@dataclass
class Counters:
    requests: int = 0
    forwarded: int = 0
    delayed: int = 0
    slowed_down: int = 0
    #: Connections dropped by ``down`` (open ones), not counting refused connection attempts.
    dropped: int = 0


class _Conn:
    def __init__(self) -> None:
        self.delay = 0.0
        self.transports: list[asyncio.BaseTransport] = []


class StorageProxy:
    """A misbehaving HTTP proxy in front of an S3 endpoint (see the module's docstring)."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname or LOOPBACK, parts.port or 80)
        self.port = 0
        self.counters = Counters()
        self._lock = threading.Lock()
        self._delay: _Fault | None = None
        self._slowdown: _Fault | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="storage-proxy")  # fmt: skip
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()

    # -- life -----------------------------------------------------------------------------------

    def start(self) -> StorageProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._close(drop=True))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> StorageProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    # -- faults ---------------------------------------------------------------------------------

    def delay(
        self, seconds: float, for_s: float | None = None, requests: int | None = None
    ) -> None:
        """Hold each answer ``seconds`` before passing it on, for ``for_s`` seconds from now
        and/or the next ``requests`` requests (neither: until ``clear``)."""
        with self._lock:
            self._delay = _Fault(_until(for_s), requests, seconds)

    def slowdown(self, for_s: float | None = None, requests: int | None = None) -> None:
        """Answer ``503 SlowDown`` instead of forwarding, for ``for_s`` seconds from now and/or
        the next ``requests`` requests (neither: until ``clear``)."""
        with self._lock:
            self._slowdown = _Fault(_until(for_s), requests)

    def clear(self) -> None:
        with self._lock:
            self._delay = self._slowdown = None

    def down(self) -> None:
        """Stop listening (connection refused) and drop every open connection."""
        self._call(self._close(drop=True))

    def up(self) -> None:
        """Listen again on the same port."""
        self._call(self._listen())

    def snapshot(self) -> Counters:
        with self._lock:
            return Counters(**vars(self.counters))

    # -- inside the loop ------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(15)

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._serve, LOOPBACK, self.port,
                                                  reuse_address=True)  # fmt: skip
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self, drop: bool) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if drop:
            for conn in list(self._conns):
                for transport in conn.transports:
                    transport.abort()  # type: ignore[attr-defined]
                with self._lock:
                    self.counters.dropped += 1
            self._conns.clear()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    def _take(self, which: str) -> _Fault | None:
        with self._lock:
            fault = getattr(self, which)
            if fault is not None and fault.take():
                return fault  # type: ignore[no-any-return]
            return None

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        conn = _Conn()
        conn.transports.append(cwriter.transport)
        self._conns.add(conn)
        upstream: asyncio.StreamWriter | None = None
        pipe: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    head = await creader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                method, headers = _parse_head(head)
                with self._lock:
                    self.counters.requests += 1
                if self._take("_slowdown") is not None:
                    with self._lock:
                        self.counters.slowed_down += 1
                    if headers.get("expect", "").lower() == "100-continue":
                        cwriter.write(_slowdown_answer(method, close=True))
                        await cwriter.drain()
                        return  # the body may still come: no reuse of this connection
                    await _read_body(creader, headers, None)  # consumed, not forwarded
                    cwriter.write(_slowdown_answer(method, close=False))
                    await cwriter.drain()
                    continue
                if upstream is None:
                    ureader, upstream = await asyncio.open_connection(*self.upstream)
                    conn.transports.append(upstream.transport)
                    pipe = asyncio.create_task(self._pipe(ureader, cwriter, conn))
                delay = self._take("_delay")
                if delay is not None:
                    conn.delay = delay.value
                    with self._lock:
                        self.counters.delayed += 1
                with self._lock:
                    self.counters.forwarded += 1
                upstream.write(head)
                await _read_body(creader, headers, upstream)
                await upstream.drain()
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            return
        finally:
            if pipe is not None:
                pipe.cancel()
            for transport in conn.transports:
                transport.close()
            self._conns.discard(conn)

    async def _pipe(
        self, ureader: asyncio.StreamReader, cwriter: asyncio.StreamWriter, conn: _Conn
    ) -> None:
        """Upstream's answers back to the client; the first chunk of a delayed answer waits."""
        try:
            while data := await ureader.read(65536):
                # An interim "100 Continue" (boto3 sends PutObject with Expect) passes at once:
                # the delay is the final answer's.
                if conn.delay and not data.startswith(b"HTTP/1.1 1"):
                    wait, conn.delay = conn.delay, 0.0
                    await asyncio.sleep(wait)
                cwriter.write(data)
                await cwriter.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            cwriter.transport.close()


def _until(for_s: float | None) -> float | None:
    return None if for_s is None else time.monotonic() + for_s


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method = lines[0].split(" ", 1)[0].upper()
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return method, headers


async def _read_body(
    reader: asyncio.StreamReader, headers: dict[str, str], out: asyncio.StreamWriter | None
) -> None:
    """Read a request's body (Content-Length or chunked), passing it to ``out`` if given."""

    def emit(data: bytes) -> None:
        if out is not None:
            out.write(data)

    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            emit(size_line)
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, up to the blank line
                    line = await reader.readuntil(b"\r\n")
                    emit(line)
                    if line == b"\r\n":
                        return
            emit(await reader.readexactly(size + 2))
    left = int(headers.get("content-length", "0") or 0)
    while left > 0:
        chunk = await reader.read(min(left, 65536))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", left)
        emit(chunk)
        left -= len(chunk)


def _slowdown_answer(method: str, close: bool) -> bytes:
    body = b"" if method == "HEAD" else SLOWDOWN_BODY
    head = (
        "HTTP/1.1 503 Slow Down\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        "x-amz-request-id: fault-proxy\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        "Server: fault-proxy\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    )
    return head.encode() + body
