"""Seeded sampling and incremental detokenization, on plain values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.runtime.detokenize import TextStream
from edge.runtime.sampling import pick_token, step_uniform


def test_step_uniform_depends_only_on_seed_and_step() -> None:
    draws = [step_uniform(7, s) for s in range(1000)]
    assert draws == [step_uniform(7, s) for s in range(1000)]
    assert all(0 <= u < 1 for u in draws)
    assert 0.45 < float(np.mean(draws)) < 0.55
    assert step_uniform(7, 3) != step_uniform(8, 3)


def test_greedy_picks_the_argmax() -> None:
    assert pick_token(np.array([0.1, 3.0, 2.9]), 0.0, 1.0, 1, 0) == 1


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = np.log(np.array([0.6, 0.3, 0.05, 0.05]))
    picks = {pick_token(logits, 1.0, 0.8, seed, step) for seed in range(20) for step in range(20)}
    assert picks == {0, 1}


def test_sampling_follows_the_distribution() -> None:
    logits = np.log(np.array([0.7, 0.2, 0.1]))
    picks = [pick_token(logits, 1.0, 1.0, 42, step) for step in range(3000)]
    freq = np.bincount(picks, minlength=3) / len(picks)
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.03)


@pytest.fixture(scope="module")
def tokenizer(small_lm_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(small_lm_dir / "tokenizer.json"))


def test_multibyte_characters_are_never_split(tokenizer) -> None:
    text = "東京 🙂 crème"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    stream = TextStream(tokenizer)
    pieces = [stream.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.finish() == text


def test_stop_strings_are_held_back_until_settled(tokenizer) -> None:
    ids = tokenizer.encode("Answer: blue. Question: next", add_special_tokens=False).ids
    stream = TextStream(tokenizer, stop=["Question:"])
    out = ""
    for t in ids:
        out += stream.push(t)
        assert "Quest" not in out or stream.stopped
        if stream.stopped:
            break
    assert stream.stopped and out == "Answer: blue. "


def test_a_stop_prefix_that_never_completes_is_released_at_the_end(tokenizer) -> None:
    ids = tokenizer.encode("blue Ques", add_special_tokens=False).ids
    stream = TextStream(tokenizer, stop=["Question:"])
    out = "".join(stream.push(t) for t in ids)
    assert not stream.stopped and out + stream.finish() == "blue Ques"
