"""Hand stored events to the worker. The receiver calls this after the events' rows have committed."""

from __future__ import annotations

from collections.abc import Sequence


def hand_over(event_row_ids: Sequence[int]) -> None:
    """Send stored events (by ``stripe_events.id``) to the worker; raise if the broker cannot take them."""
    raise NotImplementedError("worker hand-over is not built yet")
