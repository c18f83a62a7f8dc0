"""The review app's gate: no page or action without a login, no action without the session's CSRF token."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, quote, urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, MutableHeaders
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from webhooks.review.auth import CSRF_FIELD, ReviewUser, csrf_valid, session_user
from webhooks.review.params import has_control_characters

# Reached without a session: the login form itself and the stylesheet it uses.
PUBLIC_PREFIXES = ("/login", "/static/")

SECURITY_HEADERS = {
    # Nothing from other hosts, no inline script; the chart is inline SVG, which is markup, not script.
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
}


def route_path(scope: Scope) -> str:
    """The request path relative to where the review app is mounted."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


def safe_next(scope: Scope, candidate: str | None) -> str:
    """A post-login destination inside the review app; anything else (another host, //evil) goes home."""
    root: str = scope.get("root_path", "")
    home = f"{root}/mismatches"
    if not candidate:
        return home
    parts = urlsplit(candidate)
    if parts.scheme or parts.netloc or not candidate.startswith(f"{root}/") or candidate.startswith("//"):
        return home
    if "\\" in candidate or "\r" in candidate or "\n" in candidate:
        return home
    return candidate


class ReviewGate:
    """ASGI middleware (inside SessionMiddleware): logs in or redirects, and stamps security headers."""

    def __init__(self, app: ASGIApp, users: Callable[[], dict[str, ReviewUser]]) -> None:
        self.app = app
        self.users = users

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                # Review pages show money and customer data: never cache them anywhere.
                if not route_path(scope).startswith("/static/"):
                    headers["cache-control"] = "no-store"
            await send(message)

        path = route_path(scope)
        if _hostile(scope):
            refused = PlainTextResponse(
                "Bad request: control characters (such as NUL) have no place in an address.", status_code=400
            )
            await refused(scope, receive, send_with_headers)
            return
        if not path.startswith(PUBLIC_PREFIXES):
            request = Request(scope, receive)
            user = await run_in_threadpool(session_user, request, self.users())
            if user is None:
                target = scope["path"] + (
                    "?" + scope["query_string"].decode("latin-1") if scope["query_string"] else ""
                )
                if request.method not in ("GET", "HEAD"):
                    target = scope.get("root_path", "") + "/mismatches"
                login = f"{scope.get('root_path', '')}/login?next={quote(target, safe='')}"
                response: Response = RedirectResponse(login, status_code=303)
                await response(scope, receive, send_with_headers)
                return
            scope.setdefault("state", {})["review_user"] = user
        await self.app(scope, receive, send_with_headers)


def _hostile(scope: Scope) -> bool:
    """True when the path or a query value carries NUL or another control character (no id or name does)."""
    if has_control_characters(scope["path"]):
        return True
    query = scope.get("query_string", b"")
    if not query:
        return False
    try:
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        return True
    return any(has_control_characters(key) or has_control_characters(value) for key, value in pairs)


def current_user(request: Request) -> ReviewUser:
    """The logged-in user the gate put on the request."""
    user: ReviewUser = request.state.review_user
    return user


FormHandler = Callable[[Request, FormData], Awaitable[Response]]


def same_origin(request: Request) -> bool:
    """False when the browser says the form was posted from another site (a second line behind CSRF tokens)."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc == host


def form_action(handler: FormHandler) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a POST handler: parse the form and refuse it (403, nothing done) without this session's token."""

    async def endpoint(request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=50)
        if not same_origin(request) or not csrf_valid(request, form.get(CSRF_FIELD)):
            return PlainTextResponse(
                "Refused: the form's security token is missing or stale. Go back, reload the page and try again.",
                status_code=403,
            )
        return await handler(request, form)

    endpoint.__name__ = handler.__name__
    endpoint.__doc__ = handler.__doc__
    return endpoint


class SecureCookiesOverHttps:
    """ASGI middleware (outside SessionMiddleware): over HTTPS, mark the cookies it sets ``Secure``.

    The scheme is the one the server saw (uvicorn's --proxy-headers takes it from X-Forwarded-Proto behind a
    TLS-terminating proxy), so plain-HTTP development still works.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("scheme") != "https":
            await self.app(scope, receive, send)
            return

        async def send_secure(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, value + b"; secure")
                    if name.lower() == b"set-cookie" and b"secure" not in value.lower()
                    else (name, value)
                    for name, value in message.get("headers", [])
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_secure)
