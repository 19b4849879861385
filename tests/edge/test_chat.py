"""Chat messages as the small LM's prompt: the checkpoint's template rendered as transformers renders
it (read at export time from the checkpoint), else a transcript."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge.lm_export import read_chat_template
from edge.runtime.chat import ChatTemplate, transcript
from edge.runtime.generation import SmallLM
from tests.support.chat_templates import LLAMA3_TEMPLATE

# A ChatML-style template with the constructs real ones use: bos, a system-role branch, loop
# variables, `raise_exception`, the generation prompt and whitespace control.
TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('a chat must not open with the assistant') }}{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>"
    "{% if not loop.last %}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}"
)

TEMPLATES = {"chatml": TEMPLATE, "llama3": LLAMA3_TEMPLATE}

CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Where is Zürich? 🙂"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}],
]


def with_template(small_lm_dir: Path, dest: Path, template: str) -> Path:
    """The generated checkpoint, given `template` in its tokenizer_config.json."""
    checkpoint = shutil.copytree(small_lm_dir / "checkpoint", dest)
    config_path = checkpoint / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return checkpoint


@pytest.fixture()
def checkpoint_with_template(small_lm_dir: Path, tmp_path: Path) -> Path:
    return with_template(small_lm_dir, tmp_path / "checkpoint", TEMPLATE)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("messages", CHATS)
def test_a_template_renders_as_transformers_renders_it(small_lm_dir: Path, tmp_path: Path, name: str, messages) -> None:
    from transformers import AutoTokenizer

    checkpoint = with_template(small_lm_dir, tmp_path / "checkpoint", TEMPLATES[name])
    exported = read_chat_template(checkpoint)
    assert exported is not None and exported["source"] == TEMPLATES[name]
    reference = AutoTokenizer.from_pretrained(checkpoint)
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate(**exported).render(messages) == expected
    assert expected.startswith("<s><|")  # the bos string came through


def test_a_template_that_does_not_compile_fails_the_export_before_any_work(small_lm_dir: Path, tmp_path: Path) -> None:
    from edge.lm_export import ExportError, build_small_lm

    checkpoint = with_template(small_lm_dir, tmp_path / "checkpoint", "{% for m in messages %}{{ m['content'] }}")
    with pytest.raises(ExportError, match=r"the chat template does not compile: .*endfor"):
        build_small_lm(tmp_path / "export", checkpoint=checkpoint)
    assert not (tmp_path / "export").exists()


def test_a_templated_chat_encodes_to_the_ids_transformers_gives(checkpoint_with_template: Path, small_lm_dir: Path,
                                                              tmp_path: Path) -> None:
    # TEMPLATE writes the BOS string and the tokenizer adds BOS too: one BOS, as transformers has it.
    from transformers import AutoTokenizer

    model_dir = shutil.copytree(small_lm_dir, tmp_path / "lm", ignore=shutil.ignore_patterns("checkpoint"))
    meta = json.loads((model_dir / "meta.json").read_text())
    meta["chat_template"] = read_chat_template(checkpoint_with_template)
    (model_dir / "meta.json").write_text(json.dumps(meta))
    lm = SmallLM.load(model_dir)
    reference = AutoTokenizer.from_pretrained(checkpoint_with_template)
    for messages in CHATS:
        expected = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected  # a BatchEncoding in transformers 5
        assert lm.encode(lm.chat_prompt(messages)) == list(expected)
        assert lm.encode(lm.chat_prompt(messages)).count(lm.meta.bos_token_id) == 1


def test_a_template_file_beside_the_tokenizer_is_read_too(small_lm_dir: Path, tmp_path: Path) -> None:
    checkpoint = shutil.copytree(small_lm_dir / "checkpoint", tmp_path / "checkpoint")
    (checkpoint / "chat_template.jinja").write_text(TEMPLATE)
    assert read_chat_template(checkpoint)["source"] == TEMPLATE


def test_a_checkpoint_without_a_template_gets_transcripts(small_lm_dir: Path) -> None:
    assert read_chat_template(small_lm_dir / "checkpoint") is None
    messages = CHATS[1]
    assert ChatTemplate().render(messages) == "system: Be brief. \nuser: Where is Zürich? 🙂\nassistant:"
    assert transcript(messages) == ChatTemplate().render(messages)


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([], "empty"),
        ([{"role": "", "content": "x"}], r"messages\[0\]"),
        ([{"role": "user", "content": "x"}, {"role": "user"}], r"messages\[1\]"),
        ([{"role": "assistant", "content": "x"}], "must not open with the assistant"),
    ],
    ids=["no-messages", "empty-role", "no-content", "template-refuses"],
)
def test_bad_messages_are_a_value_error_naming_the_problem(messages, fragment) -> None:
    with pytest.raises(ValueError, match=fragment):
        ChatTemplate(TEMPLATE, "<s>", "</s>").render(messages)
