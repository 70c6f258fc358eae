"""The one Markdown table builder: every table of the report and of `cmpnas evaluate` goes through it, so all share one syntax."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# a column's alignment letter -> its delimiter cell
ALIGN = {"l": "---", "r": "---:", "c": ":---:"}


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A pipe table, one line per row, no trailing newline.

    ``align`` has one letter per column (``l``, ``r``, ``c``; None: all ``l``). A blank header cell is one
    space, so a key/value table can go without headers.
    """
    align = align or "l" * len(headers)
    if len(align) != len(headers) or set(align) - set(ALIGN):
        raise ValueError(f"align {align!r} must give one of {''.join(ALIGN)} per column of {list(headers)}")
    lines = ["|" + "|".join(f" {h} " if h else " " for h in headers) + "|"]
    lines.append("|" + "|".join(ALIGN[a] for a in align) + "|")
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)} has {len(row)} cells, the table {len(headers)} columns")
        lines.append("| " + " | ".join(f"{cell}" for cell in row) + " |")
    return "\n".join(lines)


def num(x: float | None, digits: int = 1) -> str:
    """A number cell rounded to ``digits``, or ``n/a``."""
    return "n/a" if x is None else f"{x:.{digits}f}"
