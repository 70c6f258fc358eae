"""Typed, validated configuration (pydantic + YAML). One config object drives every stage.

One idea in one file although it is long: the schema is read as a whole (every section a stage reads, its
defaults and its checks), and a split would scatter the cross-section checks.

A YAML file is validated against :class:`Config`; unknown keys are errors (a typo must not be
silently ignored). CLI overrides use dotted keys: ``--set train.epochs=3``.
"""

from __future__ import annotations

import copy
import difflib
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cmpnas.errors import CmpnasError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where images come from and how they are split."""

    name: Literal["fashion_mnist", "folder", "csv", "synthetic", "deepfashion2", "ijbc_train", "digits"] = (
        "fashion_mnist"
    )
    root: str | None = Field(None, description="dataset folder / CSV file; None = look up defaults")
    download: bool = Field(True, description="allow torchvision's download when no local copy is found")
    val_size: int = Field(
        5000, ge=0, description="images held out of train for model selection / search reward"
    )
    subset_train: int | None = Field(
        None, ge=1, description="use only this many training images (smoke runs)"
    )
    subset_test: int | None = Field(None, ge=1, description="use only this many test images (smoke runs)")
    image_size: int = Field(28, ge=8, description="side length images are resized to (folder/csv)")
    in_chans: int = Field(1, description="1 = grayscale, 3 = RGB")
    open_set: bool = Field(
        False,
        description="test classes disjoint from training classes (folder, csv, fashion_mnist, digits; the last "
        "two also draw val from the held-out classes)",
    )
    open_set_test_fraction: float = Field(0.3, gt=0, lt=1)
    on_bad_image: Literal["skip", "error"] = "skip"
    margin: float = Field(0.0, ge=0, description="deepfashion2: widen item boxes by this fraction per side")
    label: Literal["identity", "category"] = Field(
        "identity", description="deepfashion2: class = (pair_id, style) identity, or the clothing category"
    )
    max_images: int | None = Field(
        None, ge=1, description="deepfashion2 / ijbc_train: read only the first N images (smoke runs)"
    )
    seed: int = 0

    @field_validator("in_chans")
    @classmethod
    def _chans(cls, v: int) -> int:
        if v not in (1, 3):
            raise ValueError("in_chans must be 1 (grayscale) or 3 (RGB)")
        return v


class ModelConfig(_Strict):
    """An embedding model: backbone + embedding head (dim D) + classifier."""

    backbone: str = Field(
        "cifar_resnet20",
        description="factory name, e.g. 'cifar_resnet20', 'timm:resnet18', 'tv:mobilenet_v2'",
    )
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)
    arch: dict[str, Any] | None = Field(None, description="SPOS architecture encoding (backbone 'spos')")
    embed_dim: int = Field(128, ge=2)
    classifier: Literal["linear", "cosine", "arcface", "cosface"] = "linear"
    cosine_scale: float = Field(16.0, gt=0, description="scale s of the cosine / arcface / cosface logits")
    margin: float = Field(0.5, ge=0, description="angular margin m of arcface (radians) / cosface (cosine)")
    pretrained: bool = False


class OptimConfig(_Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True


class TrainConfig(_Strict):
    """The one training loop's settings (every stage)."""

    epochs: float = Field(2, gt=0, description="may be fractional: 0.5 = half an epoch")
    batch_size: int = Field(128, ge=1)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    warmup_epochs: float = Field(0.2, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "fp32",
        description="bf16 autocast; auto = bf16 where the device computes it natively (CUDA with bf16, a CPU "
        "with AVX512-BF16 or AMX), fp32 elsewhere: emulated bf16 on an AVX2 CPU trains several times slower",
    )
    channels_last: bool = True
    augment: bool = True
    grad_clip: float | None = Field(
        None, gt=0, description="clip the gradients' global L2 norm to this (None = no clipping)"
    )
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None = torch default")
    log_every: int = Field(50, ge=1)


