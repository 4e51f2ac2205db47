"""A lean HTTP/1.1 transport for the gateway's httpx client (worker traffic only).

httpx's default transport (httpcore + h11, pure Python) costs ~1 ms of CPU per request
and ~0.1 ms per streamed event on a small box; parsing with httptools (C, already used by
uvicorn) over an asyncio.Protocol costs a fraction. The client stays an `httpx.AsyncClient`
— timeouts, errors and responses keep httpx's types — only the transport is swapped.

Scope, on purpose: plain http://, HTTP/1.1 keep-alive, bodies given as bytes, responses
with content-length or chunked encoding. A pool of idle connections per host:port; a
request that fails on a *reused* connection before any response byte is retried once on a
fresh one (the worker may have closed it while idle), so stale sockets never look like a
failed worker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

import httptools
import httpx

_READ_HIGH = 256 * 1024  # pause the socket above this much unread body


class _Conn(asyncio.Protocol):
    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.error: Exception | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.keep_alive = False
        self.complete = False
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.got_bytes = False
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False

    # -------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = httpx.RemoteProtocolError(f"bad response from worker: {exc}")
            self._close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.error is None:
            self.error = httpx.ReadError(f"connection closed by worker ({exc or 'EOF'})")
        self._wake()

    # -------------------------------------------------------------- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # only valid before the body ends
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _READ_HIGH and not self.paused and self.transport:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True

    # -------------------------------------------------------------- reading
    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self, seconds: float | None) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self.waiter, seconds)
        except TimeoutError:
            self._close()
            raise httpx.ReadTimeout("worker read timed out") from None
        finally:
            self.waiter = None

    async def read_head(self, seconds: float | None) -> None:
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait(seconds)

    async def read_body(self, seconds: float | None) -> AsyncIterator[bytes]:
        while True:
            if self.chunks:
                if len(self.chunks) == 1:
                    data = self.chunks.popleft()
                else:
                    data = b"".join(self.chunks)
                    self.chunks.clear()
                self.buffered = 0
                if self.paused and self.usable:
                    self.paused = False
                    self.transport.resume_reading()  # type: ignore[union-attr]
                yield data
                continue
            if self.complete:
                return
            if self.error is not None:
                raise self.error
            await self._wait(seconds)

    def send(self, data: bytes) -> None:
        # uvloop raises RuntimeError when writing to a transport that closed (the worker
        # hung up) before `connection_lost` ran; that is a failed write, not a gateway bug.
        if not self.usable:
            raise httpx.WriteError("connection to the worker is closed")
        try:
            self.transport.write(data)  # type: ignore[union-attr]
        except (RuntimeError, OSError) as exc:
            self._close()
            raise httpx.WriteError(f"writing to the worker failed: {exc}") from None

    @property
    def usable(self) -> bool:
        """Open as far as the event loop knows (the `closed` flag trails the transport)."""
        t = self.transport
        return not self.closed and t is not None and not t.is_closing()

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and self.usable and self.error is None


class _Body(httpx.AsyncByteStream):
    def __init__(self, pool: LeanTransport, conn: _Conn, timeout: float | None) -> None:
        self.pool = pool
        self.conn = conn
        self.timeout = timeout
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for data in self.conn.read_body(self.timeout):
            yield data

    async def aclose(self) -> None:
        if not self.closed:  # at most once: a connection must never be pooled twice
            self.closed = True
            self.pool._finished(self.conn)


class LeanTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_idle_per_host: int = 256) -> None:
        self.max_idle = max_idle_per_host
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._all: set[_Conn] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol("the lean transport speaks plain http:// only")
        key = (url.host, url.port or 80)
        timeouts = request.extensions.get("timeout", {})
        body = request.content  # bytes (reads a non-streaming body once)
        head = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (
            request.method.encode(), url.raw_path, url.netloc)]
        for name, value in request.headers.raw:
            if name.lower() not in (b"host", b"transfer-encoding", b"content-length"):
                head.append(b"%s: %s\r\n" % (name, value))
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        wire = b"".join(head) + body
        read = timeouts.get("read")
        conn = await self._exchange(key, wire, timeouts.get("connect"), read)
        return httpx.Response(conn.status, headers=conn.headers, stream=_Body(self, conn, read),
                              extensions={"http_version": b"HTTP/1.1"})

    async def post(self, host: str, port: int, path: str, body: bytes, connect: float | None,
                   read: float | None) -> tuple[int, dict[str, str], bytes]:
        """A whole JSON POST without building httpx objects (the gateway's hot path for
        non-streamed requests): status, headers (lower-case names), body."""
        wire = b"POST %s HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n" \
               b"content-length: %d\r\n\r\n%s" % (path.encode(), host.encode(), port,
                                                   len(body), body)
        conn = await self._exchange((host, port), wire, connect, read)
        try:
            data = b"".join([chunk async for chunk in conn.read_body(read)])
        finally:
            self._finished(conn)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in conn.headers}
        return conn.status, headers, data

    async def _exchange(self, key: tuple[str, int], wire: bytes, connect: float | None,
                        read: float | None) -> _Conn:
        """Sends a request and reads the response head; the body is the caller's to read
        (then `_finished`)."""
        for attempt in (0, 1):
            conn, reused = await self._get(key, connect)
            conn._reset()
            try:
                conn.send(wire)
                await conn.read_head(read)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                self._discard(conn)
                if reused and attempt == 0 and not conn.got_bytes:
                    continue  # the worker closed this idle connection: try a fresh one
                raise
            except BaseException:
                self._discard(conn)
                raise
            return conn
        raise AssertionError("unreachable")

    async def _get(self, key: tuple[str, int], connect: float | None) -> tuple[_Conn, bool]:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable:
                return conn, True
            self._discard(conn)
        loop = asyncio.get_running_loop()
        conn = _Conn(key)
        try:
            await asyncio.wait_for(loop.create_connection(lambda: conn, key[0], key[1]), connect)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {key[0]}:{key[1]} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {key[0]}:{key[1]}: {exc}") from None
        self._all.add(conn)
        return conn, False

    def _finished(self, conn: _Conn) -> None:
        if conn.reusable:
            idle = self._idle.setdefault(conn.key, [])
            if len(idle) < self.max_idle:
                idle.append(conn)
                return
        self._discard(conn)

    def _discard(self, conn: _Conn) -> None:
        conn._close()
        self._all.discard(conn)

    async def aclose(self) -> None:
        for conn in list(self._all):
            with contextlib.suppress(Exception):
                conn._close()
        self._all.clear()
        self._idle.clear()
