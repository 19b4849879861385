"""Steady, open-loop mixed load through the gateway: embeddings, completions and streams.

Open loop: requests start on a fixed schedule whatever the answers do, as real clients would, so
a slow zone shows up as latency and never hides by slowing the load down. Every request is
unique (no cache hits); streams sample with a seed, so a resumed stream can be checked against
an undisturbed run of the same request.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field

import aiohttp

EMBED_MODEL = "all-minilm-l6-v2"
# The tier that serves each kind of request the load sends.
TIER_OF_KIND = {"embed": "edge", "complete": "core", "stream": "core"}


@dataclass
class Sample:
    kind: str  # "embed" | "complete" | "stream"
    started: float  # seconds since the load began
    latency: float = 0.0
    ok: bool = False
    status: int = 0
    zone: str = ""
    error: str = ""
    text: str = ""
    body: dict = field(default_factory=dict)
    streaming: bool = False  # a stream that has received text and not finished yet
    answered: bool = False  # the request is over (answered, failed or timed out)
    chunks: int = 0  # events with text a stream has received so far
    resumed: int = 0  # zones the gateway moved this stream through (its SSE comment says)
    attempts: int = 1  # upstream tries the gateway made before the answer began (x-meridian-attempts)


@dataclass(frozen=True)
class Rates:
    embed: float = 10.0
    complete: float = 1.0
    stream: float = 1.0


class LoadGenerator:
    """Sends the load and keeps one Sample per request."""

    def __init__(self, base_url: str, api_key: str, core_model: str, rates: Rates = Rates(), timeout: float = 60.0):
        self.base_url = base_url
        self.core_model = core_model
        self.rates = rates
        self.samples: list[Sample] = []
        self._headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._counter = 0
        self._t0 = 0.0
        # Unique per run, so no request is ever a cache hit of an earlier drill's.
        self._nonce = secrets.token_hex(4)

    def begin(self) -> None:
        """Start the clock (before `run` is scheduled, so callers can time faults against it)."""
        self._t0 = time.monotonic()

    async def run(self, duration: float) -> list[Sample]:
        """Send the load for `duration` seconds and wait for every answer."""
        if not self._t0:
            self.begin()
        connector = aiohttp.TCPConnector(limit=256)
        async with aiohttp.ClientSession(headers=self._headers, timeout=self._timeout, connector=connector) as session:
            tasks: list[asyncio.Task] = []
            schedules = [(kind, rate) for kind, rate in vars(self.rates).items() if rate > 0]
            await asyncio.gather(*(self._schedule(session, kind, rate, duration, tasks) for kind, rate in schedules))
            await asyncio.gather(*tasks)
        return self.samples

    def streams_in_flight(self, zone: str | None = None, min_chunks: int = 1, min_left: int = 0) -> int:
        """Streams that have sent at least `min_chunks` pieces of text, may send `min_left` more
        (by their max_tokens) and have not finished (served by `zone`, if given): the ones a
        fault must resume."""
        return sum(1 for s in self.samples if s.streaming and s.chunks >= min_chunks and zone in (None, s.zone)
                   and s.body.get("max_tokens", s.chunks + min_left) - s.chunks >= min_left)

    def in_flight(self, kind: str) -> int:
        """Requests of `kind` sent and not over yet."""
        return sum(1 for s in self.samples if s.kind == kind and not s.answered)

    def now(self) -> float:
        """Seconds since the load began."""
        return time.monotonic() - self._t0

    async def _schedule(self, session, kind: str, rate: float, duration: float, tasks: list) -> None:
        period = 1.0 / rate
        n = 0
        while True:
            due = n * period
            if due >= duration:
                return
            await asyncio.sleep(max(0.0, due - self.now()))
            tasks.append(asyncio.create_task(self._one(session, kind)))
            n += 1

    async def _one(self, session: aiohttp.ClientSession, kind: str) -> None:
        self._counter += 1
        i = self._counter
        sample = Sample(kind, self.now())
        self.samples.append(sample)
        started = time.monotonic()
        try:
            if kind == "embed":
                sample.body = {"model": EMBED_MODEL, "input": [f"drill {self._nonce} sentence number {i}"]}
                await self._unary(session, "/v1/embeddings", sample)
            elif kind == "complete":
                sample.body = {"model": self.core_model, "prompt": f"Drill {self._nonce} prompt {i}:", "max_tokens": 8, "temperature": 0}
                await self._unary(session, "/v1/completions", sample)
            else:
                sample.body = {"model": self.core_model, "prompt": f"Drill {self._nonce} story {i}:", "max_tokens": 24,
                               "temperature": 0.8, "seed": i, "stream": True}
                await stream_text(session, self.base_url, sample)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, OSError) as exc:
            sample.ok, sample.error = False, f"{type(exc).__name__}: {exc}"
        sample.latency = time.monotonic() - started
        sample.answered = True

    async def _unary(self, session, path: str, sample: Sample) -> None:
        async with session.post(self.base_url + path, data=json.dumps(sample.body)) as r:
            _note_answer(sample, r)
            text = await r.text()
            sample.ok = r.status == 200
            if not sample.ok:
                sample.error = text[:300]


def _note_answer(sample: Sample, r: aiohttp.ClientResponse) -> None:
    """What the answer's status line and headers say: its status, the zone that served it, the tries."""
    sample.status = r.status
    sample.zone = r.headers.get("x-meridian-zone", "")
    sample.attempts = int(r.headers.get("x-meridian-attempts", "1"))


async def stream_text(session: aiohttp.ClientSession, base_url: str, sample: Sample, headers: dict | None = None) -> None:
    """Read a completion stream to its end; an error event or a missing [DONE] is a failure."""
    async with session.post(base_url + "/v1/completions", data=json.dumps(sample.body), headers=headers) as r:
        _note_answer(sample, r)
        if r.status != 200:
            sample.error = (await r.text())[:300]
            return
        parts: list[str] = []
        done = False
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith(": meridian-resumed "):
                sample.resumed = int(line.rsplit(" ", 1)[1])
                continue
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                sample.error = event["error"].get("message", "error event")
                sample.streaming = False
                return
            parts.append(event["choices"][0]["text"])
            sample.chunks += 1
            sample.streaming = True
        sample.streaming = False
        sample.text = "".join(parts)
        sample.ok = done
        if not done:
            sample.error = "stream ended without [DONE]"