class CompatConfig(_Strict):
    """Weights of the compatibility losses combined in query / supernet training."""

    mode: Literal["independent", "bct"] = "bct"
    bct_weight: float = Field(1.0, ge=0, description="lambda of the BCT influence loss")
    align_weight: float = Field(0.0, ge=0, description="weight of the embedding-alignment term")
    align: Literal["cosine", "l2"] = "cosine"
    gallery_classifier: Literal["auto", "trained", "synthesized"] = Field(
        "auto",
        description="classifier used by BCT: the gallery's own ('trained'), BCT's class-mean one ('synthesized'), "
        "or 'auto' = trained when it covers the training classes, else synthesized",
    )
    terms: dict[str, float] = Field(
        default_factory=dict, description="weights of further registered compatibility terms, by name"
    )

    options: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="per-term options by name, e.g. {csd: {k: 16, temperature: 0.05}}"
    )

    def weights(self) -> dict[str, float]:
        """Every term's weight by registry name (bct and align first, in that order)."""
        return {"bct": self.bct_weight, "align": self.align_weight, **self.terms}


class SpaceConfig(_Strict):
    """The SPOS ShuffleNetV2 one-shot search space (defaults sized for 1x28x28 inputs)."""

    name: str = Field("spos", description="registered search space (cmpnas.models.spaces.SPACES)")
    stem_channels: int = Field(16, ge=4)
    stem_stride: int = Field(1, ge=1, le=4)
    stage_repeats: list[int] = Field(default_factory=lambda: [2, 2, 4, 2])
    stage_widths: list[int] = Field(default_factory=lambda: [24, 48, 96, 192])
    stage_strides: list[int] = Field(default_factory=lambda: [2, 2, 2, 2])
    last_channels: int = Field(128, ge=8)
    choices: list[Literal["shuffle3", "shuffle5", "shuffle7", "xception"]] = Field(
        default_factory=lambda: ["shuffle3", "shuffle5", "shuffle7", "xception"]
    )
    channel_scales: list[float] = Field(
        default_factory=lambda: [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6],
        description="mid-channel scales (SPOS)",
    )


class SearchConfig(_Strict):
    """Evolutionary search (SPOS defaults) and the reward."""

    population: int = Field(50, ge=2)
    generations: int = Field(20, ge=1)
    parents: int = Field(10, ge=1)
    mutations: int = Field(25, ge=0)
    crossovers: int = Field(25, ge=0)
    mutation_prob: float = Field(0.1, gt=0, le=1)
    max_tries_factor: int = Field(10, ge=1, description="each operator tries at most factor x count times")
    reward: Literal["R1", "R2", "R3"] = "R3"
    reward_weight: float = Field(0.5, ge=0, le=1, description="w in R3 = w*M(q,g) + (1-w)*M(q,q)")
    metric: Literal["top1", "map"] = "top1"
    recal_images: int = Field(2000, ge=1)
    recal_batch: int = Field(250, ge=1)
    val_images: int | None = Field(None, ge=1, description="use only this many val images for the reward")
    seed: int = 0


class BudgetConfig(_Strict):
    """One device class of a query-model family: a MACs cap (absolute or as a cost reduction) and/or a latency cap."""

    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="member name, also its folder and stage name (default: from the caps, e.g. '80x', '80x-0.3ms')",
    )
    cost_reduction: float | None = Field(None, gt=0, description="MACs cap = gallery MACs / this")
    macs: float | None = Field(None, gt=0, description="absolute MACs cap")
    latency_ms: float | None = Field(None, gt=0, description="cap on the latency table's batch-1 prediction")

    @model_validator(mode="after")
    def _one_cap_at_least(self) -> BudgetConfig:
        if self.cost_reduction is not None and self.macs is not None:
            raise ValueError("give cost_reduction or macs, not both")
        if self.cost_reduction is None and self.macs is None and self.latency_ms is None:
            raise ValueError("a budget needs cost_reduction, macs or latency_ms")
        return self

    def label(self) -> str:
        """The member's name: the configured one, else the caps (``80x``, ``1.2MMACs``, ``80x-0.3ms``)."""
        if self.name:
            return self.name
        parts = []
        if self.cost_reduction is not None:
            parts.append(f"{self.cost_reduction:g}x")
        if self.macs is not None:
            parts.append(f"{self.macs / 1e6:g}MMACs")
        if self.latency_ms is not None:
            parts.append(f"{self.latency_ms:g}ms")
        return "-".join(parts)


