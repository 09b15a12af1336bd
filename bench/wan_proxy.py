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
(the link both tools share), with a burst of 20 ms' worth. It also counts the
requests in flight (begun, answer not yet started) and keeps their peak, which the
tests use to check batchpush's limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
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
                    self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                    await asyncio.sleep(self.delay_s)
                elif not request and state["waiting"]:
                    state["waiting"] = False
                    self.in_flight -= 1
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
            with contextlib.suppress(ConnectionError, OSError):
                writer.close()

    def stats(self) -> dict[str, int]:
        return {"requests": self.requests, "connections": self.connections, "peak_in_flight": self.peak_in_flight, "bytes": self.bytes}


async def serve(proxy: WanProxy) -> None:
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
