"""Who may use the dashboard, and proof that a POST came from its own pages.

- **Binding.** Loopback needs no login; any other address needs ``dashboard.token``, or the
  dashboard refuses to start (``check_binding``).
- **Login.** With a token set, every page needs a session: the login form takes the token and
  the operator's name, and answers with a signed, expiring, HttpOnly, SameSite=Strict cookie.
  Scripts may send ``Authorization: Bearer <token>`` instead.
- **Cross-site requests.** Every POST carries a CSRF token that is an HMAC of a random cookie
  (the double-submit pattern, signed so that a cookie planted from a sibling domain cannot
  be paired with a token), and its Origin (or Referer), when the browser sends one, must be
  this dashboard. SameSite=Strict cookies are the third line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from duplex.errors import ConfigurationError

SESSION_COOKIE = "duplex_session"
CSRF_COOKIE = "duplex_csrf"
_NAME = re.compile(r"^[\w.@+-][\w .@+-]{0,63}$")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address to bind) is reachable only from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None) -> None:
    """Refuse (one line) to serve beyond loopback without authentication."""
    if token is None and not is_loopback(host):
        raise ConfigurationError(
            f"dashboard: refusing to listen on {host} without authentication; "
            f"set dashboard.token (DUPLEX_DASHBOARD__TOKEN) or bind to 127.0.0.1"
        )


def operator_name(text: str | None) -> str:
    """Check a name typed by an operator; raise ``ValueError`` saying what is wrong."""
    name = " ".join((text or "").split())
    if not name:
        raise ValueError("operator: give your name (it is recorded with the change)")
    if not _NAME.match(name):
        raise ValueError(
            "operator: 1 to 64 letters, digits, spaces or . @ + - _ (starting with no space)"
        )
    return name


@dataclass(frozen=True)
class Guard:
    """The keys of one dashboard process: sessions (from the token) and CSRF tokens."""

    token: str | None
    session_s: float
    _csrf_key: bytes = b""

    @classmethod
    def create(cls, token: str | None, *, session_hours: float) -> Guard:
        return cls(token, session_hours * 3600.0, secrets.token_bytes(32))

    @property
    def login_required(self) -> bool:
        return self.token is not None

    # -- login -----------------------------------------------------------------------------

    def token_matches(self, offered: str) -> bool:
        return self.token is not None and hmac.compare_digest(
            offered.encode("utf-8", "replace"), self.token.encode()
        )

    def new_session(self, name: str, *, now: float | None = None) -> str:
        """A cookie value naming the operator until it expires."""
        expires = int((now if now is not None else time.time()) + self.session_s)
        body = _b64(f"{expires}|{name}".encode())
        return f"{body}.{self._sign(b'session', body)}"

    def session_name(self, cookie: str | None, *, now: float | None = None) -> str | None:
        """The operator of a valid, unexpired session cookie; ``None`` otherwise."""
        if not cookie or self.token is None or "." not in cookie:
            return None
        body, signature = cookie.rsplit(".", 1)
        if not hmac.compare_digest(signature, self._sign(b"session", body)):
            return None
        try:
            expires, name = _unb64(body).decode().split("|", 1)
            alive = int(expires) > (now if now is not None else time.time())
        except (ValueError, UnicodeDecodeError):
            return None
        return name if alive else None

    def bearer_ok(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        return self.token_matches(header[len("Bearer ") :].strip())

    # -- cross-site request forgery --------------------------------------------------------

    @staticmethod
    def new_csrf_cookie() -> str:
        return secrets.token_urlsafe(24)

    def csrf_token(self, cookie: str) -> str:
        """The value every form of this browser carries."""
        return self._sign(b"csrf", cookie)

    def csrf_ok(self, cookie: str | None, offered: str | None) -> bool:
        if not cookie or not offered:
            return False
        return hmac.compare_digest(offered, self.csrf_token(cookie))

    def _sign(self, purpose: bytes, value: str) -> str:
        # Sessions are signed with a key derived from the token, so they survive a restart;
        # CSRF tokens with a key of this process.
        key = (
            hashlib.sha256(b"duplex-dashboard-session|" + self.token.encode()).digest()
            if purpose == b"session" and self.token is not None
            else self._csrf_key
        )
        return _b64(hmac.new(key, purpose + b"|" + value.encode(), hashlib.sha256).digest())


def same_origin(origin: str | None, referer: str | None, host: str | None) -> bool:
    """Whether the browser says the request comes from a page of ``host`` (the Host header).

    A browser sends Origin with every cross-origin POST (and Referer unless told not to);
    when it sends neither, the CSRF token alone decides.
    """
    if not host:
        return False
    source = origin if origin and origin != "null" else referer
    if origin == "null":
        return False
    if not source:
        return True
    return urlsplit(source).netloc.lower() == host.lower()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