class LatencyConfig(_Strict):
    """How the latency table is measured: the deployment runtime at batch 1 (as `cmpnas export` measures)."""

    runtime: Literal["onnxruntime", "torch"] = "onnxruntime"
    threads: int = Field(1, ge=1)
    repeats: int = Field(20, ge=1)
    warmup: int = Field(3, ge=0)
    rounds: int = Field(10, ge=1, description="interleaved timing passes over every block (noise on a busy machine)")
    statistic: Literal["min", "p50"] = Field("min", description="per entry: the fastest run, or the quietest pass's median")


class SupernetConfig(_Strict):
    """How supernet paths are drawn, what they learn from, and when a supernet is too weak to search.

    Band sampling favours narrow layers (the band sits at the cheap end of the space) and slicing always
    trains the first channels, so a layer's widest channels are rarely updated: ``width_warmup`` trains every
    layer at its widest scale first, and ``sampling: fair`` gives one random layer per step a uniformly drawn
    scale and repairs the others into the band instead of rejecting.
    """

    width_warmup: float = Field(
        0.0, ge=0, lt=1, description="fraction of the steps that train random blocks at every layer's widest scale"
    )
    sampling: Literal["rejection", "fair"] = Field(
        "rejection",
        description="rejection = uniform paths rejection-sampled into the band (SPOS); fair = one layer's scale "
        "drawn uniformly, the other layers repaired into the band",
    )
    sandwich: bool = Field(
        False,
        description="after the warm-up every step also trains the space's widest and narrowest paths (random "
        "blocks) beside the in-band path: the sandwich rule, so every channel is trained at every step",
    )
    inplace_distill: bool = Field(
        False,
        description="with sandwich: the narrower paths learn the widest path's classifier output (in-place "
        "distillation) instead of the labels; the compatibility terms stay on every path",
    )
    compat: CompatConfig | None = Field(
        None,
        description="the supernet's compatibility objective (None = the run's compat); e.g. align_weight > 0 "
        "distils every path to the cached gallery embeddings (set supernet_train.augment: false with it)",
    )
    health_paths: int = Field(16, ge=1, description="random in-band paths scored on validation after training")
    min_skill: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="the search refuses a supernet whose paths score below chance + min_skill x (100 - chance) "
        "on classifier or heterogeneous top-1 (mean over the health paths)",
    )

    @model_validator(mode="after")
    def _distill_needs_a_teacher(self) -> SupernetConfig:
        if self.inplace_distill and not self.sandwich:
            raise ValueError("inplace_distill needs sandwich: true (the widest path is the teacher)")
        return self


class NasConfig(_Strict):
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    budgets: list[BudgetConfig] | None = Field(
        None,
        min_length=1,
        description="a family of query models, one per budget, from one search (`cmpnas run` adds the family "
        "stages); None = no family (budget_* below set the one budget of the R1/R2/R3 searches)",
    )
    family_floor: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="a family member's query MACs must be at least this fraction of its MACs cap (None = any cost "
        "under the cap): each member then uses its own budget instead of every budget picking the cheapest "
        "architecture the supernet ranks first",
    )
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    budget_macs: float | None = Field(None, gt=0, description="query cost cap in MACs")
    budget_cost_reduction: float | None = Field(
        80.0, gt=0, description="cap = gallery MACs / this (used when budget_macs is None)"
    )
    budget_latency_ms: float | None = Field(
        None,
        gt=0,
        description="optional cap on the query model's batch-1 latency in ONNX Runtime (1 thread), "
        "predicted by the space's latency table measured on this machine",
    )
    sample_band: float | None = Field(
        0.5, gt=0, le=1, description="supernet paths sampled with MACs in [band*cap, cap] (None = uniform)"
    )
    supernet_train: TrainConfig = Field(default_factory=TrainConfig)
    supernet: SupernetConfig = Field(default_factory=SupernetConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    retrain: TrainConfig | None = Field(
        None,
        description="schedule of `cmpnas retrain` (None = query_train); `cmpnas run` requires it to equal "
        "query_train: every query model of one table trains on one schedule",
    )
    study_archs: int = Field(40, ge=0)
    study_modes: list[Literal["bct", "independent"]] = Field(
        default_factory=lambda: ["bct", "independent"],
        description="how the study's archs are trained (the paper's Q1 compares both; Q2 needs only bct)",
    )
    ranking_archs: int = Field(
        0,
        ge=0,
        description="archs stratified by MACs over the bands the supernet trains ([sample_band*cap, cap] per cap), "
        "trained stand-alone with BCT (study_train, ranking_seeds), against the supernet's estimates: how far the "
        "search's ranking can be trusted",
    )
    ranking_seeds: list[int] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="each ranking arch is trained once per seed s (study_train seed + s); with two or more the "
        "report measures the target's split-half reliability and the Kendall ceiling it implies",
    )
    study_band: float = Field(0.15, gt=0, lt=1, description="study archs within +-band of the budget")
    study_train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=1))

    @field_validator("budgets")
    @classmethod
    def _distinct_budget_names(cls, budgets: list[BudgetConfig] | None) -> list[BudgetConfig] | None:
        names = [b.label() for b in budgets or []]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise ValueError(f"two budgets are named {clash[0]!r}; give them distinct 'name's")
        return budgets


