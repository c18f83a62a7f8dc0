"""The review pages' sub-application, mounted at /review by the main app."""

from __future__ import annotations

from starlette.applications import Starlette


def create_review_app() -> Starlette:
    """Build the review sub-application."""
    return Starlette(routes=[])
