"""The SDK's errors: one base class, a kind per failure, the API's error body kept as values."""

from __future__ import annotations


class MeridianError(Exception):
    """Base of every error the SDK raises."""


class ConfigError(MeridianError, ValueError):
    """The client was built or called with bad arguments."""


class TransportError(MeridianError):
    """The network failed before a whole answer arrived.

    `sent` says whether the request may have reached the server: a request that never left can be
    retried whatever its method; one that may have left is retried only when replay-safe.
    """

    def __init__(self, message: str, *, sent: bool = False) -> None:
        super().__init__(message)
        self.sent = sent


class ConnectError(TransportError):
    """No connection could be made (UDP blocked, host unreachable, handshake failed)."""


class HandshakeTimeout(ConnectError):
    """The handshake did not finish within the handshake timeout."""


class ConnectionRefused(ConnectError):
    """The server answered the handshake by refusing the connection (QUIC CONNECTION_REFUSED: a
    gateway at its connection limit). The path works; the server is busy for now."""


class EarlyDataRejected(TransportError):
    """The server refused 0-RTT data, so the request was not processed; it is safe to send again."""


class RequestTimeout(TransportError):
    """The answer (or its next chunk) did not come within the request's timeout."""


class ProtocolError(TransportError):
    """The server sent something this client cannot parse."""


class APIError(MeridianError):
    """The server answered with an error status and an OpenAI-style error body. `param` names the
    field at fault; `request_id` is the gateway's x-request-id, what its logs know the request by."""

    def __init__(self, status: int, message: str, *, type: str = "", code: str | None = None,
                 retry_after: float | None = None, param: str | None = None, request_id: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.retry_after = retry_after
        self.param = param
        self.request_id = request_id


class BadRequestError(APIError):
    """400, 404, 413, 422: the request itself is wrong; retrying will not help."""


class AuthenticationError(APIError):
    """401 or 403, even after asking the token provider for a fresh token."""


class RateLimitError(APIError):
    """429: too many requests; `retry_after` says when to come back."""


class ServerError(APIError):
    """5xx: the gateway or every upstream zone failed."""


class OfflineUnavailable(MeridianError):
    """The network failed and no local model can answer this request."""


def api_error(status: int, message: str, *, type: str = "", code: str | None = None,
              retry_after: float | None = None, param: str | None = None, request_id: str | None = None) -> APIError:
    """The APIError subclass for an HTTP status."""
    if status in (401, 403):
        cls: type[APIError] = AuthenticationError
    elif status == 429:
        cls = RateLimitError
    elif status >= 500:
        cls = ServerError
    else:
        cls = BadRequestError
    return cls(status, message, type=type, code=code, retry_after=retry_after, param=param, request_id=request_id)
