"""grpclib's server with two fixes to how a connection handles a client's RST_STREAM (grpclib 0.4.9).

A gateway cancels RPCs all the time: a hedge that lost, a coalesced RPC whose requests all left, a
deadline. Two races in grpclib's `Handler` then hurt a long-lived connection:

- A stream reset after its handler task finished and was collected raises `KeyError` inside
  `data_received`; asyncio treats that as fatal and drops the whole connection, with every other
  RPC on it.
- A stream reset before its handler task ever ran (HEADERS, DATA and RST_STREAM in one read)
  cancels a coroutine that never started, so its `finally` never releases the stream: its DATA
  stays charged to the connection's flow-control window (grpclib issue #217). The debt grows with
  every such cancel until the window is gone and the connection, alive for HEADERS, carries no
  request bodies: RPCs hang until their deadline.

`Server` here builds each connection's handler from `Handler` below, which fixes both. It also
closes the connections still open when it closes (grpclib stops listening and cancels handlers,
but leaves the connections up): an RPC a client sends in that moment then fails at once and goes
elsewhere, instead of waiting for an answer that never comes until its deadline.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import grpclib.server
from grpclib.protocol import H2Protocol


class Handler(grpclib.server.Handler):
    """grpclib's per-connection handler, safe against resets that race the handler task."""

    def accept(self, stream: Any, headers: Any, release_stream: Callable[[], Any]) -> None:
        released = False

        def release_once() -> None:
            nonlocal released
            if not released:
                released = True
                release_stream()

        super().accept(stream, headers, release_once)
        # A task cancelled before its first step never enters request_handler's try/finally.
        self._tasks[stream].add_done_callback(lambda _: release_once())

    def cancel(self, stream: Any) -> None:
        task = self._tasks.pop(stream, None)
        if task is None:  # finished and collected already: nothing left to cancel
            return
        task.cancel()
        self._cancelled.add(task)


class Server(grpclib.server.Server):
    """grpclib's `Server`, its connections handled by `Handler` above and closed with it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()

    def _protocol_factory(self) -> H2Protocol:
        self.__gc_step__()
        handler = Handler(self._mapping, self._codec, self._status_details_codec, self.__dispatch__)
        self._handlers.add(handler)
        protocol = H2Protocol(handler, self._config, self._h2_config)
        self._protocols.add(protocol)
        return protocol

    def close(self) -> None:
        """Stop listening, cancel what still runs, and close every connection (what is already
        written to a connection is still sent)."""
        super().close()
        for protocol in list(self._protocols):
            processor = getattr(protocol, "processor", None)  # absent until the connection is made
            if processor is not None:
                processor.close("server closed")
