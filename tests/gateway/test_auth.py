"""Security tests of authentication: API keys and JWTs, each attack refused with the right status."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway import jwt_auth
from gateway.auth import Authenticator, authorize, hash_key
from gateway.config import parse_topology
from gateway.errors import GatewayError
from gateway.http import Request

ISS, AUD = "https://id.example", "meridian"
SECRET = "s3cret-shared-between-issuer-and-gateway"


def _jwk(public_key, kid: str, alg_cls) -> dict:
    data = json.loads(alg_cls.to_jwk(public_key))
    data["kid"] = kid
    return data


@pytest.fixture(scope="module")
def keys():
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
        "other_rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


@pytest.fixture
def jwks_file(tmp_path, keys):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [
        _jwk(keys["rsa"].public_key(), "rsa-1", RSAAlgorithm),
        _jwk(keys["ec"].public_key(), "ec-1", ECAlgorithm),
        _jwk(keys["ed"].public_key(), "ed-1", OKPAlgorithm),
    ]}))
    return path


@pytest.fixture
def auth(jwks_file):
    topo = parse_topology({
        "auth": {
            "api_keys": [
                {"name": "live", "tenant": "acme", "sha256": hash_key("sk-live")},
                {"name": "gone", "tenant": "acme", "sha256": hash_key("sk-gone"), "revoked": True},
            ],
            "jwt": [
                {"issuer": ISS, "audience": AUD, "jwks_file": str(jwks_file), "leeway_s": 5},
                {"issuer": "https://hs.example", "audience": AUD, "algorithms": ["HS256"], "hs256_secret": SECRET},
            ],
        }
    })
    return Authenticator(topo.auth)


def claims(**over) -> dict:
    now = int(time.time())
    base = {"iss": ISS, "aud": AUD, "sub": "user-1", "tenant": "acme", "iat": now, "exp": now + 300}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def request(token: str) -> Request:
    return Request("POST", "/v1/embeddings", {"authorization": f"Bearer {token}"}, b"", "127.0.0.1", "h3")


async def status_of(auth: Authenticator, token: str) -> int:
    try:
        await auth.authenticate(request(token))
    except GatewayError as err:
        return err.status
    return 200


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_valid_tokens_of_each_algorithm(auth, keys):
    for alg, key, kid in [("RS256", keys["rsa"], "rsa-1"), ("ES256", keys["ec"], "ec-1"), ("EdDSA", keys["ed"], "ed-1")]:
        token = jwt.encode(claims(), key, algorithm=alg, headers={"kid": kid})
        principal = await auth.authenticate(request(token))
        assert principal.tenant == "acme", alg
    hs = jwt.encode(claims(iss="https://hs.example"), SECRET, algorithm="HS256")
    assert await status_of(auth, hs) == 200


@pytest.mark.parametrize("iss", [["https://hs.example"], {"a": 1}, 7, None])
async def test_an_issuer_that_is_not_a_string_is_refused(auth, iss):
    # Signed at the JWS level: PyJWT's encode would refuse such a claim itself.
    token = jwt.api_jws.PyJWS().encode(json.dumps({**claims(), "iss": iss}).encode(), SECRET, algorithm="HS256")
    assert await status_of(auth, token) == 401


async def test_alg_none_is_refused(auth):
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims()).encode())
    assert await status_of(auth, f"{header}.{payload}.") == 401


async def test_hs256_signed_with_the_public_key_is_refused(auth, keys):
    public_pem = keys["rsa"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = b64(json.dumps(claims()).encode())
    import hashlib
    import hmac

    sig = b64(hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    assert await status_of(auth, f"{header}.{payload}.{sig}") == 401


async def test_wrong_key_expired_not_yet_valid_wrong_iss_aud(auth, keys):
    wrong = jwt.encode(claims(), keys["other_rsa"], algorithm="RS256", headers={"kid": "rsa-1"})
    expired = jwt.encode(claims(exp=int(time.time()) - 60), keys["rsa"], algorithm="RS256", headers={"kid": "rsa-1"})
    future = jwt.encode(claims(nbf=int(time.time()) + 120), keys["rsa"], algorithm="RS256", headers={"kid": "rsa-1"})
    bad_aud = jwt.encode(claims(aud="someone-else"), keys["rsa"], algorithm="RS256", headers={"kid": "rsa-1"})
    unknown_iss = jwt.encode(claims(iss="https://evil.example"), keys["rsa"], algorithm="RS256", headers={"kid": "rsa-1"})
    no_exp = jwt.encode(claims(exp=None), keys["rsa"], algorithm="RS256", headers={"kid": "rsa-1"})
    for token in (wrong, expired, future, bad_aud, unknown_iss, no_exp):
        assert await status_of(auth, token) == 401


async def test_small_clock_skew_is_tolerated(auth, keys):
    just_expired = jwt.encode(claims(exp=int(time.time()) - 2), keys["rsa"], algorithm="RS256", headers={"kid": "rsa-1"})
    assert await status_of(auth, just_expired) == 200


async def test_tampered_payload_is_refused(auth, keys):
    token = jwt.encode(claims(), keys["ec"], algorithm="ES256", headers={"kid": "ec-1"})
    header, _, sig = token.split(".")
    forged = b64(json.dumps(claims(tenant="someone-else")).encode())
    assert await status_of(auth, f"{header}.{forged}.{sig}") == 401


async def test_key_type_must_match_the_algorithm(auth, keys):
    # An ES256 token that names the RSA key id finds no usable key.
    token = jwt.encode(claims(), keys["ec"], algorithm="ES256", headers={"kid": "rsa-1"})
    assert await status_of(auth, token) == 401


async def test_rotated_jwks_file_is_picked_up(auth, keys, jwks_file, tmp_path):
    new_key = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(claims(), new_key, algorithm="ES256", headers={"kid": "ec-2"})
    assert await status_of(auth, token) == 401
    data = json.loads(jwks_file.read_text())
    data["keys"].append(_jwk(new_key.public_key(), "ec-2", ECAlgorithm))
    jwks_file.write_text(json.dumps(data))
    os.utime(jwks_file, (time.time() + 5, time.time() + 5))
    assert await status_of(auth, token) == 200


async def test_api_keys_live_revoked_unknown(auth):
    assert await status_of(auth, "sk-live") == 200
    assert await status_of(auth, "sk-gone") == 401
    assert await status_of(auth, "sk-never") == 401


async def test_scopes_from_the_token(auth, keys):
    token = jwt.encode(claims(scope="models:all-minilm-* routes:/v1/embeddings"), keys["rsa"], algorithm="RS256",
                       headers={"kid": "rsa-1"})
    principal = await auth.authenticate(request(token))
    authorize(principal, "/v1/embeddings", "all-minilm-l6-v2")
    # Each half of the scope refuses on its own: a model outside it on an allowed route, and an
    # allowed model on a route outside it.
    for route, model, named in [("/v1/embeddings", "meridian-moe-mini", "model 'meridian-moe-mini'"),
                                 ("/v1/completions", "all-minilm-l6-v2", "route /v1/completions")]:
        with pytest.raises(GatewayError) as err:
            authorize(principal, route, model)
        assert err.value.status == 403 and err.value.message.endswith(named), (route, model)


async def test_a_jwks_file_caught_mid_write_or_not_a_key_set_keeps_the_keys_in_use(auth, keys, jwks_file, caplog):
    token = jwt.encode(claims(), keys["rsa"], algorithm="RS256", headers={"kid": "rsa-1"})
    assert await status_of(auth, token) == 200
    good = jwks_file.read_text()
    for i, broken in enumerate(['{"keys": [{"kty": "RS', "[1, 2]", '{"keys": {"kty": "RSA"}}']):
        jwks_file.write_text(broken)
        os.utime(jwks_file, (time.time() + 5 + i, time.time() + 5 + i))
        assert await status_of(auth, token) == 200, broken
    assert "jwks file unreadable" in caplog.text
    # A key set with one malformed entry (a kid that is no string) loses that entry only.
    data = json.loads(good)
    data["keys"].insert(0, dict(data["keys"][1], kid=["ec-1"]))
    jwks_file.write_text(json.dumps(data))
    os.utime(jwks_file, (time.time() + 10, time.time() + 10))
    assert await status_of(auth, token) == 200
    ec_token = jwt.encode(claims(), keys["ec"], algorithm="ES256", headers={"kid": "ec-1"})
    assert await status_of(auth, ec_token) == 200


class JwksServer:
    """A real HTTP server for a JWK set, counting its fetches; `status` makes it fail."""

    def __init__(self, jwks: dict) -> None:
        self.jwks, self.status, self.fetches = jwks, 200, 0

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        await asyncio.sleep(0.05)  # long enough for every concurrent caller to be waiting on it
        if self.status != 200:
            return web.Response(status=self.status, text="down")
        return web.json_response(self.jwks)

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_get("/jwks.json", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}/jwks.json"

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()


def url_auth(url: str) -> Authenticator:
    topo = parse_topology({"auth": {"jwt": [{"issuer": ISS, "audience": AUD, "jwks_url": url}]}})
    return Authenticator(topo.auth)


async def test_a_jwks_url_is_fetched_once_for_every_caller_waiting_on_it(keys, jwks_file, monkeypatch):
    monkeypatch.setattr(jwt_auth, "_MIN_REFETCH_S", 0.0)  # an unknown kid may refetch at once
    server = JwksServer(json.loads(jwks_file.read_text()))
    async with server as url:
        auth = url_auth(url)
        token = jwt.encode(claims(), keys["rsa"], algorithm="RS256", headers={"kid": "rsa-1"})
        assert await asyncio.gather(*(status_of(auth, token) for _ in range(20))) == [200] * 20
        assert server.fetches == 1
        # A key rotated in at the issuer: twenty callers with its kid refetch the set once together.
        new_key = ec.generate_private_key(ec.SECP256R1())
        server.jwks = {"keys": [*server.jwks["keys"], _jwk(new_key.public_key(), "ec-2", ECAlgorithm)]}
        rotated = jwt.encode(claims(), new_key, algorithm="ES256", headers={"kid": "ec-2"})
        assert await asyncio.gather(*(status_of(auth, rotated) for _ in range(20))) == [200] * 20
        assert server.fetches == 2


async def test_a_failing_jwks_url_is_not_hammered_and_its_keys_are_kept(keys, jwks_file, caplog):
    server = JwksServer(json.loads(jwks_file.read_text()))
    async with server as url:
        auth = url_auth(url)
        token = jwt.encode(claims(), keys["rsa"], algorithm="RS256", headers={"kid": "rsa-1"})
        assert await status_of(auth, token) == 200
        server.status = 500
        unknown = jwt.encode(claims(), keys["other_rsa"], algorithm="RS256", headers={"kid": "rsa-9"})
        for _ in range(10):
            assert await status_of(auth, unknown) == 401
            assert await status_of(auth, token) == 200  # the keys fetched before still verify
        assert server.fetches == 1  # an unknown kid refetches at most every 10 s
    # An issuer whose JWKS never answered: its tokens are refused (401), one fetch, logged once.
    down = JwksServer({"keys": []})
    down.status = 503
    async with down as url:
        auth = url_auth(url)
        assert [await status_of(auth, token) for _ in range(5)] == [401] * 5
        assert down.fetches == 1
    assert caplog.text.count("jwks fetch failed") == 1
