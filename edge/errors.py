"""Errors the edge worker answers with: a kind plus a message meant for the caller."""

from __future__ import annotations

from enum import Enum


class ErrorKind(Enum):
    """What went wrong, independent of the wire protocol (the server maps kinds to gRPC status)."""

    BAD_INPUT = "bad_input"
    CONTEXT_OVERFLOW = "context_overflow"  # bad input the client can act on: a shorter prompt
    UNKNOWN_MODEL = "unknown_model"
    UNAVAILABLE = "unavailable"
    UNIMPLEMENTED = "unimplemented"


class EdgeError(Exception):
    """A request the worker refuses; `message` is safe to show to the client."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
