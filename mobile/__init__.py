"""Meridian's mobile SDK: HTTP/3 with 0-RTT resumption, HTTP/1.1 fallback, retries, offline answers.

    async with mobile.Client("https://gateway:443", api_key=KEY, ticket_dir=app_dir / "quic") as c:
        answer = await c.chat.completions.create(model="meridian-moe-mini", messages=[...])

Imports only the standard library and aioquic; `edge.runtime` is imported lazily for offline mode.
"""

from mobile.client import Client, Stream, Timeouts
from mobile.errors import (APIError, AuthenticationError, BadRequestError, ConfigError, ConnectError,
                           ConnectionRefused, EarlyDataRejected, HandshakeTimeout, MeridianError, OfflineUnavailable,
                           ProtocolError, RateLimitError, RequestTimeout, ServerError, TransportError)
from mobile.offline import EdgeLocalModel, LocalModel
from mobile.retry import RetryPolicy
from mobile.sync import SyncClient, SyncStream
from mobile.tickets import TicketStore
from mobile.types import (ChatCompletion, ChatCompletionChunk, Completion, Embedding, EmbeddingList, Model, ModelList,
                          ResponseMeta, Usage)

__version__ = "0.1.0"

__all__ = [
    "Client", "SyncClient", "Stream", "SyncStream", "Timeouts", "RetryPolicy", "TicketStore",
    "LocalModel", "EdgeLocalModel",
    "ChatCompletion", "ChatCompletionChunk", "Completion", "Embedding", "EmbeddingList", "Model", "ModelList",
    "ResponseMeta", "Usage",
    "MeridianError", "ConfigError", "TransportError", "ConnectError", "ConnectionRefused", "HandshakeTimeout",
    "EarlyDataRejected",
    "RequestTimeout", "ProtocolError", "APIError", "BadRequestError", "AuthenticationError", "RateLimitError",
    "ServerError", "OfflineUnavailable",
]
