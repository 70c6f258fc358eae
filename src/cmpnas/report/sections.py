"""report.md: its sections, each from results.json (and the searches and study it summarises)."""

from __future__ import annotations

import statistics
from typing import Any

from cmpnas.config import Config
from cmpnas.progress import format_seconds
from cmpnas.report.comparisons import hand_designed
from cmpnas.report.learning_check import learning_markdown
from cmpnas.report.summary import pm, val_text
from cmpnas.report.supernet import supernet_markdown
from cmpnas.tables import markdown_table, num


def models_table(models: list[dict[str, Any]]) -> str:
    """Paragon / homogeneous / heterogeneous per query model: mean ± std over seeds (test split), and the
    validation heterogeneous top-1 the comparisons choose by."""
    headers = [
        "query model", "MACs", "cost reduction", "seeds", "paragon top-1 / mAP", "homogeneous top-1 / mAP",
        "heterogeneous top-1 / mAP", "gap to paragon (top-1)", "M(q,g) > M(q,q)", "val heterogeneous top-1",
    ]  # fmt: skip
    rows = []
    for m in models:
        p = m["paragon"]
        compatible = "yes" if m["compatible"] else "no"
        if m["n_seeds"] > 1:
            compatible += f" ({m['compatible_seeds']}/{m['n_seeds']} seeds)"
        rows.append(
            [
                m["name"],
                f"{m['macs'] / 1e6:.2f} M",
                f"{m['cost_reduction']:.1f}x",
                m["n_seeds"],
                f"{p['top1']:.2f} / {p['map']:.2f}",
                f"{pm(m, 'homogeneous')} / {pm(m, 'homogeneous', 'map')}",
                f"{pm(m, 'heterogeneous')} / {pm(m, 'heterogeneous', 'map')}",
                pm(m, "gap_to_paragon"),
                compatible,
                val_text(m),
            ]
        )
    return markdown_table(headers, rows, "lrrrlllrcr") + "\n"


def per_seed_table(models: list[dict[str, Any]]) -> str:
    """Each seed's homogeneous / heterogeneous top-1 and mAP (test split), the rows the means come from."""
    rows = [
        [
            m["name"],
            r["seed"],
            f"{r['homogeneous']['top1']:.2f} / {r['homogeneous']['map']:.2f}",
            f"{r['heterogeneous']['top1']:.2f} / {r['heterogeneous']['map']:.2f}",
        ]
        for m in models
        for r in m["per_seed"]
    ]
    headers = ["query model", "seed", "homogeneous top-1 / mAP", "heterogeneous top-1 / mAP"]
    return markdown_table(headers, rows, "lrll") + "\n"


def _latency_line(models: list[dict[str, Any]], gallery: dict[str, Any]) -> str:
    return (
        "Latency (batch 1, torch eager, 1 thread, p50): "
        + ", ".join(f"{m['name']} {m['latency_ms_b1']:.2f} ms" for m in models)
        + f"; gallery {gallery.get('latency_ms_b1', float('nan')):.2f} ms.\n"
    )


def rows_note(cfg: Config, models: list[dict[str, Any]], controls: dict[str, Any] | None) -> list[str]:
    """Which hand-designed rows have the search space's stem, and how the random controls were drawn."""
    md = []
    matched = [m["name"] for m in hand_designed(cfg, models, "matched")]
    if matched:
        md.append(
            f"Stem-matched hand-designed rows (they downsample as the search space does, same final feature-map "
            f"size): {', '.join(matched)}; the other hand-designed rows keep their stock stems.\n"
        )
    if controls:
        low, high = controls["band"]
        md.append(
            f"Random controls: {len(controls['archs'])} distinct architectures drawn uniformly from the search "
            f"space with query MACs in [{low / 1e6:.2f}, {high / 1e6:.2f}] MMACs (the band the search samples; "
            f"draw seed {controls['seed']}), each trained like the searched model (same schedule, compat "
            "objective and seeds).\n"
        )
    return md


