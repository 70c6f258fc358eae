"""The index/query/export/serve commands, registered on a local Typer app as cli/app.py registers them."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from cmpnas.cli import deploy, index
from cmpnas.errors import CmpnasError


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    app = typer.Typer()
    for group in (index, deploy):
        group.register(app)
    return app


def run(cli: typer.Typer, *args: Any) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_registers_five_commands_with_help(cli: typer.Typer) -> None:
    for name in ("index", "query", "evaluate-index", "export", "serve"):
        r = run(cli, name, "--help")
        assert r.exit_code == 0, r.output
    assert "--allow-incompatible" in run(cli, "query", "--help").output
    assert "--ef-search" in run(cli, "index", "--help").output
    assert "--backend" in run(cli, "index", "--help").output


def test_evaluate_index_command(cli: typer.Typer, flat_index: Path, gallery_dir: Path, models: Any) -> None:
    r = run(cli, "evaluate-index", "--index", flat_index, "--query-model", models.query, "--images", gallery_dir,
            "-k", 5)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "36 queries against faiss index" in r.output and "(heterogeneous)" in r.output and "top5" in r.output
    r = run(cli, "evaluate-index", "--index", flat_index, "--query-model", models.query)
    assert isinstance(r.exception, CmpnasError) and "exactly one query source" in str(r.exception)
    r = run(cli, "index", "--gallery-model", models.gallery, "--images", gallery_dir, "--out", "x", "--uri", "a.db")
    assert isinstance(r.exception, CmpnasError) and "--uri and --collection are Milvus" in str(r.exception)


def test_index_then_query_json_and_table(
    cli: typer.Typer, tmp_path: Path, gallery_dir: Path, models: Any, pattern: Any
) -> None:
    out = tmp_path / "idx"
    r = run(
        cli,
        "index",
        "--gallery-model",
        models.gallery,
        "--images",
        gallery_dir,
        "--out",
        out,
        "--index",
        "hnsw",
    )
    assert r.exit_code == 0, r.output
    assert "36 items (hnsw" in r.output and "skipped 1 unreadable" in r.output
    pattern("checks", 104).save(tmp_path / "q.png")  # = gallery item checks/004.png
    r = run(
        cli, "query", "--index", out, "--query-model", models.gallery, "-k", "3", "--json", tmp_path / "q.png"
    )
    assert r.exit_code == 0, r.output
    body = json.loads(r.output)
    assert body["mode"] == "homogeneous"
    assert body["queries"][0]["results"][0]["id"] == "checks/004.png"
    r = run(
        cli, "query", "--index", out, "--query-model", models.query, tmp_path / "q.png", tmp_path / "q.png"
    )
    assert (
        r.exit_code == 0 and r.output.count("mode heterogeneous") == 2 and r.output.count("\n") == 2 + 2 * 10
    )


def test_incompatible_query_refused_then_overridden(
    cli: typer.Typer, flat_index: Path, models: Any, tmp_path: Path, pattern: Any
) -> None:
    pattern("blobs", 1).save(tmp_path / "q.png")
    r = run(cli, "query", "--index", flat_index, "--query-model", models.stranger, tmp_path / "q.png")
    assert r.exit_code != 0 and isinstance(r.exception, CmpnasError)  # the main CLI turns it into exit 2
    assert models.gallery_fp in str(r.exception) and models.stranger_fp in str(r.exception)
    r = run(
        cli,
        "query",
        "--index",
        flat_index,
        "--query-model",
        models.stranger,
        "--allow-incompatible",
        "--json",
        tmp_path / "q.png",
    )
    assert r.exit_code == 0 and json.loads(r.stdout)["mode"] == "incompatible-override"


def test_index_needs_exactly_one_source(
    cli: typer.Typer, tmp_path: Path, gallery_dir: Path, models: Any
) -> None:
    r = run(cli, "index", "--gallery-model", models.gallery, "--out", tmp_path / "i")
    assert isinstance(r.exception, CmpnasError) and "exactly one" in str(r.exception)
    r = run(
        cli,
        "index",
        "--gallery-model",
        models.gallery,
        "--out",
        tmp_path / "i",
        "--images",
        gallery_dir,
        "--dataset",
        "fashion_mnist",
    )
    assert isinstance(r.exception, CmpnasError)
    assert not (tmp_path / "i").exists()


def test_index_dataset_append(cli: typer.Typer, tmp_path: Path, tiny_idx_dir: Path, models: Any) -> None:
    out = tmp_path / "idx"
    base = [
        "--gallery-model",
        models.gallery,
        "--dataset",
        "fashion_mnist",
        "--dataset-root",
        tiny_idx_dir,
        "--out",
        out,
    ]
    assert run(cli, "index", *base, "--limit", "10").exit_code == 0
    r = run(cli, "index", *base, "--append")
    assert r.exit_code == 0, r.output
    assert "30 items" in r.output and "added 20" in r.output and "10 duplicate ids" in r.output
    r = run(cli, "index", *base, "--append", "--index", "ivf")
    assert isinstance(r.exception, CmpnasError) and "--append" in str(r.exception)


def test_export_command(cli: typer.Typer, tmp_path: Path, models: Any) -> None:
    r = run(
        cli,
        "export",
        "--model",
        models.query,
        "--out",
        tmp_path / "q.onnx",
        "--exporter",
        "legacy",
        "--latency-runs",
        "2",
    )
    assert r.exit_code == 0, r.output
    assert "parity max abs diff" in r.output and "batch_32 (ms)" in r.output
    assert (tmp_path / "q.onnx").is_file() and (tmp_path / "export.json").is_file()


def test_serve_passes_limits_to_the_server(
    cli: typer.Typer, monkeypatch: pytest.MonkeyPatch, flat_index: Path, models: Any
) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(deploy, "run_server", lambda *a, **kw: seen.update(args=a, **kw))
    r = run(
        cli,
        "serve",
        "--index",
        flat_index,
        "--query-model",
        models.query,
        "--port",
        "8123",
        "--max-k",
        "7",
        "--max-upload-mb",
        "0.5",
    )
    assert r.exit_code == 0, r.output
    assert seen["args"] == (flat_index, models.query) and seen["port"] == 8123 and seen["max_k"] == 7
    assert seen["max_upload_bytes"] == 512 * 1024 and seen["host"] == "127.0.0.1"
    assert seen["threads"] == 1  # the serving default: one query at a time
    assert seen["workers"] == 1
    assert seen["dual_query"] == []


def test_serve_passes_every_query_model_to_the_server(
    cli: typer.Typer, monkeypatch: pytest.MonkeyPatch, flat_index: Path, models: Any, small_query: Path
) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(deploy, "run_server", lambda *a, **kw: seen.update(args=a, **kw))
    r = run(cli, "serve", "--index", flat_index, "--query-model", models.query, "--query-model", small_query)
    assert r.exit_code == 0, r.output
    assert seen["args"] == (flat_index, models.query, small_query)
    assert f"with query ({models.query}), small ({small_query}) on" in r.output
    r = run(cli, "serve", "--index", flat_index, "--query-model", models.query, "--query-model", models.query)
    assert isinstance(r.exception, CmpnasError) and "both named 'query'" in str(r.exception)


def cmpnas_command() -> list[str]:
    """The installed console script (or ``python -m cmpnas.cli``), as a user runs it."""
    script = Path(sys.executable).parent / "cmpnas"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cmpnas.cli"]


@contextlib.contextmanager
def serving(*args: Any) -> Iterator[str]:
    """``cmpnas serve ARGS --port P`` in a subprocess; yields its URL once every worker is up, stops it after.

    Up = /stats lists it (each worker lists itself once its app is built): a connection the kernel gives to a
    worker still loading would wait in its queue longer than a client's timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    workers = int(args[args.index("--workers") + 1]) if "--workers" in args else 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*cmpnas_command(), "serve", *map(str, args), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300  # start-up wait (two processes load torch), not a speed check
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if (
                    httpx.get(f"{url}/healthz", timeout=2).status_code == 200
                    and len(httpx.get(f"{url}/stats", timeout=2).json()["workers"]) >= workers
                ):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_with_two_worker_processes(
    tmp_path: Path, flat_index: Path, onnx_query: Path, pattern: Any
) -> None:
    """The real console command with --workers 2 answers searches, every worker some of them, and /stats and
    /metrics add up both workers whichever answers."""
    with serving("--index", flat_index, "--query-model", onnx_query, "--workers", 2) as url:
        buf = io.BytesIO()
        pattern("stripes", 3).save(buf, format="PNG")
        answers = set()

        def search() -> None:  # a new connection each time: the kernel hashes it to either worker
            r = httpx.post(f"{url}/search", params={"k": 4}, files={"file": ("q.png", buf.getvalue())})
            assert r.status_code == 200, r.text
            answers.add(tuple(h["id"] for h in r.json()["results"]))

        sent = 0
        for _ in range(6):
            search()
            sent += 1
        stats = counted(url, sent)
        # six connections all land on one worker once in 32 times: more until both have answered
        while sent < 60 and sum(w["queries"] > 0 for w in stats["workers"]) < 2:
            search()
            sent += 1
            stats = counted(url, sent)
        assert len(answers) == 1 and len(next(iter(answers))) == 4
        # whichever worker answers /stats counts every worker's searches (shared through their metrics files)
        assert stats["queries"] == sent and stats["latency_ms"]["window"] == sent, stats["workers"]
        per_worker = [w["queries"] for w in stats["workers"]]
        assert len(per_worker) == 2 and min(per_worker) >= 1 and sum(per_worker) == sent, stats["workers"]
        for _ in range(4):  # and keeps doing so, whichever worker answers
            assert httpx.get(f"{url}/stats").json()["queries"] == sent
        for _ in range(2):  # /metrics adds up both workers' files too, whichever worker answers
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
                for s in family.samples
            }
            where = (("endpoint", "/search"), ("model", "query"))
            assert samples["cmpnas_search_requests_total", (*where, ("outcome", "answered"))] == sent
            assert samples["cmpnas_search_latency_seconds_count", where] == sent
            per_worker = [v for (name, _), v in samples.items() if name == "cmpnas_worker_searches"]
            assert len(per_worker) == 2 and min(per_worker) >= 1 and sum(per_worker) == sent


