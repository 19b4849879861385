"""How the SDK checks the server's certificate, shared by the HTTP/3 and HTTP/1.1 transports."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from aioquic.quic.configuration import QuicConfiguration

from mobile.errors import ConfigError


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """`cafile`: extra trust anchors (a self-signed gateway's cert); `verify=False` only for tests."""

    cafile: str | None = None
    verify: bool = True

    def ssl_context(self, alpn: list[str]) -> ssl.SSLContext:
        """A client context for TLS over TCP."""
        try:
            ctx = ssl.create_default_context(cafile=self.cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load CA file {self.cafile!r}: {exc}") from None
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(alpn)
        return ctx

    def apply(self, config: QuicConfiguration) -> None:
        """Set the same checks on a QUIC configuration."""
        if not self.verify:
            config.verify_mode = ssl.CERT_NONE
        elif self.cafile:
            try:
                config.load_verify_locations(cafile=self.cafile)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot load CA file {self.cafile!r}: {exc}") from None
