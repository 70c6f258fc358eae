"""The CMP-NAS stage graph of `cmpnas run`: which stages a config asks for, what each one's key hashes, what
it builds on, and the adapters that call :mod:`cmpnas.stages` with the run folder's paths (from
:mod:`cmpnas.pipeline.layout`). One idea, kept in one file although it is long: the graph is read as a whole
(which stage builds on which, and why a change to one config part reruns what it does).

Seeds (``run.seeds``): every query model (each baseline, each retrain) is trained once per seed ``s`` over the
same gallery, supernet and search, with its TrainConfig seed + ``s`` (names and folders: the layout's docstring).
The search runs once.

Random controls (``run.random_controls``): architectures drawn uniformly from the searched space within the
search's MACs band, trained like a searched one (``control-random<i>`` in ``controls/random<i>``), so the
table says what the search buys over a random pick.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmpnas.config import CompatConfig, Config, TrainConfig, dump_config
from cmpnas.errors import CmpnasError
from cmpnas.io import write_text_atomic
from cmpnas.pipeline.engine import SAME_AS, Plan, StageDef, delete_paths, run_plan
from cmpnas.pipeline.layout import (
    EVALUATE,
    EVALUATE_UPGRADE,
    EXPORT,
    FAMILY_EXPORT,
    FAMILY_SEARCH,
    GALLERY,
    INDEX,
    REPORT,
    STUDY,
    SUPERNET,
    UPGRADE_CONTROL,
    UPGRADE_GALLERY,
    RunLayout,
    model_stage,
    search_stage,
)
from cmpnas.report import CONTROL_KIND, write_report
from cmpnas.serving.family import read_family
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


@dataclass
class RunContext:
    """What every stage adapter is handed: the config, the run folder's layout, the data (loaded once) and the
    run state (the records of the stages before it)."""

    cfg: Config
    layout: RunLayout
    data: Any = None
    state: dict[str, Any] = field(default_factory=dict)


Stage = StageDef[RunContext]


def _dump(x: Any) -> Any:
    return x.model_dump(mode="json") if hasattr(x, "model_dump") else x


def seeded(tcfg: TrainConfig, seed: int) -> TrainConfig:
    """The training config of seed ``s``: its own seed + s (seed 0 = the config as written)."""
    return tcfg.model_copy(update={"seed": tcfg.seed + seed})


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


# ------------------------------------------------------------------------------------------ adapters
def _gallery(ctx: RunContext) -> dict[str, Any]:
    return dict(train_gallery(ctx.cfg, ctx.layout.gallery_dir, resume=True, data=ctx.data))


def _baseline(index: int, seed: int) -> Callable[[RunContext], dict[str, Any]]:
    def run(ctx: RunContext) -> dict[str, Any]:
        b = ctx.cfg.run.baselines[index]
        compat = CompatConfig(**{**ctx.cfg.compat.model_dump(), "mode": b.compat})
        res = train_query(
            ctx.cfg,
            ctx.layout.gallery_model,
            ctx.layout.model_dir("baseline", b.name, seed),
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
    lay = ctx.layout
    return dict(train_supernet(ctx.cfg, lay.gallery_model, lay.supernet_dir, resume=True, data=ctx.data))


def _search(reward: str) -> Callable[[RunContext], dict[str, Any]]:
    def run(ctx: RunContext) -> dict[str, Any]:
        lay = ctx.layout
        scfg = ctx.cfg.nas.search.model_copy(update={"reward": reward})
        res = search(
            ctx.cfg,
            lay.gallery_model,
            lay.supernet_model,
            lay.search_dir(reward),
            resume=True,
            data=ctx.data,
            search_cfg=scfg,
            cache_path=lay.candidates_file,
        )
        return {
            "best": res["best"],
            "seconds": res["seconds"],
            "n_candidates": res["n_candidates"],
            "evaluator_calls": res["evaluator_calls"],
        }

    return run


def _train_searched(
    ctx: RunContext, kind: str, name: str, arch: dict, earlier: list[str], seed: int
) -> dict[str, Any]:
    """Train a searched architecture for one seed, once: two rewards (or two family members) may find the same
    arch, so an earlier stage of this kind and seed with it is pointed at instead. Only the stages before this
    one (its deps) have records of this run; the first match was trained."""
    for other in earlier:
        rec = ctx.state.get(model_stage(kind, other, seed))
        if rec and rec.get("outputs", {}).get("arch") == arch:
            return {**rec["outputs"], SAME_AS: other}
    folder = ctx.layout.model_dir(kind, name, seed)
    res = retrain(
        ctx.cfg,
        ctx.layout.gallery_model,
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
    rec = ctx.state.get(model_stage(kind, name, seed), {}).get("outputs", {})
    return ctx.layout.model_dir(kind, rec.get(SAME_AS, name), seed)


def _retrain(reward: str, seed: int) -> Callable[[RunContext], dict[str, Any]]:
    def run(ctx: RunContext) -> dict[str, Any]:
        arch = ctx.state[search_stage(reward)]["outputs"]["best"]["arch"]
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
        draw = draw_random_controls(ctx.cfg, ctx.layout.gallery_model, ctx.data)
        folder = ctx.layout.model_dir("control", f"random{index}", seed)
        res = retrain(
            ctx.cfg,
            ctx.layout.gallery_model,
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


def _control_stages(cfg: Config) -> list[Stage]:
    """One stage per random control and seed, built on the gallery only (the draw needs its MACs)."""

    def parts(c: Config, index: int) -> list[Any]:
        # what fixes the drawn arch (the space, the budget, the band, the seed, its index; the gallery's MACs via
        # the dep) and how it is trained (the model settings of a retrain, the table's schedule, the compat)
        draw = [_dump(c.nas.space), c.nas.budget_macs, c.nas.budget_cost_reduction, c.nas.sample_band]
        model = [c.query.classifier, c.query.cosine_scale, c.query.margin]
        return [draw, c.run.random_controls_seed, index, model, _dump(table_schedule(c)), _dump(c.compat)]

    return [
        StageDef(model_stage("control", name, s), [GALLERY], lambda c, i=i: parts(c, i), _control(i, s))
        for i, name in enumerate(control_names(cfg))
        for s in cfg.run.seeds
    ]


# ------------------------------------------------------------------------------------------ family
def _family_search(ctx: RunContext) -> dict[str, Any]:
    lay = ctx.layout
    res = search(
        ctx.cfg,
        lay.gallery_model,
        lay.supernet_model,
        lay.family_search_dir,
        resume=True,
        data=ctx.data,
        cache_path=lay.candidates_file,
        family=True,
        latency_path=lay.latency_table,
    )
    return {
        "family": lay.rel(lay.family_search_file),
        "members": [
            {"name": b["name"], "arch": b["best"]["arch"], "macs": b["best"]["macs"]} for b in res["budgets"]
        ],
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
    lay = ctx.layout
    _, doc = read_family(lay.family_search_dir)
    seed = ctx.cfg.run.seeds[0]
    doc["members"] = [
        {**m, "model": lay.rel(_searched_dir(ctx, "member", m["name"], seed) / MODEL_FILE)}
        for m in doc["members"]
    ]
    references = [
        (b.name, lay.model_dir("baseline", b.name, seed) / MODEL_FILE) for b in ctx.cfg.run.baselines
    ]
    res = export_family(
        doc,
        lay.out,
        lay.family_export_dir,
        exporter=ctx.cfg.run.onnx_exporter,
        latency_runs=ctx.cfg.run.latency_repeats,
        references=references,
    )
    return {
        "family": lay.rel(lay.family_export_file),
        "latency_check": res["latency_check"],
        "members": [
            {
                k: m[k]
                for k in (
                    "name",
                    "macs",
                    "macs_counted",
                    "latency_ms_predicted",
                    "latency_ms_measured",
                    "latency_error_pct",
                )
            }
            for m in res["members"]
        ],
    }


def _family_stages(cfg: Config) -> tuple[list[Stage], list[Stage], list[Stage]]:
    """(family-search, member retrains, family-export) when ``nas.budgets`` is set."""
    if not cfg.nas.budgets:
        return [], [], []
    searched = StageDef(
        FAMILY_SEARCH,
        [SUPERNET],
        lambda c: [_dump(c.nas.search), _dump(c.nas.budgets), _dump(c.nas.latency)],
        _family_search,
    )
    members: list[Stage] = []
    names = member_names(cfg)
    for name in names:
        for s in cfg.run.seeds:
            deps = [FAMILY_SEARCH] + [model_stage("member", o, s) for o in names[: names.index(name)]]
            members.append(
                StageDef(
                    model_stage("member", name, s),
                    deps,
                    lambda c: [_dump(table_schedule(c)), _dump(c.compat)],
                    _member(name, s),
                )
            )
    export_deps = [searched.name, *(st.name for st in members)] + [
        model_stage("baseline", b.name, cfg.run.seeds[0]) for b in cfg.run.baselines
    ]
    export = StageDef(
        FAMILY_EXPORT, export_deps, lambda c: [c.run.onnx_exporter, c.run.latency_repeats], _family_export
    )
    return [searched], members, [export]


# ------------------------------------------------------------------------------------------ study, evaluate, export
def _study(ctx: RunContext) -> dict[str, Any]:
    lay = ctx.layout
    res = study(ctx.cfg, lay.gallery_model, lay.study_dir, supernet_path=lay.supernet_model, data=ctx.data)
    return {k: v for k, v in res.items() if k != "rows"}


def query_model_dirs(ctx: RunContext) -> list[tuple[str, Path, str, int]]:
    """(display name, model dir, kind, seed) of every query model and seed of the run, in report order."""
    seeds = ctx.cfg.run.seeds
    rows = [
        (b.name, ctx.layout.model_dir("baseline", b.name, s), "baseline", s)
        for b in ctx.cfg.run.baselines
        for s in seeds
    ]
    for r in ctx.cfg.run.rewards:
        rows += [
            (f"CMP-NAS {r} (searched, BCT)", _searched_dir(ctx, "retrain", r, s), f"searched-{r}", s)
            for s in seeds
        ]
    for i, name in enumerate(control_names(ctx.cfg)):
        rows += [
            (control_display_name(i), _searched_dir(ctx, "control", name, s), CONTROL_KIND, s) for s in seeds
        ]
    for name in member_names(ctx.cfg):
        rows += [
            (f"CMP-NAS family {name}", _searched_dir(ctx, "member", name, s), f"family-{name}", s)
            for s in seeds
        ]
    return rows


def control_display_name(index: int) -> str:
    return f"random arch {index} (same space, BCT)"


def _evaluate(ctx: RunContext) -> dict[str, Any]:
    lay = ctx.layout
    models = [(name, folder / MODEL_FILE, kind, s) for name, folder, kind, s in query_model_dirs(ctx)]
    res = evaluate_query_models(ctx.cfg, lay.gallery_model, models, lay.evaluation_dir, data=ctx.data)
    return {"rows": lay.rel(lay.rows_file), "n_models": res["n_models"], "n_rows": res["n_rows"]}


def _headline_dir(ctx: RunContext) -> Path:
    """The headline reward's model of the first seed (the one exported)."""
    return _searched_dir(ctx, "retrain", ctx.cfg.run.headline_reward, ctx.cfg.run.seeds[0])


