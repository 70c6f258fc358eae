"""The report's figures (matplotlib, Agg backend, imported only when drawing) and their PNG encoding for the
self-contained HTML."""

from __future__ import annotations

import base64
import io
from typing import Any


def png(fig: Any) -> str:
    """The figure as base64 PNG (for an inline ``data:`` image), closed afterwards."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def report_plots(
    models: list[dict[str, Any]],
    gallery: dict[str, Any] | None,
    searches: dict[str, Any],
    study: dict[str, Any] | None,
) -> dict[str, str]:
    """The main report's figures by name: accuracy vs MACs, search progress, the study, supernet vs stand-alone
    (each only when the run has its data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, str] = {}
    if models and gallery:
        fig, ax = plt.subplots(figsize=(9, 4.2))
        ax.axhline(
            models[0]["paragon"]["top1"],
            color="tab:orange",
            ls="--",
            label=f"paragon M(g,g) ({gallery['macs'] / 1e6:.0f} MMACs)",
        )
        # one colour per model, named in the legend (labels on the points overlap when models have similar
        # MACs); hollow circles = homogeneous, filled triangles = heterogeneous
        colors = plt.get_cmap("tab10").colors
        for i, r in enumerate(models):
            m, color = r["macs"] / 1e6, colors[i % len(colors)]
            for setting, marker, face in (("homogeneous", "o", "none"), ("heterogeneous", "^", color)):
                ax.errorbar(
                    m,
                    r[setting]["top1"],
                    yerr=r["std"][setting]["top1"] or 0.0,
                    fmt=marker,
                    color=color,
                    mfc=face,
                    capsize=2,
                    label=r["name"] if setting == "heterogeneous" else None,
                )
        ax.scatter([], [], marker="o", facecolors="none", edgecolors="black", label="homogeneous M(q,q)")
        ax.scatter([], [], marker="^", color="black", label="heterogeneous M(q,g)")
        for (reward, s), ls in zip(searches.items(), ("-", "--", ":", "-."), strict=False):
            front = s.get("pareto_front") or []
            if front:
                ax.plot(
                    [p["macs"] / 1e6 for p in front],
                    [p["het_top1"] for p in front],
                    lw=0.8,
                    color="grey",
                    ls=ls,
                    label=f"search {reward} Pareto front (val, supernet)",
                )
        ax.set_xlabel("query model MMACs")
        ax.set_ylabel("top-1 (%), test split")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        n = max(r["n_seeds"] for r in models)
        ax.set_title("Accuracy vs cost" + (f" (mean ± std over {n} seeds)" if n > 1 else ""))
        plots["accuracy_vs_macs"] = png(fig)
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
        plots["search_progress"] = png(fig)
    if study and study.get("rows"):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
        for mode, color in (("bct", "tab:green"), ("independent", "tab:red")):
            rs = [r for r in study["rows"] if r["mode"] == mode and r.get("set", "study") == "study"]
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
        plots["study"] = png(fig)
    estimated = [r for r in (study or {}).get("rows", []) if r.get("supernet_het_top1") is not None]
    if estimated:
        fig, ax = plt.subplots(figsize=(4.8, 3.8))
        for arch_set, color in (("ranking", "tab:blue"), ("study", "tab:green")):
            rs = [r for r in estimated if r.get("set", "study") == arch_set]
            if rs:
                ax.scatter(
                    [r["supernet_het_top1"] for r in rs],
                    [r["het_top1"] for r in rs],
                    color=color,
                    s=14,
                    label=f"{arch_set} archs ({len(rs)})",
                )
        tau = (study.get("ranking") or {}).get("kendall_supernet_vs_standalone_het")
        ax.set_xlabel("supernet estimate, heterogeneous top-1")
        ax.set_ylabel("stand-alone (BCT), heterogeneous top-1")
        ax.set_title(
            "Supernet vs stand-alone (val)" + (f", ranking set Kendall {tau:.2f}" if tau is not None else "")
        )
        ax.legend(fontsize=7)
        plots["supernet_vs_standalone"] = png(fig)
    return plots


