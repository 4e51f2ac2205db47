"""`corral bench` as a user runs it: a real process against a real sim worker.

The sim worker decodes at a known rate per slot after a known TTFT, so the bench's
numbers have a right answer: every check below fails if the bench miscounts requests or
tokens, mistimes the first token, or hides errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
from procs import Worker, start_worker

RATE = 100.0  # sim tokens/s per slot
TTFT = 0.1  # sim seconds to first token
SLOTS = 4
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def sim() -> Worker:
    w = start_worker("--sim-tokens-per-second", str(RATE), "--sim-ttft", str(TTFT),
                     "--parallel", str(SLOTS), backend="sim")
    yield w
    w.proc.stop()


def bench(*args: str, timeout: float = 120) -> tuple[int, dict]:
    out = subprocess.run(
        [sys.executable, "-m", "corral.cli", "bench", "--json", *args],
        capture_output=True, text=True, timeout=timeout,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"--json must print exactly one line:\n{out.stdout}\n{out.stderr}"
    return out.returncode, json.loads(lines[0])


def test_closed_loop_stream_matches_the_sim(sim: Worker) -> None:
    n = 16
    code, s = bench("--base-url", sim.url, "--requests", str(n), "--concurrency", str(SLOTS),
                    "--max-tokens", str(MAX_TOKENS), "--stream")
    assert code == 0
    assert (s["requests"], s["completed"], s["errors"]) == (n, n, 0), s
    assert s["mode"] == "closed" and s["concurrency"] == SLOTS
    # Tokens come from the usage chunk (include_usage is requested) and match max_tokens.
    assert s["tokens_source"] == "usage"
    assert s["output_tokens"] == n * MAX_TOKENS
    # No request can see its first token before the sim's TTFT.
    assert s["ttft_ms"]["min"] >= TTFT * 1000
    assert s["ttft_ms"]["count"] == n
    # After the first token the sim emits one every 1/RATE s: TPOT p50 is ~10 ms.
    assert 0.8 * 1000 / RATE <= s["tpot_ms"]["p50"] <= 1.5 * 1000 / RATE, s["tpot_ms"]
    assert s["itl_ms"]["count"] == n * (MAX_TOKENS - 1)
    # Aggregate throughput: SLOTS requests at a time, each TTFT + (T-1)/RATE long at best.
    ideal = SLOTS * MAX_TOKENS / (TTFT + (MAX_TOKENS - 1) / RATE)
    assert 0.5 * ideal <= s["output_tokens_per_second"] <= 1.05 * ideal, (ideal, s)
    lat = s["latency_ms"]
    assert lat["min"] >= (TTFT + (MAX_TOKENS - 1) / RATE) * 1000
    assert lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert s["workers"] == {sim.id: n}


def test_not_streamed_counts_usage_tokens(sim: Worker) -> None:
    code, s = bench("--base-url", f"{sim.url}/v1", "--requests", "8", "--concurrency", "4",
                    "--max-tokens", "8", "--distinct-prompts")
    assert code == 0
    assert s["distinct_prompts"] is True and s["stream"] is False
    assert (s["completed"], s["errors"], s["output_tokens"]) == (8, 0, 64), s
    assert s["ttft_ms"] is None and s["itl_ms"] is None  # nothing to time without a stream
    assert s["latency_ms"]["min"] >= (TTFT + 7 / RATE) * 1000


def test_wrong_model_is_counted_not_fatal(sim: Worker) -> None:
    code, s = bench("--base-url", sim.url, "--requests", "6", "--concurrency", "2",
                    "--model", "no-such-model", "--stream")
    assert code == 0  # documented: the run finished; failures are in the report
    assert (s["requests"], s["completed"], s["errors"]) == (6, 0, 6), s
    assert s["errors_by_kind"] == {"http_404": 6}
    assert "no-such-model" in s["error_examples"]["http_404"]
    assert s["output_tokens"] == 0 and s["latency_ms"] is None


def test_unreachable_server_ends_with_connect_errors() -> None:
    from procs import free_port

    code, s = bench("--base-url", f"http://127.0.0.1:{free_port()}", "--requests", "3",
                    "--timeout", "5", timeout=60)
    assert code == 0
    assert s["errors_by_kind"] == {"connect": 3}, s


def test_open_loop_poisson(sim: Worker) -> None:
    n, rate = 20, 10.0
    code, s = bench("--base-url", sim.url, "--requests", str(n), "--rate", str(rate),
                    "--max-tokens", "8", "--stream", "--seed", "3")
    assert code == 0
    assert s["mode"] == "open" and s["rate"] == rate and s["concurrency"] is None
    assert (s["completed"], s["errors"]) == (n, 0), s
    # 20 arrivals at 10/s span ~1.9 s on average; far from both a burst and a crawl.
    assert 0.7 < s["duration_s"] < 6.0, s["duration_s"]
    assert s["client_lag_ms"]["count"] == n
    assert s["ttft_ms"]["min"] >= TTFT * 1000


def test_plot_writes_a_png(sim: Worker, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    code, s = bench("--base-url", sim.url, "--requests", "8", "--concurrency", "4",
                    "--max-tokens", "8", "--stream", "--plot", str(png))
    assert code == 0 and s["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_output(sim: Worker) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "corral.cli", "bench", "--base-url", sim.url, "--requests", "4",
         "--concurrency", "2", "--max-tokens", "4", "--stream"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "120"},
    )
    assert out.returncode == 0, out.stderr
    assert "4 ok / 4 sent" in out.stdout
    assert "TTFT" in out.stdout and "p99" in out.stdout



# ----------------------------------------------------------------- in-process, no server


def _run_mock(handler, **spec_kw):
    import httpx

    from corral.bench import LoadSpec, Runner, summarize

    spec = LoadSpec(base_url="http://bench.test", model="m", requests=spec_kw.pop("requests", 3),
                    concurrency=1, stream=True, timeout=spec_kw.pop("timeout", 5), **spec_kw)
    runner = Runner(spec, transport=httpx.MockTransport(handler))
    results = runner.run()
    return summarize(spec, results, runner.duration), results


def _sse_response(parts: list[bytes]):
    import httpx

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self):
            for part in parts:
                yield part

    return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Body())


def test_sse_events_split_across_reads_with_crlf_and_comments() -> None:
    events = (
        b": keep-alive\r\n\r\n"
        b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\r\n\r\n'
        b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\r\n\r\n'
        b'data: {"choices":[{"index":0,"delta":{"content":"b"}}]}\r\n\r\n'
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\r\n\r\n'
        b'data: {"choices":[],"usage":{"completion_tokens":7}}\r\n\r\n'
        b"data: [DONE]\r\n\r\n"
    )
    # Cut every 7 bytes: events and even "\r\n" pairs straddle reads.
    parts = [events[i:i + 7] for i in range(0, len(events), 7)]
    seen = []

    def handler(request):
        seen.append(request)
        return _sse_response(parts)

    s, results = _run_mock(handler)
    assert (s["completed"], s["errors"]) == (3, 0), s
    assert [len(r.chunk_times) for r in results] == [2, 2, 2]  # the empty role chunk is no text
    assert s["output_tokens"] == 21 and s["tokens_source"] == "usage"
    body = seen[0].read()
    assert b'"include_usage":true' in body and seen[0].url.path == "/v1/chat/completions"


def test_sse_without_usage_counts_chunks_and_without_done_is_incomplete() -> None:
    good = (b'data: {"choices":[{"index":0,"text":"x"}]}\n\n' * 4) + b"data: [DONE]\n\n"
    cut = b'data: {"choices":[{"index":0,"text":"x"}]}\n\n'
    calls = []

    def handler(request):
        calls.append(1)
        return _sse_response([good if len(calls) < 3 else cut])

    s, _ = _run_mock(handler)
    assert s["completed"] == 2 and s["errors_by_kind"] == {"incomplete": 1}, s
    assert s["output_tokens"] == 8 and s["tokens_source"] == "chunks"


def test_error_event_mid_stream_is_a_stream_error() -> None:
    parts = [b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n',
             b'data: {"error":{"message":"worker died","type":"server_error"}}\n\n']
    s, _ = _run_mock(lambda request: _sse_response(parts), requests=2)
    assert s["errors_by_kind"] == {"stream_error": 2}
    assert s["error_examples"]["stream_error"] == "worker died"


def test_percentiles_interpolate() -> None:
    from corral.bench.stats import distribution, percentile

    v = [float(x) for x in range(1, 101)]  # 1..100
    assert percentile(v, 50) == 50.5
    assert percentile(v, 99) == 99.01
    assert percentile([3.0], 99) == 3.0
    d = distribution([0.001, 0.002, 0.003])  # seconds in, ms out
    assert (d["min"], d["p50"], d["max"], d["count"]) == (1.0, 2.0, 3.0, 3)
    assert distribution([]) is None


def test_a_kept_alive_connection_closed_unanswered_is_sent_again() -> None:
    """llama-server announces keep-alive, then closes after each streamed answer: a request
    written on that connection meanwhile gets no byte back (issue 19). A real socket
    server that answers one request per connection and closes on the next: every request
    completes, and the resends are counted, not hidden."""
    import socket
    import threading

    from corral.bench import LoadSpec, Runner, summarize

    body = (b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
            b'data: {"choices":[],"usage":{"completion_tokens":1}}\n\ndata: [DONE]\n\n')
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
              b"Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n\r\n"
              + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(30)

    def read_request(conn: socket.socket) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        while len(rest) < length:
            rest += conn.recv(65536)
        return True

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = srv.accept()
                with conn:
                    if read_request(conn):
                        conn.sendall(answer)
                        read_request(conn)  # the next request on it: closed unanswered

    threading.Thread(target=serve, daemon=True).start()
    try:
        spec = LoadSpec(base_url=f"http://127.0.0.1:{srv.getsockname()[1]}", model="m",
                        requests=4, concurrency=1, stream=True, timeout=20)
        runner = Runner(spec)
        s = summarize(spec, runner.run(), runner.duration)
    finally:
        srv.close()
    assert (s["completed"], s["errors"]) == (4, 0), s
    assert s["stale_connection_retries"] == 3 and s["output_tokens"] == 4, s
