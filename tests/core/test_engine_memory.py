"""The engine over a small paged KV cache: admission waits for blocks, cancellation frees them,
chunked prefill interleaves with decoding and gives the same tokens as one-shot prefill."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from core.engine import Engine, GenerationRequest
from core.engine.kv_cache import bytes_per_token
from core.model.loader import load_model
from core.tokenizer import Tokenizer

BLOCK = 16


@pytest.fixture(scope="module")
def model(local_checkpoint):
    return load_model(local_checkpoint)


@pytest.fixture(scope="module")
def tokenizer(local_checkpoint):
    return Tokenizer(local_checkpoint)


def make_engine(model, tokenizer, blocks: int, **kw) -> Engine:
    """An engine whose KV budget holds `blocks` blocks of BLOCK tokens (plus the scratch block)."""
    budget = bytes_per_token(model.cache_layout(), next(model.parameters()).dtype) * BLOCK * (blocks + 1)
    return Engine(model, tokenizer, max_batch=8, max_seq_len=512, kv_cache_bytes=budget, block_size=BLOCK, **kw)


def request(tokenizer, rid: str, prompt: str = "Tell me about the sea.", **kw) -> GenerationRequest:
    kw.setdefault("max_tokens", 20)
    kw.setdefault("ignore_eos", True)
    kw.setdefault("temperature", 0.0)
    return GenerationRequest(rid, tokenizer.encode(prompt), **kw)


def test_admission_waits_for_blocks_then_proceeds(model, tokenizer):
    engine = make_engine(model, tokenizer, blocks=4)  # 64 tokens: one request of ~8 + 40 at a time
    try:
        assert engine.cache.num_blocks == 4
        solo = engine.generate(request(tokenizer, "solo", max_tokens=40))
        done: queue.Queue = queue.Queue()
        peak_waiting = 0
        for i in range(3):
            engine.submit(request(tokenizer, f"r{i}", max_tokens=40), lambda e: e.finished and done.put(e))
        results = []
        while len(results) < 3:
            peak_waiting = max(peak_waiting, engine.stats()["waiting"])
            assert engine.free_blocks >= 0
            try:
                results.append(done.get(timeout=0.01))
            except queue.Empty:
                pass
        assert peak_waiting >= 1  # the budget held one request; the others queued
        assert sorted(r.request_id for r in results) == ["r0", "r1", "r2"]  # first come, first served
        assert [r.request_id for r in results] == ["r0", "r1", "r2"]
        assert engine.free_blocks == 4 and engine.active == 0
        again = engine.generate(request(tokenizer, "again", max_tokens=40))
        assert again.token_ids == solo.token_ids
    finally:
        engine.close()


def test_request_larger_than_the_cache_is_refused(model, tokenizer):
    engine = make_engine(model, tokenizer, blocks=2)
    try:
        with pytest.raises(ValueError, match="KV cache blocks"):
            engine.submit(request(tokenizer, "big", max_tokens=100), lambda e: None)
        with pytest.raises(ValueError, match="max_tokens 600 exceeds the context"):
            engine.submit(request(tokenizer, "long", max_tokens=600), lambda e: None)
        assert engine.generate(request(tokenizer, "ok", max_tokens=8)).completion_tokens == 8
    finally:
        engine.close()


def test_a_ceiling_the_caller_did_not_name_is_shortened_to_the_context(model, tokenizer):
    engine = make_engine(model, tokenizer, blocks=40)
    try:
        result = engine.generate(request(tokenizer, "long", max_tokens=600, fit_context=True))
        assert result.finish_reason == "length"
        assert result.prompt_tokens + result.completion_tokens == engine.max_seq_len
    finally:
        engine.close()


def test_cancel_frees_blocks(model, tokenizer):
    engine = make_engine(model, tokenizer, blocks=40)
    try:
        events: queue.Queue = queue.Queue()
        engine.submit(request(tokenizer, "c", max_tokens=400, temperature=0.8, seed=1), events.put)
        assert not events.get(timeout=60).finished
        assert engine.free_blocks < 40
        engine.cancel("c")
        while not (event := events.get(timeout=60)).finished:
            pass
        assert event.finish_reason == "cancelled"
        assert engine.free_blocks == 40 and engine.stats()["running"] == 0
    finally:
        engine.close()


def test_chunked_prefill_interleaves_and_matches(model, tokenizer):
    long_prompt = " ".join(["The gateway sends heavy chat requests to the core."] * 14)
    n = len(tokenizer.encode(long_prompt))
    assert n > 150
    one_shot = make_engine(model, tokenizer, blocks=64, prefill_chunk=512)
    chunked = make_engine(model, tokenizer, blocks=64, prefill_chunk=16)
    try:
        want = one_shot.generate(request(tokenizer, "w", long_prompt, max_tokens=12))
        # A stream already running keeps getting tokens while the long prompt is prefilled in chunks.
        order: list[str] = []
        lock = threading.Lock()
        first_b = threading.Event()

        def log(name):
            def on_event(e):
                with lock:
                    order.extend([name] * len(e.token_ids))
                if name == "b":
                    first_b.set()
            return on_event

        chunked.submit(request(tokenizer, "a", max_tokens=200), log("a"))
        while "a" not in order:
            time.sleep(0.01)
        got: queue.Queue = queue.Queue()
        chunked.submit(request(tokenizer, "b", long_prompt, max_tokens=12),
                       lambda e: (log("b")(e), got.put(e)))
        ids = []
        while not (e := got.get(timeout=120)).finished:
            ids.extend(e.token_ids)
        ids.extend(e.token_ids)
        assert ids == want.token_ids
        with lock:
            before_b = order[: order.index("b")]
        # b's prompt takes ceil(n / 16) chunks; a decodes once per engine step meanwhile.
        assert before_b.count("a") >= n // 16 - 1
        chunked.cancel("a")
    finally:
        one_shot.close()
        chunked.close()
