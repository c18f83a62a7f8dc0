"""The main app serves the review pages under /review, behind the same login."""

from __future__ import annotations

from sqlalchemy import Engine
from starlette.testclient import TestClient

from tests.review.conftest import csrf_from
from webhooks.app import create_app


class TestMountedInMainApp:
    def test_review_is_mounted_and_gated(self, engine: Engine, review_settings: str) -> None:
        client = TestClient(create_app(), follow_redirects=False)
        assert client.get("/review/mismatches").headers["location"] == "/review/login?next=%2Freview%2Fmismatches"
        login = client.get("/review/login")
        assert login.status_code == 200
        assert client.get("/review/static/review.css").status_code == 200
        token = csrf_from(login.text)
        signed = client.post(
            "/review/login",
            data={"username": "alice", "password": "correct horse battery staple", "csrf_token": token},
        )
        assert signed.status_code == 303
        assert client.get("/review/mismatches").status_code == 200
