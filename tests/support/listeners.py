"""The gateway's two TLS listeners (HTTP/3 and HTTPS/1.1) on loopback, in front of in-process
upstreams: for tests of what happens at the listeners themselves."""

from __future__ import annotations

import copy
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.app import Gateway
from gateway.config import parse_topology
from gateway.http1 import Http1Listener
from gateway.http3 import Http3Listener
from gateway.tls import ensure_self_signed
from gateway.upstreams import UpstreamPool
from tests.gateway.test_pipeline import TOPOLOGY
from tests.support.fakes import FakeUpstream


@dataclass
class TlsListeners:
    h3: Http3Listener
    https: Http1Listener
    context: ssl.SSLContext  # the HTTPS listener's
    cert: Path
    key: Path


@asynccontextmanager
async def tls_listeners(tls_dir: Path, **gateway_settings) -> AsyncIterator[TlsListeners]:
    """Both listeners with a self-signed certificate made in `tls_dir`; `gateway_settings` amend the
    test topology's `gateway` section (max_connections=1, say)."""
    raw = copy.deepcopy(TOPOLOGY)
    raw["gateway"].update(gateway_settings)
    pool = UpstreamPool([FakeUpstream("zone-a", "edge"), FakeUpstream("zone-a", "core")])
    await pool.check_once()
    gateway = Gateway(parse_topology(raw), pool)
    cert, key = tls_dir / "cert.pem", tls_dir / "key.pem"
    ensure_self_signed(cert, key)
    h3 = Http3Listener(gateway, cert=str(cert), key=str(key))
    await h3.start("127.0.0.1", 0)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    https = Http1Listener(gateway, h3_port=h3.port)
    try:
        await https.start("127.0.0.1", 0, tls=context)
        yield TlsListeners(h3, https, context, cert, key)
    finally:
        await https.close()
        await h3.close()
