"""Generate over gRPC on a real worker serving both edge models, called as the gateway calls it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from edge.api import edge_pb2
from edge.api.edge_grpc import EdgeStub
from edge.config import EdgeConfig
from edge.lm_export import torch_greedy
from edge.runtime.chat import transcript
from edge.runtime.generation import DEFAULT_MAX_TOKENS, SmallLM
from edge.server import EdgeServer

EMBED, LM = "all-minilm-l6-v2", "edge-small"


@pytest.fixture(scope="module")
async def worker(embedding_model_dir: Path, small_lm_dir: Path) -> AsyncIterator[EdgeServer]:
    """One worker with both models, batching on and a small L1 cache."""
    config = EdgeConfig(host="127.0.0.1", port=0, zone="gen-zone", models={EMBED: embedding_model_dir, LM: small_lm_dir},
                        threads=1, workers=2, max_batch=16, max_queue_delay_ms=5, l1_cache_entries=64, drain_timeout_s=10,
                        drain_grace_s=0)
    running = EdgeServer(config)
    await running.start()
    yield running
    await running.stop()


@pytest.fixture(scope="module")
async def stub(worker: EdgeServer) -> AsyncIterator[EdgeStub]:
    async with Channel("127.0.0.1", worker.port) as chan:
        yield EdgeStub(chan)


async def _generate(stub: EdgeStub, **fields) -> list[edge_pb2.GenerateChunk]:
    """Every chunk of one Generate call."""
    async with stub.Generate.open(timeout=60) as stream:
        await stream.send_message(edge_pb2.GenerateRequest(model=LM, **fields), end=True)
        return [chunk async for chunk in stream]


async def test_greedy_stream_matches_transformers(stub: EdgeStub, small_lm_dir: Path, torch_lm) -> None:
    chunks = await _generate(stub, prompt="The edge answers", max_tokens=32, temperature=0.0)
    tokens = [t for c in chunks for t in c.token_ids]
    lm = SmallLM.load(small_lm_dir)
    assert tokens == torch_greedy(torch_lm, lm.encode("The edge answers"), 32)
    assert len(chunks) > 1, "tokens should stream, not arrive as one message"
    assert [c.finish_reason for c in chunks[:-1]] == [""] * (len(chunks) - 1)
    assert chunks[-1].finish_reason in ("stop", "length")
    assert chunks[-1].completion_tokens == len(tokens) and chunks[-1].prompt_tokens == len(lm.encode("The edge answers"))


async def test_chat_messages_are_completed_as_the_model_s_chat_prompt(stub: EdgeStub) -> None:
    # edge-small has no chat template: the edge completes the transcript the SDK's offline mode
    # would make, exactly as if that transcript had been sent as the prompt.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does water boil?"}]
    chat = await _generate(stub, messages=[edge_pb2.ChatMessage(**m) for m in messages], max_tokens=12, temperature=0.0)
    plain = await _generate(stub, prompt=transcript(messages), max_tokens=12, temperature=0.0)
    assert [t for c in chat for t in c.token_ids] == [t for c in plain for t in c.token_ids]
    assert chat[-1].prompt_tokens == plain[-1].prompt_tokens > 10


async def test_resumed_stream_continues_the_seeded_run(stub: EdgeStub) -> None:
    fields = dict(prompt="Once upon a time,", max_tokens=20, temperature=1.1, top_p=0.9, seed=2024)
    whole = await _generate(stub, **fields)
    sent = whole[:3]
    prefix = [t for c in sent for t in c.token_ids]
    rest = await _generate(stub, **{**fields, "max_tokens": 20}, prefix_token_ids=prefix)
    assert prefix + [t for c in rest for t in c.token_ids] == [t for c in whole for t in c.token_ids]
    assert "".join(c.text for c in sent + rest) == "".join(c.text for c in whole)


# Which prompts run on past a budget depends on the generated checkpoint, which is trained on the
# machine that builds it (its float rounding differs between CPUs): the tests pick one that does.
PROMPTS = ("One, two, three,", "Monday,", "The edge answers", "Once upon a time", "The weather today")


async def _long_greedy_run(stub: EdgeStub) -> tuple[str, list[int], str]:
    """(prompt, tokens, text) of a greedy run that goes past the default max_tokens."""
    for prompt in PROMPTS:
        chunks = await _generate(stub, prompt=prompt, temperature=0.0, max_tokens=4 * DEFAULT_MAX_TOKENS)
        tokens = [t for c in chunks for t in c.token_ids]
        if len(tokens) > DEFAULT_MAX_TOKENS:
            return prompt, tokens, "".join(c.text for c in chunks)
    pytest.fail(f"no greedy run of {PROMPTS} went past {DEFAULT_MAX_TOKENS} tokens")


async def test_default_max_tokens_ends_the_run_at_length(stub: EdgeStub) -> None:
    # max_tokens 0 means the default: the run stops there, on the same tokens as the longer run.
    prompt, tokens, _ = await _long_greedy_run(stub)
    counted = await _generate(stub, prompt=prompt, temperature=0.0)
    assert counted[-1].finish_reason == "length"
    assert [t for c in counted for t in c.token_ids] == tokens[:DEFAULT_MAX_TOKENS]
    assert counted[-1].completion_tokens == DEFAULT_MAX_TOKENS


async def test_a_stop_string_ends_the_text_before_it(stub: EdgeStub) -> None:
    prompt, _, text = await _long_greedy_run(stub)
    words = text.split()
    stop = next((w for w in words[1:] if text.index(w) > 0), None)
    assert stop is not None, f"no word to stop at in {text!r}"
    stopped = await _generate(stub, prompt=prompt, temperature=0.0, max_tokens=4 * DEFAULT_MAX_TOKENS, stop=[stop])
    assert stopped[-1].finish_reason == "stop"
    assert "".join(c.text for c in stopped) == text[:text.index(stop)]


@pytest.mark.parametrize(
    ("fields", "status", "fragment"),
    [
        (dict(model=EMBED, prompt="hi"), Status.INVALID_ARGUMENT, "call Embed"),
        (dict(model=LM, prompt="hi", temperature=-1), Status.INVALID_ARGUMENT, "temperature"),
        (dict(model=LM, prompt="hi", temperature=float("inf")), Status.INVALID_ARGUMENT, "finite"),
        (dict(model=LM, prompt="hi", prefix_token_ids=[10**6]), Status.INVALID_ARGUMENT, "vocabulary"),
        (dict(model=LM, prompt="word " * 5000), Status.OUT_OF_RANGE, "leaves no room in the context"),
        (dict(model=LM, prompt="hi", max_tokens=5000), Status.OUT_OF_RANGE, "max_tokens 5000 exceeds the context"),
        (dict(model=LM, prompt="hi", stop=["x"] * 20), Status.INVALID_ARGUMENT, "stop strings"),
        (dict(model=LM, prompt="hi", messages=[edge_pb2.ChatMessage(role="user", content="hi")]),
         Status.INVALID_ARGUMENT, "not both"),
        (dict(model=LM, messages=[edge_pb2.ChatMessage(role="", content="hi")]), Status.INVALID_ARGUMENT, "role"),
        (dict(model=LM, messages=[edge_pb2.ChatMessage(role="user", content="word " * 8000)]),
         Status.OUT_OF_RANGE, "characters"),
        (dict(model=LM, prompt="w" * 40_000), Status.OUT_OF_RANGE, "40000 characters"),
        (dict(model=LM, messages=[edge_pb2.ChatMessage(role="user", content="")] * 2000),
         Status.INVALID_ARGUMENT, "2000 messages"),
    ],
    ids=["embedding-model", "negative-temperature", "infinite-temperature", "bad-prefix", "too-long",
         "max-tokens-past-the-context", "too-many-stops",
         "prompt-and-messages", "empty-role", "messages-too-long", "prompt-over-the-character-limit",
         "too-many-messages"],
)
async def test_bad_generate_requests_get_clear_errors(stub: EdgeStub, fields: dict, status: Status, fragment: str) -> None:
    with pytest.raises(GRPCError) as caught:
        async with stub.Generate.open(timeout=30) as stream:
            await stream.send_message(edge_pb2.GenerateRequest(**fields), end=True)
            [chunk async for chunk in stream]
    assert caught.value.status == status and fragment in (caught.value.message or "")


async def test_a_max_tokens_that_is_only_a_ceiling_runs_to_the_context_s_end(stub: EdgeStub) -> None:
    request = edge_pb2.GenerateRequest(model=LM, prompt="word " * 300, max_tokens=5000, temperature=1.0, seed=1,
                                       fit_context=True)
    async with stub.Generate.open(timeout=60) as stream:
        await stream.send_message(request, end=True)
        chunks = [chunk async for chunk in stream]
    last = chunks[-1]
    assert last.finish_reason in ("length", "stop")
    assert last.prompt_tokens + last.completion_tokens <= 1024  # the default LM's context


async def test_embed_on_the_lm_is_invalid_argument(stub: EdgeStub) -> None:
    with pytest.raises(GRPCError) as caught:
        await stub.Embed(edge_pb2.EmbedRequest(model=LM, inputs=["x"]), timeout=10)
    assert caught.value.status == Status.INVALID_ARGUMENT and "call Generate" in (caught.value.message or "")


async def test_concurrent_embeds_are_batched_cached_and_unchanged(stub: EdgeStub, worker: EdgeServer, embedding_model_dir) -> None:
    texts = [f"sentence number {i} about the edge" for i in range(24)]
    before = worker.embedder._batchers[EMBED].batches if EMBED in worker.embedder._batchers else 0
    replies = await asyncio.gather(*(stub.Embed(edge_pb2.EmbedRequest(model=EMBED, inputs=[t]), timeout=60) for t in texts))
    batches = worker.embedder._batchers[EMBED].batches - before
    assert batches < len(texts), f"{len(texts)} concurrent requests took {batches} model calls"
    from edge.runtime.embedding import EmbeddingModel

    expected = EmbeddingModel.load(embedding_model_dir).embed(texts).vectors
    got = np.array([r.embeddings[0].values for r in replies], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    hits = worker.embedder.cache.hits
    again = await stub.Embed(edge_pb2.EmbedRequest(model=EMBED, inputs=texts[:3]), timeout=60)
    assert worker.embedder.cache.hits == hits + 3
    assert again.prompt_tokens == sum(r.prompt_tokens for r in replies[:3])


async def test_drain_lets_a_running_stream_finish(embedding_model_dir: Path, small_lm_dir: Path) -> None:
    server = EdgeServer(EdgeConfig(host="127.0.0.1", port=0, models={LM: small_lm_dir}, threads=1, drain_timeout_s=20,
                                     drain_grace_s=0.2))
    await server.start()
    async with Channel("127.0.0.1", server.port) as chan:
        stub = EdgeStub(chan)
        async with stub.Generate.open(timeout=60) as stream:
            await stream.send_message(edge_pb2.GenerateRequest(model=LM, prompt="Hello", max_tokens=60, temperature=0.9, seed=1), end=True)
            first = await stream.recv_message()
            stopping = asyncio.create_task(server.stop())
            await asyncio.sleep(0.05)
            health = await HealthStub(chan).Check(HealthCheckRequest(service=""), timeout=5)
            assert health.status == HealthCheckResponse.NOT_SERVING
            rest = [chunk async for chunk in stream]
        assert first is not None and rest[-1].finish_reason in ("stop", "length")
    await asyncio.wait_for(stopping, 20)
