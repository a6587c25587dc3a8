"""A single-file HTML report: tables plus figures embedded as base64 PNGs."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

import numpy as np

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}.ok{color:#070}.bad{color:#b00;font-weight:bold}img{max-width:100%}
pre{background:#f6f6f6;padding:8px;font-size:12px;overflow-x:auto}.scroll{overflow-x:auto;max-width:100%}
.scroll td:first-child,.scroll th:first-child{position:sticky;left:0;background:#fff;text-align:left;white-space:nowrap}
.scroll th:first-child{background:#f3f3f3}"""


def _decimals(rows: Sequence[Sequence[Any]]) -> dict[int, int]:
    """Decimals per column, so a column reads evenly (3.100 beside 3.058, not 3.1): 3 where its numbers
    lie in [0.01, 10⁴), 4 where some lie in [0.001, 0.01). A column with a number under 0.001, or one
    that reaches 10⁴, is left out: its cells keep four significant digits each (7.722e-05). Fixed
    decimals there printed 3.7e-05 as 0.0000 beside a column that showed the same value in full, so a
    quantity that had not moved read as one that fell to zero."""
    out = {}
    for j in range(max((len(r) for r in rows), default=0)):
        vals = [abs(float(r[j])) for r in rows if j < len(r) and isinstance(r[j], (float, np.floating))
                and not isinstance(r[j], bool) and math.isfinite(float(r[j])) and not float(r[j]).is_integer()]
        if vals and 0.01 <= max(vals) < 1e4 and min(vals) >= 0.001:
            out[j] = 3 if min(vals) >= 0.01 else 4
    return out


def table_html(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    decimals = _decimals(rows)

    def cell(v: Any, j: int) -> str:
        if isinstance(v, bool):
            return f'<td class="{"ok" if v else "bad"}">{"yes" if v else "no"}</td>'
        if isinstance(v, np.floating):
            v = float(v)
        if isinstance(v, float) and v != v:  # undefined (a class with no positions, a ratio over 0 / 0)
            return '<td title="undefined">–</td>'
        if isinstance(v, float) and v in (float("inf"), float("-inf")):
            return f"<td>{'∞' if v > 0 else '−∞'}</td>"
        if isinstance(v, float) and v.is_integer() and j not in decimals:  # a median of whole steps, a count (no −0)
            return f"<td>{int(v)}</td>"
        if isinstance(v, float):
            text = f"{v:.{decimals[j]}f}" if j in decimals else f"{v:.4g}"
            return f"<td>{text.lstrip('-') if not text.strip('-0.') else text}</td>"  # no −0.0000
        return f"<td>{html.escape(str(v))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v, j) for j, v in enumerate(r)) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'  # a wide table scrolls in its box, not the page


def image_html(path: Path, caption: str, mime: str = "image/png") -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:{mime};base64,{data}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def link_html(target: str, text: str) -> str:
    """A link to another page of the same run (a relative path): comparison pages link the runs they compare."""
    return f'<a href="{html.escape(quote(target, safe="/=,+"))}">{html.escape(text)}</a>'


def page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{html.escape(h)}</h2>{content}" for h, content in sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}</body></html>")
