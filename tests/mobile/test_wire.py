"""Sans-IO pieces: SSE decoding, HTTP/1.1 framing, request values, ticket files."""

from __future__ import annotations

import asyncio
import datetime
import stat

import pytest
from aioquic.tls import CipherSuite, SessionTicket

from mobile.errors import ConfigError, ProtocolError
from mobile.h1 import _parse_head, _read_body
from mobile.http import HttpRequest, SSEDecoder
from mobile.tickets import TicketStore, decode_ticket, encode_ticket


def test_sse_decoder_handles_split_events_and_crlf():
    d = SSEDecoder()
    assert d.feed(b"data: {\"a\"") == []
    assert d.feed(b": 1}\r\n\r\ndata: x\n") == ['{"a": 1}']
    assert d.feed(b"data: y\n\n: comment\n\ndata: [DONE]\n\n") == ["x\ny", "[DONE]"]


def test_replay_safety():
    assert HttpRequest("GET", "/v1/models").replay_safe
    assert not HttpRequest("POST", "/v1/completions").replay_safe
    assert HttpRequest("POST", "/v1/completions", {"idempotency-key": "k"}).replay_safe
    with pytest.raises(ConfigError):
        HttpRequest("GET", "v1/models")


async def _body(raw: bytes, headers: dict[str, str]) -> bytes:
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    return b"".join([c async for c in _read_body(reader, headers, "POST")])


async def test_h1_bodies():
    assert await _body(b"5\r\nhello\r\n6;x=1\r\n world\r\n0\r\nTrailer: t\r\n\r\n", {"transfer-encoding": "chunked"}) == b"hello world"
    assert await _body(b"abcdef", {"content-length": "3"}) == b"abc"
    assert await _body(b"until close", {}) == b"until close"
    with pytest.raises(asyncio.IncompleteReadError):
        await _body(b"ab", {"content-length": "3"})


def test_h1_head_parsing():
    status, headers = _parse_head(b"HTTP/1.1 429 Too Many\r\n", [b"Retry-After: 2\r\n", b"X-A: 1\r\n", b"x-a: 2\r\n"])
    assert status == 429 and headers == {"retry-after": "2", "x-a": "1, 2"}
    with pytest.raises(ProtocolError):
        _parse_head(b"SSH-2.0-OpenSSH\r\n", [])


def _ticket() -> SessionTicket:
    now = datetime.datetime.now(datetime.timezone.utc)
    return SessionTicket(age_add=7, cipher_suite=CipherSuite.AES_128_GCM_SHA256, not_valid_after=now + datetime.timedelta(hours=1),
                         not_valid_before=now - datetime.timedelta(seconds=1), resumption_secret=b"s" * 32,
                         server_name="gw", ticket=b"t" * 40, max_early_data_size=0xFFFFFFFF,
                         other_extensions=[(0x39, b"\x01\x02")])


def test_ticket_store_round_trip_permissions_and_single_use(tmp_path):
    store, ticket = TicketStore(tmp_path / "t"), _ticket()
    store.put("gw:443", ticket)
    path = store.path("gw:443")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in (tmp_path / "t").iterdir()] == [path.name]  # no temp file left behind
    assert "gw" not in path.name
    assert decode_ticket(encode_ticket(ticket)) == ticket
    assert store.take("gw:443") == ticket
    assert store.get("gw:443") is None


def test_ticket_store_drops_bad_and_expired_files(tmp_path):
    store = TicketStore(tmp_path)
    store.path("a:1").write_bytes(b"\x80\x04 pickle? never")
    assert store.get("a:1") is None and not store.path("a:1").exists()
    old = _ticket()
    old.not_valid_after = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    store.put("b:1", old)
    assert store.get("b:1") is None
