"""Review pages: mismatches, reconciliation runs and customers, for finance and support staff.

Served under ``/review`` by the main app (``webhooks.app.create_app``), server-rendered with Jinja2, and usable
with JavaScript off. Set up:

* ``REVIEW_USERS``: comma-separated ``name:hash`` pairs; make a pair with
  ``python -m webhooks.review hash-password NAME`` (scrypt, stdlib; the password is prompted for, never echoed).
* ``SECRET_KEY``: signs the session cookie (12 hours) and so its CSRF token; rotating it signs everyone out.

Every page needs a session (without one: a redirect to the login form, no data); every form carries the
session's CSRF token; resolve/ignore/reopen need a note and record the signed-in name in the audit trail.
"""
