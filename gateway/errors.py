"""Errors are values with a kind; the kind alone decides the HTTP status and the OpenAI error type."""

from __future__ import annotations

import enum

import msgspec


class Kind(enum.Enum):
    # (HTTP status, OpenAI error type)
    BAD_REQUEST = (400, "invalid_request_error")
    UNAUTHORIZED = (401, "authentication_error")
    FORBIDDEN = (403, "permission_error")
    NOT_FOUND = (404, "not_found_error")
    METHOD_NOT_ALLOWED = (405, "invalid_request_error")
    REQUEST_TIMEOUT = (408, "invalid_request_error")
    TOO_LARGE = (413, "invalid_request_error")
    EXPECTATION_FAILED = (417, "invalid_request_error")
    UNPROCESSABLE = (422, "invalid_request_error")
    HEADERS_TOO_LARGE = (431, "invalid_request_error")
    RATE_LIMITED = (429, "rate_limit_error")
    INTERNAL = (500, "server_error")
    UPSTREAM = (502, "upstream_error")
    NO_HEALTHY_ZONE = (503, "service_unavailable")
    OVERLOADED = (503, "server_error")
    UPSTREAM_TIMEOUT = (504, "timeout_error")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def type(self) -> str:
        return self.value[1]


# OpenAI's code for a prompt (or prompt and max_tokens) longer than the model's context: clients
# key on it to shorten and retry.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


class GatewayError(Exception):
    """A refusal or failure that reaches the client as an OpenAI-style error body."""

    def __init__(
        self,
        kind: Kind,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    @property
    def status(self) -> int:
        return self.kind.status

    def body(self) -> bytes:
        """The OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
        return msgspec.json.encode(
            {"error": {"message": self.message, "type": self.kind.type, "param": self.param, "code": self.code}}
        )


class UpstreamFailure(Exception):
    """An upstream call failed in a way another zone may not (connection refused, reset, 5xx).

    `retryable` is False when the request itself is at fault (the upstream refused the input),
    so that failover does not carry a bad request from zone to zone.
    """

    def __init__(
        self, message: str, *, retryable: bool = True, timeout: bool = False, hard: bool = False, refused: bool = False,
        in_zone: bool = False, stalled: bool = False,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.timeout = timeout
        # The process is gone (connection refused or reset), not merely slow or erring.
        self.hard = hard
        # Nothing came back, and nothing will: the upstream turned the request away (draining,
        # still loading) or went down before answering. Sending it elsewhere is safe, streams included.
        self.refused = refused
        # One replica's failure, in a zone whose other replicas serve: go on in the same zone.
        self.in_zone = in_zone
        # A stream sent nothing for the chunk gap while its zone answered its health checks.
        self.stalled = stalled
