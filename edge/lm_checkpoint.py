"""The local default small LM: a tiny dense Llama-family decoder in Hugging Face format, made offline.

Users bring their own checkpoint of a supported family; this one exists so that the stack runs with
nothing downloaded. Its tokenizer is a byte-level BPE trained on a built-in corpus, and its weights
are fitted to that corpus for a couple of hundred steps (seeded), so greedy text is readable and its
next-token choices are confident: numerical noise (ONNX vs PyTorch, int8 vs fp32) then rarely flips
a token, which is what the export checks need from a model that is otherwise a toy.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge.artefacts import progress, step, torch_threads

TAG = "edge.lm_checkpoint"
SEED = 20240611
VOCAB_SIZE = 1024  # an upper bound; the corpus yields fewer merges, the model vocabulary follows
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
TRAIN_STEPS = 240
WINDOW = 48
BATCH = 8

CORPUS = (
    "The edge answers small work close to the user, fast and cheap.",
    "Embeddings turn a sentence into a vector that machines can compare.",
    "A small language model runs on the edge and streams its tokens one by one.",
    "The gateway sends heavy chat requests to the core and light ones to the edge.",
    "When a zone fails, the request moves to the next zone without an error.",
    "Dynamic batching groups requests that arrive together into one model call.",
    "A cache near the user remembers answers to questions it has seen before.",
    "On a rolling restart each worker drains its requests before it exits.",
    "Hello, world! How are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, a fisherman lived in a small village by the sea.",
    "Every morning he walked to the harbour and talked with the sailors.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The library opens at nine on weekdays and at ten on Saturdays.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(3):\n    print(i)\n",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "Café, naïve, über, jalapeño, crème brûlée.",
    "東京は日本の首都です。",
    "Emoji: 🙂 🚀 🌍 and math: π ≈ 3.14159.",
    "Question: what is the capital of France? Answer: Paris.",
    "Question: what colour is the sky? Answer: blue.",
    "Please summarise the document in three sentences.",
)


def build_tokenizer():
    """Train a byte-level BPE on the built-in corpus: deterministic, offline, with BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def model_config_kwargs(vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> dict:
    """Llama shaped with grouped-query attention, shrunk to run quickly on two CPU cores."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        initializer_range=0.02,
    )


def write_checkpoint(out: Path) -> None:
    """Write tokenizer, config and fitted weights of the default small LM into `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    bos_id, eos_id, pad_id = (tok.token_to_id(t) for t in (BOS, EOS, PAD))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
    }, indent=2) + "\n")
    cfg = AutoConfig.for_model("llama", **model_config_kwargs(tok.get_vocab_size(), bos_id, eos_id, pad_id))
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with step(TAG, f"fit to the built-in corpus ({TRAIN_STEPS} steps)"):
        _fit(model, [tok.encode(s).ids + [eos_id] for s in CORPUS])
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "do_sample": False,
    }, indent=2) + "\n")


def _fit(model, sequences: list[list[int]]) -> None:
    """Seeded AdamW steps of next-token prediction over random corpus windows."""
    import torch

    stream = torch.tensor([t for s in sequences for t in s])
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    model.train()
    # One thread: on a busy shared machine two threads spin against each other and run 5x slower.
    with torch_threads(1):
        for i in range(TRAIN_STEPS):
            starts = torch.randint(0, len(stream) - WINDOW, (BATCH,), generator=generator)
            batch = torch.stack([stream[s : s + WINDOW] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss  # transformers shifts the labels itself
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if (i + 1) % 40 == 0:
                progress(TAG, f"  step {i + 1}: loss {loss.item():.3f}")
