"""The review pages' gate: no data without a session, no change without the session's CSRF token."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from starlette.routing import Route
from starlette.testclient import TestClient

from reconciliation.models import Mismatch, MismatchStatus
from tests.review.conftest import (
    PASSWORD,
    REVIEWER,
    SECRET_KEY,
    Seeded,
    count_actions,
    csrf_from,
    log_in,
    mounted_review_app,
    seed,
)
from webhooks.review.app import create_review_app
from webhooks.review.auth import hash_password, parse_users, verify_password

# Strings that only appear when seeded data leaks into a response.
DATA_MARKERS = ("cus_alpha", "cus_beta", "pi_alpha", "req_explain_42", "no ledger grant", "past_due", "10,000")


def _page_urls(s: Seeded) -> list[str]:
    return [
        "/review/",
        "/review/mismatches",
        "/review/mismatches?status=open&kind=payment_without_grant&customer=cus_alpha",
        f"/review/mismatches?run={s.run_id}&sort=amount",
        "/review/mismatches.csv",
        "/review/mismatches.csv?customer=cus_alpha",
        f"/review/mismatches/{s.payment_case}",
        f"/review/mismatches/{s.provider_case}",
        "/review/runs",
        f"/review/runs?run={s.run_id}",
        "/review/revenue",
        "/review/customers",
        "/review/customers?q=cus_alpha",
        "/review/customers/cus_alpha",
        f"/review/customers/cus_alpha?find={s.charge_request_id}",
        "/review/events/evt_alpha_charge_2",
        "/review/notifications",
        "/review/notifications?status=failed&customer=cus_alpha",
    ]


def _action_posts(s: Seeded) -> list[tuple[str, dict[str, str]]]:
    return [
        (f"/review/mismatches/{s.payment_case}/resolve", {"note": "paid by hand"}),
        (f"/review/mismatches/{s.payment_case}/ignore", {"note": "test payment"}),
        (f"/review/mismatches/{s.amount_case}/resolve", {"note": "config changed"}),
        ("/review/logout", {}),
    ]


def _statuses(engine: Engine) -> dict[int, MismatchStatus]:
    with Session(engine) as session:
        return {m.id: m.status for m in session.scalars(select(Mismatch))}


def _is_login_redirect(response: object) -> bool:
    location = response.headers.get("location", "")  # type: ignore[attr-defined]
    return response.status_code == 303 and urlsplit(location).path == "/review/login"  # type: ignore[attr-defined]


class TestWithoutSession:
    def test_every_page_redirects_to_login_with_no_data(self, engine: Engine, client: TestClient) -> None:
        s = seed(engine)
        for url in _page_urls(s):
            response = client.get(url)
            assert _is_login_redirect(response), (url, response.status_code)
            for marker in DATA_MARKERS:
                assert marker not in response.text, (url, marker)
            # The only thing echoed back is the address the user asked for, to return there after login.
            location = urlsplit(response.headers["location"])
            assert parse_qs(location.query) == {"next": [url]}, url

    def test_redirect_remembers_where_the_user_was_going(self, engine: Engine, client: TestClient) -> None:
        response = client.get("/review/runs?from=2026-01-01&to=2026-01-31")
        query = parse_qs(urlsplit(response.headers["location"]).query)
        assert query["next"] == ["/review/runs?from=2026-01-01&to=2026-01-31"]

    def test_every_action_redirects_and_changes_nothing(self, engine: Engine, client: TestClient) -> None:
        s = seed(engine)
        before, actions_before = _statuses(engine), count_actions(engine)
        # Even with a CSRF token from the login page: a token is not a session.
        token = csrf_from(client.get("/review/login").text)
        for url, data in _action_posts(s):
            for form in (data, {**data, "csrf_token": token}):
                response = client.post(url, data=form)
                assert _is_login_redirect(response), (url, response.status_code)
                assert "paid by hand" not in response.text
        assert _statuses(engine) == before
        assert count_actions(engine) == actions_before

    def test_every_route_of_the_app_is_covered(self, engine: Engine, review_settings: str) -> None:
        # A new page or action added later must be added to the lists above, or this fails.
        app = create_review_app()
        covered = {"/", "/login", "/logout", "/mismatches", "/mismatches.csv", "/runs", "/revenue", "/customers"}
        covered |= {"/mismatches/{mismatch_id:billing_id}", "/mismatches/{mismatch_id:billing_id}/{action:str}"}
        covered |= {"/customers/{customer_id:str}", "/events/{event_id:str}", "/notifications"}
        paths = {r.path for r in app.routes if isinstance(r, Route)}
        assert paths == covered

    def test_a_forged_session_cookie_is_no_session(self, engine: Engine, client: TestClient) -> None:
        seed(engine)
        client.cookies.set("review_session", "eyJ1c2VyIjogImFsaWNlIn0=.forged.signature")
        assert _is_login_redirect(client.get("/review/mismatches"))

    def test_a_cookie_signed_with_another_key_is_no_session(
        self, engine: Engine, client: TestClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        seed(engine)
        assert log_in(client).status_code == 303
        assert client.get("/review/mismatches").status_code == 200
        from ledger.settings import get_settings

        monkeypatch.setenv("SECRET_KEY", "a-rotated-secret")
        get_settings.cache_clear()
        with TestClient(mounted_review_app(), follow_redirects=False, cookies=client.cookies) as other:
            assert _is_login_redirect(other.get("/review/mismatches"))

    def test_changing_the_password_ends_sessions(
        self, engine: Engine, client: TestClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from ledger.settings import get_settings

        assert log_in(client).status_code == 303
        assert client.get("/review/mismatches").status_code == 200
        monkeypatch.setenv("REVIEW_USERS", f"{REVIEWER}:{hash_password('a new password')}")
        get_settings.cache_clear()
        assert _is_login_redirect(client.get("/review/mismatches"))

    def test_logout_ends_the_session(self, engine: Engine, signed_in: TestClient) -> None:
        token = csrf_from(signed_in.get("/review/mismatches").text)
        assert signed_in.post("/review/logout", data={"csrf_token": token}).status_code == 303
        assert _is_login_redirect(signed_in.get("/review/mismatches"))


class TestLogin:
    def test_wrong_password_gets_no_session(self, engine: Engine, client: TestClient) -> None:
        response = log_in(client, password="wrong")
        assert response.status_code == 401
        assert "do not match" in response.text
        assert _is_login_redirect(client.get("/review/mismatches"))

    def test_unknown_user_gets_the_same_answer(self, engine: Engine, client: TestClient) -> None:
        response = log_in(client, name="mallory", password=PASSWORD)
        assert response.status_code == 401
        assert "do not match" in response.text

    def test_login_needs_the_csrf_token(self, engine: Engine, client: TestClient) -> None:
        client.get("/review/login")
        response = client.post("/review/login", data={"username": REVIEWER, "password": PASSWORD})
        assert response.status_code == 403
        assert _is_login_redirect(client.get("/review/mismatches"))

    @pytest.mark.parametrize("target", ["https://evil.example/x", "//evil.example/x", "/elsewhere", "/review\\@evil"])
    def test_next_never_leaves_the_review_app(self, engine: Engine, client: TestClient, target: str) -> None:
        token = csrf_from(client.get("/review/login").text)
        response = client.post(
            "/review/login", data={"username": REVIEWER, "password": PASSWORD, "csrf_token": token, "next": target}
        )
        assert response.status_code == 303
        assert response.headers["location"] == "/review/mismatches"

    def test_session_token_changes_at_login(self, engine: Engine, client: TestClient) -> None:
        before = csrf_from(client.get("/review/login").text)
        assert log_in(client).status_code == 303
        after = csrf_from(client.get("/review/mismatches").text)
        assert before != after

    def test_secrets_never_appear_in_pages(self, engine: Engine, signed_in: TestClient, review_settings: str) -> None:
        s = seed(engine)
        salt_and_key = review_settings.split("$", 4)[4]
        for url in _page_urls(s):
            response = signed_in.get(url, follow_redirects=True)
            assert response.status_code == 200, url
            assert SECRET_KEY not in response.text
            assert salt_and_key not in response.text
            assert PASSWORD not in response.text

    def test_pages_carry_security_headers(self, engine: Engine, signed_in: TestClient) -> None:
        response = signed_in.get("/review/mismatches")
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-frame-options"] == "DENY"
        cookie = response.headers.get("set-cookie", "") or signed_in.cookies.get("review_session", "")
        assert cookie


class TestCsrf:
    @pytest.mark.parametrize("token", [None, "", "not-the-token", "x" * 43])
    def test_action_without_the_sessions_token_changes_nothing(
        self, engine: Engine, signed_in: TestClient, token: str | None
    ) -> None:
        s = seed(engine)
        before, actions_before = _statuses(engine), count_actions(engine)
        for url, data in _action_posts(s):
            form = dict(data) if token is None else {**data, "csrf_token": token}
            response = signed_in.post(url, data=form)
            assert response.status_code == 403, url
        assert _statuses(engine) == before
        assert count_actions(engine) == actions_before
        assert signed_in.get("/review/mismatches").status_code == 200  # logout was refused too

    def test_another_sessions_token_is_refused(self, engine: Engine, signed_in: TestClient) -> None:
        s = seed(engine)
        with TestClient(mounted_review_app(), follow_redirects=False) as other:
            assert log_in(other).status_code == 303
            foreign = csrf_from(other.get("/review/mismatches").text)
        mine = csrf_from(signed_in.get("/review/mismatches").text)
        assert foreign != mine
        response = signed_in.post(
            f"/review/mismatches/{s.payment_case}/resolve", data={"note": "x", "csrf_token": foreign}
        )
        assert response.status_code == 403
        assert _statuses(engine)[s.payment_case] is MismatchStatus.OPEN

    def test_cross_site_origin_is_refused_even_with_the_token(self, engine: Engine, signed_in: TestClient) -> None:
        s = seed(engine)
        token = csrf_from(signed_in.get("/review/mismatches").text)
        response = signed_in.post(
            f"/review/mismatches/{s.payment_case}/resolve",
            data={"note": "x", "csrf_token": token},
            headers={"origin": "https://evil.example"},
        )
        assert response.status_code == 403
        assert _statuses(engine)[s.payment_case] is MismatchStatus.OPEN

    def test_the_right_token_acts(self, engine: Engine, signed_in: TestClient) -> None:
        s = seed(engine)
        token = csrf_from(signed_in.get(f"/review/mismatches/{s.payment_case}").text)
        response = signed_in.post(
            f"/review/mismatches/{s.payment_case}/resolve",
            data={"note": "granted by hand", "csrf_token": token},
            headers={"origin": "http://testserver"},
        )
        assert response.status_code == 303
        assert _statuses(engine)[s.payment_case] is MismatchStatus.RESOLVED


class TestPasswords:
    def test_hash_round_trip(self) -> None:
        stored = hash_password("s3cret")
        assert stored.startswith("scrypt$")
        assert verify_password("s3cret", stored)
        assert not verify_password("s3cret ", stored)
        assert not verify_password("s3cret", "scrypt$1$2$3$bad$hash")

    def test_salts_differ(self) -> None:
        assert hash_password("same") != hash_password("same")

    def test_users_spec_is_validated(self) -> None:
        users = parse_users(f"alice:{hash_password('a')}, bob:{hash_password('b')}")
        assert set(users) == {"alice", "bob"}
        with pytest.raises(ValueError, match="entry 2"):
            parse_users(f"alice:{hash_password('a')},bob:plaintext")


class TestThrottle:
    def test_too_many_failures_block_the_name_even_with_the_right_password(
        self, engine: Engine, client: TestClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from webhooks.review import views
        from webhooks.review.sessions import LoginThrottle

        monkeypatch.setattr(views, "throttle", LoginThrottle(max_failures=3, window_seconds=60))
        for _ in range(3):
            assert log_in(client, password="guess").status_code == 401
        blocked = log_in(client)
        assert blocked.status_code == 429
        assert _is_login_redirect(client.get("/review/mismatches"))
        assert log_in(client, name="bob", password="guess").status_code == 401  # other names are not blocked


class TestCookies:
    def test_session_cookie_is_httponly_and_secure_over_https(self, engine: Engine, review_settings: str) -> None:
        with TestClient(mounted_review_app(), base_url="https://review.example", follow_redirects=False) as c:
            response = c.get("/review/login")
            cookie = response.headers["set-cookie"].lower()
            assert "httponly" in cookie and "secure" in cookie and "samesite=lax" in cookie

    def test_plain_http_cookie_is_not_marked_secure(self, engine: Engine, client: TestClient) -> None:
        cookie = client.get("/review/login").headers["set-cookie"].lower()
        assert "httponly" in cookie and "secure" not in cookie


class TestRedaction:
    def test_client_secrets_in_stored_payloads_are_not_shown(self, engine: Engine, signed_in: TestClient) -> None:
        from datetime import UTC, datetime

        from ledger.inbox import store_event
        from tests.review.conftest import stripe_event

        secret = "pi_alpha_9_secret_Zk3QvT0pSECRET"
        with Session(engine) as session, session.begin():
            raw, env = stripe_event(
                "evt_pi_secret",
                "payment_intent.succeeded",
                {"id": "pi_alpha_9", "object": "payment_intent", "amount": 100, "currency": "usd",
                 "customer": "cus_alpha", "client_secret": secret},
                created=datetime.now(UTC),
            )  # fmt: skip
            store_event(session, raw, env)  # type: ignore[arg-type]
        html = signed_in.get("/review/events/evt_pi_secret").text
        assert "pi_alpha_9" in html and "[redacted]" in html
        assert "SECRET" not in html
