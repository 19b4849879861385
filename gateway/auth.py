"""Who is calling: API keys (stored hashed) bound to a tenant and scopes."""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass

from gateway.config import AuthConfig
from gateway.errors import GatewayError, Kind
from gateway.http import Request
from gateway.jwt_auth import JwtVerifier, TokenRejected


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    key_name: str
    models: tuple[str, ...]
    routes: tuple[str, ...]

    def allows(self, route: str, model: str | None) -> bool:
        """Whether this caller's scopes cover the route and model."""
        if not any(fnmatch.fnmatchcase(route, r) for r in self.routes):
            return False
        return model is None or any(fnmatch.fnmatchcase(model, m) for m in self.models)


def hash_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


class Authenticator:
    """Resolves a request's credentials (an API key or a JWT) to a Principal, or refuses it."""

    def __init__(self, config: AuthConfig) -> None:
        self._keys = {k.sha256: k for k in config.api_keys}
        self._jwt = JwtVerifier(config.jwt)

    async def authenticate(self, request: Request) -> Principal:
        """401 unless the request carries a valid, unrevoked key or a valid token."""
        token = _credential(request)
        if token is None:
            raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'", "missing_api_key")
        if self._jwt.enabled and token.count(".") == 2:
            try:
                claims = await self._jwt.verify(token)
            except TokenRejected as exc:
                raise _unauthorized(str(exc), "invalid_token") from None
            return Principal(claims.tenant, f"jwt:{claims.subject}", claims.models, claims.routes)
        entry = self._keys.get(hash_key(token))
        if entry is None or entry.revoked:
            raise _unauthorized("invalid API key", "invalid_api_key")
        return Principal(entry.tenant, entry.name, tuple(entry.models), tuple(entry.routes))


def _unauthorized(message: str, code: str) -> GatewayError:
    return GatewayError(Kind.UNAUTHORIZED, message, code=code, headers={"www-authenticate": "Bearer"})


def authorize(principal: Principal, route: str, model: str | None) -> None:
    """403 for a known caller outside its scopes."""
    if not principal.allows(route, None):
        raise GatewayError(Kind.FORBIDDEN, f"this key may not use route {route}", code="insufficient_scope")
    if not principal.allows(route, model):
        raise GatewayError(Kind.FORBIDDEN, f"this key may not use model {model!r}", code="insufficient_scope")


def _credential(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = request.headers.get("x-api-key", "").strip()
    return key or None
