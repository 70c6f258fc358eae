"""A gallery-model upgrade end to end with the real commands, on the smoke profile shrunk to a folder of
generated images: train v1 and a query model -> upgrade-gallery (BCT) and the control (--independent) -> index
with v1 -> append with v2 -> backfill, killed once and resumed -> train-transformation + transform-index ->
evaluate-upgrade -> serve while the index is appended to and backfilled under a client's load."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cmpnas.serving.backfill import work_dir
from cmpnas.serving.index import GalleryIndex

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
FAULT = REPO / "tests" / "fault_injection.py"
GALLERY = "{backbone: resnet_small, embed_dim: 16, backbone_kwargs: {widths: [8, 16], depths: [1, 1], strides: [1, 2]}}"
QUERY = "{backbone: resnet_small, embed_dim: 16, backbone_kwargs: {widths: [4, 8], depths: [1, 1], strides: [2, 2]}}"
TRAIN = "{epochs: 3, batch_size: 16, warmup_epochs: 0.1, log_every: 5, threads: 1}"
KINDS = ("stripes", "checks", "blobs")


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def cmpnas(*args: Any, fault: str | None = None, expect: int = 0) -> subprocess.CompletedProcess:
    pre = [str(FAULT), "--kill-before-replace", fault, "--"] if fault else ["-m", "cmpnas.cli"]
    proc = subprocess.run(
        [sys.executable, *pre, *map(str, args)], capture_output=True, text=True, env=env(), timeout=600
    )
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def configured(root: Path) -> list[str]:
    sets = [
        f"data={{name: folder, root: '{root}', image_size: 28, val_size: 9}}",
        f"gallery={GALLERY}", f"gallery_train={TRAIN}", f"query={QUERY}", f"query_train={TRAIN}",
        "compat={mode: bct}", "eval_batch_size=64",
    ]  # fmt: skip
    return ["-c", str(SMOKE), *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def upgrade(tmp_path_factory: pytest.TempPathFactory, pattern: Any) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("upgrade")
    for c, kind in enumerate(KINDS):
        (d / "images" / kind).mkdir(parents=True)
        for i in range(20):
            pattern(kind, 100 * c + i).save(d / "images" / kind / f"{i:03d}.png")
    (d / "extra" / "checks").mkdir(parents=True)
    for i in range(3):
        pattern("checks", 900 + i).save(d / "extra" / "checks" / f"new{i}.png")
    cfg = configured(d / "images")
    cmpnas("train-gallery", *cfg, "-o", d / "v1", "-q")
    cmpnas("train-query", *cfg, "-g", d / "v1/model.safetensors", "-o", d / "small", "-q")
    v2 = [*cfg, "--set", "gallery_train.epochs=4", "--old", d / "v1/model.safetensors"]  # v2: a longer schedule
    cmpnas("upgrade-gallery", *v2, "-o", d / "v2", "-q")
    cmpnas("upgrade-gallery", *v2, "--independent", "-o", d / "v2i", "-q")  # the control: the same, no compat
    cmpnas("index", "--gallery-model", d / "v1/model.safetensors", "--images", d / "images", "--out", d / "idx", "-q")
    for copy in ("ref", "fct", "served"):
        shutil.copytree(d / "idx", d / f"idx-{copy}")
    return {"dir": d, "cfg": cfg, **{k: d / k / "model.safetensors" for k in ("v1", "small", "v2", "v2i")}}


def spec_of(path: Path) -> dict:
    from cmpnas.models.embedding import load_model

    return load_model(path).spec.__dict__


def fingerprint_of(path: Path) -> str:
    from cmpnas.serving.encoder import load_encoder

    return load_encoder(path).fingerprint


def test_upgrade_records_the_lineage_and_the_control_does_not(upgrade: dict) -> None:
    v1 = fingerprint_of(upgrade["v1"])
    assert spec_of(upgrade["v2"])["compatible_with"] == v1
    assert spec_of(upgrade["v2i"])["compatible_with"] is None
    assert len({fingerprint_of(upgrade[k]) for k in ("v1", "v2", "v2i")}) == 3
    manifest = json.loads((upgrade["v2"].parent / "manifest.json").read_text())
    assert manifest["stage"] == "upgrade-gallery" and manifest["inputs"]["compat"]["mode"] == "bct"


def test_append_then_backfill_killed_and_resumed_equals_an_uninterrupted_one(upgrade: dict) -> None:
    d, v2 = upgrade["dir"], upgrade["v2"]
    for idx in ("idx", "idx-ref"):
        cmpnas("index", "--append", "--gallery-model", v2, "--images", d / "extra", "--out", d / idx, "-q")
    # the control model was not trained compatible: it may not write into the index
    refused = cmpnas("index", "--append", "--gallery-model", upgrade["v2i"], "--images", d / "extra",
                     "--out", d / "idx", expect=2)  # fmt: skip
    assert refused.stderr.count("\n") == 1 and "cannot write into" in refused.stderr
    args = ["backfill", "--index", d / "idx", "--gallery-model", v2, "--fraction", "0.5", "--chunk-size", "8"]
    before = (d / "idx" / "manifest.json").read_text()
    cmpnas(*args, "-q", fault="*:3", expect=-9)  # killed before its third rename: the plan and one chunk saved
    assert (d / "idx" / "manifest.json").read_text() == before  # the index itself is untouched
    saved = sorted(p.name for p in work_dir(d / "idx").iterdir() if not p.name.startswith("."))
    assert saved == ["chunk00000.npz", "plan.json"]  # (plus the killed write's temp file, never read)
    resumed = cmpnas(*args, "--json-logs")
    assert any('"event": "resume"' in line for line in resumed.stdout.splitlines())
    cmpnas("backfill", "--index", d / "idx-ref", "--gallery-model", v2, "--fraction", "0.5", "-q")
    a, b = GalleryIndex.load(d / "idx"), GalleryIndex.load(d / "idx-ref")
    assert (d / "idx" / "items.csv").read_text() == (d / "idx-ref" / "items.csv").read_text()
    ids = [it.id for it in a.items]
    np.testing.assert_allclose(a.store.vectors(ids), b.store.vectors(ids), atol=1e-6)
    v1, new = fingerprint_of(upgrade["v1"]), fingerprint_of(v2)
    assert a.lineage == [new, v1] and a.model_counts() == {new: 32, v1: 31}  # round(0.5 * 63) by v2
    bad = cmpnas("backfill", "--index", d / "idx", "--gallery-model", v2, "--fraction", "1.5", expect=2)
    assert bad.stderr.startswith("cmpnas: error:") and bad.stderr.count("\n") == 1


def test_transform_index_then_only_the_new_space_fits(upgrade: dict) -> None:
    d = upgrade["dir"]
    cmpnas("train-transformation", *upgrade["cfg"], "--old", upgrade["v1"], "--new", upgrade["v2i"],
           "--epochs", "5", "-o", d / "fct", "-q")  # fmt: skip
    t = d / "fct" / "transformation.safetensors"
    cmpnas("transform-index", "--index", d / "idx-fct", "--transformation", t, "--gallery-model", upgrade["v2i"], "-q")
    image = d / "images" / "checks" / "000.png"
    q = cmpnas("query", image, "--index", d / "idx-fct", "--query-model", upgrade["v2i"], "--json")
    assert json.loads(q.stdout)["mode"] == "homogeneous"
    refused = cmpnas("query", image, "--index", d / "idx-fct", "--query-model", upgrade["small"], expect=2)
    assert "not comparable" in refused.stderr and refused.stderr.count("\n") == 1


def test_evaluate_upgrade_table_and_curve_agree(upgrade: dict) -> None:
    d = upgrade["dir"]
    if not (d / "fct" / "transformation.safetensors").exists():
        cmpnas("train-transformation", *upgrade["cfg"], "--old", upgrade["v1"], "--new", upgrade["v2i"],
               "--epochs", "5", "-o", d / "fct", "-q")  # fmt: skip
    cmpnas("evaluate-upgrade", *upgrade["cfg"], "--old", upgrade["v1"], "--new", upgrade["v2"], "--small",
           upgrade["small"], "--independent", upgrade["v2i"], "--transformation",
           d / "fct" / "transformation.safetensors", "-o", d / "eval", "-q")  # fmt: skip
    res = json.loads((d / "eval" / "results.json").read_text())
    table = {(r["query"], r["gallery"]): r for r in res["table"]}
    assert set(table) == {
        ("old", "old"), ("new", "new"), ("new", "old"), ("small", "old"), ("small", "new"),
        ("independent", "independent"), ("independent", "old"), ("independent", "fct(old)"),
    }  # fmt: skip
    assert res["split"] == "test" and set(res["bct_criterion"]) == {"new", "independent"}
    for order in ("uncertainty", "random"):  # the curve's ends are two rows of the table, computed another way
        curve = res["backfill_curve"][order]
        assert [p["fraction"] for p in curve] == [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
        assert curve[0]["top1"] == pytest.approx(table[("new", "old")]["top1"])
        assert curve[-1]["top1"] == pytest.approx(table[("new", "new")]["top1"])
        old_top1 = table[("old", "old")]["top1"]
        for p in curve:  # flips are counted on the same queries as top-1: their balance is the change in top-1
            assert p["positive_flips"] - p["negative_flips"] == pytest.approx(p["top1"] - old_top1)
        assert res["backfill_summary"][order]["min_top1"] == min(p["top1"] for p in curve)
    for order in ("uncertainty, dual query", "random, dual query"):  # the dual policy starts as the old system
        curve = res["backfill_curve"][order]
        assert curve[0]["top1"] == pytest.approx(table[("old", "old")]["top1"])
        assert curve[0]["negative_flips"] == curve[0]["positive_flips"] == 0.0
        assert curve[-1]["top1"] == pytest.approx(table[("new", "new")]["top1"])
    assert table[("old", "old")]["negative_flips"] == table[("old", "old")]["positive_flips"] == 0.0
    for r in res["table"]:
        assert r["positive_flips"] - r["negative_flips"] == pytest.approx(r["top1"] - old_top1)
    assert "BCT criterion" in (d / "eval" / "results.md").read_text()


def test_serve_swaps_the_index_under_load_without_a_failed_request(upgrade: dict, pattern: Any) -> None:
    d, served = upgrade["dir"], upgrade["dir"] / "idx-served"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cmpnas.cli", "serve", "--index", str(served), "--query-model", str(upgrade["small"]),
         "--port", str(port), "--watch-index", "0.2"],
        env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    statuses: list[int] = []
    modes: set[str] = set()
    stop = threading.Event()

    def client() -> None:
        import io

        buf = io.BytesIO()
        pattern("checks", 5).save(buf, format="PNG")
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                r = c.post(f"{url}/search", params={"k": 3}, content=buf.getvalue(), headers={"Content-Type": "image/png"})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    modes.add(r.json()["mode"])

    try:
        deadline = time.monotonic() + 300  # start-up wait, not a speed check
        while True:
            assert proc.poll() is None, "server exited"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        thread = threading.Thread(target=client)
        thread.start()
        cmpnas("index", "--append", "--gallery-model", upgrade["v2"], "--images", d / "extra", "--out", served, "-q")
        cmpnas("backfill", "--index", served, "--gallery-model", upgrade["v2"], "--fraction", "1.0", "-q")
        v2 = fingerprint_of(upgrade["v2"])
        for _ in range(200):  # the watcher checks every 0.2 s
            stats = httpx.get(f"{url}/stats").json()
            if stats["index"]["items_by_model"] == {v2: 63}:
                break
            time.sleep(0.1)
        time.sleep(0.5)
        stop.set()
        thread.join(timeout=60)
    finally:
        stop.set()
        proc.terminate()
        proc.wait(timeout=30)
    assert stats["index"]["items_by_model"] == {v2: 63} and stats["index"]["lineage"][0] == v2
    assert stats["index"]["swaps"] >= 1 and stats["index"]["count"] == 63
    assert len(statuses) > 10 and set(statuses) == {200}  # not one request failed across the swaps
    assert modes == {"heterogeneous", "lineage"}  # the small query model fits v1's index, then the v2 chain


def test_serve_dual_query_merges_both_generations_like_the_offline_policy(upgrade: dict, pattern: Any) -> None:
    """Half the index re-embedded by v2: /search?model=v2~v1 answers as the dual policy computed here from the
    stored vectors (v1's query on v1 rows, v2's on v2 rows, one cosine ranking); bad pairs are refused."""
    import io

    from fastapi.testclient import TestClient

    from cmpnas.compat.transition import dual_vectors
    from cmpnas.errors import CmpnasError
    from cmpnas.serving.app import create_app
    from cmpnas.serving.encoder import load_encoder

    d = upgrade["dir"]
    index_dir, named = d / "idx-dual", d / "named"
    shutil.copytree(d / "idx", index_dir)
    named.mkdir()
    for k in ("v1", "v2"):  # served models are named by their file stem
        shutil.copy(upgrade[k], named / f"{k}.safetensors")
    cmpnas("backfill", "--index", index_dir, "--gallery-model", upgrade["v2"], "--fraction", "0.5", "-q")
    v1, v2 = named / "v1.safetensors", named / "v2.safetensors"
    client = TestClient(create_app(index_dir, v2, v1, dual_query=["v2~v1"], watch_index_s=0))

    described = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert described["v2~v1"]["dual_query_with"] == "v1" and described["v2"]["dual_query_with"] is None
    assert described["v2~v1"]["onnx_url"] is None and "two models" in described["v2~v1"]["browser_problem"]
    index = GalleryIndex.load(index_dir)
    ids = [it.id for it in index.items]
    stored = torch_tensor(index.store.vectors(ids))
    backfilled = np.array([m == fingerprint_of(v2) for m in index.store.model_of(ids)])
    assert 0 < backfilled.sum() < len(ids)
    enc = {k: load_encoder(p) for k, p in (("v1", v1), ("v2", v2))}
    for kind, seed in (("checks", 7), ("blobs", 8), ("stripes", 9)):
        img = pattern(kind, seed)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        r = client.post("/search", params={"k": 5, "model": "v2~v1"}, content=buf.getvalue(),
                        headers={"Content-Type": "image/png"})  # fmt: skip
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        query, gallery = dual_vectors(
            torch_tensor(enc["v1"].embed_images([img])), torch_tensor(enc["v2"].embed_images([img])),
            stored, stored, backfilled,
        )  # fmt: skip
        scores = (query @ gallery.T)[0].numpy()  # the cosine in each row's own space
        best = np.argsort(-scores, kind="stable")[:5]
        assert [h["id"] for h in got] == [ids[i] for i in best]
        np.testing.assert_allclose([h["score"] for h in got], scores[best], atol=1e-5)
    for bad in (["v2~v3"], ["v2~v2"], ["v2"]):
        with pytest.raises(CmpnasError) as exc:
            create_app(index_dir, v2, v1, dual_query=bad, watch_index_s=0)
        assert "--dual-query" in exc.value.problem


def torch_tensor(x: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.asarray(x, dtype=np.float32))
