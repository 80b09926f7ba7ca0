"""Talking to the dashboard over real HTTP: ``serving`` runs it in this process on a free
port, ``Browser`` is a client that keeps cookies by hand and never follows a redirect.
"""

from __future__ import annotations

import html
import http.client
import re
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any

from duplex.dashboard import Dashboard
from duplex.observability.http import HttpServer
from duplex.settings import Settings
from duplex.storage.db import Database

HTTP_TIMEOUT_S = 10.0
ERROR_MESSAGE = re.compile(r'<p class="error-message">(.*?)</p>', re.S)
CSRF_INPUT = re.compile(r'<input type="hidden" name="csrf" value="([^"]+)">')


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: str

    def header(self, name: str) -> str:
        return self.headers.get(name, "")

    def set_cookies(self) -> dict[str, str]:
        """The cookies this answer sets (an empty value for a cookie it deletes)."""
        out: dict[str, str] = {}
        for line in self.headers.get_all("Set-Cookie") or []:
            jar: SimpleCookie = SimpleCookie()
            jar.load(line)
            for name, morsel in jar.items():
                out[name] = morsel.value
        return out

    @property
    def message(self) -> str:
        """The one line of an error page."""
        found = ERROR_MESSAGE.findall(self.body)
        assert len(found) == 1, f"not one error message in:\n{self.body}"
        return html.unescape(found[0])

    @property
    def csrf(self) -> str:
        found: set[str] = set(CSRF_INPUT.findall(self.body))
        assert len(found) == 1, "no (or several) csrf tokens in the page"
        return found.pop()


_DEFAULT = object()


class Browser:
    """One browser of the dashboard at ``127.0.0.1:port``: cookies kept, redirects not followed."""

    def __init__(self, port: int, *, timeout: float = HTTP_TIMEOUT_S) -> None:
        self.port = port
        self.timeout = timeout
        self.cookies: dict[str, str] = {}
        self.csrf = ""

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        sent = dict(headers or {})
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=sent)
            answer = conn.getresponse()
            reply = Reply(answer.status, answer.headers, answer.read().decode())
        finally:
            conn.close()
        for name, value in reply.set_cookies().items():
            if value:
                self.cookies[name] = value
            else:
                self.cookies.pop(name, None)
        tokens = set(CSRF_INPUT.findall(reply.body))
        if len(tokens) == 1:
            self.csrf = tokens.pop()
        return reply

    def get(self, path: str, **headers: str) -> Reply:
        return self.request("GET", path, headers=headers)

    def post(
        self,
        path: str,
        form: dict[str, str] | None = None,
        *,
        csrf: Any = _DEFAULT,
        origin: Any = _DEFAULT,
        content_type: str = "application/x-www-form-urlencoded",
        headers: dict[str, str] | None = None,
    ) -> Reply:
        fields = dict(form or {})
        token = self.csrf if csrf is _DEFAULT else csrf
        if token is not None:
            fields["csrf"] = token
        sent = {"Content-Type": content_type, **(headers or {})}
        source = self.origin if origin is _DEFAULT else origin
        if source is not None:
            sent["Origin"] = source
        body = urllib.parse.urlencode(fields).encode()
        return self.request("POST", path, body=body, headers=sent)


@contextmanager
def serving(settings: Settings, db: Database) -> Iterator[int]:
    """Serve the dashboard in this process on a free port; yield the port."""
    server = HttpServer("127.0.0.1", 0, Dashboard(settings, db), threads=4, serves="dashboard")
    server.start()
    try:
        yield server.port
    finally:
        server.stop()
