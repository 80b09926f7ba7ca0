"""The dashboard's HTTP plumbing: requests and responses, forms, redirects and cookies.

Plain functions over the WSGI environ, so the app (``duplex.dashboard.server``) reads as routes
and pages. ``HttpError`` carries any answer other than the page.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

# An operator's form is a few fields; anything larger is refused before it is read.
_MAX_FORM_BYTES = 16 * 1024
# Sent with every HTML answer: no script, style or frame from anywhere else.
SECURITY_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
]


class HttpError(Exception):
    """An answer other than the page: a status and one line saying why."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Request:
    """One request as the routes see it: headers lower-cased, the last of repeated params."""

    method: str
    path: str
    params: dict[str, str]
    cookies: dict[str, str]
    headers: dict[str, str]
    environ: WSGIEnvironment
    form: dict[str, str] = field(default_factory=dict)
    operator: str | None = None  # the logged-in operator, when login is required

    @property
    def live(self) -> bool:
        return self.headers.get("x-duplex-live") == "1"


@dataclass
class Response:
    """A status, a body and headers; ``Content-Length`` is added when it is sent."""

    status: str
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)


def read_request(environ: WSGIEnvironment) -> Request:
    raw_path = environ.get("PATH_INFO", "") or "/"
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    headers = {
        key[5:].replace("_", "-").lower(): str(value)
        for key, value in environ.items()
        if key.startswith("HTTP_")
    }
    cookies: dict[str, str] = {}
    try:
        jar = SimpleCookie(headers.get("cookie", ""))
        cookies = {key: morsel.value for key, morsel in jar.items()}
    except CookieError:
        pass
    return Request(
        method=str(environ.get("REQUEST_METHOD", "GET")).upper(),
        path=raw_path,
        params={key: values[-1] for key, values in query.items()},
        cookies=cookies,
        headers=headers,
        environ=environ,
    )


def read_form(environ: WSGIEnvironment) -> dict[str, str]:
    kind = str(environ.get("CONTENT_TYPE", "")).split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise HttpError("415 Unsupported Media Type", "send the form as a web form")
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise HttpError("400 Bad Request", "bad Content-Length") from None
    if length > _MAX_FORM_BYTES:
        raise HttpError("413 Content Too Large", "the form is too large")
    body = environ["wsgi.input"].read(length) if length > 0 else b""
    try:
        fields = urllib.parse.parse_qs(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise HttpError("400 Bad Request", "the form is not UTF-8") from None
    return {key: values[-1] for key, values in fields.items()}


def route_of(path: str) -> str:
    # For the log: the page kind, never a uuid from the path.
    return re.sub(r"/[0-9a-fA-F-]{8,}", "/…", path)[:80]


def full_path(request: Request) -> str:
    query = request.environ.get("QUERY_STRING", "")
    return request.path + (f"?{query}" if query else "")


def safe_next(values: dict[str, str]) -> str:
    # Only a path of this dashboard: never an open redirect to another site.
    target = values.get("next", "") or "/tasks"
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/tasks"
    return target


def redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response("303 See Other", b"", [("Location", location), *(headers or [])])


def cookie_header(name: str, value: str, *, max_age: int | None = None) -> str:
    parts = [f"{name}={value}", "Path=/", "HttpOnly", "SameSite=Strict"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts)
