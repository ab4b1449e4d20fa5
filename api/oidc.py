"""The OpenID Connect relying party: authorization code flow with PKCE, state and nonce.

A login's secrets (PKCE verifier, nonce) are made here, on the replica that starts it, and
replicated in the login record (cluster/login_apply.py), because the provider's redirect may
bring the browser back to any replica. The `state` in the URL is the login's bearer handle:
only its sha256 is stored. The ID token is checked here, before anything is proposed:
signature by a key of the provider's JWKS (asymmetric algorithms only: never `none` or a
MAC keyed by something public), issuer, audience, expiry and the login's nonce.
"""
from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import aiohttp
from authlib.common.urls import add_params_to_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from raftmesh.cluster.config import ReplicaConfig

from .errors import APIError

ID_TOKEN_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                       "ES256", "ES384", "ES512", "EdDSA")
IDP_TIMEOUT = 5.0  # seconds for one request to the provider
CLOCK_LEEWAY = 60  # seconds of clock difference tolerated on exp/iat
USER_NAME_MAX = 128


def login_id(state: str) -> str:
    """What a login is stored under: the state's hash (the state itself is a bearer secret)."""
    return hashlib.sha256(state.encode()).hexdigest()


@dataclass(frozen=True)
class NewLogin:
    """A login about to be proposed: the URL the person opens and the secrets to replicate."""

    id: str
    auth_url: str
    nonce: str
    code_verifier: str


@dataclass(frozen=True)
class Identity:
    """Who the provider vouched for, from a validated ID token."""

    user: str
    subject: str
    groups: list[str]


class RelyingParty:
    """This replica's client of the provider; caches its discovery document and keys."""

    def __init__(self, config: ReplicaConfig):
        self.config = config
        self._metadata: dict | None = None
        self._keys: KeySet | None = None
        self._lock = asyncio.Lock()

    # -- the provider's documents ----------------------------------------------------------
    async def _get_json(self, session: aiohttp.ClientSession, url: str) -> dict:
        async with session.get(url) as resp:
            if resp.status != 200:
                raise APIError(503, "idp_unavailable", f"the identity provider answered {resp.status} "
                               f"for {url}")
            return await resp.json(content_type=None)

    async def metadata(self) -> dict:
        async with self._lock:
            if self._metadata is None:
                url = self.config.oidc_issuer.rstrip("/") + "/.well-known/openid-configuration"
                doc = await self._call(lambda s: self._get_json(s, url))
                if doc.get("issuer") != self.config.oidc_issuer:
                    raise APIError(503, "idp_unavailable", f"the provider's discovery document "
                                   f"names issuer {doc.get('issuer')!r}, not the configured "
                                   f"{self.config.oidc_issuer!r}")
                self._metadata = doc
            return self._metadata

    async def _key_set(self, refresh: bool) -> KeySet:
        if self._keys is None or refresh:
            uri = (await self.metadata())["jwks_uri"]
            self._keys = KeySet.import_key_set(await self._call(lambda s: self._get_json(s, uri)))
        return self._keys

    async def _call(self, fn):
        """One request to the provider; unreachable or slow is a clear 503, never a 500."""
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=IDP_TIMEOUT)) as s:
                return await fn(s)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            raise APIError(503, "idp_unavailable", f"cannot reach the identity provider at "
                           f"{self.config.oidc_issuer}: {type(e).__name__} {e}".rstrip()) from None

    # -- the flow ----------------------------------------------------------------------------
    async def new_login(self) -> NewLogin:
        state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(48)
        auth_url = add_params_to_uri((await self.metadata())["authorization_endpoint"], [
            ("response_type", "code"), ("client_id", self.config.oidc_client_id),
            ("redirect_uri", self.config.oidc_redirect_url),
            ("scope", self.config.oidc_scopes), ("state", state), ("nonce", nonce),
            ("code_challenge", create_s256_code_challenge(verifier)),
            ("code_challenge_method", "S256")])
        return NewLogin(login_id(state), auth_url, nonce, verifier)

    async def identity(self, code: str, login: dict) -> Identity:
        """Redeem `code` for the login's ID token and validate it."""
        token_endpoint = (await self.metadata())["token_endpoint"]
        # The redirect_uri of the authorization request, which the replica that started the
        # login chose: without a shared oidc_redirect_url each replica names its own.
        redirect_uri = parse_qs(urlsplit(login["auth_url"]).query)["redirect_uri"][0]
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "code_verifier": login["code_verifier"]}
        auth = aiohttp.BasicAuth(self.config.oidc_client_id, self.config.oidc_client_secret)

        async def redeem(s: aiohttp.ClientSession) -> dict:
            async with s.post(token_endpoint, data=form, auth=auth) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200 or not isinstance(body, dict):
                    error = body.get("error") if isinstance(body, dict) else None
                    raise APIError(400, "login_invalid", f"the identity provider refused the "
                                   f"authorization code ({error or resp.status})")
                return body
        tokens = await self._call(redeem)
        if not isinstance(tokens.get("id_token"), str):
            raise APIError(400, "login_invalid", "the identity provider sent no ID token")
        return self.claims_identity(await self.validated_claims(tokens["id_token"], login["nonce"]))

    async def validated_claims(self, id_token: str, nonce: str) -> dict:
        try:
            token = await self._decode(id_token)
        except JoseError as e:
            raise APIError(400, "login_invalid", f"ID token rejected: {e.error}: "
                           f"{e.description or 'signature or format'}") from None
        registry = jwt.JWTClaimsRegistry(
            leeway=CLOCK_LEEWAY, iss={"essential": True, "value": self.config.oidc_issuer},
            aud={"essential": True, "value": self.config.oidc_client_id},
            exp={"essential": True}, sub={"essential": True},
            nonce={"essential": True, "value": nonce})
        try:
            registry.validate(token.claims)
        except JoseError as e:
            raise APIError(400, "login_invalid", f"ID token rejected: {e.error}: {e.description}") from None
        return token.claims

    async def _decode(self, id_token: str) -> jwt.Token:
        """Verify the signature; a key id this replica has not seen refreshes the key set once
        (the provider rotated its keys)."""
        keys = await self._key_set(refresh=False)
        try:
            return jwt.decode(id_token, keys, algorithms=ID_TOKEN_ALGORITHMS)
        except JoseError as e:
            if e.error != "invalid_key_id" and "kid" not in str(e.description or ""):
                raise
        return jwt.decode(id_token, await self._key_set(refresh=True), algorithms=ID_TOKEN_ALGORITHMS)

    def claims_identity(self, claims: dict) -> Identity:
        name = claims.get(self.config.oidc_user_claim)
        if not isinstance(name, str) or not 0 < len(name) <= USER_NAME_MAX:
            raise APIError(400, "login_invalid", f"the ID token has no usable "
                           f"{self.config.oidc_user_claim!r} claim to name the user")
        groups = claims.get(self.config.oidc_groups_claim, [])
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise APIError(400, "login_invalid", f"the ID token's {self.config.oidc_groups_claim!r} "
                           "claim is not a list of group names")
        return Identity(name.lower(), str(claims["sub"]), sorted(set(groups)))

    def scopes_of(self, groups: list[str]) -> list[str]:
        """The API scopes an admin login gets: those its IdP groups are mapped to."""
        return sorted({s for g in groups for s in self.config.oidc_group_scopes.get(g, ())})


def expires_at(config: ReplicaConfig) -> float:
    return time.time() + config.login_timeout