class BaselineConfig(_Strict):
    """A hand-designed query model trained by `cmpnas run` for comparison."""

    name: str
    model: ModelConfig
    compat: Literal["independent", "bct"] = "bct"
    family: str | None = Field(
        None, description="hand-designed family it belongs to (e.g. MobileNetV2): one line in the family plot"
    )
    stem: Literal["stock", "matched"] = Field(
        "stock",
        description="a label for the report: 'matched' = the model downsamples as the search space does (same "
        "final feature-map size, e.g. tv: backbone_kwargs stem_stride: 1), so it is compared with the searched "
        "model apart from the stock-stem models; the model itself is what `model` says",
    )


class UpgradeConfig(_Strict):
    """A gallery-model upgrade in `cmpnas run` (docs/upgrades.md): a new gallery model trained with the run's compat
    objective against the run's gallery, the same without it (the control), and the BCT compatibility table with
    the backfill curve."""

    gallery: ModelConfig | None = Field(None, description="the new gallery model; None = the run's gallery config")
    gallery_train: TrainConfig = Field(description="the new gallery model's schedule")
    control: bool = Field(True, description="also train the control (no compat term): M(control, old) should collapse")
    split: Literal["val", "test"] = "test"


class RunConfig(_Strict):
    """What `cmpnas run` does beyond the core stages."""

    baselines: list[BaselineConfig] = Field(default_factory=list)
    rewards: list[Literal["R1", "R2", "R3"]] = Field(default_factory=lambda: ["R1", "R2", "R3"])
    headline_reward: Literal["R1", "R2", "R3"] = "R3"
    study: bool = True
    export_onnx: bool = True
    onnx_exporter: Literal["auto", "dynamo", "legacy"] = Field(
        "auto",
        description="auto = torch's dynamo exporter (needs onnxscript), falling back to the legacy one",
    )
    export_int8: bool = Field(
        False,
        description="also write an int8 query model beside the export (static QDQ quantization calibrated on "
        "training images), refused if its embeddings drift from the fp32 export's; its retrieval, size and "
        "latency next to the fp32 export's go to export/query.int8.json",
    )
    build_index: bool = True
    upgrade: UpgradeConfig | None = None
    latency_repeats: int = Field(50, ge=1)
    seeds: list[int] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="every query model (baselines, retrains) is trained once per seed s, with its TrainConfig "
        "seed + s, over the same gallery and supernet; the search runs once. Seed 0 keeps the stage names and "
        "folders of a single-seed run",
    )
    random_controls: int = Field(
        0,
        ge=0,
        description="beside a search: this many distinct architectures drawn uniformly from the search space "
        "within the search's MACs band [nas.sample_band x budget, budget], each trained like a searched one "
        "(table schedule, compat objective, every seed): what the search buys over a random pick",
    )
    random_controls_seed: int = Field(
        0, description="seed of the random controls' draw (one draw for the run, recorded in the report)"
    )

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if any(s < 0 for s in v) or len(set(v)) != len(v):
            raise ValueError("seeds must be distinct non-negative integers, e.g. [0, 1, 2]")
        return v