def paired_section(comparisons: list[dict[str, Any]], n_seeds: int) -> list[str]:
    """One sentence per comparison: A − B of heterogeneous top-1 (test), its 95 % interval and the verdict."""
    method = (
        f"paired by seed over {n_seeds} seeds, 95 % paired-t interval"
        if n_seeds > 1
        else "1 seed: no interval can be given"
    )
    md = [f"## Paired comparisons (heterogeneous top-1, test split; {method})\n"]
    if not comparisons:
        md.append("(no pair of comparable query models in this run)\n")
        return md
    md += [f"- {c['sentence']} — {c['comparison']}" for c in comparisons]
    md.append("")
    return md


def search_buys_section(sentences: list[str], n_seeds: int) -> list[str]:
    """The headline comparisons in words: what the search buys over a random pick and the hand-designed models."""
    if not sentences:
        return []
    how = f"paired by seed over {n_seeds} seeds" if n_seeds > 1 else "1 seed: no interval"
    md = [f"## What the search buys (heterogeneous top-1, test split; {how})\n"]
    md += [f"- {s}" for s in sentences]
    md.append("")
    return md


def searches_section(searches: dict[str, Any]) -> list[str]:
    """Each reward's best candidate as the supernet scored it (validation split)."""
    if not searches:
        return []
    rows = [
        [
            k,
            f"{v['best']['macs'] / 1e6:.3f}",
            f"{v['best']['metrics']['hom_top1']:.2f}",
            f"{v['best']['metrics']['het_top1']:.2f}",
            v["n_candidates"],
            f"{v['seconds']:.0f}",
        ]
        for k, v in searches.items()
    ]
    headers = ["reward", "best MMACs", "hom top-1", "het top-1", "candidates", "seconds"]
    return [
        "## Searches (val split, supernet weights after BN recalibration; run once, not per seed)\n",
        markdown_table(headers, rows, "lrrrrr"),
        "",
    ]


# the supernet's rank agreement with stand-alone training, in the order of the study's second table
RANK_AGREEMENT = (
    "kendall_supernet_vs_standalone_het",
    "spearman_supernet_vs_standalone_het",
    "kendall_supernet_vs_standalone_hom",
    "spearman_supernet_vs_standalone_hom",
)


def study_section(study: dict[str, Any]) -> list[str]:
    """The random-architecture study (val split) as tables: Q1 (is architecture a lever at equal cost? the spread
    of heterogeneous top-1), Q2 (does the homogeneous rank predict the heterogeneous one? Kendall τ), and how
    well the supernet ranks architectures against the same ones trained stand-alone."""
    band = study.get("band")
    budget = study.get("budget_macs")
    where = f" at {budget / 1e6:.2f} MMACs ± {100 * band:.0f} %" if budget and band is not None else ""
    questions = []
    for mode in ("bct", "independent"):
        s = study.get(mode) or {}
        if not s.get("n"):
            continue
        het = [r["het_top1"] for r in study.get("rows", []) if r["mode"] == mode and r.get("set", "study") == "study"]
        std = f" ± {statistics.stdev(het):.1f}" if len(het) > 1 else ""
        questions.append(
            [
                mode,
                s["n"],
                f"{num(s.get('het_mean'))}{std}",
                num(s.get("het_spread")),
                num(s.get("kendall_hom_het"), 2),
                num(s.get("spearman_hom_het"), 2),
                f"{100 * s.get('fraction_compatible', 0):.0f} %",
            ]
        )
    md = [
        "## Random-architecture study (val split)\n",
        f"Random architectures{where}, each trained stand-alone on the study schedule. Q1: the spread of "
        "heterogeneous top-1 says whether the architecture is a lever at equal cost. Q2: Kendall τ between the "
        "homogeneous and the heterogeneous rank says whether a compatibility-agnostic search would pick the "
        "compatible architecture.\n",
        markdown_table(
            ["training", "archs", "het top-1 mean ± std", "het top-1 range (max − min)", "τ(hom, het)",
             "ρ(hom, het)", "M(q,g) > M(q,q)"],
            questions,
            "lrrrrrr",
        ),
    ]  # fmt: skip
    ranking = []
    for label, s in (("study archs (BCT)", study.get("bct") or {}), ("ranking set", study.get("ranking") or {})):
        if not s.get("n") or s.get("kendall_supernet_vs_standalone_het") is None:
            continue
        span = s.get("macs_range")
        label += f" ({span[0] / 1e6:.2f}-{span[1] / 1e6:.2f} MMACs)" if span else ""
        ranking.append([label, s["n"], *(num(s.get(k), 2) for k in RANK_AGREEMENT)])
    if ranking:
        md += [
            "",
            "Supernet estimate (after BN recalibration) against the same architecture trained stand-alone with "
            "BCT, rank agreement (goal: τ ≥ 0.5 on heterogeneous top-1):\n",
            markdown_table(["architectures", "n", "het τ", "het ρ", "hom τ", "hom ρ"], ranking, "lrrrrr"),
        ]
    md.append("")
    return md


