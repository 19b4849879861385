"""JWT bearer tokens: an allow-list of algorithms per issuer, keys from a JWKS file or URL.

The token's header and issuer are read unverified only to pick the issuer's configuration; the
signature is then checked with that issuer's keys and only the algorithm it allows for that key
type, which closes `alg: none` and the HS256-signed-with-the-public-key confusion.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass

import aiohttp
import jwt
from jwt import PyJWK

from gateway.config import JwtIssuer

log = logging.getLogger("meridian.gateway.jwt")

# Which JWK key type may sign with which algorithm.
_KEY_TYPES = {"RS256": "RSA", "ES256": "EC", "EdDSA": "OKP"}
_MIN_REFETCH_S = 10.0


class TokenRejected(Exception):
    """The token is not acceptable; the message says why (safe to show the caller)."""


@dataclass(frozen=True)
class Claims:
    tenant: str
    subject: str
    models: tuple[str, ...]
    routes: tuple[str, ...]


class _KeySet:
    """One issuer's signing keys, reloaded on change (file) or refetched (URL)."""

    def __init__(self, issuer: JwtIssuer) -> None:
        self._issuer = issuer
        self._keys: dict[str | None, list[PyJWK]] = {}
        self._mtime = 0.0
        self._fetched = 0.0
        self._lock = asyncio.Lock()
        self._complaint: dict | None = None  # the last failure to load the keys, logged once

    async def find(self, kid: str | None, alg: str) -> PyJWK:
        """The key for `kid` usable with `alg`; refreshes the set once when it is unknown."""
        await self._refresh(force=False)
        key = self._match(kid, alg)
        if key is None and time.monotonic() - self._fetched > _MIN_REFETCH_S:
            await self._refresh(force=True)
            key = self._match(kid, alg)
        if key is None:
            raise TokenRejected("no matching signing key for this token")
        return key

    def _match(self, kid: str | None, alg: str) -> PyJWK | None:
        candidates = self._keys.get(kid, []) if kid is not None else [k for ks in self._keys.values() for k in ks]
        for key in candidates:
            if key.key_type == _KEY_TYPES.get(alg) and (key.algorithm_name in (alg, None) or alg == "EdDSA"):
                return key
        return None

    async def _refresh(self, *, force: bool) -> None:
        if self._issuer.jwks_file:
            self._reread(force=force)
        elif self._issuer.jwks_url:
            seen = self._fetched
            if force or not seen or time.monotonic() - seen > self._issuer.jwks_refresh_s:
                async with self._lock:
                    if self._fetched == seen:  # one fetch for everyone who waited on it
                        await self._fetch()

    def _reread(self, *, force: bool) -> None:
        """Load the file when it changed. One that cannot be read or parsed (caught mid-write by
        a key rotation) keeps the keys in use: a rotation must not lock every caller out."""
        path = self._issuer.jwks_file
        try:
            mtime = os.stat(path).st_mtime
            if not force and mtime == self._mtime:
                return
            self._mtime = mtime  # a broken file is not parsed again until it changes
            self._fetched = time.monotonic()
            with open(path) as f:
                self._load(json.load(f))
        except (OSError, ValueError) as exc:
            self._complain("jwks file unreadable; keeping the previous keys", {"path": path, "error": str(exc)})
        else:
            self._complaint = None

    async def _fetch(self) -> None:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                async with session.get(self._issuer.jwks_url) as r:
                    r.raise_for_status()
                    jwks = await r.json(content_type=None)
            self._load(jwks)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            self._complain("jwks fetch failed; keeping the previous keys", {"url": self._issuer.jwks_url, "error": str(exc)})
        else:
            self._complaint = None
        finally:
            # Once done: whoever waited on this fetch sees the time move and does not fetch again.
            self._fetched = time.monotonic()

    def _complain(self, msg: str, extra: dict) -> None:
        """Log a failure to load the keys once, not on every request that meets it."""
        if extra != self._complaint:
            log.warning(msg, extra=extra)
        self._complaint = extra

    def _load(self, jwks: object) -> None:
        """Take the usable keys of a JWK set (RFC 7517), skipping the ones of unknown types;
        ValueError when it is no JWK set at all."""
        raw_keys = jwks.get("keys") if isinstance(jwks, dict) else None
        if not isinstance(raw_keys, list):
            raise ValueError('not a JWK set (an object with a "keys" list)')
        keys: dict[str | None, list[PyJWK]] = {}
        for raw in raw_keys:
            if not isinstance(raw, dict) or not isinstance(raw.get("kid"), (str, type(None))):
                continue
            try:
                key = PyJWK(raw)
            except (jwt.PyJWKError, jwt.InvalidKeyError):
                continue
            keys.setdefault(raw.get("kid"), []).append(key)
        self._keys = keys


class JwtVerifier:
    """Verifies bearer tokens against the configured issuers."""

    def __init__(self, issuers: list[JwtIssuer]) -> None:
        self._issuers = {i.issuer: i for i in issuers}
        self._keys = {i.issuer: _KeySet(i) for i in issuers}

    @property
    def enabled(self) -> bool:
        return bool(self._issuers)

    async def verify(self, token: str) -> Claims:
        """The token's claims, or TokenRejected."""
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"malformed token: {exc}") from None
        iss = unverified.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None  # a list or object is no issuer
        if issuer is None:
            raise TokenRejected("unknown token issuer")
        alg = header.get("alg")
        if alg not in issuer.algorithms:
            raise TokenRejected(f"algorithm {alg!r} is not accepted")
        if alg == "HS256":
            key = issuer.hs256_secret
        else:
            key = (await self._keys[issuer.issuer].find(header.get("kid"), alg)).key
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=issuer.audience,
                issuer=issuer.issuer,
                leeway=issuer.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRejected("token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRejected("token not yet valid") from None
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"invalid token: {exc}") from None
        return _claims(issuer, claims)


def _claims(issuer: JwtIssuer, claims: dict) -> Claims:
    tenant = claims.get(issuer.tenant_claim) or claims.get("sub")
    if not isinstance(tenant, str) or not tenant:
        raise TokenRejected(f"token names no tenant ({issuer.tenant_claim!r} or 'sub')")
    scopes = str(claims.get("scope", "")).split()
    models = tuple(s.removeprefix("models:") for s in scopes if s.startswith("models:")) or tuple(issuer.default_models)
    routes = tuple(s.removeprefix("routes:") for s in scopes if s.startswith("routes:")) or tuple(issuer.default_routes)
    return Claims(tenant, str(claims.get("sub", "")), models, routes)
