"""The local default checkpoint: a small random DeepSeek-V3 in Hugging Face format, made offline.

It is what the stack serves when the user points the core at nothing else. Weights are random (a fixed
seed), so the text is nonsense, but every path (MLA, grouped routing, YaRN, chat template, byte-level
BPE with multi-byte characters) is the one a real DeepSeek-V3 checkpoint takes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

MODEL_NAME = "meridian-moe-mini"
SEED = 1234
VOCAB_SIZE = 2048  # an upper bound: the built-in corpus yields about 1.6k tokens, the model vocabulary
BOS, EOS, PAD = "<|begin_of_sentence|>", "<|end_of_sentence|>", "<|pad|>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]

# DeepSeek-style template, rendered by core.tokenizer exactly as transformers' apply_chat_template does.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' ~ message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)

# A small built-in corpus: enough English, code and non-ASCII text for merges over multi-byte
# characters, so incremental detokenisation meets characters split across tokens.
CORPUS = [
    "Meridian serves language models from the edge to the cloud.",
    "The gateway sends heavy chat requests to the core, where a mixture of experts runs on our kernels.",
    "Each token is routed to a few experts; a shared expert sees every token.",
    "Hello, world! How are you today? I am fine, thank you. What is the weather like?",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "def forward(self, x):\n    return self.down(silu(self.gate(x)) * self.up(x))\n",
    "for i in range(10):\n    print(i, i * i)\n",
    '{"model": "meridian-moe-mini", "messages": [{"role": "user", "content": "hi"}], "stream": true}',
    "Café, naïve, façade, über, smörgåsbord, jalapeño, crème brûlée.",
    "日本語のテキストも少し含めます。東京は日本の首都です。",
    "中文文本：你好，世界！我们在边缘和云之间提供推理服务。",
    "Русский текст: привет, мир. Ελληνικά: γειά σου κόσμε. עברית: שלום עולם.",
    "Emoji: 🙂 🚀 🌍 ✨ 👍🏽 — and math: ∑ x² ≤ ∞, π ≈ 3.14159, e^{iπ} + 1 = 0.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.5 42%.",
    "A user asks a question and the assistant answers it briefly and politely.",
    "Streaming responses arrive token by token; a final message carries the finish reason.",
    "Mixture-of-experts models activate only a fraction of their parameters for each token, which keeps inference cheap.",
    "Multi-head latent attention compresses keys and values into a small latent vector before caching them.",
    "Rotary position embeddings rotate pairs of dimensions by an angle that grows with the position.",
    "Continuous batching lets new requests join the running batch between decode steps.",
    "When a zone fails, the gateway retries the request in the next healthy zone without losing the stream.",
    "Temperature, nucleus sampling and a fixed seed decide which token comes next.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his curious granddaughter.",
    "Every morning she walked along the beach, collecting shells, driftwood and stories from the passing sailors.",
    "Science explains the world through careful observation, measurement, experiment and honest doubt.",
    "Water boils at one hundred degrees Celsius at sea level; at higher altitudes it boils at lower temperatures.",
    "The library opens at nine o'clock on weekdays and at ten o'clock on Saturdays and Sundays.",
    "Please summarise the following document in three sentences, keeping the numbers exact.",
    "Translate into French: good morning, thank you very much, see you tomorrow. Bonjour, merci beaucoup, à demain.",
    "Deutsch: Guten Morgen, wie geht es Ihnen? Español: buenos días, ¿cómo estás? Português: obrigado, até logo.",
    "import torch\nimport numpy as np\nx = torch.randn(4, 8)\ny = x.softmax(dim=-1).sum(dim=0)\n",
    "class Request:\n    def __init__(self, prompt: str, max_tokens: int = 16) -> None:\n        self.prompt = prompt\n",
    "SELECT name, count(*) FROM requests WHERE status = 'ok' GROUP BY name ORDER BY 2 DESC LIMIT 10;",
    "한국어: 안녕하세요, 만나서 반갑습니다. ไทย: สวัสดีครับ. हिन्दी: नमस्ते दुनिया. العربية: مرحبا بالعالم.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday; January, February, March, April, May, June.",
    "July, August, September, October, November, December; spring, summer, autumn, winter; north, south, east, west.",
]


def build_tokenizer():
    """Train a byte-level BPE on the built-in corpus: deterministic, offline, with BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeating the corpus weights nothing differently; it only lets rarer pairs reach min_frequency.
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def model_config_kwargs(vocab_size: int, bos_id: int, eos_id: int) -> dict:
    """DeepSeek-V3 shaped, shrunk to run quickly on two CPU cores."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=16,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=4,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=4096,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "rope_theta": 10000.0,
        },
        rope_theta=10000.0,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
        initializer_range=0.05,
    )


BUILD_FILE = "meridian_build.json"


def recipe_fingerprint() -> str:
    """This recipe's identity: its own source and the libraries whose output it stores (the
    tokenizer's training, transformers' config and init, torch's random stream)."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for package in ("torch", "transformers", "tokenizers"):
        digest.update(b"\0" + package.encode() + metadata.version(package).encode())
    return digest.hexdigest()[:16]


