"""Celery app and tasks that turn stored Stripe events into ledger effects, exactly once in effect.

- Stripe is reached through ``reconciliation.gateway`` (below both packages).
- ``celery_app``: the app from settings (Redis, or the embedded SQLite queue / eager mode) and the beat schedule;
- ``enqueue.hand_over``: the receiver's door (ids only, one message per batch);
- ``tasks``: thin glue that calls ``processing`` (events), ``sweep``, the ledger's expiry jobs, reconciliation;
- ``processing``: claim, dispatch to ``handlers`` (one small function per event type), status, waits, retries;
- ``payments`` / ``ordering`` / ``models``: which grant a payment funded, refunds counted, per-object versions;
- ``backfill``: the Events API into the inbox;
- ``commands``: ``billing-reconciler worker`` and ``events list|show|replay|backfill``.
"""
