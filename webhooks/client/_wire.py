"""The sync client's connections when it owns them: urllib3's keep-alive pool, answers handed back as httpx's.

A metered AI call makes two requests to the usage API (its hold, its capture), each a few hundred bytes to a
server that answers in about a millisecond, so what the client spends per request is a large part of what the
wrapper adds to the call. Measured on one caller (scripts/bench_client.py), ``httpx.Client`` spends about twice
the CPU of urllib3's connection pool on the same request (URL merging, request and response models, the h11
state machine, the pool's bookkeeping). ``Billing`` sends its requests through urllib3 when it owns its
connections; a caller's own ``httpx.Client`` (``Billing(..., http=...)``), a proxy configured in the environment,
or a URL other than ``http(s)://`` keep httpx. Answers are handed back as ``httpx.Response`` and failures as
httpx's transport errors, so parsing, errors and the retry policy (tenacity, the same idempotency key on every
attempt; urllib3's own retries are off) are the same on both paths.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

# Connections kept for reuse (as the httpx client's max_keepalive_connections); more may be open at once.
MAX_IDLE = 100
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


def suits(base_url: str) -> bool:
    """Whether urllib3's pool sends to ``base_url`` as httpx would: an http(s) URL and no proxy in the environment."""
    if urlsplit(base_url).scheme not in ("http", "https"):
        return False
    # httpx honours HTTP(S)_PROXY / ALL_PROXY; a bare urllib3 pool does not.
    return not any(os.environ.get(name) or os.environ.get(name.upper()) for name in _PROXY_VARIABLES)


class Wire:
    """Keep-alive connections to one server (urllib3's pool); thread-safe."""

    def __init__(self, base_url: str, headers: Mapping[str, str], *, timeout: float) -> None:
        parts = urlsplit(base_url)
        self._prefix = parts.path.rstrip("/")
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._headers = dict(headers)
        # As httpx verifies by default (certifi's certificates, SSL_CERT_FILE/SSL_CERT_DIR honoured).
        tls: dict[str, Any] = {"ssl_context": httpx.create_ssl_context()} if parts.scheme == "https" else {}
        self._pool = urllib3.connection_from_url(
            self._origin,
            maxsize=MAX_IDLE,
            block=False,
            retries=False,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            **tls,
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Send one request and read its whole answer; transport failures raise httpx's TransportError kinds."""
        target = self._prefix + path
        if params:
            target += "?" + urlencode(params)
        request_headers = {**self._headers, **(headers or {})}
        body: bytes | None = None
        if json_body is not None:
            body = json.dumps(json_body, separators=(",", ":")).encode()
            request_headers["Content-Type"] = "application/json"
        elif method in ("POST", "PUT", "PATCH"):
            request_headers["Content-Length"] = "0"
        try:
            answer = self._pool.urlopen(
                method, target, body=body, headers=request_headers, retries=False, redirect=False
            )
        except HTTPError as exc:
            raise _transport_error(exc, method, self._origin + target) from exc
        return httpx.Response(answer.status, headers=list(answer.headers.items()), content=answer.data)

    def close(self) -> None:
        """Close the pool's connections."""
        self._pool.close()


def _transport_error(exc: HTTPError, method: str, url: str) -> httpx.TransportError:
    """httpx's error for what went wrong on the wire: a time-out, a refused or dropped connection, a bad answer."""
    request = httpx.Request(method, url)
    if isinstance(exc, NewConnectionError):  # before its base class, ConnectTimeoutError
        return httpx.ConnectError(str(exc), request=request)
    if isinstance(exc, ConnectTimeoutError):
        return httpx.ConnectTimeout(str(exc), request=request)
    if isinstance(exc, ReadTimeoutError):
        return httpx.ReadTimeout(f"no answer within the time-out ({exc})", request=request)
    if isinstance(exc, ProtocolError):
        # Reset, closed before the answer, a malformed answer: the request may or may not have been applied,
        # which the idempotency key makes safe to retry.
        return httpx.RemoteProtocolError(str(exc), request=request)
    return httpx.TransportError(f"{type(exc).__name__}: {exc}", request=request)
