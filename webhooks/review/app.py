"""The review pages' sub-application, mounted at /review by the main app."""

from __future__ import annotations

from sqlalchemy.exc import DataError
from starlette.applications import Starlette
from starlette.convertors import register_url_convertor
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ledger.logs import get_logger
from ledger.settings import get_settings
from webhooks.review import mismatch_views, notification_views, revenue_views, views
from webhooks.review.params import IdConvertor
from webhooks.review.security import ReviewGate, SecureCookiesOverHttps, form_action
from webhooks.review.state import review_users
from webhooks.review.templating import STATIC_DIR
from webhooks.review.views import SESSION_MAX_AGE_SECONDS

SESSION_COOKIE = "review_session"
_DEFAULT_SECRET = "change-me-in-production"

log = get_logger(__name__)
register_url_convertor("billing_id", IdConvertor())


def create_review_app() -> Starlette:
    """Build the review sub-application (login, mismatches, runs, customers, events, static files)."""
    settings = get_settings()
    users = review_users()  # a malformed REVIEW_USERS fails here, at start-up, naming the entry
    secret = settings.secret_key.get_secret_value()
    if secret == _DEFAULT_SECRET:
        log.warning("review.default_secret_key", hint="set SECRET_KEY: session cookies are signed with it")
    if not users:
        log.warning("review.no_users", hint="set REVIEW_USERS to name:hash pairs to allow sign-in")
    routes = [
        Route("/", views.home, methods=["GET"]),
        Route("/login", views.login_form, methods=["GET"]),
        Route("/login", form_action(views.login), methods=["POST"]),
        Route("/logout", form_action(views.logout), methods=["POST"]),
        Route("/mismatches", mismatch_views.mismatch_list, methods=["GET"]),
        Route("/mismatches.csv", mismatch_views.mismatch_csv, methods=["GET"]),
        Route("/mismatches/{mismatch_id:billing_id}", mismatch_views.mismatch_page, methods=["GET"]),
        Route(
            "/mismatches/{mismatch_id:billing_id}/{action:str}",
            form_action(mismatch_views.mismatch_action),
            methods=["POST"],
        ),
        Route("/runs", mismatch_views.run_list, methods=["GET"]),
        Route("/revenue", revenue_views.revenue_page, methods=["GET"]),
        Route("/customers", views.customer_search, methods=["GET"]),
        Route("/customers/{customer_id:str}", views.customer_page, methods=["GET"], name="customer"),
        Route("/events/{event_id:str}", views.event_page, methods=["GET"]),
        Route("/notifications", notification_views.notification_list, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    middleware = [
        Middleware(SecureCookiesOverHttps),
        Middleware(
            SessionMiddleware,
            secret_key=secret,
            session_cookie=SESSION_COOKIE,
            max_age=SESSION_MAX_AGE_SECONDS,
            same_site="lax",
            # HttpOnly always; Secure is added per request over HTTPS (SecureCookiesOverHttps).
            https_only=False,
        ),
        Middleware(ReviewGate, users=review_users),
    ]
    return Starlette(
        routes=routes,
        middleware=middleware,
        # The last line behind the parsers in webhooks.review.params: a value no column or date can hold is the
        # request's fault (400), not the server's.
        exception_handlers={OverflowError: _out_of_range, DataError: _out_of_range},
    )


async def _out_of_range(request: Request, exc: Exception) -> Response:
    log.info("review.value_out_of_range", path=request.url.path, error=type(exc).__name__)
    return PlainTextResponse("Bad request: a value in the request is out of range.", status_code=400)
