"""A TCP proxy on loopback that delays every byte by a fixed time each way.

    python bench/delay_proxy.py --delay-ms 2 --upstream 127.0.0.1:5001 [--upstream ...]

This kernel has no netem, so bench/rpc_split.py puts this between a split head and its RPC
shards to add network latency. For each `--upstream` it listens on a free 127.0.0.1 port and
prints `LISTEN <port> <upstream>`, then `READY`. Each connection gets, per direction, an
asyncio reader that stamps every chunk with its arrival time and a writer that sends it no
earlier than arrival + delay, in order (latency is added, bandwidth is not limited; a chunk
that arrives while an earlier one waits does not wait twice). The writer sleeps in asyncio
to within 1.5 ms of the deadline, then the rest with a precise, blocking `time.sleep`
(event loop timers round up to whole milliseconds, too coarse for 0.5 ms). On SIGTERM it
prints one JSON line: the one-way delay it actually added (ms: count, mean, p50, p99) since
the start or the last SIGUSR1 (rpc_split.py sends one after loading, so the model upload's
queueing is not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
import time

samples: list[float] = []  # the delay actually added to each chunk, seconds


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

    async def read() -> None:
        while data := await src.read(1 << 16):
            queue.put_nowait((time.perf_counter(), data))
        queue.put_nowait(None)

    reader = asyncio.ensure_future(read())
    try:
        while (item := await queue.get()) is not None:
            arrived, data = item
            wait = arrived + delay - time.perf_counter()
            if wait > 0.0015:
                await asyncio.sleep(wait - 0.0015)
            wait = arrived + delay - time.perf_counter()
            if wait > 0:
                time.sleep(wait)  # noqa: ASYNC251  precise to ~0.1 ms; blocks < 1.5 ms
            dst.write(data)
            samples.append(time.perf_counter() - arrived)
            if dst.transport.get_write_buffer_size() > (1 << 20):
                await dst.drain()
    finally:
        reader.cancel()


def _nodelay(w: asyncio.StreamWriter) -> None:
    sock = w.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def serve(upstreams: list[str], delay: float) -> None:
    servers = []
    for up in upstreams:
        host, port = up.rsplit(":", 1)

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                         host: str = host, port: int = int(port)) -> None:
            try:
                ur, uw = await asyncio.open_connection(host, port)
            except OSError:
                w.transport.abort()
                return
            _nodelay(w)
            _nodelay(uw)
            tasks = [asyncio.ensure_future(_pipe(r, uw, delay)),
                     asyncio.ensure_future(_pipe(ur, w, delay))]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()
                for x in (w, uw):
                    x.transport.abort()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        print(f"LISTEN {server.sockets[0].getsockname()[1]} {up}", flush=True)
    print("READY", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, samples.clear)  # start counting afresh
    await stop.wait()
    for s in servers:
        s.close()


def stats() -> dict:
    ms = sorted(1000 * s for s in samples)
    if not ms:
        return {"count": 0}
    return {"count": len(ms), "mean": round(sum(ms) / len(ms), 3),
            "p50": round(ms[len(ms) // 2], 3), "p99": round(ms[int(len(ms) * 0.99)], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--delay-ms", type=float, required=True)
    ap.add_argument("--upstream", action="append", required=True, help="127.0.0.1:PORT")
    a = ap.parse_args()
    for up in a.upstream:
        if up.rsplit(":", 1)[0] not in ("127.0.0.1", "localhost"):
            sys.exit("loopback upstreams only")
    asyncio.run(serve(a.upstream, a.delay_ms / 1000))
    print(json.dumps({"delay_ms": a.delay_ms, "added_ms": stats()}), flush=True)


if __name__ == "__main__":
    main()
