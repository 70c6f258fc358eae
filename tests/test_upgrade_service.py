"""The service's hot-refresh trace (``benchmarks/upgrade_service.py``) end to end on tiny models: v1 and v2 trained
on a Fashion-MNIST-shaped toy set, the index served by ``cmpnas serve --watch-index``, backfilled in two steps,
probed over HTTP after each swap. The trace's flips are recomputed from the per-query correctness it stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cmpnas.evaluation.flips import flip_rates

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "upgrade_service.py"
GALLERY = "{backbone: resnet_small, embed_dim: 16, backbone_kwargs: {widths: [8, 16], depths: [1, 1], strides: [1, 2]}}"
TRAIN = "{epochs: 3, batch_size: 16, warmup_epochs: 0.1, log_every: 5, threads: 1}"


def bits(hits: str) -> np.ndarray:
    return np.array([c == "1" for c in hits])


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from conftest import FASHION_FILES, write_idx_gz

    d = tmp_path_factory.mktemp("service-trace")
    rng = np.random.default_rng(7)
    for split, per_class in (("train", 10), ("test", 4)):  # class k: a bright band at rows 2k..2k+4
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class))
        images = rng.integers(0, 60, size=(labels.size, 28, 28), dtype=np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 * k : 2 * k + 5, :] = 200
        write_idx_gz(d / FASHION_FILES[f"{split}_images"], images)
        write_idx_gz(d / FASHION_FILES[f"{split}_labels"], labels)
    sets = [
        f"data={{name: fashion_mnist, root: '{d}', val_size: 10}}",
        f"gallery={GALLERY}", f"gallery_train={TRAIN}", "compat={mode: bct}", "eval_batch_size=64",
    ]  # fmt: skip
    out = d / "trace.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--work",
        str(d / "work"),
        "--config",
        str(REPO / "configs" / "smoke.yaml"),
    ]
    cmd += [a for s in sets for a in ("--set", s)]
    cmd += ["--v2-epochs", "4", "--fractions", "0.5", "1.0", "--queries", "30", "--watch-index", "0.2"]
    cmd += ["--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return {"json": json.loads(out.read_text()), "png": out.with_suffix(".png")}


@pytest.mark.slow
def test_trace_structure_fractions_and_versions(trace: dict) -> None:
    t = trace["json"]
    steps = t["steps"]
    assert (
        t["benchmark"] == "upgrade_service" and t["plot"] == "trace.png" and trace["png"].stat().st_size > 0
    )
    assert set(t["models"]) == {"v1", "v2"} and t["cpu"] and t["scale"]["index_items"] == 40
    assert [s["step"] for s in steps] == [0, 1, 2] and [s["target"] for s in steps] == [0.0, 0.5, 1.0]
    assert [s["fraction"] for s in steps] == [0.0, 0.5, 1.0] == t["summary"]["fractions"]
    v1, v2 = t["models"]["v1"]["fingerprint"], t["models"]["v2"]["fingerprint"]
    assert (
        t["models"]["v2"]["compatible_with"] == v1
        and t["models"]["v2"]["training"]["stage"] == "upgrade-gallery"
    )
    assert steps[0]["version"]["items_by_model"] == {v1: 40}
    assert steps[-1]["version"]["items_by_model"] == {v2: 40} and steps[-1]["version"]["lineage"] == [v2, v1]
    swaps = [s["version"]["swaps"] for s in steps]
    assert swaps[0] == 0 and swaps == sorted(set(swaps))  # one more swap per step, each seen by the probe
    for s in steps[1:]:
        assert s["version"]["items_by_model"].get(v2) == s["backfill"]["embedded_by_model_after"]
        assert s["backfill"]["order"] == "random" and s["during_swap"]["requests"] >= 0
    assert len(t["query_ids"]) == 30 and all(len(p["hits"]) == 30 for s in steps for p in s["probe"].values())
    # the dual policy is the old system before the backfill and the new one after it, query by query
    assert steps[0]["probe"]["v2~v1"]["hits"] == steps[0]["probe"]["v1"]["hits"]
    assert steps[-1]["probe"]["v2~v1"]["hits"] == steps[-1]["probe"]["v2"]["hits"]


@pytest.mark.slow
def test_trace_flips_agree_with_flips_py_on_the_stored_hits(trace: dict) -> None:
    steps = trace["json"]["steps"]
    ref = bits(steps[0]["probe"]["v1"]["hits"])
    assert steps[0]["probe"]["v1"]["negative_flips"] == steps[0]["probe"]["v1"]["positive_flips"] == 0.0
    for s in steps:
        for p in s["probe"].values():
            hits = bits(p["hits"])
            expected = flip_rates(torch.from_numpy(ref), torch.from_numpy(hits))
            assert p["negative_flips"] == pytest.approx(expected["negative_flips"], abs=1e-3)
            assert p["positive_flips"] == pytest.approx(expected["positive_flips"], abs=1e-3)
            # counted by hand too: right -> wrong and wrong -> right, in percent of the probe's queries
            assert p["negative_flips"] == pytest.approx(100 * np.mean(ref & ~hits), abs=1e-3)
            assert p["top1"] == pytest.approx(100 * hits.mean(), abs=1e-3)
            assert p["positive_flips"] - p["negative_flips"] == pytest.approx(
                p["top1"] - 100 * ref.mean(), abs=1e-2
            )


@pytest.mark.slow
def test_trace_reports_no_failed_request_and_matches_the_offline_answer(trace: dict) -> None:
    t = trace["json"]
    summary = t["summary"]
    assert (
        summary["probe_errors"] == summary["swap_load_errors"] == 0 and summary["any_request_failed"] is False
    )
    assert summary["probe_requests"] == 3 * 3 * 30  # 3 steps x (v1, v2, the dual policy v2~v1) x 30 queries
    for s in t["steps"]:
        for p in s["probe"].values():
            assert p["errors"] == 0 and p["statuses"] == {"200": 30}
            assert p["offline_agreement"] >= 0.9  # the service answered from the index version it reported
    for m, row in summary["by_model"].items():
        assert row["min_top1"] == min(s["probe"][m]["top1"] for s in t["steps"])
        assert row["max_negative_flips"] == max(s["probe"][m]["negative_flips"] for s in t["steps"])
