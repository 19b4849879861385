"""The core as an Upstream: Triton's KServe v2 gRPC protocol against a decoupled model."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from gateway.config import Tier
from gateway.errors import GatewayError, Kind, UpstreamFailure
from gateway.outliers import DEFAULT_POLICY, EjectionPolicy
from gateway.replicas import ReplicatedUpstream, Resolver, resolve
from gateway.upstreams import EmbedResult, GenerateCall, GenerateChunk

# The core marks refusals of the request itself "bad input: MESSAGE", or "bad input [CODE]: MESSAGE"
# with an OpenAI error code (the stream protocol carries only a message): such errors are the
# client's and are not retried in another zone.
_REFUSAL = re.compile(r"bad input(?: \[(?P<code>[a-z_]+)\])?:(?P<message>.*)", re.IGNORECASE | re.DOTALL)
_OUTPUTS = ("text_output", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens")


class CoreChannel:
    """One Triton server's address: its gRPC client."""

    def __init__(self, host: str, grpc_port: int, models: list[str]) -> None:
        address = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
        self._client = InferenceServerClient(url=f"{address}:{grpc_port}")
        self._models = models

    async def generate(self, call: GenerateCall, *, timeout: float) -> AsyncIterator[GenerateChunk]:
        """Stream a generation from the decoupled model through `stream_infer`."""
        request = {
            "model_name": call.model,
            "model_version": call.model_version,
            "inputs": _inputs(call),
            "outputs": [InferRequestedOutput(n) for n in _OUTPUTS],
        }
        if call.traceparent:
            request["parameters"] = {"traceparent": call.traceparent}

        async def one_request():
            yield request

        responses = self._client.stream_infer(one_request(), stream_timeout=timeout)
        try:
            async for result, error in responses:
                if error is not None:
                    raise _classify_error(error)
                chunk = _chunk(result)
                yield chunk
                if chunk.finish_reason:
                    return
            raise UpstreamFailure("core closed the stream before the generation finished")
        except (GatewayError, UpstreamFailure):
            raise
        except asyncio.CancelledError:
            raise
        except GeneratorExit:
            raise
        except Exception as exc:
            raise _classify_transport(exc) from exc
        finally:
            # Ends the call on Triton's side too, so a client that went away frees the engine.
            responses.cancel()

    async def health(self, *, timeout: float) -> bool:
        """Triton's server readiness and the readiness of every model this core serves, asked
        at once (one round trip, not one per question); raises when the server does not answer."""
        # gRPC deadlines, not a wait_for around the gather: a wait_for cancelled by the caller's own
        # timeout at the same instant left the gather's failure unretrieved.
        checks = [self._client.is_server_ready(client_timeout=timeout),
                  *(self._client.is_model_ready(m, client_timeout=timeout) for m in self._models)]
        answers = await asyncio.gather(*checks, return_exceptions=True)  # every call's end is read
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return all(answers)

    async def close(self) -> None:
        """Close the gRPC channel."""
        await self._client.close()


class CoreUpstream(ReplicatedUpstream[CoreChannel]):
    """One zone's core: every Triton server its name resolves to, balanced per request
    (`gateway/replicas.py`; one server per zone in the shipped manifests)."""

    tier: Tier = "core"

    def __init__(
        self,
        zone: str,
        host: str,
        grpc_port: int,
        models: list[str],
        *,
        resolve_interval_s: float = 5.0,
        resolver: Resolver = resolve,
        ejection: EjectionPolicy = DEFAULT_POLICY,
    ) -> None:
        super().__init__(
            zone, host, grpc_port, lambda h, p: CoreChannel(h, p, models),
            resolve_interval_s=resolve_interval_s, resolver=resolver, ejection=ejection,
        )

    async def embed(
        self, model: str, inputs: list[str], *, timeout: float, traceparent: str | None = None
    ) -> EmbedResult:
        """The core serves no embedding models."""
        raise GatewayError(Kind.BAD_REQUEST, f"model {model!r} does not produce embeddings")


def _inputs(call: GenerateCall) -> list[InferInput]:
    inputs = [
        _tensor("text_input", [call.prompt.encode()], "BYTES"),
        _tensor("temperature", [call.temperature], "FP32"),
        _tensor("top_p", [call.top_p], "FP32"),
        _tensor("stream", [call.stream], "BOOL"),
    ]
    if call.messages is not None:
        inputs.append(_tensor("messages", [json.dumps(call.messages).encode()], "BYTES"))
    if call.max_tokens is not None:
        inputs.append(_tensor("max_tokens", [call.max_tokens], "INT32"))
    if call.fit_context:
        inputs.append(_tensor("fit_context", [True], "BOOL"))
    if call.seed is not None:
        inputs.append(_tensor("seed", [call.seed], "UINT64"))
    if call.stop:
        inputs.append(_tensor("stop", [s.encode() for s in call.stop], "BYTES"))
    if call.prefix_token_ids:
        inputs.append(_tensor("prefix_token_ids", list(call.prefix_token_ids), "INT32"))
    return inputs


_NP = {"BYTES": np.object_, "FP32": np.float32, "BOOL": np.bool_, "INT32": np.int32, "UINT64": np.uint64}


def _tensor(name: str, values: list, dtype: str) -> InferInput:
    array = np.array(values, dtype=_NP[dtype])
    tensor = InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def _chunk(result) -> GenerateChunk:
    def scalar(name: str, default=None):
        value = result.as_numpy(name)
        return default if value is None or value.size == 0 else value.reshape(-1)[0]

    text = scalar("text_output", b"")
    reason = scalar("finish_reason", b"")
    ids = result.as_numpy("token_ids")
    return GenerateChunk(
        text=text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text),
        token_ids=[] if ids is None else [int(i) for i in ids.reshape(-1)],
        finish_reason=(reason.decode() if isinstance(reason, bytes) else str(reason)) or None,
        prompt_tokens=int(scalar("prompt_tokens", 0)),
        completion_tokens=int(scalar("completion_tokens", 0)),
    )


def _classify_error(error: InferenceServerException) -> Exception:
    message = error.message() or str(error)
    refused = _REFUSAL.match(message)
    if refused:  # the request itself: every zone would refuse it
        return GatewayError(Kind.BAD_REQUEST, refused.group("message").strip(), code=refused.group("code"))
    return UpstreamFailure(f"core failed: {message}")


def _classify_transport(exc: BaseException) -> Exception:
    text = str(exc)
    if "DEADLINE_EXCEEDED" in text or isinstance(exc, asyncio.TimeoutError):
        return UpstreamFailure("core timed out", timeout=True)
    # grpc reports a refused or reset connection as UNAVAILABLE.
    return UpstreamFailure(f"core unreachable: {type(exc).__name__}: {text[:200]}", hard="UNAVAILABLE" in text)
