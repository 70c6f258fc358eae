"""The run report: results.json, report.md and a self-contained report.html (PNG plots inlined)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from cmpnas.config import Config
from cmpnas.evaluation.compare import markdown_table
from cmpnas.io import read_json, write_json_atomic, write_text_atomic
from cmpnas.manifest import environment


def _load(path: Path) -> Any:
    fix = "restore it, or redo the stage that wrote it (cmpnas run ... --force STAGE)"
    return read_json(path, fix) if path.exists() else None


def headline(rows: list[dict[str, Any]], reward: str) -> tuple[str, dict[str, Any] | None]:
    """One sentence from the measurements for the headline model (the R-searched query model)."""
    pick = next((r for r in rows if r["query"].get("kind") == f"searched-{reward}"), None) or (
        rows[-1] if rows else None
    )
    if pick is None:
        return "No query model was evaluated.", None
    gap = pick["gap_to_paragon"]["top1"]
    where = f"within {gap:.2f} points of" if gap >= 0 else f"{-gap:.2f} points above"
    return (
        f"The CMP-NAS {reward} query model is {pick['cost_reduction']:.0f}x cheaper than the gallery model "
        f"({pick['query']['macs'] / 1e6:.2f} vs {pick['gallery']['macs'] / 1e6:.1f} MMACs); heterogeneous top-1 is "
        f"{pick['heterogeneous']['top1']:.2f}, {where} the paragon ({pick['paragon']['top1']:.2f}), against "
        f"{pick['homogeneous']['top1']:.2f} for the query model alone.",
        pick,
    )


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(
    rows: list[dict[str, Any]], searches: dict[str, Any], study: dict[str, Any] | None
) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, str] = {}
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.axhline(
            rows[0]["paragon"]["top1"],
            color="tab:orange",
            ls="--",
            label=f"paragon M(g,g) ({rows[0]['gallery']['macs'] / 1e6:.0f} MMACs)",
        )
        for r in rows:
            m = r["query"]["macs"] / 1e6
            ax.scatter(m, r["homogeneous"]["top1"], marker="o", color="tab:blue")
            ax.scatter(m, r["heterogeneous"]["top1"], marker="^", color="tab:green")
            ax.annotate(
                r["query"]["name"],
                (m, r["heterogeneous"]["top1"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.scatter([], [], marker="o", color="tab:blue", label="homogeneous M(q,q)")
        ax.scatter([], [], marker="^", color="tab:green", label="heterogeneous M(q,g)")
        for reward, s in searches.items():
            front = s.get("pareto_front") or []
            if front:
                ax.plot(
                    [p["macs"] / 1e6 for p in front],
                    [p["het_top1"] for p in front],
                    lw=0.8,
                    alpha=0.6,
                    label=f"search {reward} Pareto front (val, supernet)",
                )
        ax.set_xscale("log")
        ax.set_xlabel("query model MMACs (log)")
        ax.set_ylabel("top-1 (%)")
        ax.legend(fontsize=7)
        ax.set_title("Accuracy vs cost")
        plots["accuracy_vs_macs"] = _png(fig)
    if searches:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for reward, s in searches.items():
            h = s.get("history") or []
            ax.plot(
                [e["generation"] for e in h],
                [e["best_fitness"] for e in h],
                marker=".",
                label=f"{reward} best",
            )
            ax.plot(
                [e["generation"] for e in h], [e["mean_fitness"] for e in h], ls=":", label=f"{reward} mean"
            )
        ax.set_xlabel("generation")
        ax.set_ylabel("reward (val, %)")
        ax.legend(fontsize=7)
        ax.set_title("Search progress")
        plots["search_progress"] = _png(fig)
    if study and study.get("rows"):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
        for mode, color in (("bct", "tab:green"), ("independent", "tab:red")):
            rs = [r for r in study["rows"] if r["mode"] == mode]
            axes[0].scatter(
                [r["hom_top1"] for r in rs], [r["het_top1"] for r in rs], color=color, label=mode, s=14
            )
            axes[1].scatter(
                [r["macs"] / 1e6 for r in rs], [r["het_top1"] for r in rs], color=color, label=mode, s=14
            )
        axes[0].set_xlabel("homogeneous top-1")
        axes[0].set_ylabel("heterogeneous top-1")
        axes[1].set_xlabel("MMACs")
        axes[1].set_ylabel("heterogeneous top-1")
        for a in axes:
            a.legend(fontsize=7)
        fig.suptitle("Random architectures at equal cost (val)")
        plots["study"] = _png(fig)
    return plots


def write_report(out: Path, cfg: Config, state: dict[str, Any]) -> dict[str, Any]:
    rows = _load(out / "evaluation" / "rows.json") or []
    searches = {r: _load(out / "search" / r / "search.json") for r in cfg.run.rewards}
    searches = {k: v for k, v in searches.items() if v}
    study = _load(out / "study" / "study.json")
    head, pick = headline(rows, cfg.run.headline_reward)
    timings = {k: v.get("seconds") for k, v in state.items() if v.get("status") == "done"}
    results = {
        "headline": head,
        "cost_reduction": pick["cost_reduction"] if pick else None,
        "gap_to_paragon": pick["gap_to_paragon"] if pick else None,
        "paragon": pick["paragon"] if pick else None,
        "query_models": [
            {
                "name": r["query"]["name"],
                "kind": r["query"].get("kind"),
                "macs": r["query"]["macs"],
                "latency_ms_b1": r["query"].get("latency_ms_b1"),
                "cost_reduction": r["cost_reduction"],
                "paragon": r["paragon"],
                "homogeneous": r["homogeneous"],
                "heterogeneous": r["heterogeneous"],
                "gap_to_paragon": r["gap_to_paragon"],
                "compatible": r["compatible"],
                "fingerprint": r["query"]["fingerprint"],
            }
            for r in rows
        ],
        "gallery": rows[0]["gallery"] if rows else None,
        "searches": {
            k: {"best": v["best"], "n_candidates": v["n_candidates"], "seconds": v["seconds"]}
            for k, v in searches.items()
        },
        "study": {k: v for k, v in (study or {}).items() if k != "rows"} or None,
        "stage_seconds": timings,
        "total_seconds": round(sum(t for t in timings.values() if t), 1),
        "environment": environment(),
    }
    write_json_atomic(out / "results.json", results)
    table = markdown_table(rows) if rows else "(no models evaluated)\n"
    md = [
        f"# cmpnas report\n\n**{head}**\n",
        f"Data: {cfg.data.name}; protocol: leave-one-out retrieval on the test split "
        "(every image queries all other images; top-1 = nearest neighbour has the same class).\n",
        "## Paragon / homogeneous / heterogeneous\n",
        table,
    ]
    if rows:
        md.append(
            "Latency (batch 1, torch eager, 1 thread, p50): "
            + ", ".join(
                f"{r['query']['name']} {r['query'].get('latency_ms_b1', float('nan')):.2f} ms" for r in rows
            )
            + f"; gallery {rows[0]['gallery'].get('latency_ms_b1', float('nan')):.2f} ms.\n"
        )
    if searches:
        md.append("## Searches (val split, supernet weights after BN recalibration)\n")
        md.append(
            "| reward | best MMACs | hom top-1 | het top-1 | candidates | seconds |\n|---|---:|---:|---:|---:|---:|"
        )
        for k, v in searches.items():
            b = v["best"]
            md.append(
                f"| {k} | {b['macs'] / 1e6:.3f} | {b['metrics']['hom_top1']:.2f} | {b['metrics']['het_top1']:.2f} "
                f"| {v['n_candidates']} | {v['seconds']:.0f} |"
            )
        md.append("")
    if study:
        md.append("## Random-architecture study (val)\n")
        for mode in ("bct", "independent"):
            s = study.get(mode) or {}
            md.append(
                f"- {mode}: n={s.get('n')}, het top-1 mean {s.get('het_mean')}, spread {s.get('het_spread')}, "
                f"Pearson(hom, het) {s.get('pearson_hom_het')}, Kendall {s.get('kendall_hom_het')}, "
                f"fraction with M(q,g) > M(q,q) {s.get('fraction_compatible')}"
                + (
                    f", supernet-vs-standalone Kendall {s.get('kendall_supernet_vs_standalone_het')}"
                    if mode == "bct"
                    else ""
                )
            )
        md.append("")
    md.append("## Stage timings (s)\n")
    md.append("| stage | seconds |\n|---|---:|")
    md += [f"| {k} | {v} |" for k, v in timings.items()]
    md.append(f"\nEnvironment: `{json.dumps(results['environment'])}`\n")
    markdown = "\n".join(md) + "\n"
    write_text_atomic(out / "report.md", markdown)
    plots = _plots(rows, searches, study)
    write_text_atomic(out / "report.html", _html(markdown, plots))
    return {
        "results": "results.json",
        "report_md": "report.md",
        "report_html": "report.html",
        "headline": head,
        "plots": sorted(plots),
    }


def _html(markdown: str, plots: dict[str, str]) -> str:
    """Minimal Markdown (headings, tables, paragraphs) to HTML, then the plots; no external assets."""
    out, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-:"):
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
                out.append("<tr>" + "".join(f"<th>{c}</th>" for c in cells) + "</tr>")
            else:
                out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            text = html.escape(line).replace("**", "")
            out.append(f"<p>{text}</p>")
    if in_table:
        out.append("</table>")
    imgs = "".join(
        f'<figure><img alt="{k}" src="data:image/png;base64,{v}"><figcaption>{k}</figcaption></figure>'
        for k, v in plots.items()
    )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
        "img{max-width:100%}figure{display:inline-block;margin:8px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>cmpnas report</title><style>{style}</style>"
        f"</head><body>{''.join(out)}<h2>Plots</h2>{imgs}</body></html>"
    )
