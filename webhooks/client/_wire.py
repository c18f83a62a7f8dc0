"""The sync client's own HTTP/1.1 connections: keep-alive over the standard library's ``http.client``.

A metered AI call makes two requests to the usage API (its hold, its capture), each a few hundred bytes to a
server that answers in about a millisecond, so what the client spends per request is a large part of what the
wrapper adds to the call. Measured on one caller (scripts/bench_client.py), ``httpx.Client`` spends ~3x the CPU
of ``http.client`` on the same request (URL merging, request and response models, the h11 state machine, the
connection pool's bookkeeping). ``Billing`` sends its requests here when it owns its connections; a caller's own
``httpx.Client`` (``Billing(..., http=...)``), a proxy configured in the environment, or a URL other than
``http(s)://`` keep httpx. Answers are handed back as ``httpx.Response`` and failures as httpx's transport errors,
so parsing, errors and the retry policy (same idempotency key on every attempt) are the same on both paths.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import ssl
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

# Idle connections kept for reuse (as the httpx client's max_keepalive_connections).
MAX_IDLE = 100
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


def suits(base_url: str) -> bool:
    """Whether requests to ``base_url`` can go over plain ``http.client`` with the same effect as httpx's: an
    http(s) URL and no proxy in the environment (httpx honours ``HTTP(S)_PROXY``/``ALL_PROXY``; these do not)."""
    if urlsplit(base_url).scheme not in ("http", "https"):
        return False
    return not any(os.environ.get(name) or os.environ.get(name.upper()) for name in _PROXY_VARIABLES)


class Wire:
    """A pool of keep-alive connections to one server; thread-safe (a connection serves one request at a time)."""

    def __init__(self, base_url: str, headers: Mapping[str, str], *, timeout: float) -> None:
        parts = urlsplit(base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._headers = dict(headers)
        self._timeout = timeout
        # As httpx verifies by default (certifi's certificates, SSL_CERT_FILE/SSL_CERT_DIR honoured).
        self._context: ssl.SSLContext | None = httpx.create_ssl_context() if self._https else None
        self._idle: list[_Connection | _TLSConnection] = []
        self._lock = threading.Lock()
        self._closed = False

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
        connection = self._checkout()
        try:
            connection.hold_head = body is not None
            connection.request(method, target, body=body, headers=request_headers)
            answer = connection.getresponse()
            content = answer.read()
        except BaseException as exc:
            connection.close()
            raise _transport_error(exc, method, self._origin + target) from exc
        if answer.will_close:
            connection.close()
        else:
            self._checkin(connection)
        return httpx.Response(answer.status, headers=answer.getheaders(), content=content)

    def _checkout(self) -> _Connection | _TLSConnection:
        with self._lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            while self._idle:
                connection = self._idle.pop()
                if _usable(connection):
                    return connection
                connection.close()
        if self._context is not None:
            return _TLSConnection(self._host, self._port, timeout=self._timeout, context=self._context)
        return _Connection(self._host, self._port, timeout=self._timeout)

    def _checkin(self, connection: _Connection | _TLSConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        """Close the idle connections (those in use close when their request ends)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class _OneWrite:
    """Sends a request's head and body in one write: ``http.client`` writes them apart, so the server reads (and
    its event loop wakes for) the head, then the body; one segment is one wake-up, and never a Nagle delay."""

    hold_head = False
    _head: bytes | None = None

    def send(self, data: Any) -> None:
        if self.hold_head:
            self.hold_head = False
            self._head = bytes(data)
            return
        if self._head is not None:
            data, self._head = self._head + bytes(data), None
        super().send(data)  # type: ignore[misc]


class _Connection(_OneWrite, http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _TLSConnection(_OneWrite, http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _usable(connection: http.client.HTTPConnection) -> bool:
    """Whether an idle kept-alive connection is still open: the server has sent nothing since (a readable socket
    means it closed the connection, or sent what no request asked for); as httpcore checks before reuse."""
    sock = connection.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _transport_error(exc: BaseException, method: str, url: str) -> BaseException:
    """httpx's error for what went wrong on the wire (a timeout, a refused or dropped connection, a bad answer);
    anything else (an interrupt) as it is."""
    request = httpx.Request(method, url)
    if isinstance(exc, TimeoutError):
        return httpx.ReadTimeout(f"no answer within the time-out ({exc})", request=request)
    if isinstance(exc, ConnectionRefusedError | socket.gaierror):
        return httpx.ConnectError(str(exc), request=request)
    if isinstance(exc, http.client.HTTPException | OSError):
        # Reset, broken pipe, closed before the answer, a malformed answer: the request may or may not have been
        # applied, which the idempotency key makes safe to retry.
        return httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}", request=request)
    return exc
