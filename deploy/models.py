"""`meridian models`: build every artefact the local topology serves, into the model cache."""

from __future__ import annotations

import time

from deploy.settings import Settings


def build_all(settings: Settings, *, force: bool = False) -> int:
    """Export the edge's ONNX models and generate the core's local checkpoint (cached)."""
    from core.checkpoint.synthetic import build_local_checkpoint
    from edge.export import build_embedding_model
    from edge.lm_export import build_small_lm

    cache = settings.cache_dir
    steps = [
        ("edge embedding model (all-MiniLM-L6-v2 -> ONNX)", lambda: build_embedding_model(cache / "edge" / "all-minilm-l6-v2", force=force)),
        ("edge small LM (edge-small, Llama family -> ONNX with KV cache)", lambda: build_small_lm(cache / "edge" / "edge-small", force=force)),
        ("core checkpoint (meridian-moe-mini, DeepSeek-V3 family)", lambda: build_local_checkpoint(cache / "core" / "meridian-moe-mini", force=force)),
    ]
    print(f"Building model artefacts into {cache}", flush=True)
    for i, (name, build) in enumerate(steps, 1):
        started = time.monotonic()
        print(f"[{i}/{len(steps)}] {name}", flush=True)
        path = build()
        print(f"[{i}/{len(steps)}] done in {time.monotonic() - started:.1f}s: {path}", flush=True)
    return 0
