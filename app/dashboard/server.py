"""The dashboard's WSGI app: routing, login, CSRF checks, and error pages.

Pages are rendered on the server (Jinja2, autoescaped) from ``duplex.dashboard.pages``; the one
script, ``static/dashboard.js``, refreshes each page's live part by asking for the same URL
with ``X-Duplex-Live: 1``, which answers only that part. Operator actions are POSTs that run
the CLI's own functions (``duplex.storage.operations``) in one write transaction, then redirect
back with the CLI's own one-line summary.

Nothing a page shows is logged: a failed request logs its route and the exception's type,
never a query string, a form or a value read from the database.
"""

from __future__ import annotations

import html
import mimetypes
import re
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from http.cookies import CookieError, SimpleCookie
from importlib import resources
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, PackageLoader, select_autoescape
from loguru import logger
from markupsafe import Markup

from duplex.clock import utcnow
from duplex.dashboard import pages
from duplex.dashboard.security import CSRF_COOKIE, SESSION_COOKIE, Guard, operator_name, same_origin
from duplex.errors import InputError, SchemaNotReadyError, StorageError, TransitionError
from duplex.settings import Settings
from duplex.states import STEP_STATES
from duplex.storage.dashboard import EXECUTION_STATUSES
from duplex.storage.db import Database
from duplex.storage.operations import OperatorReport, cancel_task, resolve_step, retry_step

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

