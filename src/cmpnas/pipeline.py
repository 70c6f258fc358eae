"""`cmpnas run`: every stage from one config, skipping stages already done for the same inputs.

Each stage's record (a key = hash of its config sections and upstream keys, its outputs and
timing) is kept in ``RUN/run_state.json``; a stage whose record matches is skipped, so a killed
run continues where it stopped (and long stages resume from their own checkpoints).

Reliability (docs/reliability.md): one run per folder (``RUN/run.lock``); a stage is only skipped when its
outputs still read back; a corrupt ``run_state.json`` is refused rather than guessed around.

Seeds (``run.seeds``): every query model (each baseline, each retrain) is trained once per seed ``s``
over the same gallery, supernet and search, with its TrainConfig seed + ``s``. Seed 0 keeps the
single-seed stage names and folders (``baseline-NAME``, ``baselines/NAME``), so existing runs stay
valid; seed ``s > 0`` is ``baseline-NAME@s<s>`` in ``baselines/NAME/seed<s>`` (``retrain-R3@s1`` in
``retrain/R3/seed1``). The search runs once.

Random controls (``run.random_controls``): architectures drawn uniformly from the searched space within the
search's MACs band, trained like a searched one (``control-random<i>`` in ``controls/random<i>``), so the
table says what the search buys over a random pick.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmpnas import progress
from cmpnas.config import CompatConfig, Config, TrainConfig, dump_config
from cmpnas.distributed import init_distributed
from cmpnas.errors import CmpnasError
from cmpnas.io import (
    is_temporary,
    make_dirs,
    read_json,
    read_jsonl,
    remove_temporaries,
    write_json_atomic,
    write_text_atomic,
)
from cmpnas.models.embedding import verify_safetensors
from cmpnas.report import CONTROL_KIND, write_report
from cmpnas.runlock import describe, run_lock
from cmpnas.serving.family import read_family
from cmpnas.serving.index import GalleryIndex
from cmpnas.stages import (
    evaluate_query_models,
    export_model,
    index_dataset,
    load_data,
    retrain,
    search,
    study,
    train_gallery,
    train_query,
    train_supernet,
)
from cmpnas.stages.common import MODEL_FILE, nas_setup
from cmpnas.stages.family import export_family
from cmpnas.stages.study import sample_archs
from cmpnas.stages.upgrade import evaluate_upgrade, upgrade_gallery, upgrade_markdown

STATE_FILE = "run_state.json"
SEED_DIR = re.compile(r"seed\d+")


@dataclass
class StageDef:
    name: str
    deps: list[str]
    config_parts: Callable[[Config], Any]
    fn: Callable[[RunContext], dict[str, Any]]


@dataclass
class RunContext:
    cfg: Config
    out: Path
    data: Any = None
    state: dict[str, Any] = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    @property
    def gallery_path(self) -> Path:
        return self.path("gallery", "model.safetensors")

    @property
    def supernet_path(self) -> Path:
        return self.path("supernet", "supernet.safetensors")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dump(x: Any) -> Any:
    return x.model_dump(mode="json") if hasattr(x, "model_dump") else x


# ------------------------------------------------------------------------------------------ seeds
def seed_suffix(seed: int) -> str:
    """Stage-name suffix of a seed; seed 0 has none, so single-seed runs keep their stage names."""
    return "" if seed == 0 else f"@s{seed}"


def split_seed(name: str) -> tuple[str, int]:
    """``"retrain-R3@s2"`` -> ``("retrain-R3", 2)``; a name without a suffix is seed 0."""
    base, sep, seed = name.rpartition("@s")
    return (base, int(seed)) if sep and seed.isdigit() else (name, 0)


def seed_folder(folder: Path, seed: int) -> Path:
    """Seed 0 writes where a single-seed run writes; seed s > 0 in ``folder/seed<s>``."""
    return folder if seed == 0 else folder / f"seed{seed}"


def seeded(tcfg: TrainConfig, seed: int) -> TrainConfig:
    """The training config of seed ``s``: its own seed + s (seed 0 = the config as written)."""
    return tcfg.model_copy(update={"seed": tcfg.seed + seed})


# ------------------------------------------------------------------------------------------ stages
def _gallery(ctx: RunContext) -> dict[str, Any]:
    return dict(train_gallery(ctx.cfg, ctx.path("gallery"), resume=True, data=ctx.data))


def _baseline(index: int, seed: int) -> Callable[[RunContext], dict[str, Any]]:
    def run(ctx: RunContext) -> dict[str, Any]:
        b = ctx.cfg.run.baselines[index]
        compat = CompatConfig(**{**ctx.cfg.compat.model_dump(), "mode": b.compat})
        res = train_query(
            ctx.cfg,
            ctx.gallery_path,
            seed_folder(ctx.path("baselines", b.name), seed),
            resume=True,
            data=ctx.data,
            model_cfg=b.model,
            compat=compat,
            train_cfg=seeded(table_schedule(ctx.cfg), seed),
            name=b.name,
        )
        return {**res, "seed": seed}

    return run


def _supernet(ctx: RunContext) -> dict[str, Any]:
    return dict(train_supernet(ctx.cfg, ctx.gallery_path, ctx.path("supernet"), resume=True, data=ctx.data))


def _search(reward: str) -> Callable[[RunContext], dict[str, Any]]:
    def run(ctx: RunContext) -> dict[str, Any]:
        scfg = ctx.cfg.nas.search.model_copy(update={"reward": reward})
        res = search(
            ctx.cfg,
            ctx.gallery_path,
            ctx.supernet_path,
            ctx.path("search", reward),
            resume=True,
            data=ctx.data,
            search_cfg=scfg,
            cache_path=ctx.path("search", "candidates.json"),
        )
        return {
            "best": res["best"],
            "seconds": res["seconds"],
            "n_candidates": res["n_candidates"],
            "evaluator_calls": res["evaluator_calls"],
        }

    return run


# searched architectures retrained on the table's schedule: stage kind -> the folder of its models
SEARCHED_FOLDERS = {"retrain": "retrain", "member": "family", "control": "controls"}


def _train_searched(
    ctx: RunContext, kind: str, name: str, arch: dict, earlier: list[str], seed: int
) -> dict[str, Any]:
    """Train a searched architecture for one seed, once: two rewards (or two family members) may find the same
    arch, so an earlier stage of this kind and seed with it is pointed at instead. Only the stages before this
    one (its deps) have records of this run; the first match was trained."""
    for other in earlier:
        rec = ctx.state.get(f"{kind}-{other}{seed_suffix(seed)}")
        if rec and rec.get("outputs", {}).get("arch") == arch:
            return {**rec["outputs"], "same_as": other}
    folder = seed_folder(ctx.path(SEARCHED_FOLDERS[kind], name), seed)
    res = retrain(
        ctx.cfg,
        ctx.gallery_path,
        arch,
        folder,
        resume=True,
        data=ctx.data,
        name=f"cmpnas-{name}",
        train_cfg=seeded(table_schedule(ctx.cfg), seed),
    )
    return {**res, "arch": arch, "dir": str(folder), "seed": seed}


def _searched_dir(ctx: RunContext, kind: str, name: str, seed: int) -> Path:
    """Where the model of (name, seed) is: its own folder, or that of an earlier stage with its arch."""
    rec = ctx.state.get(f"{kind}-{name}{seed_suffix(seed)}", {}).get("outputs", {})
    return seed_folder(ctx.path(SEARCHED_FOLDERS[kind], rec.get("same_as", name)), seed)


def _retrain(reward: str, seed: int) -> Callable[[RunContext], dict[str, Any]]:
    def run(ctx: RunContext) -> dict[str, Any]:
        arch = ctx.state[f"search-{reward}"]["outputs"]["best"]["arch"]
        rewards = ctx.cfg.run.rewards
        return _train_searched(ctx, "retrain", reward, arch, rewards[: rewards.index(reward)], seed)

    return run


# ------------------------------------------------------------------------------------------ random controls
def control_names(cfg: Config) -> list[str]:
    """The random controls of a run: only beside a search (they are what the search is measured against)."""
    return [f"random{i}" for i in range(cfg.run.random_controls)] if cfg.run.rewards else []


def draw_random_controls(cfg: Config, gallery_path: str | Path, data: Any = None) -> dict[str, Any]:
    """``run.random_controls`` distinct archs drawn uniformly from the space's archs whose query MACs (embedding
    head included) lie in the band the search samples, [nas.sample_band x budget, budget].

    The draw depends only on the config and the gallery's MACs, with its own seed, so every control stage draws
    the same list and a rerun draws it again; the search's result is not looked at.
    """
    setup = nas_setup(cfg, gallery_path, data)
    low, high = (cfg.nas.sample_band or 0.0) * setup.budget, setup.budget
    n, seed = cfg.run.random_controls, cfg.run.random_controls_seed
    archs = sample_archs(setup.space, low, high, n, seed, setup.gallery.spec.embed_dim)
    if len(archs) < n:
        raise CmpnasError(
            f"Only {len(archs)} of {n} random controls were found in the search band "
            f"{low / 1e6:.3f}-{high / 1e6:.3f} MMACs.",
            "lower run.random_controls, or widen the band (nas.sample_band)",
        )
    return {"archs": archs, "band": [low, high], "budget": high, "seed": seed}


def _control(index: int, seed: int) -> Callable[[RunContext], dict[str, Any]]:
    """Train random control ``index`` for one seed as a searched architecture is: the table's schedule, the
    run's compat objective."""

    def run(ctx: RunContext) -> dict[str, Any]:
        draw = draw_random_controls(ctx.cfg, ctx.gallery_path, ctx.data)
        name = f"random{index}"
        folder = seed_folder(ctx.path(SEARCHED_FOLDERS["control"], name), seed)
        res = retrain(
            ctx.cfg,
            ctx.gallery_path,
            draw["archs"][index],
            folder,
            resume=True,
            data=ctx.data,
            name=f"{CONTROL_KIND}{index}",
            train_cfg=seeded(table_schedule(ctx.cfg), seed),
        )
        where = {"index": index, "seed": draw["seed"], "band": draw["band"]}
        return {**res, "arch": draw["archs"][index], "draw": where, "dir": str(folder), "seed": seed}

    return run


