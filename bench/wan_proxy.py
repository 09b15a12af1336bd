"""A WAN in front of a loopback registry: a fixed delay per request and an optional
bandwidth cap shared by every connection.

``python bench/wan_proxy.py UPSTREAM_HOST:PORT [--delay-ms 25] [--rate BYTES_PER_S]``
listens on a free loopback port, prints it on its first line of stdout, and relays
bytes until it is terminated (SIGTERM); on exit it prints a JSON line of what it saw.

Bytes are streamed, never parsed. HTTP/1.1 clients do not pipeline (requests and
skopeo's Go client send a request once the previous answer is read), so a request
begins whenever the client sends after the server has answered, or first on a
connection: those first bytes, and each new connection, wait ``--delay-ms`` (one
round trip per request/response exchange; the rest of a body follows at once).
``--rate`` is a token bucket over the bytes of both directions of all connections
(the link both tools share), with a burst of 20 ms' worth.

It counts the requests in flight (begun, answer not yet started): their peak,
which the tests use to check batchpush's limit, and their average over the time
any was in flight (the area under the in-flight count over that time: how many
round trips a tool overlaps). SIGUSR1 prints a JSON line of those figures for the
window since the last SIGUSR1 (the bench's one run), then starts a new window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from registry import Registry

CHUNK = 256 << 10


class Bucket:
    """A shared link of ``rate`` bytes/s: each send is booked after the ones before it."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst_s = 0.02
        self.free_at = 0.0

    async def take(self, n: int) -> None:
        now = time.monotonic()
        start = max(now - self.burst_s, self.free_at)
        self.free_at = start + n / self.rate
        if self.free_at > now:
            await asyncio.sleep(self.free_at - now)


@dataclass
class InFlight:
    """Requests in flight over a window of time: their peak and their average over
    the time any was in flight (request-seconds / busy seconds)."""

    requests: int = 0
    peak: int = 0
    #: the integral of the in-flight count over time
    request_s: float = 0.0
    #: the time at least one request was in flight
    busy_s: float = 0.0
    now: int = 0
    changed_at: float = field(default_factory=time.monotonic)

    def change(self, by: int) -> None:
        at = time.monotonic()
        if self.now:
            self.request_s += self.now * (at - self.changed_at)
            self.busy_s += at - self.changed_at
        self.changed_at = at
        self.now += by
        if by > 0:
            self.requests += by
            self.peak = max(self.peak, self.now)

    def figures(self) -> dict[str, float]:
        self.change(0)
        return {"requests": self.requests, "peak_in_flight": self.peak, "average_in_flight": round(self.request_s / self.busy_s, 2) if self.busy_s else 0.0, "busy_s": round(self.busy_s, 3)}

    def next_window(self) -> InFlight:
        """A new window, with the requests in flight now still in it."""
        return InFlight(peak=self.now, now=self.now)


class WanProxy:
    def __init__(self, upstream: tuple[str, int], delay_s: float, rate: float | None) -> None:
        self.upstream = upstream
        self.delay_s = delay_s
        self.bucket = Bucket(rate) if rate else None
        self.requests = 0
        self.connections = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.bytes = 0
        #: the in-flight figures since the last SIGUSR1
        self.window = InFlight()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await asyncio.sleep(self.delay_s)  # the TCP handshake's round trip
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        # per connection: has the server answered since the client last sent?
        state = {"answered": True, "waiting": False}
        # a connection still open when the proxy stops ends quietly (asyncio 3.11
        # would print the cancelled handler's traceback)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(self._pump(reader, up_writer, state, request=True), self._pump(up_reader, writer, state, request=False), return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, bool], *, request: bool) -> None:
        try:
            while data := await reader.read(CHUNK):
                if request and state["answered"]:  # a new request begins: one round trip
                    state["answered"] = False
                    state["waiting"] = True
                    self.requests += 1
                    self.in_flight += 1
                    self.window.change(+1)
                    self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                    await asyncio.sleep(self.delay_s)
                elif not request and state["waiting"]:
                    state["waiting"] = False
                    self.in_flight -= 1
                    self.window.change(-1)
                if not request:
                    state["answered"] = True
                if self.bucket is not None:
                    await self.bucket.take(len(data))
                self.bytes += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if state["waiting"] and not request:  # closed unanswered
                state["waiting"] = False
                self.in_flight -= 1
                self.window.change(-1)
            with contextlib.suppress(ConnectionError, OSError):
                writer.close()

    def stats(self) -> dict[str, int]:
        return {"requests": self.requests, "connections": self.connections, "peak_in_flight": self.peak_in_flight, "bytes": self.bytes}

    def report_window(self) -> None:
        """The in-flight figures since the last report, as a JSON line; a new window begins."""
        print(json.dumps(self.window.figures()), flush=True)
        self.window = self.window.next_window()


async def serve(proxy: WanProxy) -> None:
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # before the port is printed: a SIGUSR1 sent as soon as it is read must not
    # meet the default action (the end of the process)
    loop.add_signal_handler(signal.SIGUSR1, proxy.report_window)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await stop.wait()
    print(json.dumps(proxy.stats()), flush=True)


@dataclass
class WanRegistry(Registry):
    """A real registry reached through a WanProxy: ``host`` is the proxy's."""

    proxy: subprocess.Popen[str] | None = None
    #: what the proxy saw, once stopped
    seen: dict[str, Any] | None = None

    def stop(self) -> None:
        self.stop_proxy()
        super().stop()

    def in_flight(self) -> dict[str, float]:
        """The proxy's in-flight figures since the last call (requests, their peak and
        average in flight, busy seconds); a new window begins. Empty without a proxy."""
        if self.proxy is None or self.proxy.poll() is not None:
            return {}
        assert self.proxy.stdout is not None
        self.proxy.send_signal(signal.SIGUSR1)
        ready, _, _ = select.select([self.proxy.stdout], [], [], 10)
        return json.loads(self.proxy.stdout.readline()) if ready else {}

    def stop_proxy(self) -> None:
        """Stop the proxy alone (the registry goes on) and keep what it saw."""
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.terminate()
            out, _ = self.proxy.communicate(timeout=10)
            self.seen = json.loads(out.strip().splitlines()[-1]) if out.strip() else None


def behind_wan(registry: Registry, delay_ms: float, rate: float | None = None) -> WanRegistry:
    """``registry`` behind a proxy of its own (this file, run as a process)."""
    command = [sys.executable, os.path.abspath(__file__), registry.host, "--delay-ms", str(delay_ms), "--rate", str(rate or 0)]
    proxy = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert proxy.stdout is not None
    port = int(proxy.stdout.readline())
    return WanRegistry(f"127.0.0.1:{port}", registry.root, registry.log_path, registry.process, registry.scheme, proxy=proxy)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream", metavar="HOST:PORT")
    parser.add_argument("--delay-ms", type=float, default=25.0, help="added once per request and per new connection")
    parser.add_argument("--rate", type=float, default=0.0, help="bytes/s shared by all connections, both directions (0: no cap)")
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    asyncio.run(serve(WanProxy((host, int(port)), args.delay_ms / 1e3, args.rate or None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
