"""A TCP proxy that delays everything it forwards by a fixed one-way time: a network link
between an app server and PostgreSQL, on one machine.

    .venv/bin/python bench/latency_proxy.py --delay-ms 2 [--target 127.0.0.1:5432] [--port 0]

It listens on 127.0.0.1 (a free port unless --port says which), prints
"listening 127.0.0.1:PORT" once it accepts connections, and forwards each connection to the
target. Every chunk read from one side is written to the other side the delay after it was
read, in the order read; so a connection through it sees each round trip take 2 × the delay
more than on loopback, as across a link of that latency. Chunks are pipelined, not
serialised: the delay adds latency and caps no throughput. A side's close reaches the
other side after the data read before it, delayed likewise. On SIGUSR1 it prints its
counters as one JSON line; on SIGTERM or SIGINT it closes every connection, prints them
again and exits 0.

Why `tc netem` is not used: it needs root and, to leave the machine's other loopback traffic
alone, a network namespace. This needs neither, and delays only the connections sent
through it.

How it stays accurate and cheap:

- One thread, asyncio's protocols and `call_at`: a chunk costs a read, a timer and a write,
  with no thread switch and no copy beyond the kernel's.
- select(2), not epoll: asyncio's epoll selector rounds every wait up to a whole
  millisecond, which would make 0.5 ms anything up to 1.5 ms; select waits to the
  microsecond. A bench's few dozen connections are far below its 1,024 descriptors.
- The process's timer slack is set to 1 ns (Linux lets a sleep end 50 µs late by default),
  and each timer is armed early by the lag its recent wake-ups showed (a moving average,
  at most half the delay): a virtual machine wakes a sleeper 50–250 µs late, which would
  otherwise lengthen every delay by that much. So the delay is D on average, and each
  chunk's error against its due time is counted: the accuracy is measured, not assumed.
- One timer per direction of a connection, over a queue of (due time, chunk): chunks go
  out in the order they came, whatever the timer heap does with equal due times.
- A side whose socket cannot take more (its send buffer full) pauses reading from the other.

It counts, per direction, chunks and bytes; how early or late each delayed chunk went out
against its due time (the delay's accuracy under load); and the turns of each
conversation: data from the client after the server last spoke starts a new request, so
turns ÷ requests is the number of round trips each request pays.

It also times the transactions a client sends as BEGIN … COMMIT in simple queries (as
psycopg does), per number of turns: for each turn the server's time (from the proxy's
sending it the request to the answer's arrival) and the client's (from the proxy's sending
it the previous answer to its next request's arrival), and the time from the answer to
the first statement after BEGIN to COMMIT's answer, at the proxy: how long a row lock taken
by that statement is held, seen from beside the server.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import queue
import selectors
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

LISTENING = "listening "
STOP_TIMEOUT_S = 10.0
START_TIMEOUT_S = 10.0
PR_SET_TIMERSLACK = 29  # prctl(2)
LAG_AVERAGING = 0.05  # Weight of the newest wake-up in the moving average of the lag.


@dataclass
class Counters:
    """What the proxy has seen since it started."""

    delay_ms: float
    connections: int = 0
    open_connections: int = 0
    turns: int = 0
    chunks_to_server: int = 0
    bytes_to_server: int = 0
    chunks_to_client: int = 0
    bytes_to_client: int = 0
    delayed_chunks: int = 0
    # Time sent minus time due, over the delayed chunks: negative is early.
    error_total_s: float = 0.0
    error_abs_total_s: float = 0.0
    error_max_s: float = 0.0
    off_by_over_200us: int = 0
    wake_lag_s: float = 0.0  # The moving average that timers are armed early by.
    transactions: dict[int, TransactionTimes] = field(default_factory=dict)  # By turns.

    def record(self, error_s: float) -> None:
        """Count a delayed chunk sent error_s after its due time."""
        self.delayed_chunks += 1
        self.error_total_s += error_s
        self.error_abs_total_s += abs(error_s)
        self.error_max_s = max(self.error_max_s, error_s)
        self.off_by_over_200us += abs(error_s) > 200e-6

    def as_json(self) -> dict[str, Any]:
        """The counters, times in microseconds."""
        chunks = max(1, self.delayed_chunks)
        return {
            "delay_ms": self.delay_ms,
            "connections": self.connections,
            "open_connections": self.open_connections,
            "turns": self.turns,
            "chunks_to_server": self.chunks_to_server,
            "bytes_to_server": self.bytes_to_server,
            "chunks_to_client": self.chunks_to_client,
            "bytes_to_client": self.bytes_to_client,
            "delayed_chunks": self.delayed_chunks,
            "error_total_us": round(self.error_total_s * 1e6),
            "error_abs_total_us": round(self.error_abs_total_s * 1e6),
            "error_mean_us": round(self.error_total_s / chunks * 1e6, 1),
            "error_abs_mean_us": round(self.error_abs_total_s / chunks * 1e6, 1),
            "error_max_us": round(self.error_max_s * 1e6, 1),
            "off_by_over_200us": self.off_by_over_200us,
            "wake_lag_us": round(self.wake_lag_s * 1e6, 1),
            "transactions": {
                str(turns): vars(times) for turns, times in sorted(self.transactions.items())
            },
        }


@dataclass
class TransactionTimes:
    """Sums over the transactions of one number of turns, in seconds (see the module's
    docstring): per turn the client's time before its request and the server's time to
    answer; and the time from the answer to the first statement after BEGIN to COMMIT's."""

    count: int = 0
    client_s: list[float] = field(default_factory=list)
    server_s: list[float] = field(default_factory=list)
    held_s: float = 0.0

    def add(self, turns: list[tuple[float, float, float]]) -> None:
        """Count a transaction: (client's time, server's time, answer's arrival) per turn."""
        if not self.count:
            self.client_s, self.server_s = [0.0] * len(turns), [0.0] * len(turns)
        self.count += 1
        for index, (client_s, server_s, _) in enumerate(turns):
            self.client_s[index] += client_s
            self.server_s[index] += server_s
        self.held_s += turns[-1][2] - turns[1][2]


