"""TLS session tickets on disk, one small file per server, so a later start resumes with 0-RTT.

A ticket is a secret (it resumes the session's keys), so files are 0600 in a 0700 folder and written
atomically: a crash never leaves half a ticket. The format is plain JSON of known fields, never
pickle: a file an attacker can write must not run code. Tickets are single use (the gateway forgets
one once it resumed a session), so `take` removes the file; the server sends a fresh one after
every handshake.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import tempfile
from pathlib import Path

from aioquic.tls import CipherSuite, SessionTicket

_FIELDS = ("age_add", "cipher_suite", "not_valid_after", "not_valid_before", "resumption_secret",
           "server_name", "ticket", "max_early_data_size", "other_extensions")


def encode_ticket(ticket: SessionTicket) -> bytes:
    """A ticket as JSON bytes."""
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return json.dumps({
        "version": 1,
        "age_add": ticket.age_add,
        "cipher_suite": int(ticket.cipher_suite),
        "not_valid_after": ticket.not_valid_after.isoformat(),
        "not_valid_before": ticket.not_valid_before.isoformat(),
        "resumption_secret": b64(ticket.resumption_secret),
        "server_name": ticket.server_name,
        "ticket": b64(ticket.ticket),
        "max_early_data_size": ticket.max_early_data_size,
        "other_extensions": [[kind, b64(data)] for kind, data in ticket.other_extensions],
    }).encode()


def decode_ticket(data: bytes) -> SessionTicket:
    """A ticket from `encode_ticket`'s JSON; ValueError when it is not one."""
    try:
        d = json.loads(data)
        if d.get("version") != 1:
            raise ValueError("unknown ticket file version")
        b64 = base64.b64decode
        return SessionTicket(
            age_add=int(d["age_add"]),
            cipher_suite=CipherSuite(int(d["cipher_suite"])),
            not_valid_after=datetime.datetime.fromisoformat(d["not_valid_after"]),
            not_valid_before=datetime.datetime.fromisoformat(d["not_valid_before"]),
            resumption_secret=b64(d["resumption_secret"]),
            server_name=str(d["server_name"]),
            ticket=b64(d["ticket"]),
            max_early_data_size=None if d["max_early_data_size"] is None else int(d["max_early_data_size"]),
            other_extensions=[(int(k), b64(v)) for k, v in d["other_extensions"]],
        )
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError, base64.binascii.Error) as exc:
        raise ValueError(f"not a session ticket file: {exc}") from None


class TicketStore:
    """Session tickets per server (host:port) in a folder."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def path(self, server: str) -> Path:
        """The file holding `server`'s ticket (the name hides the host)."""
        return self.folder / (hashlib.sha256(server.encode()).hexdigest()[:32] + ".ticket")

    def put(self, server: str, ticket: SessionTicket) -> None:
        """Keep `ticket` for `server`, replacing the previous one atomically."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".ticket-")  # mkstemp creates it 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(encode_ticket(ticket))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path(server))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, server: str) -> SessionTicket | None:
        """`server`'s ticket if one is stored and still valid."""
        try:
            ticket = decode_ticket(self.path(server).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            self.path(server).unlink(missing_ok=True)  # unreadable: a fresh handshake replaces it
            return None
        return ticket if ticket.is_valid else None

    def discard(self, server: str) -> None:
        """Forget `server`'s ticket."""
        self.path(server).unlink(missing_ok=True)

    def take(self, server: str) -> SessionTicket | None:
        """`server`'s ticket, removed from the store (tickets are single use)."""
        ticket = self.get(server)
        self.path(server).unlink(missing_ok=True)
        return ticket