def timings_section(stage_seconds: dict[str, float | None], total_seconds: float) -> list[str]:
    rows = [[k, format_seconds(v)] for k, v in stage_seconds.items() if v is not None]
    rows.append(["**total**", f"**{format_seconds(total_seconds)}**"])
    return ["## Stage timings\n", markdown_table(["stage", "time"], rows, "lr") + "\n"]


ENVIRONMENT_ROWS = (
    ("CPU", "cpu"), ("torch threads", "threads"), ("platform", "platform"), ("python", "python"),
    ("cmpnas", "cmpnas"), ("torch", "torch"), ("torchvision", "torchvision"), ("timm", "timm"),
    ("numpy", "numpy"), ("faiss", "faiss"), ("onnxruntime", "onnxruntime"),
)  # fmt: skip


def environment_section(env: dict[str, Any]) -> list[str]:
    rows = [[label, env[key]] for label, key in ENVIRONMENT_ROWS if env.get(key) is not None]
    return ["## Environment\n", markdown_table(["", ""], rows), ""]


def report_markdown(cfg: Config, results: dict[str, Any], searches: dict[str, Any], study: dict | None) -> str:
    """The report's main body, headline to environment (the upgrade and family sections follow it)."""
    models = results["query_models"]
    n_seeds = len(cfg.run.seeds)
    seeds = (
        f"{n_seeds} seeds {list(cfg.run.seeds)}: each query model trained once per seed (its training seed + s) "
        "over one gallery, one supernet and one search; numbers are mean ± sample std over seeds"
        if n_seeds > 1
        else "1 seed: no spread and no intervals (set run.seeds or `cmpnas run --seeds 0,1,2` for both)"
    )
    md = [
        f"# cmpnas report\n\n**{results['headline']}**\n",
        f"Data: {cfg.data.name}; protocol: leave-one-out retrieval on the test split "
        "(every image queries all other images; top-1 = nearest neighbour has the same class). "
        "Test numbers are reported only: the search rewards, the study and the choice of the best hand-designed "
        "model and the best random control in the comparisons use the validation split, and nothing is chosen "
        "by a test number.\n",
        f"Seeds: {seeds}.\n",
        *learning_markdown(results.get("learning_check")),
        f"## Paragon / homogeneous / heterogeneous (test split, {n_seeds} seed{'s' if n_seeds > 1 else ''})\n",
        models_table(models) if models else "(no models evaluated)\n",
    ]
    if models:
        md.append(_latency_line(models, results["gallery"]))
    md += rows_note(cfg, models, results.get("random_controls"))
    if models and n_seeds > 1:
        md += ["### Per seed (test split)\n", per_seed_table(models)]
    md += paired_section(results["paired_comparisons"], n_seeds)
    md += search_buys_section(results["what_the_search_buys"], n_seeds)
    md += searches_section(searches)
    md += supernet_markdown(results.get("supernet"))
    if study:
        md += study_section(study)
    md += timings_section(results["stage_seconds"], results["total_seconds"])
    md += environment_section(results["environment"])
    return "\n".join(md) + "\n"