class _Conversation:
    """Times the turns of the transactions one client sends as BEGIN … COMMIT."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.turns: list[tuple[float, float, float]] | None = None  # None: outside BEGIN.
        self.client_s = 0.0
        self.ending = False

    def request(self, data: bytes, client_s: float) -> None:
        """A turn's request arrived, client_s after the client was sent the last answer."""
        # A simple query is b"Q", its length (4 bytes), then its text.
        text = data[5:13].upper() if data[:1] == b"Q" else b""
        if text.startswith(b"BEGIN"):
            self.turns = []
        self.client_s = client_s
        self.ending = text.startswith((b"COMMIT", b"ROLLBACK"))

    def answer(self, server_s: float, now: float) -> None:
        """The answer to the turn's request began to arrive, server_s after it was sent."""
        if self.turns is None:
            return
        self.turns.append((self.client_s, server_s, now))
        if self.ending:
            if len(self.turns) >= 2:
                times = self.counters.transactions.setdefault(len(self.turns), TransactionTimes())
                times.add(self.turns)
            self.turns = None


class _Direction:
    """Chunks read from one side of a connection, written to the other `delay_s` after."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay_s: float, counters: Counters):
        self.loop = loop
        self.delay_s = delay_s
        self.counters = counters
        self.sink: asyncio.Transport | None = None
        self.pending: deque[tuple[float, bytes | None]] = deque()  # None: close the sink.
        self.timer: asyncio.TimerHandle | None = None
        self.armed_for = 0.0
        self.sent_at = 0.0  # When data last went out to the sink.

    def send(self, data: bytes | None) -> None:
        """Forward data (None: the side closed) once the delay has passed."""
        if not self.delay_s:
            self._deliver(data)
            return
        self.pending.append((self.loop.time() + self.delay_s, data))
        if self.timer is None:
            self._arm()

    def _arm(self) -> None:
        """Wake up for the oldest chunk, early by the lag that wake-ups have shown."""
        self.armed_for = self.pending[0][0] - self.counters.wake_lag_s
        self.timer = self.loop.call_at(self.armed_for, self._flush)

    def _flush(self) -> None:
        self.timer = None
        now = self.loop.time()
        counters = self.counters
        # How late this wake-up came: the lag the next timers are armed early by.
        lag = min(max(0.0, now - self.armed_for), self.delay_s / 2)
        counters.wake_lag_s += LAG_AVERAGING * (lag - counters.wake_lag_s)
        # Every chunk whose timer would have been armed by now goes.
        while self.pending and self.pending[0][0] - counters.wake_lag_s <= now:
            due, data = self.pending.popleft()
            counters.record(now - due)
            self._deliver(data)
        if self.pending:
            self._arm()

    def _deliver(self, data: bytes | None) -> None:
        if self.sink is None or self.sink.is_closing():
            return
        if data is None:
            self.sink.close()
        else:
            self.sink.write(data)
            self.sent_at = self.loop.time()

    def cancel(self) -> None:
        """Drop what is still pending (the proxy is stopping)."""
        if self.timer is not None:
            self.timer.cancel()
        self.pending.clear()


class _Side(asyncio.Protocol):
    """One socket of a proxied connection: what it reads goes out through `outbound`."""

    def __init__(self, proxy: LatencyProxy, outbound: _Direction, from_client: bool) -> None:
        self.proxy = proxy
        self.outbound = outbound
        self.from_client = from_client
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        # On the client's side: whether the server spoke since the client last did.
        self.server_spoke_last = True
        self.conversation = _Conversation(proxy.counters)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        counters = self.proxy.counters
        now = self.outbound.loop.time()
        if self.from_client:
            counters.chunks_to_server += 1
            counters.bytes_to_server += len(data)
            if self.server_spoke_last:
                counters.turns += 1
                self.server_spoke_last = False
                if self.peer is not None:
                    self.conversation.request(data, now - self.peer.outbound.sent_at)
        else:
            counters.chunks_to_client += 1
            counters.bytes_to_client += len(data)
            client = self.peer
            if client is not None and not client.server_spoke_last:
                client.server_spoke_last = True
                client.conversation.answer(now - client.outbound.sent_at, now)
        self.outbound.send(data)

    def eof_received(self) -> bool:
        return False  # Close this side; connection_lost forwards the close.

    def connection_lost(self, exc: Exception | None) -> None:
        self.outbound.send(None)
        self.proxy.forget(self)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _ClientSide(_Side):
    """The side a client connected to: it opens the target's side, then starts reading."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()  # Until the target's side exists to forward to.
        self.proxy.counters.connections += 1
        self.proxy.counters.open_connections += 1
        task = asyncio.get_running_loop().create_task(self.proxy.open_target(self))
        self.proxy.tasks.add(task)
        task.add_done_callback(self.proxy.tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.counters.open_connections -= 1
        super().connection_lost(exc)


class LatencyProxy:
    """Accepts connections on 127.0.0.1 and forwards them to target, delayed."""

    def __init__(self, target_host: str, target_port: int, delay_ms: float) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.delay_s = delay_ms / 1000
        self.counters = Counters(delay_ms=delay_ms)
        self.sides: set[_Side] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def client_side(self) -> _ClientSide:
        """The protocol of a newly accepted connection."""
        loop = asyncio.get_running_loop()
        to_server = _Direction(loop, self.delay_s, self.counters)
        side = _ClientSide(self, to_server, from_client=True)
        self.sides.add(side)
        return side

    async def open_target(self, client: _ClientSide) -> None:
        """Connect the client's side to the target, or close it if the target refuses."""
        loop = asyncio.get_running_loop()
        to_client = _Direction(loop, self.delay_s, self.counters)
        to_client.sink = client.transport
        server = _Side(self, to_client, from_client=False)
        try:
            await loop.create_connection(lambda: server, self.target_host, self.target_port)
        except OSError:
            if client.transport is not None:
                client.transport.close()
            return
        self.sides.add(server)
        server.peer, client.peer = client, server
        client.outbound.sink = server.transport
        if client.transport is not None and not client.transport.is_closing():
            client.transport.resume_reading()
        elif server.transport is not None:
            server.transport.close()  # The client left while the target was connecting.

    def forget(self, side: _Side) -> None:
        """Drop a closed side's state."""
        self.sides.discard(side)

    def close_all(self) -> None:
        """Close every connection at once, dropping what is still delayed."""
        for side in list(self.sides):
            side.outbound.cancel()
            if side.transport is not None:
                side.transport.close()


async def serve(target_host: str, target_port: int, delay_ms: float, port: int) -> None:
    """Run the proxy until SIGTERM or SIGINT, printing as it goes."""
    proxy = LatencyProxy(target_host, target_port, delay_ms)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: _print(proxy.counters.as_json()))
    server = await loop.create_server(proxy.client_side, "127.0.0.1", port)
    bound = server.sockets[0].getsockname()
    _print(f"{LISTENING}{bound[0]}:{bound[1]}")
    await stop.wait()
    server.close()
    proxy.close_all()
    await asyncio.sleep(0)  # Let the transports' close callbacks run.
    _print(proxy.counters.as_json())


