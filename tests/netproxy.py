"""A loopback TCP proxy that plays a bad network for the tests.

It relays 127.0.0.1:<its port> to a target. On demand it cuts every open connection
(`cut()`) or refuses new ones (`close_gate()`); in chaos mode it also cuts each
connection after a random lifetime (`lifetime=(min, max)` seconds) and refuses new
connections during short random outages (`start_outages()`). A cut or a refusal is an
abort: the peers see their connection reset, as on a dead network. `hold_after(n)` stalls
what the target sends, after n more bytes, until `release()`: a link gone quiet.
"""

from __future__ import annotations

import asyncio
import random


class TcpProxy:
    """Relays 127.0.0.1:<port> to a target. `close_gate()` makes it refuse (reset) new
    connections, `cut()` resets every open one; the clients see a dead network."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", *,
                 lifetime: tuple[float, float] | None = None, seed: int | None = None):
        self.target = (target_host, target_port)
        self.lifetime = lifetime
        self.random = random.Random(seed)
        self.gate_open = True
        self.links: set[tuple[asyncio.Transport, asyncio.Transport]] = set()
        self.server: asyncio.Server | None = None
        self.url = ""
        self.accepted = 0  # connections relayed to the target
        self.refused = 0  # connections reset at once: gate closed, or target unreachable
        self.cuts = 0  # relayed connections reset while open, by cut() or their lifetime
        self.outages = 0  # times start_outages() closed the gate
        self.relayed_back = 0  # bytes relayed from the target to the clients
        self.held = asyncio.Event()  # set once a hold_after() has begun
        self._hold_at: int | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._outages: asyncio.Task | None = None

    async def start(self) -> TcpProxy:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    def close_gate(self) -> None:
        self.gate_open = False

    def open_gate(self) -> None:
        self.gate_open = True

    def hold_after(self, count: int) -> None:
        """Relay `count` more bytes from the target, then nothing more from it until
        release(); `held` is set when the hold begins."""
        self.held.clear()
        self._hold_at = self.relayed_back + count

    def release(self) -> None:
        self._hold_at = None
        self._flowing.set()

    def cut(self) -> None:
        for link in list(self.links):
            self._cut(link)

    def start_outages(self, every: tuple[float, float] = (0.2, 1.0),
                      length: tuple[float, float] = (0.02, 0.15)) -> None:
        """Close the gate for a random `length` after every random `every` seconds."""
        self._outages = asyncio.create_task(self._flap(every, length))

    async def stop_outages(self) -> None:
        if self._outages is not None:
            self._outages.cancel()
            try:
                await self._outages
            except asyncio.CancelledError:
                pass
            self._outages = None
        self.open_gate()

    async def close(self) -> None:
        self.release()
        await self.stop_outages()
        self.close_gate()
        self.cut()
        self.server.close()
        try:
            await asyncio.wait_for(self.server.wait_closed(), 5)
        except TimeoutError:
            pass

    async def _flap(self, every, length) -> None:
        # These sleeps make the weather; no test waits on them.
        while True:
            await asyncio.sleep(self.random.uniform(*every))
            self.close_gate()
            self.outages += 1
            await asyncio.sleep(self.random.uniform(*length))
            self.open_gate()

    def _cut(self, link) -> None:
        if link in self.links:
            self.links.discard(link)
            self.cuts += 1
            for transport in link:
                transport.abort()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if not self.gate_open:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self.refused += 1
            writer.transport.abort()
            return
        self.accepted += 1
        link = (writer.transport, up_writer.transport)
        self.links.add(link)
        timer = None
        if self.lifetime is not None:
            timer = asyncio.get_running_loop().call_later(
                self.random.uniform(*self.lifetime), self._cut, link)
        try:
            await asyncio.gather(self._pipe(reader, up_writer),
                                 self._pipe(up_reader, writer, back=True))
        finally:
            if timer is not None:
                timer.cancel()
            self.links.discard(link)
            for transport in link:
                transport.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    back: bool = False) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
                if back:
                    self.relayed_back += len(data)
                    if self._hold_at is not None and self.relayed_back >= self._hold_at:
                        self._hold_at = None
                        self._flowing.clear()
                        self.held.set()
                    await self._flowing.wait()
            if not writer.transport.is_closing() and writer.can_write_eof():
                writer.write_eof()  # pass a half-close on
        except (ConnectionError, OSError, RuntimeError):
            writer.transport.abort()
