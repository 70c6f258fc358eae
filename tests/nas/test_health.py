"""The supernet's health record against hand-computed numbers, and the search's refusal of a supernet at chance."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from cmpnas.cli import main
from cmpnas.config import build_config
from cmpnas.errors import CmpnasError
from cmpnas.models.embedding import load_model
from cmpnas.nas.health import check_health, health_line, health_paths, judge, supernet_health
from cmpnas.nas.supernet import SupernetEmbedding, save_supernet
from cmpnas.stages import search
from cmpnas.stages.common import make_space, supernet_identity

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_evaluator(table: dict[int, dict[str, float]]):
    """arch -> the row of its first block gene: metrics chosen by hand."""
    return lambda arch: dict(table[arch["blocks"][0]])


def row(cls: float, het: float, hom: float = 50.0, het_map: float = 30.0) -> dict[str, float]:
    return {"cls_top1": cls, "het_top1": het, "hom_top1": hom, "het_map": het_map}


def test_health_means_floor_and_verdict_by_hand() -> None:
    paths = [{"blocks": [i], "scales": [1.0]} for i in range(3)]
    table = {0: row(40.0, 30.0), 1: row(50.0, 33.0), 2: row(60.0, 36.0)}
    h = supernet_health(fake_evaluator(table), paths, num_classes=10, min_skill=0.2)
    # 10 classes: chance 10 %; floor = 10 + 0.2 x (100 - 10) = 28
    assert (h["chance"], h["floor"]) == (10.0, 28.0)
    assert h["cls_top1"] == {"mean": 50.0, "min": 40.0, "max": 60.0}
    assert h["het_top1"] == {"mean": 33.0, "min": 30.0, "max": 36.0}
    assert h["ok"] and h["weak"] == []
    # a floor of 0.3 -> 37: heterogeneous 33 falls short, the classifier's 50 does not
    stricter = judge(h, 0.3)
    assert (stricter["floor"], stricter["ok"], stricter["weak"]) == (37.0, False, ["het_top1"])
    assert len(h["paths"]) == 3 and h["paths"][1]["cls_top1"] == 50.0


def test_check_health_refuses_near_chance_with_the_figures() -> None:
    table = {0: row(11.0, 9.0), 1: row(13.0, 12.0)}
    paths = [{"blocks": [i], "scales": [1.0]} for i in range(2)]
    h = supernet_health(fake_evaluator(table), paths, num_classes=10, min_skill=0.2)
    assert not h["ok"] and h["weak"] == ["cls_top1", "het_top1"]
    with pytest.raises(CmpnasError) as info:
        check_health(h, "sup.safetensors", 0.2)
    msg = str(info.value)
    assert "classifier top-1 12.0 %" in msg and "heterogeneous top-1 10.5 %" in msg
    assert "needed >= 28.0 %" in msg and "nas.supernet_train.epochs" in msg
    check_health(h, "sup.safetensors", 0.0)  # floor at chance: 12.0 and 10.5 are above 10


def test_health_paths_are_distinct_and_reproducible() -> None:
    sample = lambda rng: {"blocks": [rng.randrange(5)], "scales": [1.0]}  # noqa: E731
    key = lambda a: str(a["blocks"])  # noqa: E731
    a = health_paths(sample, key, 4, seed=3)
    assert a == health_paths(sample, key, 4, seed=3)
    assert len({key(x) for x in a}) == 4
    assert len(health_paths(sample, key, 9, seed=3)) == 5  # only 5 distinct paths exist


def test_supernet_stage_records_health(tmp_path: Path, tiny_raw: dict, tiny_data, tiny_gallery: Path) -> None:
    from cmpnas.stages import train_supernet

    res = train_supernet(build_config(tiny_raw), tiny_gallery, tmp_path / "s", data=tiny_data)
    h = res["health"]
    assert h["n_paths"] == tiny_raw["nas"]["supernet"]["health_paths"] and h["split"] == "val"
    assert 0 <= h["het_top1"]["min"] <= h["het_top1"]["mean"] <= h["het_top1"]["max"] <= 100
    assert (tmp_path / "s" / "health.json").exists()


def test_search_refuses_an_untrained_supernet(
    tmp_path: Path, tiny_raw: dict, tiny_data, tiny_gallery: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A supernet with random weights (no training) is at chance: the search exits 2 and writes nothing."""
    tiny_raw["nas"]["supernet"] = {"min_skill": 0.2, "health_paths": 4}  # the default floor
    cfg = build_config(tiny_raw)
    gallery = load_model(tiny_gallery)
    space = make_space(cfg, tiny_data)
    torch.manual_seed(0)
    model = SupernetEmbedding(space, gallery.spec.embed_dim, tiny_data.num_classes)
    path = tmp_path / "supernet.safetensors"
    meta = {**supernet_identity(cfg, tiny_data, gallery), "classifier": "linear", "cosine_scale": 16.0}
    save_supernet(model, path, {**meta, "budget_macs": 1.0})
    with pytest.raises(CmpnasError, match="near chance"):
        search(cfg, tiny_gallery, path, tmp_path / "search", data=tiny_data)
    assert not (tmp_path / "search" / "search.json").exists()

    config = tmp_path / "tiny.yaml"
    config.write_text(__import__("yaml").safe_dump(tiny_raw))
    with pytest.raises(SystemExit) as exit_info:
        main(["search", "-g", str(tiny_gallery), "--supernet", str(path), "-c", str(config), "-o", str(tmp_path / "cli")])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # the error: one line, after the health line
    assert last.startswith("cmpnas: error: Supernet") and "near chance" in last and "Fix:" in last
    assert not (tmp_path / "cli" / "search.json").exists()


