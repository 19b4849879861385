"""The gateway's TLS certificate: a self-signed one for local HTTP/3, made on first run, and the
reload of the files the topology names when they change (a Kubernetes secret rotated by
cert-manager updates its mounted files in place; the gateway must not need a restart for it)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger("meridian.gateway.tls")


def ensure_self_signed(cert_path: Path, key_path: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> None:
    """Write a P-256 certificate and key for `hosts` unless both files exist already."""
    if cert_path.exists() and key_path.exists():
        return
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meridian-local")])
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class CertificateReloader:
    """Watches the certificate and key files; when either changes, every listener's TLS settings
    (aioquic's QuicConfiguration, an ssl.SSLContext) take the new pair for their next handshakes.
    Connections already open keep theirs. A pair that does not load, or whose key does not match
    its certificate (caught mid-rotation), changes nothing: the next look tries again."""

    def __init__(self, cert: str, key: str, *, quic: list, contexts: list[ssl.SSLContext]) -> None:
        self._cert, self._key = cert, key
        self._quic, self._contexts = quic, contexts
        self._seen = self._stamp()
        self._task: asyncio.Task | None = None
        self.reloads = 0

    def _stamp(self) -> tuple | None:
        """What tells a changed file: its inode (a secret's files are swapped in whole), time and size."""
        try:
            return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in map(os.stat, (self._cert, self._key)))
        except OSError:
            return None

    def check(self) -> bool:
        """Reload if the files changed since last seen; True when the new pair is in use."""
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return False
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self._cert, self._key)  # key matches?
            for config in self._quic:
                config.load_cert_chain(self._cert, self._key)
            for context in self._contexts:
                context.load_cert_chain(self._cert, self._key)
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.warning("new TLS certificate not loaded; keeping the one in use", extra={"cert": self._cert, "error": str(exc)})
            return False
        self._seen = stamp
        self.reloads += 1
        log.warning("TLS certificate reloaded", extra={"cert": self._cert})
        return True

    def start(self, interval_s: float) -> None:
        """Look every `interval_s` seconds (0: never)."""
        if interval_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch(interval_s))

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            # On the loop, between handshakes: a QuicConfiguration takes its certificate and its
            # key in two steps, which no handshake may see half done. (Two stats per look; a
            # reload parses two small files.)
            self.check()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