def is_built(dest: Path) -> bool:
    """Complete (its last-written file is there) and built by this recipe: editing the recipe, or
    upgrading what it depends on, rebuilds it on the next `meridian models`."""
    if not ((dest / "generation_config.json").is_file() and (dest / "model.safetensors").is_file()):
        return False
    try:
        built = json.loads((dest / BUILD_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError):
        return False
    return built == recipe_fingerprint()


def _write(tmp: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    print("  training tokenizer", flush=True)
    tok = build_tokenizer()
    tok.save(str(tmp / "tokenizer.json"))
    bos_id, eos_id, pad_id = (tok.token_to_id(t) for t in (BOS, EOS, PAD))
    (tmp / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": PAD,
                "add_bos_token": True,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 4096,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    (tmp / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2)
    )

    print("  building random deepseek_v3 model", flush=True)
    cfg = AutoConfig.for_model("deepseek_v3", **model_config_kwargs(tok.get_vocab_size(), bos_id, eos_id))
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # The bias is zero at init; a small random one makes the checkpoint exercise the biased choice.
    with torch.no_grad():
        for layer in model.model.layers[cfg.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.uniform_(0.0, 0.05)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / BUILD_FILE).write_text(json.dumps({"fingerprint": recipe_fingerprint(), "seed": SEED}, indent=2))
    # Written last: its presence marks the directory complete (see is_built).
    (tmp / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "do_sample": True,
             "temperature": 0.7, "top_p": 0.95},
            indent=2,
        )
    )


def _readable_by_all(path: Path) -> None:
    """World-readable files: save_pretrained writes the weights 0600, and the core may run as
    another user (the core image runs as an unprivileged one, reading a mounted cache)."""
    for f in path.iterdir():
        mode = f.stat().st_mode
        if f.is_file() and mode & 0o044 != 0o044:
            f.chmod(mode | 0o444)


def build_local_checkpoint(dest: Path, *, force: bool = False) -> Path:
    """Build the default checkpoint at `dest` (its name is the served model name); skip when built."""
    dest = Path(dest)
    if is_built(dest) and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"building local checkpoint {dest}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the server may run as another user
    try:
        _write(tmp)
        _readable_by_all(tmp)
        # Atomic publish: readers see either no directory or a complete one.
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"built {dest}", flush=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    """`python -m core.checkpoint.synthetic DEST [--force]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help=f"checkpoint directory (conventionally <cache>/core/{MODEL_NAME})")
    parser.add_argument("--force", action="store_true", help="rebuild even when already built")
    args = parser.parse_args(argv)
    build_local_checkpoint(args.dest, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
