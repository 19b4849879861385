"""Our tokenizer wrapper against transformers' on the local checkpoint."""

from __future__ import annotations

import pytest

from core.tokenizer import IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello, world!", "Café crème brûlée 🙂🚀 日本語のテキスト", "def f(x):\n    return x * 2\n", "🙂" * 5]
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me about 東京."}],
]


@pytest.fixture(scope="module")
def pair(local_checkpoint):
    return Tokenizer(local_checkpoint), transformers.AutoTokenizer.from_pretrained(local_checkpoint)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(pair, text):
    ours, ref = pair
    assert ours.encode(text) == ref(text).input_ids
    assert ours.decode(ours.encode(text)) == text


@pytest.mark.parametrize("messages", CHATS)
def test_chat_template_matches_transformers(pair, messages):
    ours, ref = pair
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    expected = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ours.encode_chat(messages) == list(expected)


def test_eos_ids(pair):
    ours, ref = pair
    assert ref.eos_token_id in ours.eos_token_ids


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenisation_never_splits_characters(pair, text):
    ours, _ = pair
    detok = IncrementalDetokenizer(ours)
    deltas = [detok.push(t) for t in ours.encode(text, add_special_tokens=False)] + [detok.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_unknown_role_is_a_clear_error(pair):
    ours, _ = pair
    with pytest.raises(Exception, match="unknown role"):
        ours.apply_chat_template([{"role": "robot", "content": "x"}])


def test_a_checkpoint_without_a_chat_template_refuses_chats_naming_what_to_send(local_checkpoint, tmp_path):
    import json
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(local_checkpoint / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"send a prompt \(/v1/completions\)"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("messages", CHATS)
def test_a_llama3_style_template_renders_as_transformers_renders_it(local_checkpoint, tmp_path, messages):
    """strftime_now, namespaces, tojson without HTML escaping and a {% generation %} block."""
    import json
    import shutil

    from tests.support.chat_templates import LLAMA3_TEMPLATE

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(local_checkpoint / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = LLAMA3_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    expected = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert Tokenizer(tmp_path).apply_chat_template(messages) == expected
    assert "Today Date: " in expected and '"<Zürich & co>"' in expected
