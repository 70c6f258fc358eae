"""The run folder of `cmpnas run`: every stage's name and every file and folder it writes, declared here once.

The stage graph, its adapters, the run context and the report stage ask :class:`RunLayout` for paths instead of
joining folder names themselves, so moving a folder is a change in one place. (``run_state.json`` is the run
engine's own record and ``run.lock`` belongs to :mod:`cmpnas.runlock`; both sit at the top of the folder.)

Seeds: a query model (baseline, retrain, family member, random control) is trained once per seed ``s``. Seed 0
keeps the single-seed stage names and folders (``baseline-NAME`` in ``baselines/NAME``), so existing runs stay
valid; seed ``s > 0`` is ``baseline-NAME@s<s>`` in ``baselines/NAME/seed<s>``. Searches are one per reward
(``search-R3`` in ``search/R3``) and run once, whatever the seeds.

A stage's name is enough to find what it writes (:meth:`RunLayout.stage_paths`): ``--force``, a skip's read-back
check and the leftover sweep work from the run state's names alone, without the config. That is the one place
a stage name is taken apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cmpnas.report import ReportInputs
from cmpnas.serving.family import FAMILY_FILE
from cmpnas.serving.quantize import int8_path_for, report_path_for
from cmpnas.stages.common import MODEL_FILE
from cmpnas.stages.supernet import SUPERNET_FILE

# ------------------------------------------------------------------------------------------ stage names
GALLERY = "gallery"
SUPERNET = "supernet"
STUDY = "study"
FAMILY_SEARCH = "family-search"
FAMILY_EXPORT = "family-export"
EVALUATE = "evaluate"
EXPORT = "export"
INDEX = "index"
UPGRADE_GALLERY = "upgrade-gallery"
UPGRADE_CONTROL = "upgrade-control"
EVALUATE_UPGRADE = "evaluate-upgrade"
REPORT = "report"

# query-model stage kind -> the folder of its models (one subfolder per model name, seed s > 0 below it)
MODEL_FOLDERS = {"baseline": "baselines", "retrain": "retrain", "member": "family", "control": "controls"}
UPGRADE_FOLDERS = {
    UPGRADE_GALLERY: "upgrade/v2",
    UPGRADE_CONTROL: "upgrade/control",
    EVALUATE_UPGRADE: "upgrade/evaluate",
}
# stages that rewrite their outputs whole (atomically) when they run: nothing to delete before a redo
REWRITTEN_WHOLE = (EVALUATE, EXPORT, INDEX, REPORT)

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"  # written by the report (cmpnas.report.write)
ROWS_FILE = "rows.json"  # written by cmpnas.stages.evaluate
UPGRADE_RESULTS_FILE = "results.json"  # written by cmpnas.stages.upgrade.evaluate_upgrade
QUERY_ONNX = "query.onnx"
SEARCH_FILE = "search.json"  # written by cmpnas.stages.search
STUDY_FILE = "study.json"  # written by cmpnas.stages.study
CANDIDATES_FILE = "candidates.json"
LATENCY_TABLE_FILE = "latency_table.json"
SEED_DIR = re.compile(r"seed\d+")


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


def model_stage(kind: str, name: str, seed: int) -> str:
    """The stage that trains query model ``name`` of ``kind`` (a key of MODEL_FOLDERS) for one seed."""
    return f"{kind}-{name}{seed_suffix(seed)}"


def search_stage(reward: str) -> str:
    return f"search-{reward}"


# ------------------------------------------------------------------------------------------ paths
@dataclass(frozen=True)
class RunLayout:
    """Where everything of the run in ``out`` is."""

    out: Path

    def rel(self, path: Path) -> str:
        """``path`` relative to the run folder, as a run record stores it."""
        return path.relative_to(self.out).as_posix()

    @property
    def config_file(self) -> Path:
        return self.out / CONFIG_FILE

    @property
    def results_file(self) -> Path:
        return self.out / RESULTS_FILE

    @property
    def gallery_dir(self) -> Path:
        return self.out / "gallery"

    @property
    def gallery_model(self) -> Path:
        return self.gallery_dir / MODEL_FILE

    @property
    def supernet_dir(self) -> Path:
        return self.out / "supernet"

    @property
    def supernet_model(self) -> Path:
        return self.supernet_dir / SUPERNET_FILE

    def search_dir(self, reward: str) -> Path:
        return self.out / "search" / reward

    @property
    def candidates_file(self) -> Path:
        """Candidate metrics shared by every search of the run (measured on its supernet)."""
        return self.out / "search" / CANDIDATES_FILE

    @property
    def family_search_dir(self) -> Path:
        return self.out / "search" / "family"

    @property
    def family_search_file(self) -> Path:
        return self.family_search_dir / FAMILY_FILE

    @property
    def latency_table(self) -> Path:
        return self.out / "search" / LATENCY_TABLE_FILE

    def model_dir(self, kind: str, name: str, seed: int) -> Path:
        """The folder of query model ``name`` of ``kind`` (a key of MODEL_FOLDERS) for one seed."""
        return seed_folder(self.out / MODEL_FOLDERS[kind] / name, seed)

    @property
    def study_dir(self) -> Path:
        return self.out / "study"

    @property
    def evaluation_dir(self) -> Path:
        return self.out / "evaluation"

    @property
    def rows_file(self) -> Path:
        return self.evaluation_dir / ROWS_FILE

    @property
    def export_dir(self) -> Path:
        return self.out / "export"

    @property
    def query_onnx(self) -> Path:
        return self.export_dir / QUERY_ONNX

    @property
    def family_export_dir(self) -> Path:
        return self.export_dir / "family"

    @property
    def family_export_file(self) -> Path:
        return self.family_export_dir / FAMILY_FILE

    @property
    def index_dir(self) -> Path:
        return self.out / "index"

    def upgrade_dir(self, stage: str) -> Path:
        """The folder of an upgrade stage (a key of UPGRADE_FOLDERS)."""
        return self.out / UPGRADE_FOLDERS[stage]

    @property
    def upgrade_results_file(self) -> Path:
        return self.upgrade_dir(EVALUATE_UPGRADE) / UPGRADE_RESULTS_FILE

    def report_inputs(self, rewards: list[str]) -> ReportInputs:
        """What the report stage reads, for a run searching with ``rewards``."""
        return ReportInputs(
            rows=self.rows_file,
            searches={r: self.search_dir(r) / SEARCH_FILE for r in rewards},
            study=self.study_dir / STUDY_FILE,
            upgrade=self.upgrade_results_file,
            family=self.family_export_file,
            int8=report_path_for(int8_path_for(self.query_onnx)),
            gallery_model=self.gallery_model,
        )

    # -------------------------------------------------------------------------------------- per stage
    def stage_paths(self, name: str) -> list[Path]:
        """The files and folders stage ``name`` writes (what ``--force`` deletes and a skip checks).

        A query model's seed 0 owns its folder minus the ``seed<s>`` folders of the other seeds.
        """
        fixed = {
            GALLERY: [self.gallery_dir],
            SUPERNET: [self.supernet_dir],
            STUDY: [self.study_dir],
            **{stage: [self.upgrade_dir(stage)] for stage in UPGRADE_FOLDERS},
            FAMILY_SEARCH: [self.family_search_dir, self.candidates_file],
            FAMILY_EXPORT: [self.family_export_dir],
            EVALUATE: [self.evaluation_dir],
            EXPORT: [self.export_dir],
            INDEX: [self.index_dir],
            REPORT: [self.results_file],
        }
        if name in fixed:
            return fixed[name]
        base, seed = split_seed(name)
        kind, _, arg = base.partition("-")
        if kind == "search":
            return [self.search_dir(arg), self.candidates_file]
        if kind in MODEL_FOLDERS:
            folder = self.model_dir(kind, arg, 0)
            if seed:
                return [seed_folder(folder, seed)]
            if not folder.is_dir():
                return [folder]
            return [p for p in sorted(folder.iterdir()) if not (p.is_dir() and SEED_DIR.fullmatch(p.name))]
        return []

    def redo_paths(self, name: str) -> list[Path]:
        """What is deleted before stage ``name`` is redone from scratch (outputs, checkpoints, search state)."""
        return [] if name in REWRITTEN_WHOLE else self.stage_paths(name)


def stage_paths(out: Path, name: str) -> list[Path]:
    """The files and folders stage ``name`` of the run in ``out`` writes (:meth:`RunLayout.stage_paths`)."""
    return RunLayout(Path(out)).stage_paths(name)