def _control_stages(cfg: Config) -> list[StageDef]:
    """One stage per random control and seed, built on the gallery only (the draw needs its MACs)."""

    def parts(c: Config, index: int) -> list[Any]:
        # what fixes the drawn arch (the space, the budget, the band, the seed, its index; the gallery's MACs via
        # the dep) and how it is trained (the model settings of a retrain, the table's schedule, the compat)
        draw = [_dump(c.nas.space), c.nas.budget_macs, c.nas.budget_cost_reduction, c.nas.sample_band]
        model = [c.query.classifier, c.query.cosine_scale, c.query.margin]
        return [draw, c.run.random_controls_seed, index, model, _dump(table_schedule(c)), _dump(c.compat)]

    return [
        StageDef(f"control-{name}{seed_suffix(s)}", ["gallery"], lambda c, i=i: parts(c, i), _control(i, s))
        for i, name in enumerate(control_names(cfg))
        for s in cfg.run.seeds
    ]


# ------------------------------------------------------------------------------------------ family
FAMILY_SEARCH = "family-search"
FAMILY_EXPORT = "family-export"


def _family_search(ctx: RunContext) -> dict[str, Any]:
    res = search(
        ctx.cfg,
        ctx.gallery_path,
        ctx.supernet_path,
        ctx.path("search", "family"),
        resume=True,
        data=ctx.data,
        cache_path=ctx.path("search", "candidates.json"),
        family=True,
        latency_path=ctx.path("search", "latency_table.json"),
    )
    return {
        "family": "search/family/family.json",
        "members": [{"name": b["name"], "arch": b["best"]["arch"], "macs": b["best"]["macs"]} for b in res["budgets"]],
        "seconds": res["seconds"],
        "n_candidates": res["n_candidates"],
        "evaluator_calls": res["evaluator_calls"],
    }


