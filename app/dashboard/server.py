"""The dashboard's WSGI app: routing, login, CSRF checks, and error pages.

Pages are rendered on the server (Jinja2, autoescaped) from ``duplex.dashboard.pages``; the one
script, ``static/dashboard.js``, refreshes each page's live part by asking for the same URL
with ``X-Duplex-Live: 1``, which answers only that part. Operator actions are POSTs that pass
the same login and CSRF guards (``_guarded``), then run the CLI's own functions in one write
transaction (``duplex.dashboard.actions``) and redirect back with the CLI's own one-line
summary.

Nothing a page shows is logged: a failed request logs its route and the exception's type,
never a query string, a form or a value read from the database.
"""

from __future__ import annotations

import html
import mimetypes
import re
import urllib.parse
from collections.abc import Callable, Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, PackageLoader, select_autoescape
from loguru import logger

from duplex.clock import utcnow
from duplex.dashboard import actions, formatting, pages
from duplex.dashboard.schedules import schedules_view
from duplex.dashboard.security import CSRF_COOKIE, SESSION_COOKIE, Guard, operator_name, same_origin
from duplex.dashboard.web import (
    SECURITY_HEADERS,
    HttpError,
    Request,
    Response,
    cookie_header,
    full_path,
    read_form,
    read_request,
    redirect,
    route_of,
    safe_next,
)
from duplex.errors import InputError, SchemaNotReadyError, StorageError, TransitionError
from duplex.settings import Settings
from duplex.states import STEP_STATES
from duplex.storage.dashboard_list import EXECUTION_STATUSES
from duplex.storage.db import Database
from duplex.storage.operations import cancel_task, resolve_step, retry_step

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

