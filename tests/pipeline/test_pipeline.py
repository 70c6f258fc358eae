"""`cmpnas run` end to end on the smoke profile shrunk further (synthetic data, tiny models, tiny space).

One full run is shared by the structure and skip tests; a second run with another training seed is killed
once the gallery stage is recorded as done and then continued; a copy of the first run is rerun with a
changed retrain seed. The smoke profile trains every query model for two seeds (run.seeds: [0, 1]), so
these runs also cover the per-seed stages, rows and the paired comparisons of the report; its random controls
(run.random_controls: 3) and a stem-matched baseline (ShuffleNetV2 units on the space's stem) are in the table.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmpnas.errors import CmpnasError

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"
TRAIN = "{epochs: 1, batch_size: 50, warmup_epochs: 0.1, log_every: 5, threads: 1}"
SMALL_QUERY = (
    "{backbone: resnet_small, embed_dim: 16, "
    "backbone_kwargs: {widths: [4, 8], depths: [1, 1], strides: [2, 2]}}"
)
TINY_SPACE = (
    "{stem_channels: 8, stage_repeats: [1, 1], stage_widths: [16, 32], stage_strides: [2, 2], last_channels: 32, "
    "channel_scales: [0.5, 1.0]}"
)
MATCHED_QUERY = (
    "{backbone: spos, embed_dim: 16, arch: {blocks: [0, 0], scales: [0.5, 0.5]}, "
    f"backbone_kwargs: {{space: {TINY_SPACE}, input_size: 28}}}}"
)
SHRINK = [
    "data.name=synthetic", "data.subset_train=300", "data.subset_test=100", "data.val_size=60",
    "gallery.embed_dim=16", "query.embed_dim=16",
    "gallery.backbone_kwargs={widths: [8, 16], depths: [1, 1], strides: [1, 2]}",
    f"gallery_train={TRAIN}", f"query_train={TRAIN}",
    f"run.baselines=[{{name: small-independent, compat: independent, model: {SMALL_QUERY}}}, "
    f"{{name: small-bct, compat: bct, model: {SMALL_QUERY}}}, "
    f"{{name: small-matched-bct, compat: bct, stem: matched, model: {MATCHED_QUERY}}}]",
    f"nas.space={TINY_SPACE}",
    "nas.budget_cost_reduction=5",
    # as in tests/conftest.py: the tiny supernet stays a few points above chance, so its health floor is chance
    "nas.supernet={min_skill: 0.0, health_paths: 4}",
    f"nas.supernet_train={TRAIN}",
    "nas.study_train={epochs: 0.5, batch_size: 50, warmup_epochs: 0.0, log_every: 5, threads: 1}",
    "nas.search={population: 4, generations: 2, parents: 2, mutations: 2, crossovers: 2, recal_images: 64, "
    "recal_batch: 32, val_images: 60}",
    "nas.study_archs=1", "run.latency_repeats=3", "eval_batch_size=128",
    # a 2-member family (the space costs 0.22-0.49 MMACs here, the gallery 1.66)
    "nas.budgets=[{cost_reduction: 4}, {cost_reduction: 6, latency_ms: 5.0}]", "nas.latency={repeats: 3, warmup: 1}",
]  # fmt: skip
OTHER_SEED = ["gallery_train.seed=1", "query_train.seed=1", "nas.supernet_train.seed=1"]
SEEDS = [0, 1]  # the smoke profile's run.seeds
CONTROLS = [f"control-random{i}{s}" for i in range(3) for s in ("", "@s1")]  # the smoke profile's 3 controls
STAGES = [
    "gallery", "baseline-small-independent", "baseline-small-independent@s1", "baseline-small-bct",
    "baseline-small-bct@s1", "baseline-small-matched-bct", "baseline-small-matched-bct@s1", "supernet",
    "search-R1", "search-R2", "search-R3", "retrain-R1", "retrain-R1@s1", "retrain-R2", "retrain-R2@s1",
    "retrain-R3", "retrain-R3@s1", "study", *CONTROLS, "family-search", "member-4x", "member-4x@s1",
    "member-6x-5ms", "member-6x-5ms@s1", "evaluate", "export", "family-export", "index", "upgrade-gallery",
    "upgrade-control", "evaluate-upgrade", "report",
]  # fmt: skip
MEMBERS = ["4x", "6x-5ms"]
NAMES = [
    "small-independent", "small-bct", "small-matched-bct", *(f"CMP-NAS {r} (searched, BCT)" for r in ("R1", "R2", "R3")),
    *(f"random arch {i} (same space, BCT)" for i in range(3)), *(f"CMP-NAS family {m}" for m in MEMBERS),
]  # fmt: skip


def command(out: Path, extra: list[str] = ()) -> list[str]:
    sets = [a for s in [*SHRINK, *extra] for a in ("--set", s)]
    return [sys.executable, "-m", "cmpnas.cli", "run", "-c", str(SMOKE), "-o", str(out), "--json-logs", *sets]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run(out: Path, extra: list[str] = ()) -> tuple[list[dict], float]:
    """Run `cmpnas run` to completion; returns its JSON events and the wall time."""
    start = time.perf_counter()
    proc = subprocess.run(command(out, extra), capture_output=True, text=True, env=env(), timeout=900)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")], seconds


def stage_events(events: list[dict]) -> dict[str, list[str]]:
    """stage name -> the statuses it went through (start/done/skipped/failed)."""
    out: dict[str, list[str]] = {}
    for e in events:
        if e["event"] == "stage":
            out.setdefault(e["stage"], []).append(e["status"])
    return out


def snapshot(folder: Path) -> dict[str, int]:
    """mtime (ns) of every model, checkpoint and state file of a run folder."""
    files = [
        *folder.rglob("*.safetensors"),
        *folder.rglob("checkpoint.pt"),
        *folder.rglob("search_state.json"),
    ]
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in files}


def state(folder: Path) -> dict:
    return json.loads((folder / "run_state.json").read_text())


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("pipeline") / "run0"
    events, seconds = run(out)
    return {"out": out, "events": events, "seconds": seconds}


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> dict:
    """Another seed; SIGKILL as soon as run_state.json records the gallery stage as done, then continue."""
    out = tmp_path_factory.mktemp("pipeline") / "run1"
    start = time.perf_counter()
    proc = subprocess.Popen(
        command(out, OTHER_SEED), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env()
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            path = out / "run_state.json"
            if path.exists() and json.loads(path.read_text()).get("gallery", {}).get("status") == "done":
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    at_kill = state(out)
    before = snapshot(out)
    events, seconds = run(out, OTHER_SEED)
    return {"out": out, "at_kill": at_kill, "before": before, "events": events,
            "seconds": time.perf_counter() - start, "resume_seconds": seconds}  # fmt: skip


# ---------------------------------------------------------------------------------------------- report
def test_report_structure_and_numbers(first_run) -> None:
    out = first_run["out"]
    for name in ("report.md", "report.html", "results.json", "run_state.json", "config.yaml"):
        assert (out / name).is_file(), name
    assert all(state(out)[s]["status"] == "done" for s in STAGES)
    assert [s for s, st in stage_events(first_run["events"]).items() if st != ["start", "done"]] == []

    results = json.loads((out / "results.json").read_text())
    assert isinstance(results["headline"], str) and results["headline"]
    models = results["query_models"]
    assert [m["name"] for m in models] == NAMES
    gallery_macs = results["gallery"]["macs"]
    for m in models:
        assert isinstance(m["macs"], int) and 0 < m["macs"] < gallery_macs
        assert m["cost_reduction"] == pytest.approx(gallery_macs / m["macs"], abs=0.01)
        for row in ("paragon", "homogeneous", "heterogeneous"):
            assert 0 <= m[row]["top1"] <= 100 and 0 <= m[row]["map"] <= 100
        assert m["gap_to_paragon"]["top1"] == pytest.approx(m["paragon"]["top1"] - m["heterogeneous"]["top1"])
        assert m["paragon"] == models[0]["paragon"]  # one gallery model
    headline_model = next(m for m in models if m["kind"] == "searched-R3")  # R3 is the headline reward
    assert results["cost_reduction"] == headline_model["cost_reduction"]
    assert results["gap_to_paragon"] == headline_model["gap_to_paragon"]
    assert f"{headline_model['cost_reduction']:.0f}x cheaper" in results["headline"]
    het, het_std = headline_model["heterogeneous"]["top1"], headline_model["std"]["heterogeneous"]["top1"]
    assert f"{het:.1f} ± {het_std:.1f} (test split, mean ± std over 2 seeds)" in results["headline"]

    md = (out / "report.md").read_text()
    assert md.startswith("# cmpnas report") and results["headline"] in md
    assert "| small-bct |" in md
    # the smoke profile's gallery upgrade: the table (v2 with BCT, the control without), the curve, the plot
    upgrade = results["upgrade"]
    assert set(upgrade["bct_criterion"]) == {"new", "independent"} and upgrade["split"] == "test"
    assert {(r["query"], r["gallery"]) for r in upgrade["table"]} >= {("new", "old"), ("small", "new")}
    assert "## Gallery-model upgrade" in md and "BCT criterion M(new, old) > M(old, old)" in md
    v2 = json.loads((out / "upgrade" / "v2" / "manifest.json").read_text())
    assert v2["inputs"]["gallery"]["fingerprint"] == state(out)["gallery"]["outputs"]["fingerprint"]

    html = (out / "report.html").read_text()
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(pngs) >= 3  # accuracy vs MACs, search progress, the backfill curve (and the study)
    assert 'alt="backfill_curve"' in html
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html.replace("data:image/png;base64,", ""))
    assert "<script" not in html and "<link" not in html


def test_every_query_model_is_trained_and_evaluated_per_seed(first_run) -> None:
    out = first_run["out"]
    rows = json.loads((out / "evaluation" / "rows.json").read_text())
    assert [(r["query"]["name"], r["query"]["seed"]) for r in rows] == [(n, s) for n in NAMES for s in SEEDS]
    assert {r["protocol"]["split"] for r in rows} == {"test"}
    results = json.loads((out / "results.json").read_text())
    for m in results["query_models"]:
        mine = [r for r in rows if r["query"]["name"] == m["name"]]
        assert (m["seeds"], m["n_seeds"], m["split"]) == (SEEDS, 2, "test")
        assert [p["heterogeneous"] for p in m["per_seed"]] == [r["heterogeneous"] for r in mine]
        values = [r["heterogeneous"]["top1"] for r in mine]
        assert m["heterogeneous"]["top1"] == pytest.approx(sum(values) / 2)
        assert m["std"]["heterogeneous"]["top1"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    # seed 1 trains other weights, in its own folder, with the stage's training seed + 1
    for name in ("small-independent", "small-bct"):
        (m,) = [m for m in results["query_models"] if m["name"] == name]
        assert m["per_seed"][0]["fingerprint"] != m["per_seed"][1]["fingerprint"]
        manifest = json.loads((out / "baselines" / name / "seed1" / "manifest.json").read_text())
        assert manifest["inputs"]["train"]["seed"] == 1
        assert (
            json.loads((out / "baselines" / name / "manifest.json").read_text())["inputs"]["train"]["seed"]
            == 0
        )
    assert (out / "retrain" / "R1" / "seed1" / "model.safetensors").is_file()
    md = (out / "report.md").read_text()
    assert "### Per seed (test split)" in md and " ± " in md
    assert "## Searches (val split" in md and "## Random-architecture study (val split)" in md


def test_report_has_the_paired_comparisons(first_run) -> None:
    out = first_run["out"]
    results = json.loads((out / "results.json").read_text())
    assert results["splits"]["query_models"] == results["splits"]["paired_comparisons"] == "test"
    assert results["splits"]["searches"] == results["splits"]["study"] == "val"
    assert {s["split"] for s in results["searches"].values()} == {"val"} and results["study"][
        "split"
    ] == "val"
    pairs = {(c["a"], c["b"]): c for c in results["paired_comparisons"]}
    r3, r1, r2 = (f"CMP-NAS {r} (searched, BCT)" for r in ("R3", "R1", "R2"))
    expected = {(r3, r1), (r3, r2), ("small-bct", "small-independent")}
    models = results["query_models"]
    searched = next(m for m in models if m["name"] == r3)
    by_val = lambda group: max(group, key=lambda m: m["validation"]["heterogeneous_top1"])["name"]  # noqa: E731
    chosen = {(r3, by_val([m for m in models if m["kind"] == "control-random"]))}  # the best random control
    stems = {"small-independent": "stock", "small-bct": "stock", "small-matched-bct": "matched"}
    for stem in ("matched", "stock"):  # the best hand-designed model of each stem at <= the searched MACs
        cheaper = [m for m in models if stems.get(m["name"]) == stem and m["macs"] <= searched["macs"]]
        chosen |= {(r3, by_val(cheaper))} if cheaper else set()
    assert (r3, "small-bct") in chosen or (r3, "small-independent") in chosen
    for member in (m for m in models if m["kind"].startswith("family-")):
        cheaper = [m for m in models if m["kind"] == "baseline" and m["macs"] <= member["macs"]]
        chosen |= {(member["name"], by_val(cheaper))} if cheaper else set()
    assert set(pairs) == expected | chosen
    assert all(pairs[p]["chosen_on"] == "val" and "(chosen on validation)" in pairs[p]["comparison"] for p in chosen)
    assert all(pairs[p]["chosen_on"] is None for p in expected)
    rows = json.loads((out / "evaluation" / "rows.json").read_text())
    het = {(r["query"]["name"], r["query"]["seed"]): r["heterogeneous"]["top1"] for r in rows}
    md = (out / "report.md").read_text()
    section = md.split("## Paired comparisons", 1)[1].split("\n## ", 1)[0]
    for (a, b), c in pairs.items():
        diffs = [het[(a, s)] - het[(b, s)] for s in SEEDS]
        assert c["mean_difference"] == pytest.approx(sum(diffs) / 2)
        assert c["seeds"] == SEEDS and c["split"] == "test"
        low, high = c["interval"]
        assert low <= c["mean_difference"] <= high
        assert c["verdict"] in ("not distinguishable", f"{a} better", f"{b} better")
        assert c["sentence"].startswith(f"{a} vs {b}: ") and c["sentence"] in section
    said = results["what_the_search_buys"]
    assert said[0].startswith("Search vs a random architecture from the same space (the best of 3, chosen on ")
    assert len(said) == 3 and all(s in md.split("## What the search buys", 1)[1] for s in said)


def test_random_controls_and_the_stem_matched_baseline(first_run) -> None:
    """3 distinct random archs of the search band, drawn once for every seed and recorded; each trained and
    evaluated like the searched models; every row also scored on the validation split."""
    out = first_run["out"]
    st = state(out)
    records = [st[f"control-random{i}"]["outputs"] for i in range(3)]
    archs = [json.dumps(r["arch"], sort_keys=True) for r in records]
    assert len(set(archs)) == 3
    for i, r in enumerate(records):
        low, high = r["draw"]["band"]
        assert r["draw"]["index"] == i and low <= r["macs"] <= high  # counted MACs of the trained model
        assert st[f"control-random{i}@s1"]["outputs"]["arch"] == r["arch"]  # every seed trains the drawn arch
    manifest = json.loads((out / "controls" / "random0" / "seed1" / "manifest.json").read_text())
    assert manifest["inputs"]["train"]["seed"] == 1
    results = json.loads((out / "results.json").read_text())
    assert [a["arch"] for a in results["random_controls"]["archs"]] == [r["arch"] for r in records]
    rows = json.loads((out / "evaluation" / "rows.json").read_text())
    assert {r["query"]["kind"] for r in rows if r["query"]["name"].startswith("random arch")} == {"control-random"}
    assert all(r["validation"]["split"] == "val" and r["validation"]["n_images"] == 60 for r in rows)
    assert all(r["validation"]["heterogeneous_top1"] is not None for r in rows)
    md = (out / "report.md").read_text()
    assert "| random arch 0 (same space, BCT) |" in md and "| small-matched-bct |" in md
    assert "Stem-matched hand-designed rows" in md and "Random controls: 3 distinct architectures" in md


def test_supernet_health_ranking_protocol_and_learning_check_are_reported(first_run) -> None:
    """The supernet's health (manifest, health.json, results.json, report), the ranking protocol over two seeds
    with its reliability and verdict, per-arch rows kept, and the learning check."""
    out = first_run["out"]
    health = state(out)["supernet"]["outputs"]["health"]
    assert health["n_paths"] == 4 and health["split"] == "val" and health["ok"] is True
    assert health["chance"] == 10.0 and health["cls_top1"]["min"] <= health["cls_top1"]["mean"]
    assert json.loads((out / "supernet" / "health.json").read_text())["n_paths"] == 4
    manifest = json.loads((out / "supernet" / "manifest.json").read_text())
    assert manifest["outputs"]["health"] == health
    results = json.loads((out / "results.json").read_text())
    assert results["supernet"]["health"] == health and results["splits"]["supernet"] == "val"
    ranking = results["study"]["ranking"]
    assert ranking["seeds"] == [0, 1] and ranking["n"] == len(ranking["archs"]) >= 3
    assert all([s["seed"] for s in a["standalone"]] == [0, 1] for a in ranking["archs"])
    for side in ("heterogeneous", "homogeneous"):
        report = ranking[side]
        assert set(report["split_half"]) == {"r1", "r2", "tau_ceiling"}
        assert report["verdict"]["verdict"] in {"pass", "fail", "not measurable"}
        assert report["macs_only"]["kendall"] is not None
    check = results["learning_check"]
    assert check["chance"] == 10.0 and check["split"] == "test"
    md = (out / "report.md").read_text()
    assert "## The supernet (validation split)" in md and "Ranking, heterogeneous (top-1 + mAP)" in md


def test_the_family_is_searched_once_retrained_exported_and_reported(first_run) -> None:
    """2 budgets, one search; members within their caps (LUT MACs = counted MACs; the table's latency); the
    report's family table and plot."""
    from cmpnas.models.cost import LatencyTable

    out = first_run["out"]
    search = json.loads((out / "search" / "family" / "search.json").read_text())
    assert [b["name"] for b in search["budgets"]] == MEMBERS
    keys = {json.dumps(c["arch"], sort_keys=True) for c in search["candidates"]}
    assert len(keys) == search["n_candidates"]  # each candidate once, counted for every budget it fits
    assert all(c["budgets"] for c in search["candidates"])
    table = LatencyTable.from_dict(json.loads((out / "search" / "latency_table.json").read_text()))
    family = json.loads((out / "export" / "family" / "family.json").read_text())
    caps = {b["name"]: b for b in search["budgets"]}
    for m in family["members"]:
        cap = caps[m["name"]]
        assert m["macs"] == m["macs_counted"] <= cap["macs"]
        assert m["latency_ms_predicted"] == pytest.approx(table.latency_ms(m["arch"]))
        assert cap["latency_ms"] is None or m["latency_ms_predicted"] <= cap["latency_ms"]
        assert (out / "export" / "family" / m["onnx"]).is_file()
    assert [r["name"] for r in family["references"]] == ["small-independent", "small-bct", "small-matched-bct"]
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["family"]["members"]] == MEMBERS
    md = (out / "report.md").read_text()
    assert "## Query-model family" in md and "| 4x |" in md and "| 6x-5ms |" in md
    assert 'alt="family"' in (out / "report.html").read_text()

    # served: both exported members against the run's index, each answering by name
    from fastapi.testclient import TestClient

    from cmpnas.serving.app import create_app

    img = io.BytesIO()
    Image.fromarray((np.arange(28 * 28) % 251).reshape(28, 28).astype(np.uint8)).save(img, format="PNG")
    client = TestClient(create_app(out / "index", out / "export" / "family", watch_index_s=0))
    stats = client.get("/stats").json()
    assert set(stats["models"]) == set(MEMBERS) and stats["default_model"] == MEMBERS[0]
    assert {m["fingerprint"] for m in stats["models"].values()} == {m["fingerprint"] for m in family["members"]}
    for name in MEMBERS:
        r = client.post("/search", params={"model": name, "k": 3}, files={"file": ("q.png", img.getvalue())})
        assert r.status_code == 200 and r.json()["model"] == name and len(r.json()["results"]) == 3, r.text