def member_names(cfg: Config) -> list[str]:
    return [b.label() for b in cfg.nas.budgets or []]


def _member(name: str, seed: int) -> Callable[[RunContext], dict[str, Any]]:
    """Retrain one family member (one seed) on the table's schedule."""

    def run(ctx: RunContext) -> dict[str, Any]:
        arch = {m["name"]: m for m in ctx.state[FAMILY_SEARCH]["outputs"]["members"]}[name]["arch"]
        names = member_names(ctx.cfg)
        return _train_searched(ctx, "member", name, arch, names[: names.index(name)], seed)

    return run


def _family_export(ctx: RunContext) -> dict[str, Any]:
    _, doc = read_family(ctx.path("search", "family"))
    seed = ctx.cfg.run.seeds[0]
    doc["members"] = [
        {**m, "model": str((_searched_dir(ctx, "member", m["name"], seed) / MODEL_FILE).relative_to(ctx.out))}
        for m in doc["members"]
    ]
    references = [(b.name, seed_folder(ctx.path("baselines", b.name), seed) / MODEL_FILE) for b in ctx.cfg.run.baselines]
    res = export_family(
        doc,
        ctx.out,
        ctx.path("export", "family"),
        exporter=ctx.cfg.run.onnx_exporter,
        latency_runs=ctx.cfg.run.latency_repeats,
        references=references,
    )
    return {
        "family": "export/family/family.json",
        "latency_check": res["latency_check"],
        "members": [
            {k: m[k] for k in ("name", "macs", "macs_counted", "latency_ms_predicted", "latency_ms_measured", "latency_error_pct")}
            for m in res["members"]
        ],
    }


