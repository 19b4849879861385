"""Offline mode: the on-device model answers when the gateway cannot be reached, marked local."""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest

import mobile
from mobile.offline import EdgeLocalModel, chat_prompt
from mobile.types import Usage
from tests.mobile.fake_gateway import client_kwargs, running


class TinyModel:
    """A stand-in for the edge's ONNX small LM: echoes words of the prompt."""

    name = "tiny-local"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def generate(self, prompt: str, max_tokens: int, temperature: float, seed: int | None,
                 stop: Sequence[str]) -> Iterator[str]:
        self.prompts.append(prompt)
        for word in ["local", " answer", " here"][:max_tokens]:
            if word.strip() in stop:
                return
            yield word


class ShortContextModel:
    """Refuses every prompt the way the edge's SmallLM refuses one longer than its context: a
    ValueError when generate() is called (`eager`) or at the first piece."""

    name = "short-context"

    def __init__(self, eager: bool) -> None:
        self.eager = eager

    def generate(self, prompt: str, max_tokens: int, temperature: float, seed: int | None,
                 stop: Sequence[str]) -> Iterator[str]:
        if self.eager:
            raise ValueError("prompt of 2403 tokens leaves no room in the context of 1024")
        return self._pieces()

    def _pieces(self) -> Iterator[str]:
        raise ValueError("prompt of 2403 tokens leaves no room in the context of 1024")
        yield ""


@dataclass(frozen=True)
class _Piece:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class MultiTokenModel:
    """Pieces that carry several tokens each, with the runtime's own counts (edge Chunk's shape)."""

    name = "multi-token"

    def generate(self, prompt: str, max_tokens: int, temperature: float, seed: int | None,
                 stop: Sequence[str]) -> Iterator[_Piece]:
        yield _Piece(" 🚀", None, 4, 2)  # an emoji is two byte-level tokens
        yield _Piece("def", "length", 4, 3)