def test_rerun_skips_every_completed_stage(first_run) -> None:
    out = first_run["out"]
    before_state = (out / "run_state.json").read_bytes()
    before = snapshot(out)
    events, seconds = run(out)
    statuses = stage_events(events)
    assert statuses == {s: ["skipped"] for s in STAGES}
    assert (out / "run_state.json").read_bytes() == before_state
    assert snapshot(out) == before
    assert seconds < first_run["seconds"]


# ---------------------------------------------------------------------------------------------- kill + seed
def test_killed_run_continues_without_redoing_completed_stages(killed_run) -> None:
    out = killed_run["out"]
    done_at_kill = {s for s, rec in killed_run["at_kill"].items() if rec.get("status") == "done"}
    assert "gallery" in done_at_kill and "report" not in done_at_kill
    statuses = stage_events(killed_run["events"])
    for s in STAGES:
        assert statuses[s] == (["skipped"] if s in done_at_kill else ["start", "done"]), s
    # outputs of the completed stages were not rewritten
    for path, mtime in killed_run["before"].items():
        if path.startswith("gallery/"):
            assert snapshot(out)[path] == mtime, path
    assert all(state(out)[s]["status"] == "done" for s in STAGES)
    assert (out / "report.html").is_file()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_another_seed_gives_other_numbers(first_run, killed_run) -> None:
    a = json.loads((first_run["out"] / "results.json").read_text())
    b = json.loads((killed_run["out"] / "results.json").read_text())
    assert a["paragon"] != b["paragon"]
    assert [m["heterogeneous"] for m in a["query_models"]] != [m["heterogeneous"] for m in b["query_models"]]
    assert a["headline"] != b["headline"]