def _family_stages(cfg: Config) -> tuple[list[StageDef], list[StageDef]]:
    """(family-search + member retrains, family-export) when ``nas.budgets`` is set."""
    if not cfg.nas.budgets:
        return [], []
    stages = [
        StageDef(
            FAMILY_SEARCH,
            ["supernet"],
            lambda c: [_dump(c.nas.search), _dump(c.nas.budgets), _dump(c.nas.latency)],
            _family_search,
        )
    ]
    names = member_names(cfg)
    for name in names:
        for s in cfg.run.seeds:
            deps = [FAMILY_SEARCH] + [f"member-{o}{seed_suffix(s)}" for o in names[: names.index(name)]]
            stages.append(
                StageDef(
                    f"member-{name}{seed_suffix(s)}",
                    deps,
                    lambda c: [_dump(table_schedule(c)), _dump(c.compat)],
                    _member(name, s),
                )
            )
    export_deps = [st.name for st in stages] + [
        f"baseline-{b.name}{seed_suffix(cfg.run.seeds[0])}" for b in cfg.run.baselines
    ]
    export = StageDef(FAMILY_EXPORT, export_deps, lambda c: [c.run.onnx_exporter, c.run.latency_repeats], _family_export)
    return stages, [export]


def _study(ctx: RunContext) -> dict[str, Any]:
    res = study(ctx.cfg, ctx.gallery_path, ctx.path("study"), supernet_path=ctx.supernet_path, data=ctx.data)
    return {k: v for k, v in res.items() if k != "rows"}


def query_model_dirs(ctx: RunContext) -> list[tuple[str, Path, str, int]]:
    """(display name, model dir, kind, seed) of every query model and seed of the run, in report order."""
    seeds = ctx.cfg.run.seeds
    rows = [
        (b.name, seed_folder(ctx.path("baselines", b.name), s), "baseline", s)
        for b in ctx.cfg.run.baselines
        for s in seeds
    ]
    for r in ctx.cfg.run.rewards:
        rows += [(f"CMP-NAS {r} (searched, BCT)", _searched_dir(ctx, "retrain", r, s), f"searched-{r}", s) for s in seeds]
    for i, name in enumerate(control_names(ctx.cfg)):
        rows += [
            (control_display_name(i), _searched_dir(ctx, "control", name, s), CONTROL_KIND, s) for s in seeds
        ]
    for name in member_names(ctx.cfg):
        rows += [(f"CMP-NAS family {name}", _searched_dir(ctx, "member", name, s), f"family-{name}", s) for s in seeds]
    return rows


def control_display_name(index: int) -> str:
    return f"random arch {index} (same space, BCT)"


def _evaluate(ctx: RunContext) -> dict[str, Any]:
    models = [(name, folder / MODEL_FILE, kind, s) for name, folder, kind, s in query_model_dirs(ctx)]
    res = evaluate_query_models(ctx.cfg, ctx.gallery_path, models, ctx.path("evaluation"), data=ctx.data)
    return {"rows": "evaluation/rows.json", "n_models": res["n_models"], "n_rows": res["n_rows"]}


def _headline_dir(ctx: RunContext) -> Path:
    """The headline reward's model of the first seed (the one exported)."""
    return _searched_dir(ctx, "retrain", ctx.cfg.run.headline_reward, ctx.cfg.run.seeds[0])


def _export(ctx: RunContext) -> dict[str, Any]:
    res = export_model(
        _headline_dir(ctx) / MODEL_FILE,
        ctx.path("export", "query.onnx"),
        exporter=ctx.cfg.run.onnx_exporter,
        int8=ctx.cfg.run.export_int8,
        gallery_model=ctx.gallery_path,
        data=ctx.data,
    )
    return {
        "onnx": "export/query.onnx",
        **{k: v for k, v in res.items() if isinstance(v, (int, float, str, dict))},
    }