def _export(ctx: RunContext) -> dict[str, Any]:
    lay = ctx.layout
    res = export_model(
        _headline_dir(ctx) / MODEL_FILE,
        lay.query_onnx,
        exporter=ctx.cfg.run.onnx_exporter,
        int8=ctx.cfg.run.export_int8,
        gallery_model=lay.gallery_model,
        data=ctx.data,
    )
    return {
        "onnx": lay.rel(lay.query_onnx),
        **{k: v for k, v in res.items() if isinstance(v, (int, float, str, dict))},
    }


def _index(ctx: RunContext) -> dict[str, Any]:
    lay = ctx.layout
    res = index_dataset(lay.gallery_model, ctx.cfg.data, "test", lay.index_dir, store=ctx.cfg.index)
    return {
        "index": lay.rel(lay.index_dir),
        **{k: v for k, v in res.items() if isinstance(v, (int, float, str))},
    }


# ------------------------------------------------------------------------------------------ upgrade
def _upgrade(control: bool) -> Callable[[RunContext], dict[str, Any]]:
    def run(ctx: RunContext) -> dict[str, Any]:
        up = ctx.cfg.run.upgrade
        cfg = ctx.cfg.model_copy(
            update={"gallery": up.gallery or ctx.cfg.gallery, "gallery_train": up.gallery_train}
        )
        folder = ctx.layout.upgrade_dir(UPGRADE_CONTROL if control else UPGRADE_GALLERY)
        res = upgrade_gallery(
            cfg, ctx.layout.gallery_model, folder, resume=True, data=ctx.data, independent=control
        )
        return dict(res)

    return run


