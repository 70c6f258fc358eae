"""report.html: the report's Markdown rendered by markdown-it-py, with the figures inlined."""

from __future__ import annotations

from markdown_it import MarkdownIt


def report_html(markdown: str, plots: dict[str, str]) -> str:
    """The report's Markdown as HTML (CommonMark + tables, raw HTML off), then the plots; no external assets."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
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
        f"</head><body>{body}<h2>Plots</h2>{imgs}</body></html>"
    )