def counted(url: str, queries: int) -> dict[str, Any]:
    """/stats once it counts ``queries`` searches (or after 10 s)."""
    for _ in range(100):
        stats = httpx.get(f"{url}/stats").json()
        if stats["queries"] == queries:
            break
        time.sleep(0.1)
    return stats


def test_serve_two_query_models_with_two_workers(
    flat_index: Path, onnx_query: Path, small_query: Path, pattern: Any
) -> None:
    """``--query-model A --query-model B`` on the real command, two worker processes: each model answers by
    name (the default is the first), an unknown name is a 422, and /stats counts each model over both
    workers."""
    buf = io.BytesIO()
    pattern("checks", 2).save(buf, format="PNG")
    png = {"Content-Type": "image/png"}
    args = ["--index", flat_index, "--query-model", onnx_query, "--query-model", small_query, "--workers", 2]
    with serving(*args) as url:
        assert httpx.get(f"{url}/healthz").json()["models"] == ["query", "small"]
        answers: dict[str | None, set] = {}
        for model in (None, "query", "query", "small", "small"):  # 3 searches by 'query', 2 by 'small'
            params = {"k": 5} if model is None else {"k": 5, "model": model}
            r = httpx.post(f"{url}/search", params=params, content=buf.getvalue(), headers=png)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == (model or "query")
            answers.setdefault(model or "query", set()).add(tuple(h["id"] for h in r.json()["results"]))
        assert len(answers["query"]) == len(answers["small"]) == 1 and answers["query"] != answers["small"]
        r = httpx.post(f"{url}/search", params={"model": "big"}, files={"file": ("q.png", buf.getvalue())})
        assert r.status_code == 422 and "available: query, small" in r.json()["detail"]
        for _ in range(100):  # shared through the workers' metrics files, whichever worker answers
            stats = httpx.get(f"{url}/stats").json()
            if stats["queries"] == 5 and stats["rejected"] == 1:
                break
            time.sleep(0.1)
        models = stats["models"]
        assert (stats["queries"], models["query"]["queries"], models["small"]["queries"]) == (5, 3, 2), models
        assert models["query"]["kind"] == "onnx" and models["small"]["kind"] == "torch"
        assert models["small"]["latency_ms"]["window"] == 2 and len(stats["workers"]) == 2


