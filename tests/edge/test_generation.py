"""The small-LM loop on ONNX against transformers' own model: greedy tokens, streaming, stops, resumption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge.lm_export import QUALITY_PROMPTS, build_small_lm, fingerprint, torch_greedy
from edge.quantize import lm_top1_agreement
from edge.runtime import generation
from edge.runtime.generation import GenerateParams, SmallLM

PROMPTS = [
    "The edge answers",
    "Once upon a time,",
    "Question: what colour is the sky? Answer:",
    "Hello, world!",
    "",
    "Zürich 東京 🙂 and text the corpus never saw",
]
GREEDY = GenerateParams(max_tokens=40, temperature=0.0)


@pytest.fixture(scope="module")
def lm(small_lm_dir: Path) -> SmallLM:
    """Our runtime, one thread."""
    return SmallLM.load(small_lm_dir, threads=1)


def _run(lm: SmallLM, prompt: str, params: GenerateParams):
    """All chunks of one generation, and their text and tokens joined."""
    chunks = list(lm.stream(prompt, params))
    return chunks, "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_transformers(lm: SmallLM, torch_lm, prompt: str) -> None:
    expected = torch_greedy(torch_lm, lm.encode(prompt), GREEDY.max_tokens)
    chunks, text, tokens = _run(lm, prompt, GREEDY)
    assert tokens == expected
    eos = set(lm.meta.eos_token_ids)
    assert chunks[-1].finish_reason == ("stop" if expected[-1] in eos else "length")
    assert text == lm.tokenizer.decode(expected, skip_special_tokens=True)


def test_chunks_count_tokens_and_only_the_last_has_a_reason(lm: SmallLM) -> None:
    chunks, _, tokens = _run(lm, "Hello, world!", GenerateParams(max_tokens=12, temperature=0.8, seed=5))
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason in ("stop", "length")
    assert [c.completion_tokens for c in chunks] == list(np.cumsum([len(c.token_ids) for c in chunks]))
    assert all(c.prompt_tokens == len(lm.encode("Hello, world!")) for c in chunks)
    assert len(tokens) <= 12


def test_max_tokens_ends_with_length(lm: SmallLM) -> None:
    chunks, _, tokens = _run(lm, "One, two, three,", GenerateParams(max_tokens=3, temperature=0.0))
    assert len(tokens) == 3 and chunks[-1].finish_reason == "length"


def test_stop_string_ends_the_stream_without_it(lm: SmallLM) -> None:
    _, full, _ = _run(lm, "Monday,", GenerateParams(max_tokens=30, temperature=0.0))
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # some text the greedy run is sure to produce
    assert stop.strip()
    chunks, text, _ = _run(lm, "Monday,", GenerateParams(max_tokens=30, temperature=0.0, stop=(stop,)))
    assert chunks[-1].finish_reason == "stop"
    assert text == full[: full.index(stop)]
    assert stop not in text


def test_seeded_sampling_is_reproducible_and_seed_dependent(lm: SmallLM) -> None:
    params = GenerateParams(max_tokens=24, temperature=1.5, top_p=0.95, seed=1234)
    first = _run(lm, "The quick", params)[2]
    assert _run(lm, "The quick", params)[2] == first
    others = {tuple(_run(lm, "The quick", GenerateParams(max_tokens=24, temperature=1.5, seed=s))[2]) for s in range(4)}
    assert len(others) > 1


@pytest.mark.parametrize("split", [1, 5, 11])
def test_resuming_after_a_prefix_continues_the_uninterrupted_run(lm: SmallLM, split: int) -> None:
    params = GenerateParams(max_tokens=20, temperature=1.2, top_p=0.9, seed=99)
    chunks, text, tokens = _run(lm, "Every morning", params)
    # What another zone had already sent when it failed: whole chunks, as the gateway forwards them.
    sent_chunks = []
    for chunk in chunks:
        if sum(len(c.token_ids) for c in sent_chunks) >= split or chunk.finish_reason:
            break
        sent_chunks.append(chunk)
    prefix = tuple(t for c in sent_chunks for t in c.token_ids)
    resumed = GenerateParams(max_tokens=20, temperature=1.2, top_p=0.9, seed=99, prefix_token_ids=prefix)
    rest, rest_text, rest_tokens = _run(lm, "Every morning", resumed)
    assert list(prefix) + rest_tokens == tokens
    assert "".join(c.text for c in sent_chunks) + rest_text == text
    assert rest[-1].completion_tokens == len(tokens)
    assert rest[-1].finish_reason == chunks[-1].finish_reason


def test_a_prefix_that_already_ended_finishes_at_once(lm: SmallLM) -> None:
    eos = lm.meta.eos_token_ids[0]
    chunks = list(lm.stream("Hi", GenerateParams(max_tokens=5, prefix_token_ids=(lm.encode(" there")[-1], eos))))
    assert len(chunks) == 1 and chunks[0].finish_reason == "stop" and chunks[0].token_ids == ()


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        (GenerateParams(max_tokens=0), "max_tokens"),
        (GenerateParams(temperature=-1), "temperature"),
        (GenerateParams(temperature=float("inf")), "finite"),
        (GenerateParams(temperature=float("nan")), "finite"),
        (GenerateParams(top_p=0.0), "top_p"),
        (GenerateParams(prefix_token_ids=(10**9,)), "vocabulary"),
    ],
)
def test_bad_settings_are_refused_before_any_work(lm: SmallLM, params: GenerateParams, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        lm.stream("hi", params)


def test_context_overflow_is_refused(lm: SmallLM) -> None:
    with pytest.raises(ValueError, match="context"):
        lm.stream("word " * (lm.meta.max_context + 10), GenerateParams())


def test_max_tokens_past_the_context_is_refused_unless_it_is_only_a_ceiling(lm: SmallLM) -> None:
    prompt = "word " * 100
    room = lm.meta.max_context - len(lm.encode(prompt))
    with pytest.raises(ValueError, match=f"max_tokens {room + 1} exceeds the context.*at most {room}"):
        lm.stream(prompt, GenerateParams(max_tokens=room + 1, temperature=0.0, fit_context=False))
    lm.stream(prompt, GenerateParams(max_tokens=room, temperature=0.0, fit_context=False))  # fits exactly
    chunks = list(lm.stream(prompt, GenerateParams(max_tokens=room + 50, temperature=1.0, seed=3, fit_context=True)))
    assert chunks[-1].finish_reason in ("length", "stop") and chunks[-1].completion_tokens <= room


def test_onnx_io_carries_the_kv_cache(lm: SmallLM) -> None:
    inputs = {i.name: i.shape for i in lm.session.get_inputs()}
    outputs = {o.name: o.shape for o in lm.session.get_outputs()}
    layers = lm.meta.num_layers
    assert inputs["input_ids"] == ["batch", "sequence"] and inputs["position_ids"] == ["batch", "sequence"]
    for i in range(layers):
        assert inputs[f"past_key_{i}"] == ["batch", lm.meta.num_kv_heads, "past", lm.meta.head_dim]
        assert outputs[f"present_value_{i}"] == ["batch", lm.meta.num_kv_heads, "total", lm.meta.head_dim]
    assert outputs["logits"] == ["batch", lm.meta.vocab_size]


def test_cached_decoding_equals_a_full_recompute(lm: SmallLM) -> None:
    ids = lm.encode("Water boils at")
    path = lm.greedy_ids("Water boils at", 6)
    stepwise = lm.next_logits_along(ids, path)[-1]
    full, _ = lm.forward(ids + path[:-1], generation.KVCache())
    np.testing.assert_allclose(stepwise, full, atol=1e-4)


def test_int8_top1_agreement_is_at_least_95_percent(small_lm_dir: Path) -> None:
    meta = json.loads((small_lm_dir / "meta.json").read_text())
    assert meta["int8"]["top1_agreement"] >= 0.95
    assert lm_top1_agreement(small_lm_dir, QUALITY_PROMPTS, 32) >= 0.95


def test_mobile_entry_point_yields_text(small_lm_dir: Path) -> None:
    model = generation.load(small_lm_dir)
    pieces = list(model.generate("Hello, world!", max_tokens=8, temperature=0.0, seed=None, stop=[]))
    assert pieces and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == "".join(c.text for c in model.stream("Hello, world!", GenerateParams(8, 0.0)))


def test_meta_and_rebuild_skip(small_lm_dir: Path, capsys) -> None:
    meta = json.loads((small_lm_dir / "meta.json").read_text())
    assert meta["task"] == "generation" and meta["family"] == "llama"
    assert meta["num_kv_heads"] < 8  # grouped-query attention
    assert meta["fingerprint"] == fingerprint(None)
    before = (small_lm_dir / "model.onnx").stat().st_mtime_ns
    assert build_small_lm(small_lm_dir) == small_lm_dir
    assert (small_lm_dir / "model.onnx").stat().st_mtime_ns == before
    assert "up to date" in capsys.readouterr().err


def test_an_export_whose_tokens_differ_from_transformers_is_refused(small_lm_dir: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:
    # transformers' tokens are taken before the torch model is freed: they must still be what is compared.
    from edge import lm_export

    real = lm_export.torch_greedy

    def off_by_one_at_the_end(model, ids: list[int], steps: int) -> list[int]:
        tokens = real(model, ids, steps)
        return [*tokens[:-1], tokens[-1] + 1]

    monkeypatch.setattr(lm_export, "torch_greedy", off_by_one_at_the_end)
    with pytest.raises(lm_export.ExportError, match="greedy tokens differ"):
        build_small_lm(tmp_path / "export", checkpoint=small_lm_dir / "checkpoint")
    assert not (tmp_path / "export").exists()