def _dead_url() -> str:
    """An https URL where nothing listens (TCP refused, UDP dropped)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"https://127.0.0.1:{port}"


def _client(model, **kw) -> mobile.Client:
    return mobile.Client(_dead_url(), api_key="k", local_model=model, migration_check_s=None,
                         timeouts=mobile.Timeouts(handshake_s=0.3),
                         retry=mobile.RetryPolicy(max_attempts=2, base_delay_s=0.01), **kw)


async def test_unreachable_gateway_answers_from_local_model():
    model = TinyModel()
    async with _client(model) as c:
        answer = await c.completions.create(model="meridian-moe-mini", prompt="hi", max_tokens=2)
        chat = await c.chat.completions.create(model="x", messages=[{"role": "user", "content": "hey"}])
        stream = await c.chat.completions.create(model="x", messages=[{"role": "user", "content": "hey"}], stream=True)
        chunks = [ch async for ch in stream]
    assert answer.text == "local answer" and answer.meta.local and answer.meta.protocol == "local"
    assert answer.choices[0].finish_reason == "length"
    assert chat.text == "local answer here" and chat.meta.local and chat.model == "tiny-local"
    assert stream.meta.local and all(ch.meta.local for ch in chunks)
    assert "".join(ch.text for ch in chunks) == "local answer here"
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"
    assert model.prompts[1] == "user: hey\nassistant:"


async def test_prefer_local_skips_the_network():
    model = TinyModel()
    c = mobile.Client("https://gateway.invalid", api_key="k", local_model=model, prefer_local=True,
                      migration_check_s=None)
    answer = await c.completions.create(model="m", prompt="hi", stop=["here"])
    assert answer.meta.local and answer.text == "local answer"
    await c.aclose()


async def test_without_local_model_the_network_error_surfaces():
    c = mobile.Client(_dead_url(), api_key="k", migration_check_s=None, timeouts=mobile.Timeouts(handshake_s=0.3),
                      retry=mobile.RetryPolicy(max_attempts=1))
    with pytest.raises(mobile.ConnectError):
        await c.completions.create(model="m", prompt="hi")
    await c.aclose()


async def test_edge_adapter_reports_a_missing_runtime_clearly(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_generation(name, *args, **kwargs):
        if name == "edge.runtime.generation":
            raise ImportError("No module named 'edge.runtime.generation'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_generation)
    monkeypatch.setattr("importlib.import_module", lambda name: no_generation(name))
    async with _client(EdgeLocalModel(tmp_path)) as c:
        with pytest.raises(mobile.OfflineUnavailable, match="edge runtime"):
            await c.completions.create(model="m", prompt="hi")
    assert isinstance(EdgeLocalModel(tmp_path), mobile.LocalModel)
    with pytest.raises(mobile.OfflineUnavailable, match="no local model"):
        list(EdgeLocalModel(tmp_path / "absent").generate("x", 1, 0.0, None, []))


def test_chat_prompt_refuses_bad_messages():
    with pytest.raises(mobile.ConfigError):
        chat_prompt([{"role": "user"}])


async def test_offline_answer_comes_from_the_real_edge_small_lm(cache_dir):
    """The SDK's offline path runs the edge's own ONNX loop over the edge-small model `make models` built."""
    model_dir = cache_dir / "edge" / "edge-small"
    if not (model_dir / "meta.json").is_file():
        pytest.skip("edge-small is not built (make models)")
    from edge.runtime.generation import load

    expected = "".join(load(model_dir).generate("Once upon a time", max_tokens=12, temperature=0.0, seed=None, stop=[]))
    async with _client(mobile.EdgeLocalModel(model_dir)) as c:
        answer = await c.completions.create(model="edge-small", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert answer.meta.local and answer.meta.protocol == "local"
    assert answer.text == expected and answer.text


async def test_offline_chat_uses_the_model_s_chat_template_as_the_edge_does(cache_dir, tmp_path):
    """An exported model with a chat template gets it offline too, rendered by the edge runtime."""
    source = cache_dir / "edge" / "edge-small"
    if not (source / "meta.json").is_file():
        pytest.skip("edge-small is not built (make models)")
    import json
    import shutil

    from edge.runtime.generation import load

    model_dir = shutil.copytree(source, tmp_path / "edge-small", ignore=shutil.ignore_patterns("checkpoint"))
    meta = json.loads((model_dir / "meta.json").read_text())
    meta["chat_template"] = {"source": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>",
                             "bos_token": "<s>", "eos_token": "</s>"}
    (model_dir / "meta.json").write_text(json.dumps(meta))
    messages = [{"role": "user", "content": "Once upon a time"}]
    assert chat_prompt(messages, EdgeLocalModel(model_dir)) == "<user>Once upon a time<assistant>"
    assert chat_prompt(messages) == "user: Once upon a time\nassistant:"  # a model of the app's own
    expected = "".join(load(model_dir).generate("<user>Once upon a time<assistant>", max_tokens=8, temperature=0.0,
                                                seed=None, stop=[]))
    async with _client(mobile.EdgeLocalModel(model_dir)) as c:
        answer = await c.chat.completions.create(model="edge-small", messages=messages, max_tokens=8, temperature=0)
    assert answer.meta.local and answer.choices[0].message.content == expected


@pytest.mark.parametrize("eager", [True, False], ids=["at-call", "at-first-piece"])
async def test_local_refusal_with_prefer_local_asks_the_gateway(tmp_path, eager):
    async with running(tmp_path) as gw:
        kw = client_kwargs(gw, tmp_path, local_model=ShortContextModel(eager), prefer_local=True)
        async with mobile.Client(f"https://127.0.0.1:{gw.https_port}", **kw) as c:
            answer = await c.completions.create(model="m", prompt="word " * 1200)
            stream = await c.completions.create(model="m", prompt="word " * 1200, stream=True)
            texts = [ch.text async for ch in stream]
    assert not answer.meta.local and answer.text == "hello"
    assert not stream.meta.local and "".join(texts) == "hello"
    assert len(gw.seen) == 2


@pytest.mark.parametrize("eager", [True, False], ids=["at-call", "at-first-piece"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_local_refusal_offline_is_offline_unavailable(eager, stream):
    async with _client(ShortContextModel(eager)) as c:
        with pytest.raises(mobile.OfflineUnavailable, match="leaves no room") as err:
            await c.completions.create(model="m", prompt="word " * 1200, stream=stream)
    assert isinstance(err.value.__cause__, mobile.TransportError)  # the network failure stays attached


async def test_local_usage_and_finish_reason_come_from_the_runtime_not_the_piece_count():
    c = mobile.Client("https://gateway.invalid", api_key="k", local_model=MultiTokenModel(), prefer_local=True,
                      migration_check_s=None)
    answer = await c.completions.create(model="m", prompt="日本語", max_tokens=3)
    stream = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                             stream=True)
    chunks = [ch async for ch in stream]
    await c.aclose()
    assert answer.text == " 🚀def" and answer.choices[0].finish_reason == "length"
    assert answer.usage == Usage(4, 3, 7)
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_real_edge_small_lm_finish_reason_and_usage_match_the_runtime(cache_dir):
    """Seed 28 on "日本語" ends at the 3-token budget in 2 text pieces (one of them two tokens)."""
    model_dir = cache_dir / "edge" / "edge-small"
    if not (model_dir / "meta.json").is_file():
        pytest.skip("edge-small is not built (make models)")
    from edge.runtime.generation import GenerateParams, load

    ref = list(load(model_dir).stream("日本語", GenerateParams(max_tokens=3, temperature=1.0, seed=28)))
    c = mobile.Client("https://gateway.invalid", api_key="k", local_model=mobile.EdgeLocalModel(model_dir),
                      prefer_local=True, migration_check_s=None)
    answer = await c.completions.create(model="m", prompt="日本語", max_tokens=3, temperature=1.0, seed=28)
    stream = await c.completions.create(model="m", prompt="日本語", max_tokens=3, temperature=1.0, seed=28,
                                        stream=True)
    chunks = [ch async for ch in stream]
    await c.aclose()
    assert ref[-1].finish_reason == "length" and ref[-1].completion_tokens == 3
    assert answer.text == "".join(r.text for r in ref)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage == Usage(ref[-1].prompt_tokens, 3, ref[-1].prompt_tokens + 3)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(ch.text for ch in chunks) == answer.text
