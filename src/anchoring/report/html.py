"""A single-file HTML report: tables plus figures embedded as base64 PNGs."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Sequence

import numpy as np

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}.ok{color:#070}.bad{color:#b00;font-weight:bold}img{max-width:100%}
pre{background:#f6f6f6;padding:8px;font-size:12px;overflow-x:auto}.scroll{overflow-x:auto;max-width:100%}
.scroll td:first-child,.scroll th:first-child{position:sticky;left:0;background:#fff;text-align:left}
.scroll th:first-child{background:#f3f3f3}"""


def table_html(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, bool):
            return f'<td class="{"ok" if v else "bad"}">{"yes" if v else "no"}</td>'
        if isinstance(v, np.floating):
            v = float(v)
        if isinstance(v, float) and v != v:  # undefined (a class with no positions, a ratio over 0 / 0)
            return '<td title="undefined">–</td>'
        if isinstance(v, float) and v in (float("inf"), float("-inf")):
            return f"<td>{'∞' if v > 0 else '−∞'}</td>"
        if isinstance(v, float):  # four significant digits, trailing zeros kept so a column reads evenly
            return f"<td>{f'{v:#.4g}'.rstrip('.')}</td>"
        return f"<td>{html.escape(str(v))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'  # a wide table scrolls in its box, not the page


def image_html(path: Path, caption: str, mime: str = "image/png") -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:{mime};base64,{data}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{html.escape(h)}</h2>{content}" for h, content in sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}</body></html>")