# ---------------------------------------------------------------------------------------------- config change
def test_changed_config_reruns_only_the_affected_stages(first_run, tmp_path: Path) -> None:
    """Stages whose key changed start afresh (their old checkpoints would be foreign); the rest is skipped."""
    out = tmp_path / "run0-copy"
    shutil.copytree(first_run["out"], out)
    events, _ = run(out, ["query_train.seed=7"])  # the table's one schedule: baselines and retrains
    statuses = stage_events(events)
    rerun = {
        *(f"retrain-{r}{s}" for r in ("R1", "R2", "R3") for s in ("", "@s1")),
        *(f"baseline-small-{m}{s}" for m in ("independent", "bct", "matched-bct") for s in ("", "@s1")),
        *CONTROLS,
        *(f"member-{m}{s}" for m in MEMBERS for s in ("", "@s1")),
        "evaluate",
        "export",
        "family-export",
        "evaluate-upgrade",  # its query model is retrain-R3's
        "report",
    }
    for s in STAGES:
        assert statuses[s] == (["start", "done"] if s in rerun else ["skipped"]), s
    assert all(state(out)[s]["status"] == "done" for s in STAGES)


def test_force_redoes_the_stage_and_what_uses_it(first_run, tmp_path: Path) -> None:
    """A forced stage keeps its key; the stages built on its outputs (here the report) must not be skipped."""
    out = tmp_path / "run0-forced"
    shutil.copytree(first_run["out"], out)
    events, _ = run_forced(out, "family-export")
    statuses = stage_events(events)
    for s in STAGES:
        assert statuses[s] == (["start", "done"] if s in ("family-export", "report") else ["skipped"]), s


def run_forced(out: Path, stage: str) -> tuple[list[dict], float]:
    cmd = [*command(out), "--force", stage]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")], time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- one schedule
def test_a_retrain_schedule_other_than_the_baselines_is_refused(tmp_path: Path) -> None:
    """Every row of the table trains on one schedule: a longer retrain would win by its schedule."""
    from cmpnas.config import Config, TrainConfig
    from cmpnas.pipeline import check_one_schedule, run_pipeline, table_schedule

    same = Config(query_train=TrainConfig(epochs=1), nas={"retrain": {"epochs": 1}})
    check_one_schedule(same)  # equal: accepted
    assert table_schedule(same) == same.query_train
    check_one_schedule(Config(query_train=TrainConfig(epochs=1)))  # unset: retrains use query_train
    longer = Config(query_train=TrainConfig(epochs=1), nas={"retrain": {"epochs": 3}})
    with pytest.raises(CmpnasError, match="nas.retrain differs from query_train") as err:
        run_pipeline(longer, tmp_path / "run")
    assert "remove nas.retrain" in err.value.fix
    assert not (tmp_path / "run").exists()  # refused before anything is written
