"""The Triton python-backend model: a decoupled (streaming) front to the core engine.

Triton calls `initialize` once per instance (the model turns ready when it returns, so the engine
is built there), `execute` with batches of requests (we only parse and submit, and return at once),
and `finalize`. Responses go out from the engine thread through each request's response sender.
Bad input is answered with a TritonError response; it never raises out of `execute`.

The engine's queue and KV cache occupancy are Triton custom metrics (`meridian_core_*` gauges on the
server's metrics port), refreshed by the same thread that watches for cancelled requests.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from core.engine import ContextOverflow, Engine, GenerationEvent, GenerationRequest
from core.model.loader import load_model
from core.tokenizer import Tokenizer
from core.triton.live_requests import LiveRequests

log = logging.getLogger("meridian.core.triton")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_POLL_S = 0.05


class BadInput(ValueError):
    """A request the model refuses, with the message the client sees."""


def refusal(exc: ValueError) -> str:
    """The error text of a refused request: "bad input: MESSAGE", or "bad input [CODE]: MESSAGE"
    when the client can act on the reason (the gateway hands the code on as OpenAI's `code`)."""
    code = " [context_length_exceeded]" if isinstance(exc, ContextOverflow) else ""
    return f"bad input{code}: {exc}"


def _optional(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


def _scalar(request, name: str, default, kind):
    values = _optional(request, name)
    if values is None or values.size == 0:
        return default
    if values.size != 1:
        raise BadInput(f"{name} must hold one value, got {values.size}")
    return kind(values[0])


def _text(raw, name: str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def parse_request(request, tokenizer: Tokenizer) -> tuple[GenerationRequest, bool]:
    """Triton inputs -> (GenerationRequest, stream)."""
    messages = _optional(request, "messages")
    if messages is not None and messages.size:
        try:
            chat = json.loads(_text(messages[0], "messages"))
        except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
            raise BadInput(f"messages is not valid JSON: {exc}") from None
        if not isinstance(chat, list) or not chat or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in chat
        ):
            raise BadInput("messages must be a non-empty JSON list of {\"role\": str, \"content\": str}")
        try:
            prompt_ids = tokenizer.encode_chat(chat)
        except Exception as exc:  # the template's own raise_exception, e.g. an unknown role
            raise BadInput(f"chat template failed: {exc}") from None
    else:
        text = _optional(request, "text_input")
        if text is None or text.size == 0:
            raise BadInput("text_input (or messages) is required")
        prompt_ids = tokenizer.encode(_text(text[0], "text_input"))
    stop = _optional(request, "stop")
    prefix = _optional(request, "prefix_token_ids")
    seed = _scalar(request, "seed", None, int)
    gen = GenerationRequest(
        request_id=uuid.uuid4().hex,
        prompt_ids=prompt_ids,
        max_tokens=_scalar(request, "max_tokens", 16, int),
        fit_context=bool(_scalar(request, "fit_context", False, bool)),
        temperature=_scalar(request, "temperature", 1.0, float),
        top_p=_scalar(request, "top_p", 1.0, float),
        top_k=_scalar(request, "top_k", 0, int),
        seed=seed,
        stop=tuple(_text(s, "stop") for s in stop) if stop is not None else (),
        prefix_token_ids=[int(t) for t in prefix] if prefix is not None else [],
    )
    return gen, bool(_scalar(request, "stream", False, bool))


def _response(text: str, token_ids: list[int], event: GenerationEvent, final: bool):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("token_ids", np.array(token_ids, dtype=np.int32)),
        pb_utils.Tensor("finish_reason", np.array([(event.finish_reason or "").encode() if final else b""],
                                                  dtype=np.object_)),
        pb_utils.Tensor("prompt_tokens", np.array([event.prompt_tokens], dtype=np.int32)),
        pb_utils.Tensor("completion_tokens", np.array([event.completion_tokens], dtype=np.int32)),
    ])


