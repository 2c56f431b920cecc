"""Unary ttrpc round-trip latency and throughput: Python and Go (containerd/ttrpc 1.1.1), both ways.

    python3 benchmarks/ttrpc_latency.py [-n 5000] [-c 16]

Every server runs in its own process on a unix socket (the Python one is this script with --serve);
the Python client runs here on trio, the Go client is `gottrpc bench`. Each combination makes N
calls of kata.test.Echo with a 4-byte StringValue one after another, then N calls spread over C
concurrent callers on one connection, after a short warm-up. Needs `go` (see tests/interop/gopeer.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a plain script

import trio  # noqa: E402
from google.protobuf.wrappers_pb2 import StringValue  # noqa: E402

from kata_trio import run_sync_abandoning  # noqa: E402
from tests.interop.gopeer import SERVICE, build_go_peer, go_server  # noqa: E402
from tests.interop.ttrpc_support import EchoService  # noqa: E402
from ttrpc import Server, bind_unix_socket, listener_from_socket, open_client  # noqa: E402

WARMUP = 50


def summary(latencies_ns: list[int], elapsed_s: float) -> dict[str, float]:
    q = statistics.quantiles(latencies_ns, n=100, method="inclusive")
    return {"p50_us": q[49] / 1e3, "p90_us": q[89] / 1e3, "p99_us": q[98] / 1e3,
            "calls_per_s": len(latencies_ns) / elapsed_s}


async def python_client(socket: str, n: int, concurrency: int) -> dict[str, float]:
    request = StringValue(value="ping")
    async with open_client(socket) as client:
        for _ in range(WARMUP):
            await client.call(SERVICE, "Echo", request, StringValue)
        latencies: list[int] = []
        remaining = n

        async def caller() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter_ns()
                await client.call(SERVICE, "Echo", request, StringValue)
                latencies.append(time.perf_counter_ns() - t0)

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(caller)
        return summary(latencies, time.perf_counter() - start)


def go_client(go_peer: Path, socket: str, n: int, concurrency: int) -> dict[str, float]:
    out = subprocess.run([str(go_peer), "bench", "-socket", socket, "-n", str(n), "-c", str(concurrency)],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return json.loads(out)


def python_server(socket: str) -> ExitStack:
    """Start this script with --serve in a child process; the returned stack stops it."""
    stack = ExitStack()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", socket], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)

    def stop() -> None:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()  # the server exits when its stdin closes
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    stack.callback(stop)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "READY":
        stack.close()
        raise RuntimeError("Python ttrpc server did not start")
    return stack


async def serve(socket: str) -> None:
    server = Server()
    EchoService().register(server)
    listener = listener_from_socket(bind_unix_socket(socket))
    async with listener, trio.open_nursery() as nursery:
        await nursery.start(server.serve, listener)
        print("READY", flush=True)
        await run_sync_abandoning(sys.stdin.read)  # until the parent closes it
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=5000, help="calls per measurement (default 5000)")
    parser.add_argument("-c", "--concurrency", type=int, default=16, help="concurrent callers (default 16)")
    parser.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(serve, args.serve)
        return

    go_peer = build_go_peer()
    tmp = tempfile.mkdtemp(prefix="ttrpc-bench-", dir="/tmp")
    rows: list[tuple[str, str, dict[str, float]]] = []
    try:
        with ExitStack() as servers:
            py_sock, go_sock = os.path.join(tmp, "py.sock"), os.path.join(tmp, "go.sock")
            servers.enter_context(python_server(py_sock))
            servers.enter_context(go_server(go_peer, go_sock))
            for client_name, server_name, sock in [("Python", "Python", py_sock), ("Python", "Go", go_sock),
                                                   ("Go", "Python", py_sock), ("Go", "Go", go_sock)]:
                for concurrency in (1, args.concurrency):
                    if client_name == "Python":
                        result = trio.run(python_client, sock, args.n, concurrency)
                    else:
                        result = go_client(go_peer, sock, args.n, concurrency)
                    mode = "sequential" if concurrency == 1 else f"{concurrency} concurrent"
                    rows.append((f"{client_name} client -> {server_name} server", mode, result))
    finally:
        shutil.rmtree(tmp)

    print(f"ttrpc unary Echo round trip, N={args.n} calls per row, one unix-socket connection")
    header = f"{'pair':<31} {'mode':<14} {'p50 µs':>9} {'p90 µs':>9} {'p99 µs':>9} {'calls/s':>10}"
    print(header)
    print("-" * len(header))
    for pair, mode, r in rows:
        print(f"{pair:<31} {mode:<14} {r['p50_us']:>9.1f} {r['p90_us']:>9.1f} {r['p99_us']:>9.1f} "
              f"{r['calls_per_s']:>10.0f}")


if __name__ == "__main__":
    main()
