"""A sequence's results do not depend on what else shares its batch (CPU): continuous batching
moves neighbours in and out at every step, and a seeded stream must equal a solo run of the same
request, bit for bit, as must a stream resumed from its prefix.

Each mechanism is held to it on its own (products, attention, router), then whole models of each
family (decode and prefill), then the engine with many streams at once.
"""

from __future__ import annotations

import dataclasses
import random
import threading

import pytest
import torch

import kernels.cpu
from core.engine import Engine, GenerationRequest
from core.engine.kv_cache import PagedKVCache
from core.model.config import ModelConfig
from core.model.layers import PV_CHUNK, Linear, Router
from core.model.loader import load_model
from core.tokenizer import Tokenizer
from tests.core.test_model_vs_transformers import CONFIGS, make_checkpoint

FAMILIES = [("deepseek_v3", "qlora-yarn-4groups"), ("qwen3_moe", "qwen3-gqa-headdim"), ("mixtral", "mixtral-8x2")]


@pytest.fixture(params=["as probed", "4-row calls"])
def products(request, monkeypatch):
    """Products as this machine's probe chooses (one call per product on the project's AMD machines),
    and as a BLAS whose padded calls disagree gets them (an Intel Xeon's MKL): 4-row calls."""
    if request.param == "4-row calls":
        monkeypatch.setattr(kernels.cpu, "padded_products_are_invariant", lambda threads: False)
    return request.param


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(256, 512), (64, 16), (96, 1579)])
def test_linear_rows_do_not_depend_on_their_neighbours(threads, shape, products):
    torch.set_num_threads(threads)
    try:
        layer = Linear(*shape)
        x = torch.randn(300, shape[0], generator=torch.Generator().manual_seed(0))
        together = layer(x)
        for n in (1, 2, 3, 4, 5, 7, 17, 31, 64, 129, 255):
            assert torch.equal(layer(x[:n]), together[:n]), n
        assert torch.equal(layer(x[None, :1])[0], together[:1])  # leading dims too
    finally:
        torch.set_num_threads(2)


@pytest.mark.parametrize("experts", [16, 8, 60])
def test_router_rows_do_not_depend_on_their_neighbours(experts, local_checkpoint):
    """Scores go through exp/sigmoid, whose scalar tail rounds another way: odd counts included."""
    cfg = ModelConfig.from_file(local_checkpoint)
    cfg = dataclasses.replace(cfg, n_routed_experts=experts, n_group=4, topk_group=2)
    router = Router(cfg, correction_bias=True)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    weights, ids = router(x)
    for n in (1, 3, 9, 17, 33):
        w, i = router(x[:n])
        assert torch.equal(w, weights[:n]) and torch.equal(i, ids[:n]), n


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f[0])
def family_model(request, tmp_path_factory):
    family, name = request.param
    path = make_checkpoint(tmp_path_factory.mktemp(name), CONFIGS[request.param], seed=5, family=family)
    return load_model(path)


def new_cache(model, slots: int = 16) -> PagedKVCache:
    return PagedKVCache(model.cache_layout(), 256, 16, slots, 512, torch.float32)


@torch.inference_mode()
def test_decode_rows_do_not_depend_on_their_batch(family_model, products):
    """One decode row's logits, alone and among rows of other lengths (past PV_CHUNK too), at any place."""
    model, g = family_model, torch.Generator().manual_seed(2)
    lengths = [9, 3, PV_CHUNK + 37, 50, 1, 200, 16]
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in lengths]
    cache = new_cache(model)
    slots = [cache.allocate(260) for _ in prompts]
    for slot, p in zip(slots, prompts):
        model(p[None, :-1], torch.tensor([0]), cache, torch.tensor([slot])) if len(p) > 1 else None
    last = torch.tensor([[int(p[-1])] for p in prompts])
    start = torch.tensor([len(p) - 1 for p in prompts])
    # Decoding writes the last token's cache entry; each run rewrites the same values.
    batched = model(last, start, cache, torch.tensor(slots))[:, -1]
    for i in range(len(prompts)):
        alone = model(last[i : i + 1], start[i : i + 1], cache, torch.tensor(slots[i : i + 1]))[:, -1]
        assert torch.equal(alone[0], batched[i]), f"row {i} (length {lengths[i]})"
    order = [3, 0, 6, 2]
    subset = model(last[order], start[order], cache, torch.tensor([slots[i] for i in order]))[:, -1]
    assert all(torch.equal(subset[j], batched[i]) for j, i in enumerate(order))


