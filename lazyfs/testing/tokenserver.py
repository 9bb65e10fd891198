"""A tiny bearer-token service for a registry configured with ``auth: token:``.

It signs RS256 JWTs with a throw-away self-signed certificate (made by the ``openssl`` CLI) and
puts that certificate in the JWT header's ``x5c``; the registry checks the chain against its
``rootcertbundle`` (the same certificate), then ``iss``, ``aud`` (= service), ``exp``/``nbf``
and the ``access`` claim.  Every requested scope is granted; optional Basic credentials are
required for any token.  Runs in a thread (test code only) and is stopped with ``close()``.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from lazyfs.testing.dockerregistry import TokenAuth
from lazyfs.testing.server import ThreadedHTTPServer

SERVICE = "lazyfs-test-registry"
ISSUER = "lazyfs-test-issuer"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer(ThreadedHTTPServer):
    def __init__(
        self,
        workdir: Path,
        *,
        credentials: tuple[str, str] | None = None,
        expires_in: int = 300,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.credentials = credentials
        self.expires_in = expires_in
        self.key = self.workdir / "token.key"
        self.cert = self.workdir / "token.crt"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=lazyfs-test-token", "-keyout", str(self.key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
            check=True, capture_output=True,
        ).stdout  # fmt: skip
        self._x5c = base64.b64encode(der).decode()
        #: every request seen: (scope list, whether Basic credentials were sent)
        self.requests: list[tuple[list[str], bool]] = []
        self._lock = threading.Lock()
        self.port = self.serve(self._handler())
        self.realm = f"http://127.0.0.1:{self.port}/token"

    @property
    def registry_auth(self) -> TokenAuth:
        return TokenAuth(self.realm, SERVICE, ISSUER, self.cert)

    def sign(self, claims: dict[str, object]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(), check=True, capture_output=True,
        ).stdout  # fmt: skip
        return f"{signing_input}.{_b64url(sig)}"

    def issue(self, scopes: list[str], subject: str) -> str:
        now = int(time.time())
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        return self.sign({
            "iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + self.expires_in,
            "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access,
        })  # fmt: skip

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                scopes = [s for v in query.get("scope", []) for s in v.split(" ") if s]
                auth = self.headers.get("Authorization", "")
                with outer._lock:
                    outer.requests.append((scopes, auth.startswith("Basic ")))
                subject = "anonymous"
                if outer.credentials is not None:
                    want = (
                        "Basic " + base64.b64encode(":".join(outer.credentials).encode()).decode()
                    )
                    if auth != want:
                        self.send_response(401)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    subject = outer.credentials[0]
                body = json.dumps({
                    "token": outer.issue(scopes, subject),
                    "expires_in": outer.expires_in,
                    "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