def _index(ctx: RunContext) -> dict[str, Any]:
    res = index_dataset(ctx.gallery_path, ctx.cfg.data, "test", ctx.path("index"), store=ctx.cfg.index)
    return {"index": "index", **{k: v for k, v in res.items() if isinstance(v, (int, float, str))}}


UPGRADE_FOLDERS = {"upgrade-gallery": "upgrade/v2", "upgrade-control": "upgrade/control", "evaluate-upgrade": "upgrade/evaluate"}


def _upgrade(control: bool) -> Callable[[RunContext], dict[str, Any]]:
    def run(ctx: RunContext) -> dict[str, Any]:
        up = ctx.cfg.run.upgrade
        cfg = ctx.cfg.model_copy(update={"gallery": up.gallery or ctx.cfg.gallery, "gallery_train": up.gallery_train})
        name = "upgrade-control" if control else "upgrade-gallery"
        res = upgrade_gallery(
            cfg, ctx.gallery_path, ctx.path(UPGRADE_FOLDERS[name]), resume=True, data=ctx.data, independent=control
        )
        return dict(res)

    return run


def _upgrade_small(ctx: RunContext) -> Path | None:
    """The query model of the upgrade table: the headline searched model, else the first BCT baseline."""
    if ctx.cfg.run.rewards:
        return _headline_dir(ctx) / MODEL_FILE
    bct = [b for b in ctx.cfg.run.baselines if b.compat == "bct"]
    return ctx.path("baselines", bct[0].name, MODEL_FILE) if bct else None


def _evaluate_upgrade(ctx: RunContext) -> dict[str, Any]:
    up = ctx.cfg.run.upgrade
    res = evaluate_upgrade(
        ctx.cfg,
        ctx.gallery_path,
        ctx.path(UPGRADE_FOLDERS["upgrade-gallery"], MODEL_FILE),
        ctx.path(UPGRADE_FOLDERS["evaluate-upgrade"]),
        small=_upgrade_small(ctx),
        independent=ctx.path(UPGRADE_FOLDERS["upgrade-control"], MODEL_FILE) if up.control else None,
        data=ctx.data,
        split=up.split,
    )
    return {"results": f"{UPGRADE_FOLDERS['evaluate-upgrade']}/results.json", "bct_criterion": res["bct_criterion"]}


def _upgrade_stages(cfg: Config, earlier: list[StageDef]) -> list[StageDef]:
    """upgrade-gallery, upgrade-control (optional) and evaluate-upgrade, when ``run.upgrade`` is set."""
    if cfg.run.upgrade is None:
        return []
    part = lambda c: [_dump(c.run.upgrade), _dump(c.compat)]  # noqa: E731
    stages = [StageDef("upgrade-gallery", ["gallery"], part, _upgrade(False))]
    if cfg.run.upgrade.control:
        stages.append(StageDef("upgrade-control", ["gallery"], part, _upgrade(True)))
    small = [s.name for s in earlier if s.name == f"retrain-{cfg.run.headline_reward}" or s.name.startswith("baseline-")]
    stages.append(
        StageDef("evaluate-upgrade", [s.name for s in stages] + small, lambda c: [c.eval_batch_size], _evaluate_upgrade)
    )
    return stages


def _report(ctx: RunContext) -> dict[str, Any]:
    return write_report(ctx.out, ctx.cfg, ctx.state, gallery_model=ctx.gallery_path, upgrade_markdown=upgrade_markdown)


def wants_study(cfg: Config) -> bool:
    return cfg.run.study and (cfg.nas.study_archs > 0 or cfg.nas.ranking_archs > 0)