def _upgrade_small(ctx: RunContext) -> Path | None:
    """The query model of the upgrade table: the headline searched model, else the first BCT baseline."""
    if ctx.cfg.run.rewards:
        return _headline_dir(ctx) / MODEL_FILE
    bct = [b for b in ctx.cfg.run.baselines if b.compat == "bct"]
    return ctx.layout.model_dir("baseline", bct[0].name, 0) / MODEL_FILE if bct else None


def _evaluate_upgrade(ctx: RunContext) -> dict[str, Any]:
    lay = ctx.layout
    up = ctx.cfg.run.upgrade
    res = evaluate_upgrade(
        ctx.cfg,
        lay.gallery_model,
        lay.upgrade_dir(UPGRADE_GALLERY) / MODEL_FILE,
        lay.upgrade_dir(EVALUATE_UPGRADE),
        small=_upgrade_small(ctx),
        independent=lay.upgrade_dir(UPGRADE_CONTROL) / MODEL_FILE if up.control else None,
        data=ctx.data,
        split=up.split,
    )
    return {"results": lay.rel(lay.upgrade_results_file), "bct_criterion": res["bct_criterion"]}


def _upgrade_stages(cfg: Config, earlier: list[Stage]) -> list[Stage]:
    """upgrade-gallery, upgrade-control (optional) and evaluate-upgrade, when ``run.upgrade`` is set."""
    if cfg.run.upgrade is None:
        return []

    def part(c: Config) -> list[Any]:
        return [_dump(c.run.upgrade), _dump(c.compat)]

    stages = [StageDef(UPGRADE_GALLERY, [GALLERY], part, _upgrade(False))]
    if cfg.run.upgrade.control:
        stages.append(StageDef(UPGRADE_CONTROL, [GALLERY], part, _upgrade(True)))
    # what _upgrade_small may read: the headline retrain of seed 0 and every baseline (those the graph has)
    small_names = {model_stage("retrain", cfg.run.headline_reward, 0)} | {
        model_stage("baseline", b.name, s) for b in cfg.run.baselines for s in cfg.run.seeds
    }
    small = [s.name for s in earlier if s.name in small_names]
    stages.append(
        StageDef(
            EVALUATE_UPGRADE,
            [s.name for s in stages] + small,
            lambda c: [c.eval_batch_size],
            _evaluate_upgrade,
        )
    )
    return stages


