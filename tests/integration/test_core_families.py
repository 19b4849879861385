"""Fresh random checkpoints of each family, served through the whole stack (HTTP/3 -> gateway ->
Triton -> engine), give the same greedy text as transformers on the same checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from deploy.settings import DEFAULT_TOPOLOGY
from tests.conftest import free_port, meridian
from tests.support.h3 import h3_client

pytestmark = pytest.mark.integration

KEY = "mk-families-" + "y" * 12
PROMPTS = ["The quick brown fox", "Edge inference keeps latency low", "Once upon a time"]
NEW_TOKENS = 16
# Configs not seen by the unit tests: other widths, expert counts and attention shapes.
FAMILIES = {
    "qwen3_moe": dict(hidden_size=96, intermediate_size=192, moe_intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=3, head_dim=20, num_experts=10,
                      num_experts_per_tok=3, norm_topk_prob=True, max_position_embeddings=512, rope_theta=5000.0),
    "mixtral": dict(hidden_size=80, intermediate_size=112, num_hidden_layers=2, num_attention_heads=5,
                    num_key_value_heads=1, num_local_experts=6, num_experts_per_tok=2,
                    max_position_embeddings=512, rope_theta=20000.0),
    "qwen2_moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, max_position_embeddings=512),
    "olmoe": dict(hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, max_position_embeddings=512),
    # V2-Lite's shape of routing: greedy over every expert, no q LoRA, shared experts.
    "deepseek_v2": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                        kv_lora_rank=32, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, topk_method="greedy",
                        max_position_embeddings=512),
}


def build(dest: Path, family: str, tokenizer_dir: Path, seed: int) -> Path:
    """A random checkpoint of `family` that shares the local default checkpoint's tokenizer."""
    from core.tokenizer import Tokenizer

    base = json.loads((tokenizer_dir / "config.json").read_text())
    eos = sorted(Tokenizer(tokenizer_dir).eos_token_ids)
    cfg = transformers.AutoConfig.for_model(
        family, vocab_size=base["vocab_size"], tie_word_embeddings=False, bos_token_id=base.get("bos_token_id"),
        eos_token_id=eos[0] if eos else None, pad_token_id=0, **FAMILIES[family],
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def family_stack(tmp_path_factory, cache_dir):
    """One zone whose core serves a fresh checkpoint of each family."""
    work = tmp_path_factory.mktemp("families")
    built = meridian("models", env={**os.environ})
    assert built.returncode == 0, built.stderr
    tokenizer_dir = cache_dir / "core" / "meridian-moe-mini"
    checkpoints = {f: build(work / f"{f.replace('_', '-')}-fresh", f, tokenizer_dir, seed=7 + i)
                   for i, f in enumerate(FAMILIES)}
    topo = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
    topo["gateway"]["http1"]["port"] = free_port()
    topo["gateway"]["http3"]["port"] = free_port(socket.SOCK_DGRAM)
    topo["gateway"]["https"]["port"] = 0
    topo["redis"]["port"] = free_port()
    zone = topo["zones"][0]
    zone["address"] = "127.0.45.1"
    topo["zones"] = [zone]
    topo["models"] = [m for m in topo["models"] if m["tier"] == "edge"] + [
        {"name": path.name, "tier": "core", "kind": "generate", "path": str(path), "max_output_tokens": 64}
        for path in checkpoints.values()
    ]
    path = work / "topology.yaml"
    path.write_text(yaml.safe_dump(topo))
    env = {**os.environ, "MERIDIAN_API_KEY": KEY}
    var = work / "var"
    up = meridian("up", "--detach", "--topology", str(path), "--var-dir", str(var), env=env)
    if up.returncode != 0:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in (var / "logs").glob("*.log"))
        meridian("down", "--var-dir", str(var), env=env, timeout=120)
        pytest.fail(f"meridian up failed:\n{up.stdout}\n{up.stderr}\n{logs}")
    yield checkpoints, topo["gateway"]["http3"]["port"]
    meridian("down", "--var-dir", str(var), env=env, timeout=120)


def transformers_greedy(path: Path, prompt: str) -> tuple[str, bool]:
    """The reference text up to the first of the core's EOS ids, and whether one came."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    from core.tokenizer import Tokenizer  # the core's own encoding of the prompt (BOS as configured)

    core = Tokenizer(path)
    ids = torch.tensor([core.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    # The core stops at any id of its EOS set; generate only at the config's, so cut there ourselves.
    cut = next((i for i, t in enumerate(new) if t in core.eos_token_ids), len(new))
    return tok.decode(new[:cut], skip_special_tokens=True), cut < len(new)


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_greedy_text_through_the_stack_matches_transformers(family_stack, family):
    checkpoints, h3_port = family_stack
    path = checkpoints[family]
    async with h3_client("127.0.0.1", h3_port, KEY) as c:
        for prompt in PROMPTS:
            r = await c.post("/v1/completions", json={"model": path.name, "prompt": prompt, "max_tokens": NEW_TOKENS,
                                                       "temperature": 0},
                             headers={"cache-control": "no-cache"})
            assert r.status == 200, r.body
            assert r.headers["x-meridian-tier"] == "core"
            body = r.json()
            expected, stopped = transformers_greedy(path, prompt)
            got = body["choices"][0]["text"]
            # The whole reference up to EOS, never just a prefix of it: a core that stops early must fail.
            assert expected, (prompt, "the reference made no text, so the comparison would prove nothing")
            assert got == expected, (prompt, got, expected)
            assert body["choices"][0]["finish_reason"] == ("stop" if stopped else "length"), (prompt, body)