def build_stages(cfg: Config) -> list[StageDef]:
    """The stage graph for this config (optional stages only when enabled and available)."""
    data_part = lambda c: _dump(c.data)  # noqa: E731
    stages = [
        StageDef("gallery", [], lambda c: [data_part(c), _dump(c.gallery), _dump(c.gallery_train)], _gallery)
    ]
    for i, b in enumerate(cfg.run.baselines):
        for s in cfg.run.seeds:
            stages.append(
                StageDef(
                    f"baseline-{b.name}{seed_suffix(s)}",
                    ["gallery"],
                    # the family and stem labels only name a line in a plot and a row's group in the report:
                    # changing them retrains nothing
                    lambda c, i=i: [
                        c.run.baselines[i].model_dump(mode="json", exclude={"family", "stem"}),
                        _dump(table_schedule(c)),
                        _dump(c.compat),
                    ],
                    _baseline(i, s),
                )
            )
    # the family's budgets widen the supernet's sampling band; without a family the key is what it always was
    nas_common = lambda c: [_dump(c.nas.space), c.nas.budget_macs, c.nas.budget_cost_reduction] + (  # noqa: E731
        [_dump(c.nas.budgets)] if c.nas.budgets else []
    )
    family_stages, family_export = _family_stages(cfg)
    if cfg.run.rewards or wants_study(cfg) or family_stages:
        stages.append(
            StageDef(
                "supernet",
                ["gallery"],
                lambda c: [
                    nas_common(c),
                    c.nas.sample_band,
                    _dump(c.nas.supernet_train),
                    _dump(c.nas.supernet),
                    _dump(c.compat),
                    _dump(c.query),
                ],
                _supernet,
            )
        )
    for r in cfg.run.rewards:
        stages.append(
            StageDef(
                f"search-{r}",
                ["supernet"],
                lambda c, r=r: [_dump(c.nas.search), r, c.nas.budget_latency_ms],
                _search(r),
            )
        )
    for r in cfg.run.rewards:
        for s in cfg.run.seeds:
            earlier = cfg.run.rewards[: cfg.run.rewards.index(r)]
            deps = [f"search-{r}"] + [f"retrain-{o}{seed_suffix(s)}" for o in earlier]
            stages.append(
                StageDef(
                    f"retrain-{r}{seed_suffix(s)}",
                    deps,
                    lambda c: [_dump(table_schedule(c)), _dump(c.compat)],
                    _retrain(r, s),
                )
            )
    if wants_study(cfg):
        stages.append(
            StageDef(
                "study",
                ["supernet"],
                lambda c: [
                    c.nas.study_archs,
                    c.nas.study_band,
                    _dump(c.nas.study_train),
                    _dump(c.nas.search),
                    c.nas.study_modes,
                    c.nas.ranking_archs,
                    c.nas.ranking_seeds,
                    c.nas.sample_band,
                ],
                _study,
            )
        )
    stages += _control_stages(cfg)
    stages += family_stages
    query_stages = ("baseline-", "retrain-", "control-", "member-")
    evaluate_deps = [s.name for s in stages if s.name.startswith(query_stages)]
    stages.append(
        StageDef(
            "evaluate",
            ["gallery", *evaluate_deps],
            # "val": every model is also scored on the validation split (what the report chooses the best by)
            lambda c: [c.eval_batch_size, c.run.latency_repeats, "val"],
            _evaluate,
        )
    )
    if cfg.run.export_onnx and cfg.run.rewards:
        stages.append(
            StageDef(
                "export",
                [f"retrain-{cfg.run.headline_reward}{seed_suffix(cfg.run.seeds[0])}"],
                lambda c: [c.run.onnx_exporter, c.run.export_int8],
                _export,
            )
        )
    if cfg.run.export_onnx:
        stages += family_export
    if cfg.run.build_index:
        stages.append(StageDef("index", ["gallery"], lambda c: [_dump(c.index)], _index))
    stages += _upgrade_stages(cfg, stages)
    stages.append(StageDef("report", [s.name for s in stages], lambda c: [], _report))
    return stages


def stage_key(stage: StageDef, cfg: Config, state: dict[str, Any]) -> str:
    return _hash([stage.name, stage.config_parts(cfg), [state.get(d, {}).get("key") for d in stage.deps]])


