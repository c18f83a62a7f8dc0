"""A crawler over every review route, with hostile path and query values: never a 5xx, on either backend.

The routes come from the review app itself, so a new page is crawled without editing this file; the hostile
values are the classes the issue names (ids beyond any integer column, dates Python or the database cannot hold,
NUL and other control characters, huge and malformed values), each tried in every path parameter and every query
parameter any handler reads.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import product
from urllib.parse import quote

import orjson
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.datastructures import QueryParams
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from ledger.inbox import EventSource, parse_envelope, store_event
from tests.review.conftest import csrf_from, log_in, mounted_review_app, seed
from webhooks.review.app import create_review_app

HOSTILE = [
    "9223372036854775807",  # the largest BIGINT
    "9223372036854775808",  # one beyond
    "99999999999999999999999999999999",
    "-9223372036854775809",
    "-1",
    "0",
    "1e400",
    "NaN",
    "Infinity",
    "0001-01-01",
    "9999-12-31",
    "10000-01-01",
    "-0001-01-01",
    "0000-00-00",
    "0001-01-01T00:00:00+14:00~1",  # a cursor at the edge of time
    "9999-12-31T23:59:59-14:00~1",
    "1e999999~1",
    "NaN~1",
    "a\x00b",
    "\x00",
    "\x1b[31m",
    "\ud7ff\ue000",
    "'; DROP TABLE mismatches; --",
    "../../../../etc/passwd",
    "%",
    "x" * 5000,
]
# Every query parameter a review handler reads (found in the code below, so a new one is not forgotten).
QUERY_PARAMS = sorted(
    {"q", "next", "after", "before", "back", "status", "kind", "customer", "run", "seen", "from", "to", "sort"}
    | {"find", "since", "until"}
)


def handler_query_params() -> set[str]:
    """Names passed to query_params.get(...) or query_params[...] (and params.get) anywhere in the review package."""
    from pathlib import Path

    import webhooks.review as review

    names: set[str] = set()
    for path in Path(review.__file__).parent.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        names |= set(re.findall(r"(?:query_params|\bparams)(?:\.get\(|\[)\"([a-z_]+)\"", text))
        names |= set(re.findall(r"\bget\(\"([a-z_]+)\"\)", text)) & {"status", "kind", "customer", "run", "seen"}
    return names


def get_routes() -> list[tuple[str, list[str]]]:
    """(path template, path parameter names) of every GET route of the review app."""
    found = []
    for route in create_review_app().routes:
        if isinstance(route, Route) and "GET" in (route.methods or ()):
            found.append((route.path, list(route.param_convertors)))
        elif isinstance(route, Mount):
            found.append((route.path + "/{path}", ["path"]))
    return found


def post_routes() -> list[tuple[str, list[str]]]:
    found = []
    for route in create_review_app().routes:
        if isinstance(route, Route) and "POST" in (route.methods or ()):
            found.append((route.path, list(route.param_convertors)))
    return found


def fill(template: str, names: list[str], value: str) -> str:
    path = template
    for name in names:
        path = re.sub(r"\{" + name + r"(:[a-z]+)?\}", quote(value, safe=""), path)
    return "/review" + path


@pytest.fixture
def crawler(engine: Engine, review_settings: str) -> Iterator[TestClient]:
    """A signed-in client that reports a server error as a 500 answer (to collect them all) instead of raising."""
    seed(engine)
    # A stored event nested as deep as the receiver's JSON parser allows: its page must still render.
    # Written by hand: Python's own encoder cannot nest this deep. 1,000 levels plus the envelope's 3 stay within
    # the 1,024 the receiver's parser (orjson) accepts.
    inner = '{"id": "cus_deep", "client_secret": "pi_1_secret_hidden"}'
    deep = '{"a": ' * 1000 + inner + "}" * 1000
    raw = (
        '{"id": "evt_deep", "object": "event", "type": "customer.updated", "created": 1760000000, '
        '"data": {"object": {"id": "cus_deep", "object": "customer", "nested": ' + deep + "}}}"
    ).encode()
    with Session(engine) as session, session.begin():
        store_event(session, raw, parse_envelope(orjson.loads(raw)), source=EventSource.WEBHOOK)
    with TestClient(
        mounted_review_app(), base_url="http://testserver", follow_redirects=False, raise_server_exceptions=False
    ) as client:
        assert log_in(client).status_code == 303
        yield client


def test_the_crawler_knows_every_query_parameter() -> None:
    assert handler_query_params() <= set(QUERY_PARAMS)


def params_read(crawler: TestClient, url: str, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The query parameters the handler behind ``url`` reads, recorded while it answers a plain request."""
    read: set[str] = set()
    original_get, original_item = QueryParams.get, QueryParams.__getitem__

    def get(self: QueryParams, key: str, default: object = None) -> object:
        read.add(key)
        return original_get(self, key, default)

    def item(self: QueryParams, key: str) -> object:
        read.add(key)
        return original_item(self, key)

    with monkeypatch.context() as patch:
        patch.setattr(QueryParams, "get", get)
        patch.setattr(QueryParams, "__getitem__", item)
        crawler.get(url)
    return read


def test_every_get_route_with_hostile_path_and_query_values(
    crawler: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = []
    crawled: set[str] = set()
    for template, names in get_routes():
        # Hostile path values, then hostile values in each query parameter the handler reads, on a path that
        # names something real.
        urls = [fill(template, names, value) for value in HOSTILE if names]
        known = "evt_deep" if "event" in template else "cus_alpha" if "customer" in template else "1"
        real = fill(template, names, known)
        params = params_read(crawler, real, monkeypatch)
        crawled |= params
        urls += [f"{real}?{param}={quote(value, safe='')}" for param, value in product(sorted(params), HOSTILE)]
        for url in urls:
            response = crawler.get(url)
            if response.status_code >= 500:
                failures.append((url[:120], response.status_code))
    assert failures == []
    # The recording found the parameters the code reads (a broken recorder would crawl nothing).
    assert handler_query_params() - {"next", "back"} <= crawled


def test_the_deep_event_renders(crawler: TestClient) -> None:
    response = crawler.get("/review/events/evt_deep")
    assert response.status_code == 200
    assert "cus_deep" in response.text and "shown as stored" in response.text
    assert "pi_1_secret_hidden" not in response.text  # still redacted


def test_every_post_route_with_hostile_path_values(crawler: TestClient) -> None:
    token = csrf_from(crawler.get("/review/mismatches").text)
    failures = []
    for (template, names), value in product(post_routes(), HOSTILE):
        url = fill(template, names, value)
        if template == "/login":
            form = {"csrf_token": token, "username": value, "password": value, "next": value}
        else:
            form = {"csrf_token": token, "note": value}
        for _ in (1,):
            response = crawler.post(url, data=form)
            if response.status_code >= 500:
                failures.append((url[:120], response.status_code))
    assert failures == []
