"""The Triton model's requests in flight: a request is never asked whether it was cancelled after
its final response went (Triton has freed it then: asking crashed the whole server)."""

from __future__ import annotations

import threading
import time

from core.triton.live_requests import LiveRequests


class Request:
    """A request that, like Triton's, must not be asked once its final response was sent."""

    def __init__(self, cancelled: bool = False) -> None:
        self.finished = False
        self.cancelled = cancelled
        self.asked_after_finish = False

    def is_cancelled(self) -> bool:
        time.sleep(0.0002)  # the IPC round trip to the server: the window the race needs
        if self.finished:
            self.asked_after_finish = True
        return self.cancelled


def test_a_request_is_never_asked_after_its_final_response():
    live = LiveRequests()
    stop = threading.Event()

    def watcher() -> None:
        while not stop.is_set():
            live.cancelled()

    thread = threading.Thread(target=watcher)
    thread.start()
    requests = []
    try:
        for i in range(300):
            request = Request()
            requests.append(request)
            live.add(str(i), request)
            time.sleep(0.0003)
            live.remove(str(i))  # what the responder does before the final response ...
            request.finished = True  # ... which frees the request
    finally:
        stop.set()
        thread.join()
    assert not any(r.asked_after_finish for r in requests)


def test_cancelled_requests_are_reported_once_and_leave():
    live = LiveRequests()
    live.add("a", Request(cancelled=True))
    live.add("b", Request())
    assert live.cancelled() == ["a"]
    assert live.cancelled() == []
    live.remove("b")
    live.remove("b")  # twice, or never added: no error
    assert live.cancelled() == []