def stage_paths(out: Path, name: str) -> list[Path]:
    """The files and folders a stage writes (what ``--force`` deletes and a skip checks).

    A query model's seed 0 owns its folder minus the ``seed<s>`` folders of the other seeds.
    """
    base, seed = split_seed(name)
    kind, _, arg = base.partition("-")
    if name in ("gallery", "supernet", "study"):
        return [out / name]
    if name in UPGRADE_FOLDERS:
        return [out / UPGRADE_FOLDERS[name]]
    if name == FAMILY_SEARCH:
        return [out / "search" / "family", out / "search" / "candidates.json"]
    if name == FAMILY_EXPORT:
        return [out / "export" / "family"]
    if kind == "search":  # + candidate metrics shared by the searches (measured on this supernet)
        return [out / kind / arg, out / "search" / "candidates.json"]
    if kind in ("retrain", "baseline", "member", "control"):
        folder = out / {"baseline": "baselines", **SEARCHED_FOLDERS}[kind] / arg
        if seed:
            return [seed_folder(folder, seed)]
        if not folder.is_dir():
            return [folder]
        return [p for p in sorted(folder.iterdir()) if not (p.is_dir() and SEED_DIR.fullmatch(p.name))]
    folders = {"evaluate": "evaluation", "export": "export", "index": "index", "report": "results.json"}
    return [out / folders[name]] if name in folders else []


def _clear_stage(out: Path, name: str) -> None:
    """Delete what a stage left behind (outputs, checkpoints, search state) so that it runs from scratch."""
    if name in ("evaluate", "export", "index", "report"):
        return  # rewritten whole (atomically) when the stage runs
    for p in stage_paths(out, name):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _read_state(path: Path) -> dict[str, Any]:
    """The run state; a corrupt one is refused (guessing which stages are done could redo or skip work)."""
    if not path.exists():
        return {}
    fix = (
        f"delete '{path}': cmpnas run then redoes every stage, resuming from the checkpoints in "
        f"'{path.parent}' (or restore the file, or use a new --out)"
    )
    state = read_json(path, fix)
    valid = isinstance(state, dict) and all(
        isinstance(r, dict) and isinstance(r.get("key"), str) and r.get("status") in ("running", "done")
        for r in state.values()
    )
    if not valid:
        raise CmpnasError(f"'{path}' is not a cmpnas run state (corrupt or edited).", fix)
    return state


def _check_done(out: Path, name: str, rec: dict[str, Any]) -> None:
    """A stage about to be skipped must still have its outputs, readable: never build on a corrupt file."""
    shared = "same_as" in rec.get("outputs", {})  # a retrain that reuses another reward's model has no folder
    for p in stage_paths(out, name):
        problem = None if shared and not p.exists() else artifact_problem(p)
        if problem is not None:
            raise CmpnasError(
                f"Stage '{name}' is recorded as done, but {problem}.",
                f"restore the file, or redo the stage (and what uses it): cmpnas run ... --force {name}",
            )


def artifact_problem(path: Path) -> str | None:
    """Why ``path`` (a file, or a folder of them) is not a readable artifact, or None when it is."""
    if path.is_dir():
        if (path / "manifest.json").is_file() and (path / "index.faiss").exists():
            return _index_problem(path)
        for child in sorted(path.iterdir()):
            if not is_temporary(child):
                problem = artifact_problem(child)
                if problem is not None:
                    return problem
        return None
    readers: dict[str, Callable[[Path], object]] = {
        ".json": lambda p: read_json(p, ""),
        ".jsonl": read_jsonl,
        ".safetensors": verify_safetensors,
    }
    if not path.exists():
        return f"'{path}' is missing"
    reader = readers.get(path.suffix)
    if reader is None:
        return None
    try:
        reader(path)
    except CmpnasError as exc:
        return f"'{path}' is unreadable ({exc.problem})"
    return None


def _index_problem(folder: Path) -> str | None:
    try:
        GalleryIndex.load(folder)
    except CmpnasError as exc:
        return f"the index '{folder}' is unreadable ({exc.problem})"
    return None


def with_dependents(stages: list[StageDef], force: list[str]) -> list[str]:
    """The forced stages and every stage that uses one of them, directly or not (in run order).

    A key hashes its deps' keys, not their outputs: a redone stage keeps its key, so without this the stages
    built on its old outputs (e.g. the report) would be skipped with stale results.
    """
    forced = set(force)
    for stage in stages:  # in dependency order
        if any(d in forced for d in stage.deps):
            forced.add(stage.name)
    return [s.name for s in stages if s.name in forced]


def _start_state(out: Path, force: list[str], stages: list[StageDef]) -> dict[str, Any]:
    """Read the state and forget the forced stages and what uses them (saved before their files go, so a kill
    cannot leave a stage recorded as done without its outputs)."""
    state_path = out / STATE_FILE
    state = _read_state(state_path)
    names = [s.name for s in stages]
    for f in force:
        if f not in names:
            raise CmpnasError(f"Unknown stage '{f}' for --force.", f"use one of: {', '.join(names)}")
    force = with_dependents(stages, force)
    if any(f in state for f in force):
        for f in force:
            state.pop(f, None)
        write_json_atomic(state_path, state)
    for f in force:
        _clear_stage(out, f)
    return state


