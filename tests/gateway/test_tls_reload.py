"""A rotated certificate (a Kubernetes secret updated in place) is served on the next handshakes of
both TLS listeners, HTTP/3 and HTTPS/1.1, without a restart; a pair caught mid-rotation is not."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from gateway.tls import CertificateReloader, ensure_self_signed
from tests.gateway.test_pipeline import KEY
from tests.support.h3 import h3_client
from tests.support.listeners import tls_listeners


def serial(pem: Path) -> int:
    return x509.load_pem_x509_certificate(pem.read_bytes()).serial_number


def rotate(cert: Path, key: Path, into: Path) -> int:
    """A fresh pair swapped in over `cert` and `key` whole, as a secret's update does; its serial."""
    into.mkdir()
    ensure_self_signed(into / "cert.pem", into / "key.pem")
    os.replace(into / "key.pem", key)
    os.replace(into / "cert.pem", cert)
    return serial(cert)


async def https_serial(port: int) -> int:
    client = ssl.create_default_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return x509.load_der_x509_certificate(der).serial_number


async def h3_serial(port: int) -> int:
    async with h3_client("127.0.0.1", port, KEY) as c:
        assert (await c.get("/v1/models")).status == 200
        return c._protocol._quic.tls._peer_certificate.serial_number


@pytest.fixture
async def listening(tmp_path):
    async with tls_listeners(tmp_path) as on:
        reloader = CertificateReloader(str(on.cert), str(on.key), quic=[on.h3.quic_configuration],
                                       contexts=[on.context])
        yield on.cert, on.key, on.h3, on.https, reloader


async def test_a_rotated_certificate_is_served_on_the_next_handshakes(listening, tmp_path, caplog):
    cert, key, h3, https, reloader = listening
    first = serial(cert)
    assert await h3_serial(h3.port) == first and await https_serial(https.port) == first
    assert reloader.check() is False  # nothing changed
    async with h3_client("127.0.0.1", h3.port, KEY) as held:  # a connection open across the rotation
        second = rotate(cert, key, tmp_path / "second")
        assert reloader.check() is True and reloader.reloads == 1
        assert await h3_serial(h3.port) == second and await https_serial(https.port) == second
        assert (await held.get("/v1/models")).status == 200  # kept its handshake's certificate
    # Caught mid-rotation: a key that does not parse, then a valid key beside a certificate not its own.
    key.write_text("-----BEGIN PRIVATE KEY-----\ntruncat")
    assert reloader.check() is False
    rotate(tmp_path / "other-cert.pem", key, tmp_path / "third")  # a new key; its certificate elsewhere
    assert reloader.check() is False
    assert caplog.text.count("new TLS certificate not loaded") == 2
    assert await h3_serial(h3.port) == second and await https_serial(https.port) == second
    assert reloader.reloads == 1
    # Left to its own clock, the reloader finds the next rotation by itself.
    reloader.start(0.05)
    fourth = rotate(cert, key, tmp_path / "fourth")
    for _ in range(100):
        if reloader.reloads == 2:
            break
        await asyncio.sleep(0.02)
    await reloader.close()
    assert await https_serial(https.port) == fourth
