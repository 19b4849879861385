"""The requests in flight in the Triton model, and whether their clients went away.

Triton frees a request's response factory once its final response is sent, and asking that request
`is_cancelled()` afterwards dereferences the freed factory inside the server
(`TRITONBACKEND_ResponseFactoryIsCancelled`): the whole server dies with SIGSEGV. The watcher thread
asks while the engine thread answers, so the two must not interleave: a request is asked only while
it is still here, under the lock, and it leaves (under the same lock) before its final response goes.
"""

from __future__ import annotations

import threading
from typing import Protocol


class Cancellable(Protocol):
    def is_cancelled(self) -> bool: ...


class LiveRequests:
    """Request id -> request, for the requests whose final response has not been sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[str, Cancellable] = {}

    def add(self, request_id: str, request: Cancellable) -> None:
        with self._lock:
            self._requests[request_id] = request

    def remove(self, request_id: str) -> None:
        """Before the request's final response: once this returns, nothing asks it again."""
        with self._lock:
            self._requests.pop(request_id, None)

    def cancelled(self) -> list[str]:
        """The ids of the requests whose clients went away; they leave the set."""
        with self._lock:
            ids = list(self._requests)
        gone = []
        for request_id in ids:
            with self._lock:  # one request at a time: the engine thread waits at most one question
                request = self._requests.get(request_id)
                if request is None:  # answered meanwhile: its factory may be freed already
                    continue
                try:
                    cancelled = request.is_cancelled()
                except Exception:  # noqa: BLE001 - a request that cannot say is left to finish
                    continue
                if cancelled:
                    del self._requests[request_id]
                    gone.append(request_id)
        return gone
