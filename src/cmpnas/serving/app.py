"""HTTP search service over a gallery index and one or more compatible query models: its entry points.

The service is split by job: :mod:`~cmpnas.serving.uploads` (upload size, format and pixel guards),
:mod:`~cmpnas.serving.validation` (the rules for ``k`` and ``model``), :mod:`~cmpnas.serving.state` (the
loaded index and models, answering a search, the index hot swap), :mod:`~cmpnas.serving.stats` (counters shared
between worker processes), :mod:`~cmpnas.serving.raw_search` (the raw-bytes fast path),
:mod:`~cmpnas.serving.routes` (the FastAPI app) and :mod:`~cmpnas.serving.launch` (starting the processes).
Callers import the entry points from here.
"""

from __future__ import annotations

from cmpnas.serving.launch import app_from_env, run_server
from cmpnas.serving.raw_search import RawSearch
from cmpnas.serving.routes import create_app

__all__ = ["RawSearch", "app_from_env", "create_app", "run_server"]