@torch.inference_mode()
def test_prefill_rows_do_not_depend_on_their_batch(family_model, products):
    """A prompt chunk's last logits (every layer's cache behind them), alone or right-padded beside others."""
    model, g = family_model, torch.Generator().manual_seed(3)
    chunks = [(0, 23), (0, 5), (40, 31), (0, 64)]  # (cached prefix, new tokens)
    tokens = [torch.randint(0, model.config.vocab_size, (s + n,), generator=g) for s, n in chunks]

    def prefill(rows: list[int]):
        cache = new_cache(model)
        slots = [cache.allocate(160) for _ in chunks]
        for i in rows:  # cached prefixes, each alone
            if chunks[i][0]:
                model(tokens[i][None, : chunks[i][0]], torch.tensor([0]), cache, torch.tensor([slots[i]]))
        width = max(chunks[i][1] for i in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for j, i in enumerate(rows):
            batch[j, : chunks[i][1]] = tokens[i][chunks[i][0] :]
        return model(batch, torch.tensor([chunks[i][0] for i in rows]), cache, torch.tensor([slots[i] for i in rows]),
                     last_only=True, lengths=torch.tensor([chunks[i][1] for i in rows]))[:, -1]

    together = prefill([0, 1, 2, 3])
    for i in range(len(chunks)):
        assert torch.equal(prefill([i])[0], together[i]), f"chunk {i}"


def streams(engine: Engine, specs: list[dict]) -> list[list[int]]:
    """Run `specs` all at once; each stream's token ids."""
    out = {i: [] for i in range(len(specs))}
    done = threading.Semaphore(0)

    def collect(i):
        def on_event(event):  # the engine thread: never block here
            out[i].extend(event.token_ids)
            if event.finished:
                done.release()
        return on_event

    for i, spec in enumerate(specs):
        engine.submit(GenerationRequest(f"c{i}-{id(specs)}", **spec), collect(i))
    for _ in specs:
        assert done.acquire(timeout=300)
    return [out[i] for i in range(len(specs))]


@pytest.fixture(scope="module")
def chunky_engine(local_checkpoint):
    """A small prefill chunk, so that prompts are split and share prefill forwards."""
    eng = Engine(load_model(local_checkpoint), Tokenizer(local_checkpoint), max_batch=32, max_seq_len=512,
                 prefill_chunk=48)
    yield eng
    eng.close()


def test_concurrent_streams_equal_solo_runs(chunky_engine):
    """32 streams at once (greedy and sampled, prompts from 1 token to several prefill chunks), each
    token for token its solo run; then the same again with resumed streams among them."""
    rng = random.Random(11)
    vocab = chunky_engine.vocab_size
    specs = []
    for i in range(32):
        specs.append(dict(prompt_ids=[rng.randrange(vocab) for _ in range(rng.choice([1, 7, 30, 48, 49, 130]))],
                          max_tokens=rng.randint(8, 40), temperature=rng.choice([0.0, 0.7, 1.0]),
                          top_p=rng.choice([1.0, 0.9]), seed=rng.getrandbits(32), ignore_eos=True))
    solo = [streams(chunky_engine, [spec])[0] for spec in specs]
    assert streams(chunky_engine, specs) == solo
    resumed = [dict(spec, prefix_token_ids=solo[i][: len(solo[i]) // 2]) for i, spec in enumerate(specs)]
    mixed = streams(chunky_engine, resumed[::2] + specs[1::2])
    assert mixed[:16] == [solo[i][len(solo[i]) // 2 :] for i in range(0, 32, 2)]
    assert mixed[16:] == solo[1::2]