class _Responder:
    """Turns one request's engine events into Triton responses (streamed or whole)."""

    def __init__(self, model: TritonPythonModel, request, sender, stream: bool, request_id: str) -> None:
        self.model, self.request, self.sender, self.stream, self.request_id = model, request, sender, stream, request_id
        self.text: list[str] = []
        self.ids: list[int] = []

    def __call__(self, event: GenerationEvent) -> None:
        if event.finished:  # before the final response: Triton frees the request once it is sent
            self.model.live.remove(self.request_id)
        if event.finish_reason == "error":
            self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(event.error)), flags=FINAL)
        elif event.finish_reason == "cancelled":
            self.sender.send(flags=FINAL)
        elif self.stream:
            self.sender.send(_response(event.text, event.token_ids, event, event.finished),
                             flags=FINAL if event.finished else 0)
        else:
            self.text.append(event.text)
            self.ids.extend(event.token_ids)
            if event.finished:
                self.sender.send(_response("".join(self.text), self.ids, event, True), flags=FINAL)


GAUGES = {
    "free_blocks": "KV cache blocks held by no request",
    "total_blocks": "KV cache blocks in the pool",
    "running": "requests in the decode batch",
    "prefilling": "requests whose prompt is being prefilled",
    "waiting": "requests queued for admission",
}


def _engine_gauges(model_name: str) -> tuple[list, dict]:
    """One Triton gauge per engine statistic, labelled with the model name: (families, gauges).
    Keep the families: a metric must not outlive its family."""
    families, gauges = [], {}
    for name, description in GAUGES.items():
        family = pb_utils.MetricFamily(name=f"meridian_core_{name}", description=description,
                                       kind=pb_utils.MetricFamily.GAUGE)
        families.append(family)
        gauges[name] = family.Metric(labels={"model": model_name})
    return families, gauges


class TritonPythonModel:
    """Builds the engine once, then hands each request to it."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("threads", "2")))
        device = params.get("device", "cpu")
        if device == "cuda":
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        checkpoint = params["checkpoint"]
        model = load_model(checkpoint, params.get("dtype", "float32"), device)
        self.tokenizer = Tokenizer(checkpoint)
        budget = int(params.get("kv_cache_bytes", "0")) or None
        self.engine = Engine(model, self.tokenizer, max_batch=int(params.get("max_batch", "8")),
                             max_seq_len=int(params.get("max_seq_len", "2048")), kv_cache_bytes=budget,
                             prefill_chunk=int(params.get("prefill_chunk", "256")))
        self._metric_families, self._gauges = _engine_gauges(args.get("model_name", "core"))
        self.live = LiveRequests()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_cancellations, name="meridian-cancel", daemon=True)
        self._watcher.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            gen = None  # per request: a failed parse must not forget the previous request's id
            try:
                gen, stream = parse_request(request, self.tokenizer)
                responder = _Responder(self, request, sender, stream, gen.request_id)
                self.live.add(gen.request_id, request)
                self.engine.submit(gen, responder)
            except (BadInput, ValueError) as exc:
                self._forget_quietly(gen)
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(refusal(exc))), flags=FINAL)
            except Exception as exc:  # never let one request take the model down
                log.exception("request failed")
                self._forget_quietly(gen)
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {exc}")),
                            flags=FINAL)

    def finalize(self) -> None:
        self._stop.set()
        self.engine.close()

    def _forget_quietly(self, gen) -> None:
        if gen is not None:
            self.live.remove(gen.request_id)

    def _publish_stats(self) -> None:
        for name, value in self.engine.stats().items():
            if name in self._gauges:
                self._gauges[name].set(value)

    def _watch_cancellations(self) -> None:
        """Triton marks a request cancelled when its client goes away; stop generating for it."""
        while not self._stop.wait(CANCEL_POLL_S):
            try:
                self._publish_stats()
            except Exception:  # metrics must never stop cancellation
                log.debug("metrics update failed", exc_info=True)
            for request_id in self.live.cancelled():
                self.engine.cancel(request_id)
