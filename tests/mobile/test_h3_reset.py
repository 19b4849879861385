"""How the SDK reads a stream the server resets, or a connection it closes: unsent only when the
server says it never ran it, or when it never left."""

from __future__ import annotations

import asyncio

import pytest
from aioquic.h3.connection import H3_ALPN, ErrorCode
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StreamReset

from mobile.errors import TransportError
from mobile.h3 import _Failed, _H3Protocol
from mobile.http import HttpRequest


@pytest.mark.parametrize(("code", "sent", "usable"), [
    (ErrorCode.H3_REQUEST_REJECTED, False, False),  # a draining gateway after its GOAWAY: retry elsewhere
    (ErrorCode.H3_REQUEST_CANCELLED, True, True),  # it may have run: only replay-safe requests go again
    (ErrorCode.H3_INTERNAL_ERROR, True, True),
])
async def test_a_reset_stream_is_unsent_only_when_rejected(code, sent, usable):
    proto = _H3Protocol(QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)))
    proto.streams[0] = queue = asyncio.Queue()
    proto.quic_event_received(StreamReset(error_code=code, stream_id=0))
    failed = queue.get_nowait()
    assert isinstance(failed, _Failed) and failed.error.sent is sent
    assert proto.usable is usable


async def test_a_request_on_a_connection_closed_meanwhile_is_unsent():
    proto = _H3Protocol(QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)))
    proto.closed_reason = "closed by client after the server went away"  # as while awaiting the handshake
    with pytest.raises(TransportError) as closed:
        proto.send_request(HttpRequest("POST", "/v1/completions", body=b"{}"), "127.0.0.1:8443")
    assert closed.value.sent is False
