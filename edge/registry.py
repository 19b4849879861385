"""The models a worker serves, loaded from exported folders by the task their meta.json names."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from edge.runtime.embedding import EmbeddingModel
from edge.runtime.generation import SmallLM
from edge.runtime.model_dir import META_FILE

ServedModel = EmbeddingModel | SmallLM
TASKS = ("embedding", "generation")


def load_models(
    models: Mapping[str, Path], threads: int, *, int8: bool = False, instances: int = 1
) -> dict[str, ServedModel]:
    """Load every configured model; fails loudly (at startup) on a missing or unknown export.

    Embedding models get `instances` sessions (one per inference thread, so batches run side by side);
    the small LM keeps one, whose steps are short enough to share.
    """
    loaded: dict[str, ServedModel] = {}
    for name, model_dir in models.items():
        task = _task(Path(model_dir))
        if task not in TASKS:
            raise ValueError(
                f"model {name!r} at {model_dir}: task {task!r} is not supported; "
                f"supported: {', '.join(TASKS)}"
            )
        if task == "embedding":
            loaded[name] = EmbeddingModel.load(model_dir, threads, int8=int8, instances=instances)
        else:
            loaded[name] = SmallLM.load(model_dir, threads, int8=int8)
    return loaded


def _task(model_dir: Path) -> str:
    """The task recorded in an export's meta.json ("embedding" for exports that predate the field)."""
    meta_path = model_dir / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: is {model_dir} an exported model folder?")
    return str(json.loads(meta_path.read_text()).get("task", "embedding"))
