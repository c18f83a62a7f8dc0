"""Hand stored events to the worker. The receiver calls this after the events' rows have committed."""

from __future__ import annotations

from collections.abc import Sequence

from worker.celery_app import configure

# The most ids in one message: larger hand-overs are split.
MAX_IDS_PER_MESSAGE = 500


def hand_over(event_row_ids: Sequence[int]) -> None:
    """Send stored events (by ``stripe_events.id``) to the worker; raise if the broker cannot take them.

    One broker message per call (per 500 ids), carrying ids only: the worker reads the payloads from the inbox.
    With ``CELERY_TASK_ALWAYS_EAGER`` the events are processed here, in-process.
    """
    ids = [int(i) for i in event_row_ids]
    if not ids:
        return
    configure()
    from worker.tasks import process_events

    for start in range(0, len(ids), MAX_IDS_PER_MESSAGE):
        process_events.apply_async(args=[ids[start : start + MAX_IDS_PER_MESSAGE]])
