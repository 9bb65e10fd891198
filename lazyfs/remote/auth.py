"""Registry authentication: Basic, and the Bearer token dance of the distribution spec.

A 401 carries ``WWW-Authenticate``.  For ``Basic`` we resend with the user's credentials; for
``Bearer realm=…,service=…,scope=…`` we ask the realm for a token (with Basic credentials when we
have them, anonymously otherwise) and cache it per scope until shortly before it expires.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import httpx
import msgspec

from lazyfs.errors import RemoteError

# Tokens without expires_in live 60 s per the spec; renew a little early to absorb clock skew.
DEFAULT_TOKEN_LIFETIME = 60.0
EXPIRY_MARGIN = 5.0

_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


class Credentials(msgspec.Struct, frozen=True):
    username: str
    password: str


class TokenResponse(msgspec.Struct):
    token: str = ""
    access_token: str = ""
    expires_in: float | None = None
    issued_at: str | None = None


class _DockerAuth(msgspec.Struct):
    auth: str | None = None
    username: str | None = None
    password: str | None = None
    identitytoken: str | None = None


class _DockerConfig(msgspec.Struct):
    auths: dict[str, _DockerAuth] = {}


def docker_config_path() -> Path:
    env = os.environ.get("DOCKER_CONFIG")
    return Path(env) / "config.json" if env else Path.home() / ".docker" / "config.json"


def _auth_key_host(key: str) -> str:
    """``https://index.docker.io/v1/`` → ``index.docker.io``; ``host:5000`` stays."""
    key = re.sub(r"^[a-z]+://", "", key)
    return key.split("/", 1)[0]


def load_docker_credentials(
    host: str, path: str | os.PathLike[str] | None = None
) -> Credentials | None:
    """Credentials for ``host`` from a Docker ``config.json`` ``auths`` map, or None."""
    p = Path(path) if path is not None else docker_config_path()
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RemoteError(f"cannot read docker config {p}: {e}") from e
    try:
        cfg = msgspec.json.decode(data, type=_DockerConfig)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise RemoteError(f"bad docker config {p}: {e}") from e
    # Docker Hub credentials are filed under the legacy index host.
    wanted = {host}
    if host in ("registry-1.docker.io", "docker.io"):
        wanted |= {"index.docker.io", "docker.io", "registry-1.docker.io"}
    for key, entry in cfg.auths.items():
        if _auth_key_host(key) not in wanted:
            continue
        if entry.auth:
            try:
                user, sep, pw = base64.b64decode(entry.auth).decode().partition(":")
            except (ValueError, UnicodeDecodeError) as e:
                raise RemoteError(f"bad auth entry for {key} in {p}") from e
            if sep:
                return Credentials(user, pw)
        if entry.username is not None and entry.password is not None:
            return Credentials(entry.username, entry.password)
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y"`` → ``("bearer", {"realm": "x", "service": "y"})``."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM.finditer(rest)
    }
    return scheme.lower(), params


def basic_header(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


class _Token(msgspec.Struct):
    value: str
    expires: float  # on the `clock` timeline


class Authenticator:
    """Per-registry-host auth state.  Not tied to one endpoint: tokens are per realm/scope."""

    def __init__(
        self,
        credentials: Credentials | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.credentials = credentials
        self._clock = clock
        self._scheme: str | None = None
        self._params: dict[str, str] = {}
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        #: how many tokens were fetched (tests check the cache works)
        self.tokens_fetched = 0

    def _key(self, scope: str) -> tuple[str, str, str]:
        return (self._params.get("realm", ""), self._params.get("service", ""), scope)

    def header(self, scope: str) -> str | None:
        """The Authorization value to send proactively, if we know one that is still valid."""
        if self._scheme == "basic" and self.credentials:
            return basic_header(self.credentials)
        if self._scheme == "bearer":
            tok = self._tokens.get(self._key(scope))
            if tok and tok.expires > self._clock():
                return f"Bearer {tok.value}"
        return None

    def needs_token(self, scope: str) -> bool:
        """A bearer registry whose token for ``scope`` is missing or expired: fetch first."""
        return self._scheme == "bearer" and self.header(scope) is None

    async def fetch_token(self, client: httpx.AsyncClient, scope: str) -> None:
        realm = self._params.get("realm")
        if not realm:
            raise RemoteError("bearer challenge without a realm")
        query: dict[str, str] = {}
        if self._params.get("service"):
            query["service"] = self._params["service"]
        if scope:
            query["scope"] = scope
        headers = {}
        if self.credentials:
            headers["Authorization"] = basic_header(self.credentials)
        try:
            resp = await client.get(realm, params=query, headers=headers)
        except httpx.HTTPError as e:
            raise RemoteError(f"token request to {realm} failed: {e}") from e
        if resp.status_code in (401, 403):
            raise RemoteError(f"token service {realm} refused credentials ({resp.status_code})")
        if resp.status_code != 200:
            raise RemoteError(f"token service {realm} answered {resp.status_code}")
        try:
            body = msgspec.json.decode(resp.content, type=TokenResponse)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise RemoteError(f"bad token response from {realm}: {e}") from e
        value = body.token or body.access_token
        if not value:
            raise RemoteError(f"token response from {realm} has no token")
        lifetime = float(body.expires_in) if body.expires_in else DEFAULT_TOKEN_LIFETIME
        start = self._clock()
        if body.issued_at:
            try:
                issued = datetime.fromisoformat(body.issued_at.replace("Z", "+00:00")).timestamp()
                # Never trust an issue time in our future: it would extend the token's life.
                start = min(start, issued)
            except ValueError:
                pass
        # A short-lived token must still be used: renew a quarter of its life early at most.
        margin = min(EXPIRY_MARGIN, lifetime / 4)
        self._tokens[self._key(scope)] = _Token(value, start + lifetime - margin)
        self.tokens_fetched += 1

    async def on_unauthorized(self, client: httpx.AsyncClient, challenge: str, scope: str) -> bool:
        """Handle a 401's ``WWW-Authenticate``: learn the scheme, get a fresh token.  True if a
        retry may help (the caller retries once, so rejected credentials cannot loop)."""
        if not challenge:
            return False
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if not self.credentials or self._scheme == "basic":
                return False  # no credentials, or they were just rejected
            self._scheme, self._params = "basic", params
            return True
        if scheme == "bearer":
            # A registry may ask for a wider scope than ours; use what it names.
            want = params.get("scope", scope) or scope
            self._scheme, self._params = "bearer", params
            self._tokens.pop(self._key(scope), None)
            await self.fetch_token(client, scope if want == scope else want)
            if want != scope:
                self._tokens[self._key(scope)] = self._tokens[self._key(want)]
            return True
        return False


def decode_jwt_claims(token: str) -> dict[str, object]:
    """Claims of a JWT without verifying it (tests and debugging only)."""
    part = token.split(".")[1]
    claims: dict[str, object] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return claims