def test_fair_sampling_lands_in_band_and_trains_every_width() -> None:
    from cmpnas.models.spaces.spos import SposSpace

    space = SposSpace({}, in_chans=1, input_size=28)
    lo, hi = 0.5 * 1.6e6, 1.6e6
    rng = random.Random(0)
    archs = [space.sample_fair(rng, lo, hi) for _ in range(400)]
    assert all(lo <= space.macs(a) <= hi for a in archs)
    widest = max(space.scales)
    # every layer's widest channels are trained by some in-band path
    assert all(any(a["scales"][i] == widest for a in archs) for i in range(space.num_layers))


def test_path_sampler_warms_up_at_full_width_then_draws_each_band() -> None:
    from cmpnas.models.spaces.spos import SposSpace

    space = SposSpace({}, in_chans=1, input_size=28)
    bands = [(0.4e6, 0.85e6), (1.6e6, 3.2e6)]
    sample = space.path_sampler(0, None, None, 0, sampling="fair", widest_until=10, bands=bands)
    assert all(set(sample(s)["scales"]) == {max(space.scales)} for s in range(10))
    costs = [space.macs(sample(s)) for s in range(10, 110)]
    in_each = [sum(lo <= c <= hi for c in costs) for lo, hi in bands]
    assert all(n >= 30 for n in in_each) and sum(in_each) == 100


def test_sandwich_steps_are_the_widest_the_in_band_and_the_narrowest_path() -> None:
    from cmpnas.models.spaces.spos import SposSpace

    space = SposSpace({}, in_chans=1, input_size=28)
    band = (0.8e6, 1.6e6)
    plain = space.path_sampler(3, None, None, 0, sampling="fair", widest_until=5, bands=[band])
    sample = space.path_sampler(3, None, None, 0, sampling="fair", widest_until=5, bands=[band], sandwich=True)
    assert all(isinstance(sample(s), dict) for s in range(5))  # the warm-up stays one widest path per step
    for step in range(5, 40):
        widest, middle, narrowest = sample(step)
        assert set(widest["scales"]) == {max(space.scales)}
        assert set(narrowest["scales"]) == {min(space.scales)}
        assert band[0] <= space.macs(middle) <= band[1]
        assert space.macs(narrowest) < space.macs(middle) < space.macs(widest)
    assert len({space.arch_key(sample(s)[1]) for s in range(5, 40)}) > 30  # the in-band path still varies
    assert space.arch_key(plain(7)) != space.arch_key(sample(7)[0])


def test_open_set_validation_is_judged_without_the_classifier() -> None:
    # val classes the classifier never saw: its top-1 is not measurable (None) and not judged; chance is one over
    # the 3 validation classes
    rows = iter([{"cls_top1": None, "hom_top1": 60.0, "het_top1": 50.0, "het_map": 40.0}] * 2)
    health = supernet_health(lambda arch: next(rows), [{"a": 1}, {"a": 2}], 3, 0.2)
    assert health["cls_top1"] is None and health["chance"] == 33.33
    assert health["floor"] == pytest.approx(100 / 3 + 0.2 * (100 - 100 / 3), abs=0.01)  # 46.67
    assert health["ok"] and health["weak"] == []
    assert "classifier" not in health_line(health)
