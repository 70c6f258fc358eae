"""Seeds without training: the stage graph per seed, stage keys of seed 0, clearing one seed's folder,
the config and `--seeds`, and the report (mean ± std, paired comparisons) on hand-made rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmpnas.cli import main
from cmpnas.config import build_config
from cmpnas.errors import CmpnasError
from cmpnas.pipeline import _clear_stage, build_stages, split_seed, stage_key
from cmpnas.pipeline.layout import RunLayout
from cmpnas.report import write_report

SMALL = {"backbone": "resnet_small", "embed_dim": 16, "backbone_kwargs": {"widths": [4, 8], "depths": [1, 1]}}
LARGE = {**SMALL, "backbone_kwargs": {"widths": [8, 16], "depths": [1, 1]}}


def config(tiny_raw: dict, seeds: list[int], baselines: list[dict] | None = None):  # type: ignore[no-untyped-def]
    tiny_raw["run"]["seeds"] = seeds
    tiny_raw["run"]["baselines"] = baselines or [{"name": "b", "compat": "bct", "model": SMALL}]
    return build_config(tiny_raw)


# ---------------------------------------------------------------------------------------------- stage graph
def test_every_query_model_stage_repeats_per_seed(tiny_raw: dict) -> None:
    stages = {s.name: s for s in build_stages(config(tiny_raw, [0, 2]))}
    assert [n for n in stages if n.startswith(("baseline-", "retrain-"))] == [
        "baseline-b", "baseline-b@s2", "retrain-R1", "retrain-R1@s2", "retrain-R2", "retrain-R2@s2",
        "retrain-R3", "retrain-R3@s2",
    ]  # fmt: skip
    assert [n for n in stages if n.startswith(("search-", "supernet"))] == [
        "supernet",
        "search-R1",
        "search-R2",
        "search-R3",
    ]  # fmt: skip  (the search runs once)
    assert stages["retrain-R3@s2"].deps == ["search-R3", "retrain-R1@s2", "retrain-R2@s2"]
    assert set(stages["evaluate"].deps) >= {"baseline-b@s2", "retrain-R3@s2", "retrain-R3"}
    assert stages["export"].deps == ["retrain-R3"]


def test_without_seed_zero_the_first_seed_is_exported(tiny_raw: dict) -> None:
    stages = {s.name: s for s in build_stages(config(tiny_raw, [1, 2]))}
    assert "retrain-R3" not in stages and "baseline-b" not in stages
    assert stages["export"].deps == ["retrain-R3@s1"]


def test_seed_zero_keeps_the_keys_of_a_single_seed_run(tiny_raw: dict) -> None:
    """Adding seeds leaves every stage of seed 0 (and the search) valid: existing runs are not redone."""
    one, two = config(tiny_raw, [0]), config(tiny_raw, [0, 1])
    keys_one, keys_two, state_one, state_two = {}, {}, {}, {}
    for cfg, keys, state in ((one, keys_one, state_one), (two, keys_two, state_two)):
        for s in build_stages(cfg):
            keys[s.name] = stage_key(s, cfg, state)
            state[s.name] = {"key": keys[s.name]}
    same = {n for n in keys_one if keys_one[n] == keys_two.get(n)}
    assert same == set(keys_one) - {"evaluate", "report"}  # these now also read seed 1's models


def test_split_seed() -> None:
    assert split_seed("retrain-R3@s12") == ("retrain-R3", 12)
    assert split_seed("baseline-mobilenet@small") == ("baseline-mobilenet@small", 0)
    assert split_seed("gallery") == ("gallery", 0)


def test_clearing_seed_zero_keeps_the_other_seeds(tmp_path: Path) -> None:
    folder = tmp_path / "baselines" / "b"
    for rel in ("model.safetensors", "ckpt/x", "seed1/model.safetensors", "seed2/model.safetensors"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text("x")
    _clear_stage(tmp_path, "baseline-b")
    assert sorted(p.name for p in folder.iterdir()) == ["seed1", "seed2"]
    _clear_stage(tmp_path, "baseline-b@s1")
    assert sorted(p.name for p in folder.iterdir()) == ["seed2"]


# ---------------------------------------------------------------------------------------------- config + CLI
@pytest.mark.parametrize("seeds", [[], [0, 0], [-1]])
def test_bad_seeds_are_refused(tiny_raw: dict, seeds: list[int]) -> None:
    with pytest.raises(CmpnasError, match="run.seeds"):
        config(tiny_raw, seeds)


def test_cli_seeds_option(monkeypatch, capsys, tmp_path: Path) -> None:
    seen = []
    monkeypatch.setattr("cmpnas.cli.run.run_pipeline", lambda cfg, out, force=None: seen.append(cfg) or {})
    with pytest.raises(SystemExit) as exc:
        main(["run", "-p", "smoke", "-o", str(tmp_path / "a"), "--seeds", "0,x"])
    assert exc.value.code == 2 and "--seeds 0,1,2" in capsys.readouterr().err
    assert not seen and not (tmp_path / "a").exists()
    main(
        ["run", "-p", "smoke", "-o", str(tmp_path / "b"), "--seeds", "0,2,5", "--set", "run.seeds=[9]", "-q"]
    )
    assert seen[0].run.seeds == [0, 2, 5]
    main(["run", "-p", "smoke", "-o", str(tmp_path / "c"), "-q"])
    assert seen[1].run.seeds == [0, 1]  # the smoke profile exercises two seeds


# ---------------------------------------------------------------------------------------------- report
def _row(name: str, kind: str, seed: int, het: float, macs: int = 1000, fp: str | None = None) -> dict:
    hom = het - 2.0
    m = lambda top1: {"top1": top1, "map": top1 - 10}  # noqa: E731
    return {
        "query": {"name": name, "kind": kind, "seed": seed, "macs": macs, "latency_ms_b1": 1.0,
                  "fingerprint": fp or f"{name}-{seed}"},
        "gallery": {"name": "g", "macs": 100_000, "fingerprint": "g", "latency_ms_b1": 3.0},
        "paragon": m(90.0), "homogeneous": m(hom), "heterogeneous": m(het),
        "gap_to_paragon": {"top1": 90.0 - het, "map": 90.0 - het}, "cost_reduction": 100.0,
        "compatible": True, "protocol": {"name": "leave_one_out", "split": "test", "n_images": 100},
        "validation": {"split": "val", "n_images": 50, "heterogeneous_top1": het, "homogeneous_top1": hom},
    }  # fmt: skip


def _report(tmp_path: Path, cfg, rows: list[dict]) -> tuple[dict, str]:  # type: ignore[no-untyped-def]
    (tmp_path / "evaluation").mkdir(parents=True, exist_ok=True)
    (tmp_path / "evaluation" / "rows.json").write_text(json.dumps(rows))
    write_report(tmp_path, cfg, {}, RunLayout(tmp_path).report_inputs(cfg.run.rewards))
    return json.loads((tmp_path / "results.json").read_text()), (tmp_path / "report.md").read_text()


HET = {  # heterogeneous top-1 per (model, seed)
    ("ind", 0): 10.0, ("ind", 1): 12.0, ("bct", 0): 70.0, ("bct", 1): 71.0,
    ("big-bct", 0): 95.0, ("big-bct", 1): 96.0,
    ("R1", 0): 80.0, ("R1", 1): 80.4, ("R2", 0): 81.0, ("R2", 1): 80.2, ("R3", 0): 81.0, ("R3", 1): 80.2,
}  # fmt: skip


def _rows(seeds: list[int]) -> list[dict]:
    kinds = {"ind": "baseline", "bct": "baseline", "big-bct": "baseline"}
    macs = {"big-bct": 5000}
    names = {r: f"CMP-NAS {r} (searched, BCT)" for r in ("R1", "R2", "R3")}
    same = {"R2": "R3"}  # R2 found R3's architecture: one model
    return [
        _row(names.get(k, k), kinds.get(k, f"searched-{k}"), s, HET[(k, s)], macs.get(k, 1000),
             f"{same.get(k, k)}-{s}")
        for k in ("ind", "bct", "big-bct", "R1", "R2", "R3") for s in seeds
    ]  # fmt: skip


BASELINES = [
    {"name": "ind", "compat": "independent", "model": SMALL},
    {"name": "bct", "compat": "bct", "model": SMALL},
    {"name": "big-bct", "compat": "bct", "model": LARGE},
]


def test_report_with_two_seeds(tmp_path: Path, tiny_raw: dict) -> None:
    results, md = _report(tmp_path, config(tiny_raw, [0, 1], BASELINES), _rows([0, 1]))
    r3 = next(m for m in results["query_models"] if m["kind"] == "searched-R3")
    assert (r3["n_seeds"], r3["heterogeneous"]["top1"]) == (2, pytest.approx(80.6))
    assert r3["std"]["heterogeneous"]["top1"] == pytest.approx(0.8 / 2**0.5)
    assert (
        "| CMP-NAS R3 (searched, BCT) | 0.00 M | 100.0x | 2 | 90.00 / 80.00 | 78.6 ± 0.6 / 68.6 ± 0.6 |" in md
    )
    sentences = [c["sentence"] for c in results["paired_comparisons"]]
    # R3 - R1 = +1.0, -0.2: mean +0.4, sd 0.8485, se 0.6, t(0.975, 1) = 12.706 -> 0.4 -+ 7.62 = [-7.2, +8.0]
    assert sentences[0] == (
        "CMP-NAS R3 (searched, BCT) vs CMP-NAS R1 (searched, BCT): +0.4 [\u22127.2, +8.0], not distinguishable"
    )
    assert sentences[1] == (
        "CMP-NAS R3 (searched, BCT) vs CMP-NAS R2 (searched, BCT): 0.0 [0.0, 0.0], not distinguishable "
        "(the same model: both rewards found one architecture)"
    )
    # the big baseline costs more than R3, so R3 is compared with the best baseline at <= its MACs: "bct"
    # 11.0 and 9.2: se 0.9, half width 12.706 * 0.9 = 11.4, so two seeds cannot tell them apart
    assert sentences[2] == "CMP-NAS R3 (searched, BCT) vs bct: +10.1 [\u22121.3, +21.5], not distinguishable"
    # BCT vs independent of the same architecture only (big-bct has no independent twin)
    # 60 and 59: se 0.5, half width 6.35
    assert sentences[3] == "bct vs ind: +59.5 [+53.1, +65.9], bct better"
    assert len(sentences) == 4
    section = md.split("## Paired comparisons", 1)[1].split("\n## ", 1)[0]
    assert "over 2 seeds, 95 % paired-t interval" in section and all(s in section for s in sentences)
    assert "### Per seed (test split)" in md and "| bct | 1 | 69.00 / 59.00 | 71.00 / 61.00 |" in md
    assert results["splits"]["query_models"] == "test" and results["protocol"]["split"] == "test"


def test_report_with_one_seed_gives_no_intervals(tmp_path: Path, tiny_raw: dict) -> None:
    results, md = _report(tmp_path, config(tiny_raw, [0], BASELINES), _rows([0]))
    assert all(c["interval"] is None for c in results["paired_comparisons"])
    assert "1 seed: no interval can be given" in md and "[" not in md.split("## Paired comparisons", 1)[1]
    assert "better" not in md.split("## Paired comparisons", 1)[1].split("\n## ", 1)[0]
    r3 = next(m for m in results["query_models"] if m["kind"] == "searched-R3")
    assert r3["std"]["heterogeneous"]["top1"] is None
    assert "heterogeneous top-1 is 81.00, within 9.00 points of the paragon (90.00)" in results["headline"]
    assert "### Per seed" not in md and " ± " not in md.split("## Paired", 1)[0].split("## Paragon", 1)[1]
