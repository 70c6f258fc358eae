"""Serving fixtures (defined once in tests/fixtures_serving.py)."""

from fixtures_serving import *  # noqa: F403
