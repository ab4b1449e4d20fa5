"""A real OpenID Connect provider process for tests and demos: `oidc-provider-mock` (PyPI)
with predefined users, their groups and claims, ended by its pid.

A person's sign-in is the provider's own form: `sign_in(login_url, sub)` posts it as a
browser would and returns the redirect back to raftmesh (the callback URL with code and
state), which the caller then opens at whichever replica it likes.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from .local_cluster import free_ports

START_TIMEOUT = 20.0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class OidcProvider:
    def __init__(self, users: list[dict], log_path: str):
        """`users`: claims of each user, with "sub"."""
        self.port = free_ports(1)[0]
        self.issuer = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "oidc_provider_mock", "--port", str(self.port),
                "--require-nonce", *[a for u in users for a in ("--user-claims", json.dumps(u))]]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the OIDC provider did not start (see {log_path})")
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.issuer + "/.well-known/openid-configuration", timeout=1):
                return True
        except OSError:
            return False

    def sign_in(self, login_url: str, sub: str) -> str:
        """Sign in as `sub` on the provider's form; the URL it redirects the browser to."""
        data = urllib.parse.urlencode({"sub": sub}).encode()
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            opener.open(urllib.request.Request(login_url, data=data, method="POST"), timeout=10)
        except urllib.error.HTTPError as e:
            if e.code in (302, 303):
                return e.headers["Location"]
            raise
        raise AssertionError("the provider did not redirect back")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