def table_schedule(cfg: Config) -> TrainConfig:
    """The one schedule of every query model in the run's table: baselines and retrains alike."""
    return cfg.query_train


def check_one_schedule(cfg: Config) -> None:
    """Refuse a run whose retrains would train on another schedule than the baselines (a row could then win
    by its schedule, not its architecture)."""
    if cfg.nas.retrain is not None and _dump(cfg.nas.retrain) != _dump(cfg.query_train):
        raise CmpnasError(
            "nas.retrain differs from query_train: every query model of one table must train on one schedule "
            "(baselines use query_train).",
            "remove nas.retrain from the config (retrains then use query_train) or make the two equal",
        )


def run_pipeline(cfg: Config, out_dir: str | Path, force: list[str] | None = None) -> dict[str, Any]:
    """Run (or continue) the whole pipeline; returns the run state.

    One run per folder: a second `cmpnas run` on the same folder is refused while this one runs (a lock
    left by a run that died is taken over, with a ``lock`` event).
    """
    check_one_schedule(cfg)
    out = Path(out_dir)
    make_dirs(out)
    info = init_distributed()
    if not info.is_main:  # rank 0 holds the lock for all ranks of a torchrun
        return _run_locked(cfg, out, force or [])
    with run_lock(out) as lock:
        if lock.previous is not None:
            progress.event(
                "lock",
                status="taken_over",
                previous=lock.previous,
                message=f"took over the lock of a run that is gone ({describe(lock.previous)})",
            )
        if not info.enabled:  # with the lock held no other process writes here (other ranks would)
            _remove_leftovers(out, [s.name for s in build_stages(cfg)])
        return _run_locked(cfg, out, force or [])


def _remove_leftovers(out: Path, names: list[str]) -> None:
    """Temporary files and folders of writers that were killed (they never become artifacts): in the run
    folder itself and in the stages' folders, nowhere else (``--out`` may be a folder with other files)."""
    paths = [p for name in names for p in stage_paths(out, name)]
    flat = {out, *(p.parent for p in paths)}
    removed = [p for folder in sorted(flat) for p in remove_temporaries(folder, recursive=False)]
    removed += [p for d in sorted({p for p in paths if p.is_dir()}) for p in remove_temporaries(d)]
    if removed:
        progress.event(
            "cleanup",
            removed=[str(p.relative_to(out)) for p in removed],
            message=f"removed {len(removed)} temporary file(s) left by a killed run",
        )


def _run_locked(cfg: Config, out: Path, force: list[str]) -> dict[str, Any]:
    stages = build_stages(cfg)
    state = _start_state(out, force, stages)
    write_text_atomic(out / "config.yaml", dump_config(cfg))
    state_path = out / STATE_FILE
    ctx = RunContext(cfg, out, state=state)
    t_run = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        key = stage_key(stage, cfg, state)
        rec = state.get(stage.name)
        if rec and rec.get("key") == key and rec.get("status") == "done":
            _check_done(out, stage.name, rec)
            progress.event(
                "stage",
                stage=stage.name,
                status="skipped",
                message=f"{stage.name} ({i}/{len(stages)}) already done, skipped",
            )
            continue
        if rec and rec.get("key") != key:
            _clear_stage(
                out, stage.name
            )  # made with another config or inputs: its checkpoints are foreign now
        state[stage.name] = {"key": key, "status": "running"}  # a killed stage resumes only for this key
        write_json_atomic(state_path, state)
        if ctx.data is None:
            ctx.data = load_data(cfg)
        with progress.Stage(stage.name, i, len(stages)) as st:
            outputs = stage.fn(ctx)
        state[stage.name] = {
            "key": key,
            "status": "done",
            "seconds": round(st.elapsed, 2),
            "outputs": outputs,
        }
        write_json_atomic(state_path, state)
        remaining = len(stages) - i
        progress.event(
            "progress",
            message=(
                f"{i}/{len(stages)} stages done, elapsed "
                f"{progress.format_seconds(time.perf_counter() - t_run)}, "
                f"{remaining} to go"
            ),
        )
    return state
