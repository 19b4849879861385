"""HTTP/3 first, HTTP/1.1 when UDP is blocked: race the handshakes, prefer QUIC, remember the loser.

Only connection set-up is raced, never a request: a request is written on exactly one transport,
except a replay-safe one that already left as 0-RTT data and is sent again over HTTP/1.1 when QUIC
turns out to be unreachable (replaying it is harmless by definition).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from mobile.errors import ConnectError, ConnectionRefused, TransportError
from mobile.h1 import H1Transport
from mobile.h3 import H3Transport
from mobile.http import HttpRequest, HttpResponse


# After a gateway refused a QUIC connection (at its connection limit), HTTP/1.1 for this long.
REFUSED_RETRY_S = 10.0


class ProtocolMemory:
    """Per server: 'QUIC failed here, use HTTP/1.1 until <time>' (like an Alt-Svc cache, inverted)."""

    def __init__(self, ttl_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._h1_until: dict[str, float] = {}

    def quic_failed(self, server: str, for_s: float | None = None) -> None:
        """Remember that QUIC to `server` failed: skip it for `for_s` (default `ttl_s`)."""
        self._h1_until[server] = self._clock() + (self.ttl_s if for_s is None else for_s)

    def quic_worked(self, server: str) -> None:
        """QUIC to `server` works again."""
        self._h1_until.pop(server, None)

    def use_h1(self, server: str) -> bool:
        """Whether `server` is remembered as QUIC-broken right now."""
        until = self._h1_until.get(server)
        if until is not None and self._clock() >= until:
            del self._h1_until[server]
            return False
        return until is not None


class RacingTransport:
    """One Transport over an H3Transport and an H1Transport to the same gateway."""

    protocol = "h3|http/1.1"

    def __init__(self, h3: H3Transport | None, h1: H1Transport | None, *, memory: ProtocolMemory | None = None,
                 race_delay_s: float = 0.25) -> None:
        if h3 is None and h1 is None:
            raise ValueError("at least one of h3 and h1 is needed")
        self.h3, self.h1 = h3, h1
        self.memory = memory or ProtocolMemory()
        self._race_delay_s = race_delay_s
        self._quic_attempt: asyncio.Task | None = None

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """Send on HTTP/3 when it works (or is being tried first), else on HTTP/1.1."""
        if self.h3 is None:
            return await self.h1.handle(request)
        if self.h1 is None:
            return await self.h3.handle(request)
        if self.memory.use_h1(self.h3.server):
            return await self.h1.handle(request)
        if self.h3.ready:
            return await self.h3.handle(request)
        early: asyncio.Task | None = None
        attempt = self._attempt()
        if request.replay_safe:
            # Sent at once as 0-RTT data when a ticket allows it (else right after the handshake),
            # without waiting for the race: this is where resumption saves its round trip.
            early = asyncio.get_running_loop().create_task(self.h3.handle(request))
        try:
            winner = await self._race(attempt)
        except BaseException:
            if early is not None:
                early.cancel()
            raise
        if winner == "h3":
            return await (early if early is not None else self.h3.handle(request))
        if early is not None:
            early.cancel()
        return await self.h1.handle(request)

    def _attempt(self) -> asyncio.Task:
        """The QUIC handshake in progress, started if none is; its outcome is remembered per server."""
        if self._quic_attempt is None or self._quic_attempt.done():
            task = asyncio.get_running_loop().create_task(self.h3.connect())
            task.add_done_callback(self._remember)
            self._quic_attempt = task
        return self._quic_attempt

    def _remember(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            self.memory.quic_worked(self.h3.server)
        elif isinstance(error, ConnectionRefused):
            # The gateway answered over UDP and is busy: not a blocked path, so back to QUIC soon.
            self.memory.quic_failed(self.h3.server, REFUSED_RETRY_S)
        else:
            self.memory.quic_failed(self.h3.server)

    async def _race(self, quic: asyncio.Task) -> str:
        """'h3' or 'h1': QUIC gets a head start of race_delay_s, then TCP+TLS runs beside it."""
        done, _ = await asyncio.wait({quic}, timeout=self._race_delay_s)
        if quic in done and quic.exception() is None:
            return "h3"
        tcp = asyncio.get_running_loop().create_task(self.h1.connect())
        pending = {quic, tcp} - done
        errors: list[BaseException] = [quic.exception()] if quic in done else []
        try:
            while pending:
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    if task.exception() is None:
                        # QUIC keeps going in the background if TCP won: the next request may use it.
                        return "h3" if task is quic else "h1"
                    errors.append(task.exception())
        finally:
            if not tcp.done():
                tcp.cancel()  # QUIC won; the half-open TCP connection is not needed
        raise ConnectError("no transport could connect: " + "; ".join(str(e) for e in errors))

    async def aclose(self) -> None:
        """Close both transports."""
        if self._quic_attempt is not None and not self._quic_attempt.done():
            self._quic_attempt.cancel()
        for t in (self.h3, self.h1):
            if t is not None:
                await t.aclose()


__all__ = ["ProtocolMemory", "RacingTransport", "TransportError"]
