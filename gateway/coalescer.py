"""Embedding requests waiting for the same edge endpoint share one Embed RPC.

grpclib's HTTP/2 is pure Python: an RPC costs the gateway several hundred microseconds of CPU
whatever it carries, and the edge's Embed takes a list of inputs. So the requests for a model that
queue up while `max_in_flight` RPCs are out leave together in the next one, up to `max_inputs`
inputs: nothing waits while the endpoint is idle, and under load the cost of an RPC is shared.

Each request keeps its own outcome: its vectors and its token count (the edge reports the tokens
of every input), its own deadline and cancellation. The edge refuses a whole RPC when one input is
bad, so a refused RPC that carried several requests is sent again request by request: only the
bad one fails. Transport failures fail every request of the RPC, and each then goes through the
failover on its own (retry budget, ejection), as it would have without coalescing. An RPC carries
one `traceparent`, its oldest request's: the edge's span for the RPC joins that trace only.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from gateway.errors import GatewayError
from gateway.upstreams import EmbedResult


@dataclass(frozen=True, slots=True)
class EmbedReply:
    """What one Embed RPC answered."""

    vectors: np.ndarray  # float32 [inputs, dimension]
    prompt_tokens: int
    token_counts: tuple[int, ...]  # per input; empty from an edge that does not report them


# (model, inputs, timeout in seconds, traceparent) -> the reply of one RPC.
EmbedRpc = Callable[[str, list[str], float, str | None], Awaitable[EmbedReply]]


@dataclass(slots=True)
class _Waiter:
    inputs: list[str]
    deadline: float
    traceparent: str | None
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Coalescer:
    """Queues embedding requests per model and sends them in as few RPCs as the load allows."""

    def __init__(self, rpc: EmbedRpc, *, max_inputs: int, max_in_flight: int) -> None:
        self._rpc = rpc
        self._max_inputs = max_inputs
        self._max_in_flight = max_in_flight
        self._queues: dict[str, deque[_Waiter]] = {}
        self._in_flight = 0
        # Coalescing starts once the edge has shown it reports tokens per input (a rolling
        # upgrade may still run edges that do not).
        self._counts_known = False
        self.rpcs = 0  # RPCs sent, for tests and diagnostics

    async def embed(self, model: str, inputs: list[str], *, timeout: float, traceparent: str | None) -> EmbedResult:
        """The embeddings of `inputs`, sent alone or with other requests for `model`."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(inputs, loop.time() + timeout, traceparent)
        self._queues.setdefault(model, deque()).append(waiter)
        self._pump(model)
        return await waiter.future

    def _pump(self, model: str) -> None:
        queue = self._queues.get(model)
        # Until coalescing is known to be possible, requests go out at once, one per RPC, as before.
        while queue and (self._in_flight < self._max_in_flight or not self._counts_known):
            batch = self._take(queue)
            if batch:
                self._in_flight += 1
                task = asyncio.ensure_future(self._send(model, batch))
                task.add_done_callback(lambda _: self._sent(model))
                for w in batch:
                    w.future.add_done_callback(lambda _, b=batch, t=task: _abandon_if_unwanted(b, t))

    def _take(self, queue: deque[_Waiter]) -> list[_Waiter]:
        """The next RPC's requests: the oldest live ones, up to `max_inputs` inputs (one at least)."""
        batch: list[_Waiter] = []
        size = 0
        while queue:
            w = queue[0]
            if w.future.done():  # cancelled while queued (timed out, or beaten by a hedge)
                queue.popleft()
                continue
            if batch and (not self._counts_known or size + len(w.inputs) > self._max_inputs):
                break
            batch.append(queue.popleft())
            size += len(w.inputs)
        return batch

    def _sent(self, model: str) -> None:
        self._in_flight -= 1
        for name in (model, *(m for m in self._queues if m != model)):
            self._pump(name)

    async def _send(self, model: str, batch: list[_Waiter]) -> None:
        inputs = [text for w in batch for text in w.inputs]
        timeout = max(w.deadline for w in batch) - asyncio.get_running_loop().time()
        self.rpcs += 1
        try:
            reply = await self._rpc(model, inputs, max(timeout, 0.001), batch[0].traceparent)
        except GatewayError as err:
            if len(batch) == 1:
                _fail(batch[0], err)
            else:
                # A refusal names one bad input but fails the whole RPC: ask again one by one.
                await asyncio.gather(*(self._send_alone(model, w) for w in batch))
            return
        except asyncio.CancelledError:
            for w in batch:
                w.future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - a transport failure is every request's failure
            for w in batch:
                _fail(w, exc)
            return
        self._resolve(batch, reply)

    async def _send_alone(self, model: str, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        self.rpcs += 1
        timeout = max(waiter.deadline - asyncio.get_running_loop().time(), 0.001)
        try:
            reply = await self._rpc(model, waiter.inputs, timeout, waiter.traceparent)
        except Exception as exc:  # noqa: BLE001 - this request's own outcome
            _fail(waiter, exc)
            return
        self._resolve([waiter], reply)

    def _resolve(self, batch: list[_Waiter], reply: EmbedReply) -> None:
        total = sum(len(w.inputs) for w in batch)
        counts = reply.token_counts if len(reply.token_counts) == total else ()
        self._counts_known = bool(counts)
        start = 0
        for w in batch:
            end = start + len(w.inputs)
            if counts:
                tokens = sum(counts[start:end])
            else:  # an edge without per-input counts: a single request has them all
                tokens = reply.prompt_tokens if len(batch) == 1 else round(reply.prompt_tokens * len(w.inputs) / total)
            if not w.future.done():
                w.future.set_result(EmbedResult(reply.vectors[start:end], tokens))
            start = end


def _fail(waiter: _Waiter, exc: BaseException) -> None:
    if not waiter.future.done():
        waiter.future.set_exception(exc)


def _abandon_if_unwanted(batch: list[_Waiter], task: asyncio.Future) -> None:
    """Cancel an RPC once every request it carries has been cancelled (the edge stops working on it)."""
    if not task.done() and all(w.future.cancelled() for w in batch):
        task.cancel()