_UUID = r"(?P<uuid>[^/]+)"
_STATIC = {"dashboard.css", "dashboard.js", "favicon.svg"}


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
            state=formatting.state_badge,
            refresh_ms=cfg.refresh_ms,
            step_states=STEP_STATES,
            execution_statuses=EXECUTION_STATUSES,
            pretty_json=pages.pretty_json,
            when=formatting.when,
            when_utc=formatting.when_utc,
            ago=formatting.ago,
            seconds=formatting.seconds,
            urlencode=urllib.parse.urlencode,
            cursor_text=pages.cursor_text,
            filter_params=pages.filter_params,
            items_href=pages.items_href,
        )
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = [
            ("GET", re.compile(r"^/$"), self._home),
            ("GET", re.compile(r"^/tasks$"), self._tasks),
            ("GET", re.compile(rf"^/tasks/{_UUID}$"), self._task),
            ("GET", re.compile(rf"^/steps/{_UUID}$"), self._step),
            ("GET", re.compile(rf"^/steps/{_UUID}/items$"), self._items),
            ("GET", re.compile(r"^/workers$"), self._workers),
            ("GET", re.compile(r"^/schedules$"), self._schedules),
            ("GET", re.compile(r"^/login$"), self._login_form),
            ("POST", re.compile(r"^/login$"), self._login),
            ("POST", re.compile(r"^/logout$"), self._logout),
            ("POST", re.compile(rf"^/tasks/{_UUID}/cancel$"), self._cancel),
            ("POST", re.compile(rf"^/steps/{_UUID}/retry$"), self._retry),
            ("POST", re.compile(rf"^/steps/{_UUID}/resolve$"), self._resolve),
            ("POST", re.compile(rf"^/steps/{_UUID}/complete$"), self._complete),
            ("POST", re.compile(rf"^/steps/{_UUID}/signal$"), self._signal),
            ("POST", re.compile(r"^/pause$"), self._pause),
            ("POST", re.compile(r"^/resume$"), self._resume),
            ("GET", re.compile(r"^/static/(?P<name>[\w.-]+)$"), self._static),
        ]

    # -- WSGI ------------------------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = read_request(environ)
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
                "dashboard: {} {} failed: {}", request.method, route_of(request.path), type(exc)
            )
            response = self._error(request, "500 Internal Server Error", "internal error")
        headers = [*response.headers]
        if new_csrf is not None:
            headers.append(("Set-Cookie", cookie_header(CSRF_COOKIE, new_csrf)))
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
                    target = urllib.parse.quote(full_path(request), safe="")
                    return redirect(f"/login?next={target}")
                raise HttpError("401 Unauthorized", "log in first: the dashboard needs its token")
        if request.method == "POST":
            request.form = read_form(request.environ)
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
        return redirect("/tasks")

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

    def _items(self, request: Request, args: dict[str, str]) -> Response:
        with self.db.read() as conn:
            view = pages.items_view(conn, args["uuid"], request.params)
        title = f"Items of {view.batch.name}"
        return self._page(request, "items.html", title=title, nav="tasks", view=view)

    def _workers(self, request: Request, args: dict[str, str]) -> Response:
        now = utcnow()
        with self.db.read() as conn:
            rows = pages.workers_view(
                conn, claim_timeout_s=self.settings.event_system.claim_timeout_s, now=now
            )
        return self._page(request, "workers.html", title="Workers", nav="workers", workers=rows)

    def _schedules(self, request: Request, args: dict[str, str]) -> Response:
        with self.db.read() as conn:
            rows = schedules_view(conn, now=utcnow())
        return self._page(request, "schedules.html", title="Schedules", nav="schedules", rows=rows)

    # -- login -----------------------------------------------------------------------------

    def _login_form(self, request: Request, args: dict[str, str]) -> Response:
        if not self.guard.login_required:
            return redirect("/tasks")
        return self._page(
            request, "login.html", title="Log in", nav="", next=safe_next(request.params)
        )

    def _login(self, request: Request, args: dict[str, str]) -> Response:
        if not self.guard.login_required:
            return redirect("/tasks")
        target = safe_next(request.form)
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
        session = cookie_header(SESSION_COOKIE, self.guard.new_session(name))
        return redirect(target, [("Set-Cookie", session)])

    def _logout(self, request: Request, args: dict[str, str]) -> Response:
        return redirect("/login", [("Set-Cookie", cookie_header(SESSION_COOKIE, "", max_age=0))])

    # -- operator actions ------------------------------------------------------------------

    def _cancel(self, request: Request, args: dict[str, str]) -> Response:
        return actions.operate(self.db, self.settings, request, cancel_task, args["uuid"], "task")

    def _retry(self, request: Request, args: dict[str, str]) -> Response:
        return actions.operate(self.db, self.settings, request, retry_step, args["uuid"], "step")

    def _resolve(self, request: Request, args: dict[str, str]) -> Response:
        return actions.operate(self.db, self.settings, request, resolve_step, args["uuid"], "step")

    def _complete(self, request: Request, args: dict[str, str]) -> Response:
        return actions.complete(self.db, self.settings, request, args["uuid"])

    def _signal(self, request: Request, args: dict[str, str]) -> Response:
        return actions.signal(self.db, self.settings, request, args["uuid"])

    def _pause(self, request: Request, args: dict[str, str]) -> Response:
        return actions.pause_work(self.db, self.settings, request)

    def _resume(self, request: Request, args: dict[str, str]) -> Response:
        return actions.resume_work(self.db, self.settings, request)

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
            "here": full_path(request),  # where a form's action sends the browser back
        }
        page = self.env.get_template(template)
        if request.live:
            block = page.blocks["live"]
            body = "".join(block(page.new_context(context)))
        else:
            body = page.render(context)
        headers = [("Content-Type", "text/html; charset=utf-8"), *SECURITY_HEADERS]
        if flash and not request.live:
            headers.append(("Set-Cookie", cookie_header("duplex_flash", "", max_age=0)))
        return Response(status, body.encode(), headers)

    def _error(self, request: Request, status: str, message: str) -> Response:
        if request.live:
            # The live script keeps the page and shows this line in its status bar.
            body = f'<p class="live-error">{html.escape(status)}: {html.escape(message)}</p>'
            headers = [("Content-Type", "text/html; charset=utf-8"), *SECURITY_HEADERS]
            return Response(status, body.encode(), headers)
        try:
            return self._page(
                request, "error.html", status=status, title=status, nav="", message=message
            )
        except Exception:  # the error page itself failed: plain text, still no traceback
            text = f"{status}: {message}\n".encode()
            return Response(status, text, [("Content-Type", "text/plain; charset=utf-8")])