def test_serve_refuses_two_models_with_one_name(tmp_path: Path, flat_index: Path, models: Any) -> None:
    """Two files named query.*: exit code 2 and one line naming the clash and the fix, before loading."""
    other = tmp_path / "query.safetensors"
    other.write_bytes(models.query.read_bytes())
    cmd = [*cmpnas_command(), "serve", "--index", str(flat_index), "--query-model", str(models.query)]
    r = subprocess.run([*cmd, "--query-model", str(other)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "both named 'query'" in r.stderr and "Fix: rename one file" in r.stderr


def test_serve_refuses_a_dual_query_pair_it_does_not_serve(flat_index: Path, models: Any) -> None:
    """--dual-query names two served models: anything else is exit code 2 and one line, before serving."""
    cmd = [*cmpnas_command(), "serve", "--index", str(flat_index), "--query-model", str(models.query)]
    r = subprocess.run([*cmd, "--dual-query", "query~old"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "--dual-query 'query~old'" in r.stderr and "Fix:" in r.stderr


def test_serve_ort_web_dir_is_checked_then_handed_to_the_workers(
    cli: typer.Typer, monkeypatch: pytest.MonkeyPatch, flat_index: Path, models: Any, tmp_path: Path
) -> None:
    from cmpnas.serving.browser import ORT_DIR_ENV, ORT_FILES

    monkeypatch.delenv(ORT_DIR_ENV, raising=False)
    monkeypatch.setattr(deploy, "run_server", lambda *a, **kw: None)
    empty = tmp_path / "dist"
    empty.mkdir()
    r = run(cli, "serve", "--index", flat_index, "--query-model", models.query, "--ort-web-dir", empty)
    assert r.exit_code != 0 and "lacks ort.wasm.min.mjs" in str(r.exception or r.output)
    for name in ORT_FILES:
        (empty / name).write_bytes(b"")
    r = run(cli, "serve", "--index", flat_index, "--query-model", models.query, "--ort-web-dir", empty)
    assert r.exit_code == 0, r.output
    assert os.environ[ORT_DIR_ENV] == str(empty.resolve())  # worker processes inherit it
    monkeypatch.delenv(ORT_DIR_ENV)


def test_serve_with_a_bad_ort_web_dir_exits_2_with_one_line(tmp_path: Path, flat_index: Path, models: Any) -> None:
    cmd = [*cmpnas_command(), "serve", "--index", str(flat_index), "--query-model", str(models.query)]
    r = subprocess.run([*cmd, "--ort-web-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "lacks ort.wasm.min.mjs" in r.stderr and "Fix:" in r.stderr