def _print(message: str | dict[str, Any]) -> None:
    text = message if isinstance(message, str) else json.dumps(message)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run(target_host: str, target_port: int, delay_ms: float, port: int = 0) -> None:
    """Run the proxy in this thread on a select(2) event loop (see the module's docstring)."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    with asyncio.Runner(loop_factory=_select_loop) as runner:
        runner.run(serve(target_host, target_port, delay_ms, port))


def _select_loop() -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


# Running it from the bench


@dataclass
class RunningProxy:
    """A proxy running as a process of its own, so that its CPU time is its own."""

    process: subprocess.Popen[str]
    port: int
    lines: queue.Queue[str] = field(default_factory=queue.Queue)

    def counters(self) -> dict[str, Any]:
        """Ask the proxy for its counters."""
        self.process.send_signal(signal.SIGUSR1)
        return dict(json.loads(self.lines.get(timeout=START_TIMEOUT_S)))

    def database_url(self, database_url: str) -> str:
        """database_url with its host and port replaced by the proxy's."""
        parts = urlsplit(database_url)
        credentials, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{credentials}{at}127.0.0.1:{self.port}"))


def _read_lines(stream: Any, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line.strip())


@contextmanager
def running_proxy(target: str, delay_ms: float) -> Iterator[RunningProxy]:
    """Run the proxy to target (host:port) for the duration of the block, then stop it by
    its pid; the block gets its port and counters."""
    command = [sys.executable, str(Path(__file__).resolve()), "--target", target]
    process = subprocess.Popen(
        [*command, "--delay-ms", str(delay_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    try:
        first = lines.get(timeout=START_TIMEOUT_S)
        if not first.startswith(LISTENING):
            raise RuntimeError(f"the latency proxy said {first!r}")
        yield RunningProxy(process=process, port=int(first.rpartition(":")[2]), lines=lines)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main(argv: list[str]) -> int:
    """Run the proxy from the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay, e.g. 0.5")
    parser.add_argument("--target", default="127.0.0.1:5432", help="host:port to forward to")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms cannot be negative")
    host, _, port = args.target.rpartition(":")
    run(host or "127.0.0.1", int(port), args.delay_ms, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