def backfill_figure(res: dict[str, Any]) -> Any:
    """The backfill curve of an upgrade evaluation: top-1 against the fraction of the gallery re-embedded, every
    order and query policy (dashed: dual queries), with M(old, old) and M(new, new) as the ends to compare
    against."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top1 = {(r["query"], r["gallery"]): r["top1"] for r in res["table"]}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = {"uncertainty": "o", "confident": "^", "random": "s"}
    colours: dict[str, str] = {}
    for name, pts in res["backfill_curve"].items():  # "order" (new-model queries) or "order, dual query"
        order, _, policy = name.partition(", ")
        colour = colours.setdefault(order, f"C{len(colours)}")  # one colour per order, dashed when dual
        ax.plot(
            [100 * p["fraction"] for p in pts],
            [p["top1"] for p in pts],
            markers.get(order, "x") + ("--" if policy else "-"),
            color=colour,
            label=f"backfill order: {name}",
        )
    ax.axhline(top1[("old", "old")], color="grey", lw=1, ls=":", label=f"M(old, old) {top1[('old', 'old')]:.1f}")
    ax.axhline(top1[("new", "new")], color="black", lw=1, ls="-.", label=f"M(new, new) {top1[('new', 'new')]:.1f}")
    ax.set_xlabel("gallery re-embedded by the new model (%)")
    ax.set_ylabel(f"top-1 (%), {res['split']} split")
    ax.set_title("Backfilling an old index with the upgraded gallery model")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def family_figure(
    models: list[dict[str, Any]], gallery: dict[str, Any], family: dict[str, Any], baselines: Any
) -> Any:
    """Heterogeneous top-1 against MACs and against measured ONNX latency: the searched family, each hand-designed
    family (a line through its widths), the independent baseline(s), the paragon as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latency = {m["name"]: m.get("latency_ms_measured") for m in family["members"]}
    latency |= {f"ref:{r['name']}": r.get("latency_ms_measured") for r in family.get("references", [])}
    by_name = {m["name"]: m for m in models}
    groups: dict[str, list[tuple[dict[str, Any], float | None]]] = {}
    for member in family["members"]:
        model = next((m for m in models if m["kind"] == f"family-{member['name']}"), None)
        if model is not None:
            groups.setdefault("CMP-NAS family (searched, BCT)", []).append((model, latency[member["name"]]))
    for b in baselines:
        model = by_name.get(b.name)
        if model is None:
            continue
        label = f"{b.family} (hand-designed, {b.compat})" if b.family else f"{b.name} ({b.compat})"
        groups.setdefault(label, []).append((model, latency.get(f"ref:{b.name}")))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    markers = ("o", "s", "D", "^", "v", "P", "X")
    for ax, axis in zip(axes, ("macs", "latency"), strict=True):
        ax.axhline(models[0]["paragon"]["top1"], color="tab:orange", ls="--",
                   label=f"paragon M(g,g) ({gallery['macs'] / 1e6:.0f} MMACs)")
        for i, (label, points) in enumerate(groups.items()):
            pts = sorted(
                ((m["macs"] / 1e6 if axis == "macs" else lat, m) for m, lat in points if axis == "macs" or lat),
                key=lambda t: t[0],
            )
            if not pts:
                continue
            ax.errorbar(
                [x for x, _ in pts],
                [m["heterogeneous"]["top1"] for _, m in pts],
                yerr=[m["std"]["heterogeneous"]["top1"] or 0.0 for _, m in pts],
                fmt=markers[i % len(markers)] + ("-" if len(pts) > 1 else ""),
                capsize=2,
                lw=1.2 if i == 0 else 0.8,
                label=label,
            )
        ax.set_xlabel("query model MMACs" if axis == "macs" else "measured latency (ms, ONNX Runtime, batch 1, 1 thread)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("heterogeneous top-1 M(q,g) (%), test split")
    n = max(m["n_seeds"] for m in models)
    fig.suptitle("Query-model family vs hand-designed families" + (f" (mean ± std over {n} seeds)" if n > 1 else ""))
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig
