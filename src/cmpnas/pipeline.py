"""`cmpnas run`: every stage from one config, skipping stages already done for the same inputs.

Each stage's record (a key = hash of its config sections and upstream keys, its outputs and
timing) is kept in ``RUN/run_state.json``; a stage whose record matches is skipped, so a killed
run continues where it stopped (and long stages resume from their own checkpoints).

Seeds (``run.seeds``): every query model (each baseline, each retrain) is trained once per seed ``s``
over the same gallery, supernet and search, with its TrainConfig seed + ``s``. Seed 0 keeps the
single-seed stage names and folders (``baseline-NAME``, ``baselines/NAME``), so existing runs stay
valid; seed ``s > 0`` is ``baseline-NAME@s<s>`` in ``baselines/NAME/seed<s>`` (``retrain-R3@s1`` in
``retrain/R3/seed1``). The search runs once.
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
from cmpnas.errors import CmpnasError
from cmpnas.io import write_json_atomic, write_text_atomic
from cmpnas.report import write_report
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
from cmpnas.stages.common import MODEL_FILE

STATE_FILE = "run_state.json"
SEED_DIR = re.compile(r"seed\d+")


@dataclass
class StageDef:
    name: str
    deps: list[str]
    config_parts: Callable[[Config], Any]
    fn: Callable[[RunContext], dict[str, Any]]
    folder: str | None = None


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
            train_cfg=seeded(ctx.cfg.query_train, seed),
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


def _retrain(reward: str, seed: int) -> Callable[[RunContext], dict[str, Any]]:
    def run(ctx: RunContext) -> dict[str, Any]:
        arch = ctx.state[f"search-{reward}"]["outputs"]["best"]["arch"]
        # Two rewards may find the same arch: train it once (per seed) and point the other entry at it. Only
        # the rewards retrained before this one (this stage's deps) have records of this run; the first match
        # was trained.
        for other in ctx.cfg.run.rewards[: ctx.cfg.run.rewards.index(reward)]:
            rec = ctx.state.get(f"retrain-{other}{seed_suffix(seed)}")
            if rec and rec.get("outputs", {}).get("arch") == arch:
                return {**rec["outputs"], "same_as": other}
        folder = seed_folder(ctx.path("retrain", reward), seed)
        res = retrain(
            ctx.cfg,
            ctx.gallery_path,
            arch,
            folder,
            resume=True,
            data=ctx.data,
            name=f"cmpnas-{reward}",
            train_cfg=seeded(ctx.cfg.nas.retrain, seed),
        )
        return {**res, "arch": arch, "dir": str(folder), "seed": seed}

    return run


def _study(ctx: RunContext) -> dict[str, Any]:
    res = study(ctx.cfg, ctx.gallery_path, ctx.path("study"), supernet_path=ctx.supernet_path, data=ctx.data)
    return {k: v for k, v in res.items() if k != "rows"}


def _retrain_dir(ctx: RunContext, reward: str, seed: int) -> Path:
    """Where the model of (reward, seed) is: its own folder, or that of an earlier reward with its arch."""
    rec = ctx.state.get(f"retrain-{reward}{seed_suffix(seed)}", {}).get("outputs", {})
    return seed_folder(ctx.path("retrain", rec.get("same_as", reward)), seed)


def query_model_dirs(ctx: RunContext) -> list[tuple[str, Path, str, int]]:
    """(display name, model dir, kind, seed) of every query model and seed of the run, in report order."""
    seeds = ctx.cfg.run.seeds
    rows = [
        (b.name, seed_folder(ctx.path("baselines", b.name), s), "baseline", s)
        for b in ctx.cfg.run.baselines
        for s in seeds
    ]
    for r in ctx.cfg.run.rewards:
        rows += [(f"CMP-NAS {r} (searched, BCT)", _retrain_dir(ctx, r, s), f"searched-{r}", s) for s in seeds]
    return rows


def _evaluate(ctx: RunContext) -> dict[str, Any]:
    models = [(name, folder / MODEL_FILE, kind, s) for name, folder, kind, s in query_model_dirs(ctx)]
    res = evaluate_query_models(ctx.cfg, ctx.gallery_path, models, ctx.path("evaluation"), data=ctx.data)
    return {"rows": "evaluation/rows.json", "n_models": res["n_models"], "n_rows": res["n_rows"]}


def _headline_dir(ctx: RunContext) -> Path:
    """The headline reward's model of the first seed (the one exported)."""
    return _retrain_dir(ctx, ctx.cfg.run.headline_reward, ctx.cfg.run.seeds[0])


def _export(ctx: RunContext) -> dict[str, Any]:
    res = export_model(
        _headline_dir(ctx) / MODEL_FILE, ctx.path("export", "query.onnx"), exporter=ctx.cfg.run.onnx_exporter
    )
    return {
        "onnx": "export/query.onnx",
        **{k: v for k, v in res.items() if isinstance(v, (int, float, str, dict))},
    }


def _index(ctx: RunContext) -> dict[str, Any]:
    res = index_dataset(ctx.gallery_path, ctx.cfg.data, "test", ctx.path("index"))
    return {"index": "index", **{k: v for k, v in res.items() if isinstance(v, (int, float, str))}}


def _report(ctx: RunContext) -> dict[str, Any]:
    return write_report(ctx.out, ctx.cfg, ctx.state)


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
                    lambda c, i=i: [_dump(c.run.baselines[i]), _dump(c.query_train), _dump(c.compat)],
                    _baseline(i, s),
                )
            )
    nas_common = lambda c: [_dump(c.nas.space), c.nas.budget_macs, c.nas.budget_cost_reduction]  # noqa: E731
    if cfg.run.rewards or (cfg.run.study and cfg.nas.study_archs > 0):
        stages.append(
            StageDef(
                "supernet",
                ["gallery"],
                lambda c: [
                    nas_common(c),
                    c.nas.sample_band,
                    _dump(c.nas.supernet_train),
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
                    lambda c: [_dump(c.nas.retrain), _dump(c.compat)],
                    _retrain(r, s),
                )
            )
    if cfg.run.study and cfg.nas.study_archs > 0:
        stages.append(
            StageDef(
                "study",
                ["supernet"],
                lambda c: [
                    c.nas.study_archs,
                    c.nas.study_band,
                    _dump(c.nas.study_train),
                    _dump(c.nas.search),
                ],
                _study,
            )
        )
    evaluate_deps = [s.name for s in stages if s.name.startswith(("baseline-", "retrain-"))]
    stages.append(
        StageDef(
            "evaluate",
            ["gallery", *evaluate_deps],
            lambda c: [c.eval_batch_size, c.run.latency_repeats],
            _evaluate,
        )
    )
    if cfg.run.export_onnx and cfg.run.rewards:
        stages.append(
            StageDef(
                "export",
                [f"retrain-{cfg.run.headline_reward}{seed_suffix(cfg.run.seeds[0])}"],
                lambda c: [c.run.onnx_exporter],
                _export,
            )
        )
    if cfg.run.build_index:
        stages.append(StageDef("index", ["gallery"], lambda c: [], _index))
    stages.append(StageDef("report", [s.name for s in stages], lambda c: [], _report))
    return stages


def stage_key(stage: StageDef, cfg: Config, state: dict[str, Any]) -> str:
    return _hash([stage.name, stage.config_parts(cfg), [state.get(d, {}).get("key") for d in stage.deps]])


def _remove_seed0(folder: Path) -> None:
    """Delete seed 0's files of a query-model folder but not the ``seed<s>`` folders of the other seeds."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.is_dir() and SEED_DIR.fullmatch(p.name):
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _clear_stage(out: Path, name: str) -> None:
    """Delete what a stage left behind (outputs, checkpoints, search state) so that it runs from scratch."""
    base, seed = split_seed(name)
    kind, _, arg = base.partition("-")
    if name in ("gallery", "supernet", "study"):
        shutil.rmtree(out / name, ignore_errors=True)
    elif kind == "search":
        shutil.rmtree(out / kind / arg, ignore_errors=True)
        # candidate metrics shared by the searches were measured on the old supernet
        (out / "search" / "candidates.json").unlink(missing_ok=True)
    elif kind in ("retrain", "baseline"):
        folder = out / ("baselines" if kind == "baseline" else "retrain") / arg
        if seed == 0:
            _remove_seed0(folder)
        else:
            shutil.rmtree(seed_folder(folder, seed), ignore_errors=True)


def run_pipeline(cfg: Config, out_dir: str | Path, force: list[str] | None = None) -> dict[str, Any]:
    """Run (or continue) the whole pipeline; returns the run state."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", dump_config(cfg))
    state_path = out / STATE_FILE
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}
    stages = build_stages(cfg)
    names = [s.name for s in stages]
    for f in force or []:
        if f not in names:
            raise CmpnasError(f"Unknown stage '{f}' for --force.", f"use one of: {', '.join(names)}")
        state.pop(f, None)
        _clear_stage(out, f)
    ctx = RunContext(cfg, out, state=state)
    t_run = time.perf_counter()
    done_seconds = 0.0
    for i, stage in enumerate(stages, 1):
        key = stage_key(stage, cfg, state)
        rec = state.get(stage.name)
        if rec and rec.get("key") == key and rec.get("status") == "done":
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
        done_seconds += st.elapsed
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
