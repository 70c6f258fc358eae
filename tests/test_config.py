"""Config loading: YAML + validation, errors naming the key, dotted --set overrides, dump round-trip."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cmpnas.config import Config, DataConfig, build_config, dump_config, load_config, parse_override
from cmpnas.errors import CmpnasError

REPO = Path(__file__).resolve().parents[1]


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_values_are_loaded_and_the_rest_keeps_defaults(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        "data: {name: synthetic, subset_train: 300}\n"
        "gallery_train:\n  epochs: 0.5\n  optim: {name: adamw, lr: 0.01}\n"
        "compat: {mode: independent}\n",
    )
    cfg = load_config(path)
    assert cfg.data.name == "synthetic"
    assert cfg.data.subset_train == 300
    assert cfg.gallery_train.epochs == 0.5
    assert cfg.gallery_train.optim.name == "adamw"
    assert cfg.gallery_train.optim.lr == 0.01
    assert cfg.compat.mode == "independent"
    # untouched sections and keys keep the documented defaults
    assert cfg.gallery_train.batch_size == 128
    assert cfg.query_train.epochs == 2
    assert cfg.data.val_size == 5000
    assert cfg.gallery.embed_dim == 128


def test_no_file_gives_the_defaults() -> None:
    assert load_config(None) == Config()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("gallery_train: {epoch: 3}\n", "gallery_train.epoch"),
        ("galery: {backbone: resnet_small}\n", "galery"),
        ("nas: {search: {popullation: 3}}\n", "nas.search.popullation"),
    ],
)
def test_unknown_key_is_an_error_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(CmpnasError) as exc:
        load_config(write_yaml(tmp_path, text))
    assert f"'{key}'" in str(exc.value)
    assert exc.value.fix  # the message says how to fix it


@pytest.mark.parametrize(
    ("text", "key", "bad"),
    [
        ("gallery_train: {epochs: -1}\n", "gallery_train.epochs", "-1"),
        ("data: {in_chans: 2}\n", "data.in_chans", "2"),
        ("compat: {mode: bctt}\n", "compat.mode", "bctt"),
        ("query_train: {batch_size: many}\n", "query_train.batch_size", "many"),
        ("nas: {search: {reward_weight: 1.5}}\n", "nas.search.reward_weight", "1.5"),
    ],
)
def test_bad_value_is_an_error_naming_key_and_value(tmp_path: Path, text: str, key: str, bad: str) -> None:
    with pytest.raises(CmpnasError) as exc:
        load_config(write_yaml(tmp_path, text))
    msg = str(exc.value)
    assert f"'{key}'" in msg
    assert bad in msg
    assert "Fix:" in msg


def test_inplace_distillation_without_a_sandwich_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CmpnasError, match="inplace_distill needs sandwich") as exc:
        load_config(write_yaml(tmp_path, "nas: {supernet: {inplace_distill: true}}\n"))
    assert "nas.supernet" in str(exc.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [("data: [unclosed\n", "not valid YAML"), ("- a\n- b\n", "mapping")],
)
def test_malformed_file_is_a_clear_error(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(CmpnasError, match=needle):
        load_config(write_yaml(tmp_path, text))


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CmpnasError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_set_overrides_are_dotted_and_typed_as_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "gallery_train: {epochs: 5, batch_size: 32}\ndata: {root: /somewhere}\n")
    cfg = load_config(
        path,
        [
            "gallery_train.epochs=3",  # int in YAML -> float field
            "gallery_train.augment=false",  # bool
            "gallery_train.optim.lr=1e-2",  # nested section not in the file
            "nas.space.stage_repeats=[1, 1, 2]",  # list
            "query.backbone=tv:mobilenet_v2",  # a colon without a space stays a string
            "query.backbone_kwargs={width_mult: 0.35}",  # mapping
            "data.root=null",  # None
            "compat.align_weight=0.5",
        ],
    )
    assert cfg.gallery_train.epochs == 3.0
    assert cfg.gallery_train.batch_size == 32  # the file's other keys survive
    assert cfg.gallery_train.augment is False
    assert cfg.gallery_train.optim.lr == pytest.approx(0.01)
    assert cfg.nas.space.stage_repeats == [1, 1, 2]
    assert cfg.query.backbone == "tv:mobilenet_v2"
    assert cfg.query.backbone_kwargs == {"width_mult": 0.35}
    assert cfg.data.root is None
    assert cfg.compat.align_weight == 0.5


def test_later_override_wins_and_the_raw_dict_is_not_mutated() -> None:
    raw = {"gallery_train": {"epochs": 1}}
    cfg = build_config(raw, ["gallery_train.epochs=2", "gallery_train.epochs=4"])
    assert cfg.gallery_train.epochs == 4
    assert raw == {"gallery_train": {"epochs": 1}}


def test_override_value_keeps_everything_after_the_first_equals_sign() -> None:
    assert parse_override("data.root=/a=b") == ("data.root", "/a=b")
    assert parse_override(" train.epochs = 3") == ("train.epochs", 3)


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("gallery_train.epochs", "no '='"),
        ("gallery_train.epochs.x=1", "not a section"),
        ("gallery_train.epoch=1", "'gallery_train.epoch'"),
        ("gallery_train.epochs=abc", "'gallery_train.epochs'"),
    ],
)
def test_bad_override_is_a_clear_error(item: str, needle: str) -> None:
    with pytest.raises(CmpnasError, match=needle):
        build_config({"gallery_train": {"epochs": 2}}, [item])


def test_dump_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        ["data.root=/data/fm", "nas.budget_macs=123456.5", "gallery.backbone_kwargs={widths: [8, 16]}"],
    )
    text = dump_config(cfg)
    again = load_config(write_yaml(tmp_path, text))
    assert again == cfg
    assert dump_config(again) == text
    # the dump is plain YAML (no python tags), so other tools can read it
    assert yaml.safe_load(text)["data"]["root"] == "/data/fm"


@settings(max_examples=10, deadline=None)
@given(
    epochs=st.floats(min_value=0.01, max_value=100, allow_nan=False),
    batch=st.integers(min_value=1, max_value=4096),
    subset=st.one_of(st.none(), st.integers(min_value=1, max_value=10**6)),
    backbone=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_:0123456789", min_size=1, max_size=20),
)
def test_dump_round_trip_property(epochs: float, batch: int, subset: int | None, backbone: str) -> None:
    cfg = Config(
        gallery_train={"epochs": epochs, "batch_size": batch},
        data=DataConfig(subset_train=subset),
        gallery={"backbone": backbone},
    )
    assert build_config(yaml.safe_load(dump_config(cfg))) == cfg


@settings(max_examples=40, deadline=None)
@given(
    value=st.one_of(
        st.integers(-(10**9), 10**9), st.booleans(), st.floats(allow_nan=False, allow_infinity=False)
    )
)
def test_override_values_parse_as_yaml_scalars(value: int | bool | float) -> None:
    rendered = yaml.safe_dump(value).splitlines()[0]
    assert parse_override(f"a.b={rendered}") == ("a.b", value)


def test_packaged_and_repo_smoke_configs_are_valid_and_identical() -> None:
    packaged = resources.files("cmpnas") / "configs" / "smoke.yaml"
    assert load_config(Path(str(packaged))) == load_config(REPO / "configs" / "smoke.yaml")
