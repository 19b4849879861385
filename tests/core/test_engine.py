"""The engine without a server: determinism, stops, limits, cancellation, resume, batching."""

from __future__ import annotations

import queue
import threading

import pytest

from core.engine import Engine, GenerationRequest
from core.engine.text import TextStream
from core.model.loader import load_model
from core.tokenizer import Tokenizer

PROMPT = "Hello, world! Tell me a story about the sea."


@pytest.fixture(scope="module")
def engine(local_checkpoint):
    eng = Engine(load_model(local_checkpoint), Tokenizer(local_checkpoint), max_batch=4, max_seq_len=512)
    yield eng
    eng.close()


def req(engine, rid: str, prompt: str = PROMPT, **kw) -> GenerationRequest:
    kw.setdefault("max_tokens", 24)
    kw.setdefault("ignore_eos", True)
    return GenerationRequest(rid, engine.tokenizer.encode(prompt), **kw)


def test_same_seed_same_text(engine):
    a = engine.generate(req(engine, "a", temperature=0.9, top_p=0.95, seed=11))
    b = engine.generate(req(engine, "b", temperature=0.9, top_p=0.95, seed=11))
    c = engine.generate(req(engine, "c", temperature=0.9, top_p=0.95, seed=12))
    assert (a.text, a.token_ids) == (b.text, b.token_ids)
    assert a.token_ids != c.token_ids
    assert a.completion_tokens == 24 and a.prompt_tokens == len(engine.tokenizer.encode(PROMPT))


def test_top_k_and_greedy(engine):
    greedy = engine.generate(req(engine, "g", temperature=0.0))
    top1 = engine.generate(req(engine, "k", temperature=1.0, top_k=1, seed=5))
    assert greedy.token_ids == top1.token_ids


def test_max_tokens(engine):
    r = engine.generate(req(engine, "m", max_tokens=5, temperature=0.7, seed=1))
    assert (r.finish_reason, r.completion_tokens, len(r.token_ids)) == ("length", 5, 5)


def test_stop_string(engine):
    full = engine.generate(req(engine, "f", max_tokens=40, temperature=0.8, seed=3))
    stop = full.text[12:15]
    assert len(stop) == 3
    cut = engine.generate(req(engine, "s", max_tokens=40, temperature=0.8, seed=3, stop=("never-there", stop)))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_cancellation_frees_the_request(engine):
    events: queue.Queue = queue.Queue()
    engine.submit(req(engine, "x", max_tokens=400, temperature=0.8, seed=9), events.put)
    first = events.get(timeout=30)
    assert not first.finished
    assert engine.cancel("x")
    while not (event := events.get(timeout=30)).finished:
        pass
    assert event.finish_reason == "cancelled" and event.completion_tokens < 400
    assert engine.active == 0
    assert engine.cache.free_slots == engine.cache.max_slots
    assert not engine.cancel("x")


@pytest.mark.parametrize("split", [1, 7, 19])
def test_prefix_continuation_equals_uninterrupted_run(engine, split):
    kw = dict(max_tokens=32, temperature=0.8, top_p=0.9, seed=21, stop=("zzz",))
    full = engine.generate(req(engine, "u", **kw))
    prefix = full.token_ids[:split]
    resumed = engine.generate(req(engine, "r", prefix_token_ids=prefix, **kw))
    # What the first run had sent once it had produced `split` tokens:
    sent = TextStream(engine.tokenizer, kw["stop"])
    already = "".join(sent.push(t) for t in prefix)
    assert resumed.token_ids == full.token_ids[split:]
    assert already + resumed.text == full.text
    assert (resumed.completion_tokens, resumed.finish_reason) == (full.completion_tokens, full.finish_reason)


def test_batched_decode_equals_solo(engine):
    specs = [dict(prompt="One two three", seed=1, temperature=0.8), dict(prompt=PROMPT, seed=2, temperature=0.0),
             dict(prompt="日本語のテキスト", seed=3, temperature=1.0, top_k=20),
             dict(prompt="def forward(self, x):", seed=4, temperature=0.6, top_p=0.8, max_tokens=9)]
    solo = [engine.generate(req(engine, f"solo{i}", **s)) for i, s in enumerate(specs)]
    results: dict[int, list] = {i: [] for i in range(len(specs))}
    finished = threading.Semaphore(0)

    def collect(i):
        def on_event(event):  # runs on the engine thread: never block here
            results[i].append(event)
            if event.finished:
                finished.release()
        return on_event

    for i, s in enumerate(specs):
        engine.submit(req(engine, f"batch{i}", **s), collect(i))
    for _ in specs:
        assert finished.acquire(timeout=60)
    for i, r in enumerate(solo):
        assert "".join(e.text for e in results[i]) == r.text
        assert [t for e in results[i] for t in e.token_ids] == r.token_ids


def test_bad_input_is_refused(engine):
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit(req(engine, "bad", max_tokens=0), lambda e: None)
    with pytest.raises(ValueError, match="top_p"):
        engine.submit(req(engine, "bad", top_p=0.0), lambda e: None)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.submit(GenerationRequest("bad", [10**7]), lambda e: None)
    assert engine.generate(req(engine, "ok", max_tokens=2)).completion_tokens == 2
