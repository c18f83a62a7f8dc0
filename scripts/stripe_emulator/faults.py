"""Programmable failures: the next N requests fail, requests are slow, or a share of them fail at random."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass


@dataclass
class Fault:
    """What to do to one request instead of (or before) answering it."""

    status: int | None = None  # an error status to answer with; None: answer normally
    delay_ms: int = 0
    disconnect: bool = False  # close the connection without an answer (a network error for the client)


@dataclass
class _Rule:
    remaining: int
    status: int | None
    delay_ms: int
    disconnect: bool
    path_prefix: str | None
    method: str | None

    def matches(self, method: str, path: str) -> bool:
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        return self.method is None or self.method.upper() == method.upper()


class Faults:
    """Fault plan shared by the server's threads. Emulator control paths (``/_emulator``) are never faulted."""

    def __init__(self, seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._rng = random.Random(seed)
        self.slow_ms = 0
        self.failure_rate = 0.0
        self.failure_status = 500
        self.injected = 0

    def fail_next(
        self,
        n: int = 1,
        *,
        status: int = 429,
        path_prefix: str | None = None,
        method: str | None = None,
        delay_ms: int = 0,
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` (429, 500, 503, ...)."""
        with self._lock:
            self._rules.append(_Rule(n, status, delay_ms, False, path_prefix, method))

    def disconnect_next(self, n: int = 1, *, path_prefix: str | None = None, method: str | None = None) -> None:
        """Drop the connection on the next ``n`` matching requests without answering."""
        with self._lock:
            self._rules.append(_Rule(n, None, 0, True, path_prefix, method))

    def slow_next(
        self, n: int = 1, *, delay_ms: int, path_prefix: str | None = None, method: str | None = None
    ) -> None:
        """Delay the next ``n`` matching requests by ``delay_ms``, then answer normally."""
        with self._lock:
            self._rules.append(_Rule(n, None, delay_ms, False, path_prefix, method))

    def set_random_failures(self, rate: float, *, status: int = 500, seed: int | None = None) -> None:
        """Fail a share ``rate`` (0.0..1.0) of requests with ``status``."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be between 0.0 and 1.0")
        with self._lock:
            self.failure_rate = rate
            self.failure_status = status
            if seed is not None:
                self._rng = random.Random(seed)

    def clear(self) -> None:
        """Remove every planned fault, the slowness and the random failure rate."""
        with self._lock:
            self._rules.clear()
            self.slow_ms = 0
            self.failure_rate = 0.0

    @property
    def pending(self) -> int:
        """Planned faults not used yet."""
        with self._lock:
            return sum(rule.remaining for rule in self._rules)

    def take(self, method: str, path: str) -> Fault:
        """Decide the fault for one request (consuming a planned one if it matches)."""
        with self._lock:
            fault = Fault(delay_ms=self.slow_ms)
            for rule in self._rules:
                if rule.remaining > 0 and rule.matches(method, path):
                    rule.remaining -= 1
                    fault = Fault(rule.status, fault.delay_ms + rule.delay_ms, rule.disconnect)
                    break
            self._rules = [rule for rule in self._rules if rule.remaining > 0]
            random_failure = fault.status is None and not fault.disconnect and self.failure_rate > 0
            if random_failure and self._rng.random() < self.failure_rate:
                fault.status = self.failure_status
            if fault.status is not None or fault.disconnect:
                self.injected += 1
            return fault
