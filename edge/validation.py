"""Checks on requests before any model runs: bad input gets a clear error, never a crash."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from edge.errors import EdgeError, ErrorKind

M = TypeVar("M")


@dataclass(frozen=True)
class EmbedLimits:
    """How much one Embed request may ask for."""

    max_batch_inputs: int
    max_input_chars: int


def pick_model(name: str, models: Mapping[str, M]) -> M:
    """The served model called `name`, or an error listing the ones that are served."""
    available = ", ".join(sorted(models)) or "none"
    if not name:
        raise EdgeError(ErrorKind.BAD_INPUT, f"model is required; this worker serves: {available}")
    if name not in models:
        raise EdgeError(ErrorKind.UNKNOWN_MODEL, f"model {name!r} is not served here; available: {available}")
    return models[name]


def check_embed_inputs(inputs: Sequence[object], limits: EmbedLimits) -> list[str]:
    """The inputs as a list of strings, if they are within `limits`."""
    if len(inputs) == 0:
        raise EdgeError(ErrorKind.BAD_INPUT, "inputs is empty: send at least one string to embed")
    if len(inputs) > limits.max_batch_inputs:
        raise EdgeError(
            ErrorKind.BAD_INPUT,
            f"too many inputs: {len(inputs)} in one request, the limit is {limits.max_batch_inputs}; split the batch",
        )
    for index, text in enumerate(inputs):
        if not isinstance(text, str):
            raise EdgeError(ErrorKind.BAD_INPUT, f"inputs[{index}] is a {type(text).__name__}, not a string")
        if len(text) > limits.max_input_chars:
            raise EdgeError(
                ErrorKind.BAD_INPUT,
                f"inputs[{index}] has {len(text)} characters, the limit is {limits.max_input_chars}",
            )
    return list(inputs)  # type: ignore[arg-type]  # every item was checked to be a str above