_MAX_FORM_BYTES = 16 * 1024
_UUID = r"(?P<uuid>[^/]+)"
_SECURITY_HEADERS = [
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
_STATIC = {"dashboard.css", "dashboard.js", "favicon.svg"}


class HttpError(Exception):
    """An answer other than the page: a status and one line saying why."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Request:
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
    status: str
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request, dict[str, str]], Response]


class Dashboard:
    """The WSGI app of ``duplex dashboard``."""

    def __init__(self, settings: Settings, db: Database) -> None:
        cfg = settings.dashboard
        token = cfg.token.get_secret_value() if cfg.token is not None else None
        self.settings = settings
        self.db = db
        self.guard = Guard.create(token, session_hours=cfg.session_hours)
        self.env = Environment(
            loader=PackageLoader("duplex.dashboard", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.globals.update(
            state=_state_badge,
            refresh_ms=cfg.refresh_ms,
            step_states=STEP_STATES,
            execution_statuses=EXECUTION_STATUSES,
            pretty_json=pages.pretty_json,
            when=_when,
            when_utc=_when_utc,
            ago=_ago,
            seconds=_seconds,
            urlencode=urllib.parse.urlencode,
            cursor_text=pages.cursor_text,
            filter_params=pages.filter_params,
        )
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = [
            ("GET", re.compile(r"^/$"), self._home),
            ("GET", re.compile(r"^/tasks$"), self._tasks),
            ("GET", re.compile(rf"^/tasks/{_UUID}$"), self._task),
            ("GET", re.compile(rf"^/steps/{_UUID}$"), self._step),
            ("GET", re.compile(r"^/workers$"), self._workers),
            ("GET", re.compile(r"^/login$"), self._login_form),
            ("POST", re.compile(r"^/login$"), self._login),
            ("POST", re.compile(r"^/logout$"), self._logout),
            ("POST", re.compile(rf"^/tasks/{_UUID}/cancel$"), self._cancel),
            ("POST", re.compile(rf"^/steps/{_UUID}/retry$"), self._retry),
            ("POST", re.compile(rf"^/steps/{_UUID}/resolve$"), self._resolve),
            ("GET", re.compile(r"^/static/(?P<name>[\w.-]+)$"), self._static),
        ]

    # -- WSGI ------------------------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = _request(environ)
        csrf_cookie = request.cookies.get(CSRF_COOKIE)
        new_csrf = None
        if not csrf_cookie:
            csrf_cookie = new_csrf = self.guard.new_csrf_cookie()
            request.cookies[CSRF_COOKIE] = csrf_cookie
        try:
            response = self._dispatch(request)
        except HttpError as exc:
            response = self._error(request, exc.status, exc.message)
        except Exception as exc:  # a bug: an error page, never a traceback, and no data logged
            logger.error(
                "dashboard: {} {} failed: {}", request.method, _route_of(request.path), type(exc)
            )
            response = self._error(request, "500 Internal Server Error", "internal error")
        headers = [*response.headers]
        if new_csrf is not None:
            headers.append(("Set-Cookie", _cookie(CSRF_COOKIE, new_csrf)))
        if request.method == "HEAD":
            response.body = b""
        start_response(response.status, [*headers, ("Content-Length", str(len(response.body)))])
        return [response.body]

    def _dispatch(self, request: Request) -> Response:
        allowed = []
        for method, pattern, handler in self._routes:
            match = pattern.match(request.path)
            if match is None:
                continue
            allowed.append(method)
            if method == request.method or (method == "GET" and request.method == "HEAD"):
                return self._guarded(request, handler, match.groupdict())
        if allowed:
            raise HttpError("405 Method Not Allowed", f"{request.method} is not allowed here")
        raise HttpError("404 Not Found", f"no such page: {request.path}")

    def _guarded(self, request: Request, handler: Handler, args: dict[str, str]) -> Response:
        public = handler in (self._login_form, self._login, self._static)
        if self.guard.login_required and not public:
            request.operator = self.guard.session_name(request.cookies.get(SESSION_COOKIE))
            if request.operator is None and not self.guard.bearer_ok(
                request.headers.get("authorization")
            ):
                if request.method == "GET" and not request.live:
                    target = urllib.parse.quote(_full_path(request), safe="")
                    return _redirect(f"/login?next={target}")
                raise HttpError("401 Unauthorized", "log in first: the dashboard needs its token")
        if request.method == "POST":
            request.form = _read_form(request.environ)
            if not same_origin(
                request.headers.get("origin"),
                request.headers.get("referer"),
                request.headers.get("host"),
            ):
                raise HttpError("403 Forbidden", "cross-site request refused")
            if not self.guard.csrf_ok(request.cookies.get(CSRF_COOKIE), request.form.get("csrf")):
                raise HttpError(
                    "403 Forbidden",
                    "missing or stale form token: reload the page and try again",
                )
        try:
            return handler(request, args)
        except InputError as exc:
            status = "404 Not Found" if str(exc).startswith("unknown ") else "400 Bad Request"
            raise HttpError(status, str(exc)) from None
        except TransitionError as exc:
            raise HttpError("409 Conflict", str(exc)) from None
        except SchemaNotReadyError as exc:
            raise HttpError("503 Service Unavailable", str(exc)) from None
        except StorageError as exc:
            raise HttpError(
                "503 Service Unavailable",
                f"the database is unavailable ({exc}); this page retries on its own",
            ) from None

    # -- pages -----------------------------------------------------------------------------

    def _home(self, request: Request, args: dict[str, str]) -> Response:
        return _redirect("/tasks")

    def _tasks(self, request: Request, args: dict[str, str]) -> Response:
        query = pages.parse_task_list_query(request.params)
        with self.db.read() as conn:
            listing = pages.task_list(conn, query, page_size=self.settings.dashboard.page_size)
        return self._page(request, "tasks.html", title="Tasks", nav="tasks", listing=listing)

    def _task(self, request: Request, args: dict[str, str]) -> Response:
        now = utcnow()
        with self.db.read() as conn:
            view = pages.task_view(conn, args["uuid"], now=now)
        return self._page(
            request, "task.html", title=f"Task {view.task.name}", nav="tasks", view=view, now=now
        )

    def _step(self, request: Request, args: dict[str, str]) -> Response:
        with self.db.read() as conn:
            view = pages.step_view(conn, args["uuid"])
        return self._page(
            request,
            "step.html",
            title=f"Step {view.step.name}",
            nav="tasks",
            view=view,
            now=utcnow(),
        )

    def _workers(self, request: Request, args: dict[str, str]) -> Response:
        now = utcnow()
        with self.db.read() as conn:
            rows = pages.workers_view(
                conn, claim_timeout_s=self.settings.event_system.claim_timeout_s, now=now
            )
        return self._page(request, "workers.html", title="Workers", nav="workers", workers=rows)

    # -- login -----------------------------------------------------------------------------

    def _login_form(self, request: Request, args: dict[str, str]) -> Response:
        if not self.guard.login_required:
            return _redirect("/tasks")
        return self._page(
            request, "login.html", title="Log in", nav="", next=_safe_next(request.params)
        )

    def _login(self, request: Request, args: dict[str, str]) -> Response:
        if not self.guard.login_required:
            return _redirect("/tasks")
        target = _safe_next(request.form)
        try:
            name = operator_name(request.form.get("name"))
        except ValueError as exc:
            return self._page(
                request,
                "login.html",
                status="400 Bad Request",
                title="Log in",
                nav="",
                next=target,
                error=str(exc),
            )
        if not self.guard.token_matches(request.form.get("token", "")):
            return self._page(
                request,
                "login.html",
                status="401 Unauthorized",
                title="Log in",
                nav="",
                next=target,
                error="wrong token",
            )
        cookie = _cookie(SESSION_COOKIE, self.guard.new_session(name))
        return _redirect(target, [("Set-Cookie", cookie)])

    def _logout(self, request: Request, args: dict[str, str]) -> Response:
        return _redirect("/login", [("Set-Cookie", _cookie(SESSION_COOKIE, "", max_age=0))])

    # -- operator actions ------------------------------------------------------------------

    def _cancel(self, request: Request, args: dict[str, str]) -> Response:
        return self._operate(request, cancel_task, args["uuid"], "task")

    def _retry(self, request: Request, args: dict[str, str]) -> Response:
        return self._operate(request, retry_step, args["uuid"], "step")

    def _resolve(self, request: Request, args: dict[str, str]) -> Response:
        return self._operate(request, resolve_step, args["uuid"], "step")

    def _operate(
        self,
        request: Request,
        operation: Callable[..., OperatorReport],
        target: str,
        kind: str,
    ) -> Response:
        try:
            name = request.operator or operator_name(request.form.get("operator"))
        except ValueError as exc:
            raise HttpError("400 Bad Request", str(exc)) from None
        reason = request.form.get("reason", "")
        if len(reason) > 1000:
            raise HttpError("400 Bad Request", "reason: longer than 1000 characters")
        with self.db.write() as conn:
            report = operation(
                conn,
                target,
                operator=f"operator:{name} (dashboard)",
                now=utcnow(),
                reason=reason or None,
            )
        back = (
            f"/tasks/{report.task_uuid}"
            if kind == "task"
            else f"/steps/{report.changes[0].step_uuid}"
        )
        flash = urllib.parse.quote(report.summary)
        return _redirect(back, [("Set-Cookie", _cookie("duplex_flash", flash, max_age=60))])

    # -- static files ----------------------------------------------------------------------

    def _static(self, request: Request, args: dict[str, str]) -> Response:
        name = args["name"]
        if name not in _STATIC:
            raise HttpError("404 Not Found", f"no such file: {name}")
        data = resources.files("duplex.dashboard").joinpath("static", name).read_bytes()
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind.endswith("javascript"):
            kind += "; charset=utf-8"
        return Response(
            "200 OK",
            data,
            [
                ("Content-Type", kind),
                ("Cache-Control", "max-age=3600"),
                ("X-Content-Type-Options", "nosniff"),
            ],
        )

    # -- rendering -------------------------------------------------------------------------

    def _page(
        self, request: Request, template: str, *, status: str = "200 OK", **values: Any
    ) -> Response:
        flash = urllib.parse.unquote(request.cookies.get("duplex_flash", ""))
        context = {
            **values,
            "request": request,
            "operator": request.operator,
            "login_required": self.guard.login_required,
            "csrf": self.guard.csrf_token(request.cookies[CSRF_COOKIE]),
            "flash": flash,
        }
        page = self.env.get_template(template)
        if request.live:
            block = page.blocks["live"]
            body = "".join(block(page.new_context(context)))
        else:
            body = page.render(context)
        headers = [("Content-Type", "text/html; charset=utf-8"), *_SECURITY_HEADERS]
        if flash and not request.live:
            headers.append(("Set-Cookie", _cookie("duplex_flash", "", max_age=0)))
        return Response(status, body.encode(), headers)

    def _error(self, request: Request, status: str, message: str) -> Response:
        if request.live:
            # The live script keeps the page and shows this line in its status bar.
            body = f'<p class="live-error">{html.escape(status)}: {html.escape(message)}</p>'
            headers = [("Content-Type", "text/html; charset=utf-8"), *_SECURITY_HEADERS]
            return Response(status, body.encode(), headers)
        try:
            return self._page(
                request, "error.html", status=status, title=status, nav="", message=message
            )
        except Exception:  # the error page itself failed: plain text, still no traceback
            text = f"{status}: {message}\n".encode()
            return Response(status, text, [("Content-Type", "text/plain; charset=utf-8")])


# ------------------------------------------------------------------------------------------
# Plain helpers


def _request(environ: WSGIEnvironment) -> Request:
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


def _read_form(environ: WSGIEnvironment) -> dict[str, str]:
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


def _route_of(path: str) -> str:
    # For the log: the page kind, never a uuid from the path.
    return re.sub(r"/[0-9a-fA-F-]{8,}", "/…", path)[:80]


def _full_path(request: Request) -> str:
    query = request.environ.get("QUERY_STRING", "")
    return request.path + (f"?{query}" if query else "")


def _safe_next(values: dict[str, str]) -> str:
    # Only a path of this dashboard: never an open redirect to another site.
    target = values.get("next", "") or "/tasks"
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/tasks"
    return target


def _redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response("303 See Other", b"", [("Location", location), *(headers or [])])


def _cookie(name: str, value: str, *, max_age: int | None = None) -> str:
    parts = [f"{name}={value}", "Path=/", "HttpOnly", "SameSite=Strict"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts)


def _state_badge(value: str) -> Markup:
    # A plain function, not a template macro: a 1000-step page calls it thousands of times.
    return Markup('<span class="state state-{}">{}</span>').format(value, value.replace("_", " "))


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if moment is not None else "—"


def _when_utc(moment: datetime | None) -> str:
    """A time standing alone (not under a "(UTC)" column header) names its zone."""
    return f"{_when(moment)} UTC" if moment is not None else "—"


def _ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "—"
    return _seconds(max(0.0, (now - moment).total_seconds())) + " ago"


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"