def _report(ctx: RunContext) -> dict[str, Any]:
    lay = ctx.layout
    return write_report(
        lay.out,
        ctx.cfg,
        ctx.state,
        lay.report_inputs(list(ctx.cfg.run.rewards)),
        upgrade_markdown=upgrade_markdown,
    )


# ------------------------------------------------------------------------------------------ the graph
def wants_study(cfg: Config) -> bool:
    return cfg.run.study and (cfg.nas.study_archs > 0 or cfg.nas.ranking_archs > 0)


def build_stages(cfg: Config) -> list[Stage]:
    """The stage graph for this config (optional stages only when enabled and available), in run order."""
    stages = [
        StageDef(GALLERY, [], lambda c: [_dump(c.data), _dump(c.gallery), _dump(c.gallery_train)], _gallery)
    ]
    query: list[Stage] = []  # every query model's stages (what evaluate scores)
    for i, b in enumerate(cfg.run.baselines):
        for s in cfg.run.seeds:
            query.append(
                StageDef(
                    model_stage("baseline", b.name, s),
                    [GALLERY],
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
    stages += query

    # the family's budgets widen the supernet's sampling band; without a family the key is what it always was
    def nas_common(c: Config) -> list[Any]:
        budgets = [_dump(c.nas.budgets)] if c.nas.budgets else []
        return [_dump(c.nas.space), c.nas.budget_macs, c.nas.budget_cost_reduction, *budgets]

    family_search, members, family_export = _family_stages(cfg)
    if cfg.run.rewards or wants_study(cfg) or family_search:
        stages.append(
            StageDef(
                SUPERNET,
                [GALLERY],
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
                search_stage(r),
                [SUPERNET],
                lambda c, r=r: [_dump(c.nas.search), r, c.nas.budget_latency_ms],
                _search(r),
            )
        )
    for r in cfg.run.rewards:
        for s in cfg.run.seeds:
            earlier = cfg.run.rewards[: cfg.run.rewards.index(r)]
            deps = [search_stage(r)] + [model_stage("retrain", o, s) for o in earlier]
            retrain_stage = StageDef(
                model_stage("retrain", r, s),
                deps,
                lambda c: [_dump(table_schedule(c)), _dump(c.compat)],
                _retrain(r, s),
            )
            stages.append(retrain_stage)
            query.append(retrain_stage)
    if wants_study(cfg):
        stages.append(
            StageDef(
                STUDY,
                [SUPERNET],
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
    controls = _control_stages(cfg)
    stages += controls + family_search + members
    query += controls + members
    query_names = {s.name for s in query}
    stages.append(
        StageDef(
            EVALUATE,
            [GALLERY, *(s.name for s in stages if s.name in query_names)],
            # "val": every model is also scored on the validation split (what the report chooses the best by)
            lambda c: [c.eval_batch_size, c.run.latency_repeats, "val"],
            _evaluate,
        )
    )
    if cfg.run.export_onnx and cfg.run.rewards:
        stages.append(
            StageDef(
                EXPORT,
                [model_stage("retrain", cfg.run.headline_reward, cfg.run.seeds[0])],
                lambda c: [c.run.onnx_exporter, c.run.export_int8],
                _export,
            )
        )
    if cfg.run.export_onnx:
        stages += family_export
    if cfg.run.build_index:
        stages.append(StageDef(INDEX, [GALLERY], lambda c: [_dump(c.index)], _index))
    stages += _upgrade_stages(cfg, stages)
    stages.append(StageDef(REPORT, [s.name for s in stages], lambda c: [], _report))
    return stages


def _clear_stage(out: Path, name: str) -> None:
    """Delete what a stage left behind (outputs, checkpoints, search state) so that it runs from scratch."""
    delete_paths(RunLayout(Path(out)).redo_paths(name))


def build_plan(cfg: Config, out: Path, data: Any = None) -> Plan[RunContext]:
    """The engine's view of this run: the stages, where each writes (the layout), and their context (with
    ``data`` when it is already loaded, else loaded before the first stage that runs)."""
    layout = RunLayout(out)

    def start(state: dict[str, Any]) -> RunContext:
        write_text_atomic(layout.config_file, dump_config(cfg))
        return RunContext(cfg, layout, state=state, data=data)

    def before_stage(ctx: RunContext) -> None:
        if ctx.data is None:
            ctx.data = load_data(cfg)

    return Plan(cfg, out, build_stages(cfg), layout.stage_paths, layout.redo_paths, start, before_stage)


def run_pipeline(cfg: Config, out_dir: str | Path, force: list[str] | None = None) -> dict[str, Any]:
    """Run (or continue) the whole pipeline; returns the run state.

    One run per folder: a second `cmpnas run` on the same folder is refused while this one runs (a lock
    left by a run that died is taken over, with a ``lock`` event).
    """
    check_one_schedule(cfg)
    # the data is read before anything is written: a run refused for its data leaves no folder behind
    return run_plan(build_plan(cfg, Path(out_dir), load_data(cfg)), force or [])