class IndexConfig(_Strict):
    """Where the pipeline's ``index`` stage puts the gallery: one setting moves it to a Milvus cluster."""

    backend: Literal["faiss", "milvus"] = "faiss"
    uri: str | None = Field(
        None,
        description="milvus: a Milvus Lite *.db file (default: inside the index folder) or http://HOST:19530",
    )
    collection: str | None = Field(None, description="milvus: collection name (default 'gallery')")


class Config(_Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    gallery: ModelConfig = Field(default_factory=ModelConfig)
    gallery_train: TrainConfig = Field(default_factory=TrainConfig)
    query: ModelConfig = Field(
        default_factory=lambda: ModelConfig(backbone="tv:mobilenet_v2", backbone_kwargs={"width_mult": 0.35})
    )
    query_train: TrainConfig = Field(default_factory=TrainConfig)
    compat: CompatConfig = Field(default_factory=CompatConfig)
    nas: NasConfig = Field(default_factory=NasConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    eval_batch_size: int = Field(512, ge=1)


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise CmpnasError(
                f"Override '{key}': '{p}' is not a section.", "use a dotted path to a leaf option"
            )
    cur[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value is read as YAML so numbers, bools and lists work."""
    if "=" not in item:
        raise CmpnasError(
            f"Override '{item}' has no '='.", "write overrides as key=value, e.g. train.epochs=3"
        )
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def load_config_dict(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise CmpnasError(f"Config file '{p}' {what}.", "pass an existing YAML file, e.g. configs/smoke.yaml")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CmpnasError(
            f"Config file '{p}' is not UTF-8 text (byte {exc.start} cannot be decoded).",
            "pass the YAML config file, saved as UTF-8 (not a model, archive or image)",
        ) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise CmpnasError(
            f"Config file '{p}' is not valid YAML: {_yaml_problem(exc)}.",
            "fix the YAML syntax at that line (indent with spaces, close every bracket and quote)",
        ) from None
    if not isinstance(data, dict):
        raise CmpnasError(f"Config file '{p}' must hold a mapping of sections.", "see configs/default.yaml")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """'line L, column C: <problem> (<context>)' from a parser error, instead of its multi-line dump."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + problem + (f" ({context})" if context else "")


def build_config(
    raw: dict[str, Any], overrides: list[str] | None = None, model: type[BaseModel] = Config
) -> Any:
    """Validate ``raw`` + overrides against ``model``; errors name the key and the expected value."""
    data = copy.deepcopy(raw)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc.errors()[0], model) from None


def _config_error(err: Any, model: type[BaseModel]) -> CmpnasError:
    """One validation error as a CmpnasError; an unknown key names the closest known key."""
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        known = _keys_at(model, err["loc"][:-1])
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        section = ".".join(str(x) for x in err["loc"][:-1])
        action = f"rename it to '{section + '.' if section else ''}{close[0]}'" if close else "remove it"
        return CmpnasError(
            f"Unknown config key '{loc}' (in the YAML file or a --set override).",
            f"{action} (valid keys here: {', '.join(known)})",
        )
    got = repr(err.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return CmpnasError(
        f"Bad config value at '{loc}': {err['msg']} (got {got}).",
        "correct that key in the YAML file or the --set override (see `cmpnas <command> --help`)",
    )


def _keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the config section at ``loc`` (list indices skipped); [] if it is not a section."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(str(part)) if isinstance(current, type) else None
        if field is None:
            return []
        current = field.annotation
        for arg in typing.get_args(current):  # list[BaselineConfig], X | None
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, model: type[BaseModel] = Config
) -> Any:
    return build_config(load_config_dict(path), overrides, model)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def profile_path(name: str) -> Path:
    """A packaged profile (``cmpnas/configs/<name>.yaml``)."""
    root = resources.files("cmpnas") / "configs"
    names = sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))
    if name not in names:
        raise CmpnasError(f"Unknown profile '{name}'.", f"use one of: {', '.join(names)}")
    return Path(str(root / f"{name}.yaml"))
