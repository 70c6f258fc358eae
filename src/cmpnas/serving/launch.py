"""Starting the server: one uvicorn process, or several worker processes on one port.

The Python HTTP stack holds the GIL for most of a request, so one process uses about one core whatever its
thread count; ``workers > 1`` runs that many processes, each with its own copy of the models and the index,
configured through the environment. Each worker accepts from its own ``SO_REUSEPORT`` socket on the port and
the kernel spreads the connections over them (:mod:`cmpnas.serving.reuseport`).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from cmpnas.errors import CmpnasError
from cmpnas.serving.reuseport import serve_reuseport
from cmpnas.serving.routes import create_app

SERVE_CONFIG_ENV = "CMPNAS_SERVE_CONFIG"


def app_from_env() -> FastAPI:
    """App factory for uvicorn's worker processes: ``create_app`` with the JSON arguments in the env."""
    kwargs = json.loads(os.environ[SERVE_CONFIG_ENV])
    return create_app(kwargs.pop("index_dir"), *kwargs.pop("query_models"), **kwargs)


def run_server(
    index_dir: str | Path,
    *query_models: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    workers: int = 1,
    **limits: Any,
) -> None:
    """Build the app (fails fast on a bad index/model pair) and serve it with uvicorn.

    With ``workers > 1`` the app is built once here as the check, then each worker builds its own. The
    workers share their counters through files in a temporary folder, so ``/stats`` reports all of them
    whichever worker answers; a store only one process may open is served to them from this one.
    """
    import uvicorn

    if workers < 1:
        raise CmpnasError(f"workers must be >= 1, got {workers}.", "pass --workers 1 or more")
    if workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        raise CmpnasError("SO_REUSEPORT is not available on this platform.", "pass --workers 1")
    if workers == 1:
        app = create_app(index_dir, *query_models, **limits)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
        return
    app = create_app(index_dir, *query_models, **{**limits, "watch_index_s": 0})  # the check; workers watch
    shared_uri = app.state.service.index.store.shared_uri()
    del app  # checked; each worker loads its own copy

    # SIGTERM / Ctrl-C end serve_reuseport normally, so the counters' folder goes with the server
    with tempfile.TemporaryDirectory(prefix="cmpnas-serve-stats-") as stats_dir:
        config: dict[str, Any] = {
            "index_dir": str(index_dir),
            "query_models": [str(p) for p in query_models],
            "stats_dir": stats_dir,
        }
        if shared_uri is not None:
            config["milvus_uri"] = shared_uri
        serve_reuseport(
            "cmpnas.serving.launch:app_from_env",
            {SERVE_CONFIG_ENV: json.dumps({**config, **limits})},
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
        )
