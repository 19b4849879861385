"""Security tests of authentication: API keys and JWTs, each attack refused with the right status."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

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
    import os

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
    for route, model in [("/v1/embeddings", "meridian-moe-mini"), ("/v1/completions", "all-minilm-l6-v2")]:
        with pytest.raises(GatewayError) as err:
            authorize(principal, route, model)
        assert err.value.status == 403, (route, model)
