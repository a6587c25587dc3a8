"""One self-contained HTML page that shows a text token by token with its surprisal, entropy and s₂.

Layout: the text in a monospace font, one row per line (long lines wrap at a token boundary), each
token's background coloured by s₂. Under every row an inline SVG sparkline whose x axis is the row's
character columns, so each token's values sit exactly under it:

* upper band — iₜ/log|V| (dark step line) and hₜ/log|V| (grey step line), 0…1 (clipped above 1,
  a clipped step gets a small tick at the top);
* lower band — +s₂ as a solid red filled step, −s₂ mirrored above the same baseline as a dashed blue
  step line, 0…1, so a confident mistake is a tall red block and a confident hit is almost nothing.
  +s₂ above 1 is clipped and ticked like the surprisal (s₂ ≥ −1 always, so only that end clips).

Infinite values (a token whose logit was masked to −inf) are drawn at the clipped end and printed
as ∞. A carriage return is shown as ␍, and one that no newline follows is a line break (old Mac
text).

The SVG's viewBox is `columns × pixels` with `preserveAspectRatio="none"` and its CSS width is the
row's column count in `ch`, so a monospace character and one viewBox unit are the same width; strokes
use `vector-effect: non-scaling-stroke` to stay crisp. Wide characters take two columns and combining
marks none; a token beyond ASCII and Latin letters is boxed to its columns (`_boxed`). Hovering a token shows a tooltip drawn by CSS
(`::after { content: attr(data-tip) }`) with its numbers; no script, font or URL is referenced, so
the file opens offline and can be mailed. With an edit (`before=`), every line has two rows, before
and after, on the same columns.
"""

from __future__ import annotations

import html
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from anchoring.atomic import write_atomic
from anchoring.errors import AnchoringError
from anchoring.evaluate.surprise import LanguageModel, SpanTokenizer, TokenScores, score_text

GENERATOR = "anchoring surprisal"  # marks a page this module wrote: only such a file is replaced
WRAP = 100  # columns per row before a long line wraps
BAND = 15  # pixels per sparkline band
GAP = 5
BIN = 0.125  # s₂ per colour step
STEPS = 8  # colour steps each side of zero

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# printable ASCII, Latin-1 and Latin Extended-A (soft hyphen aside): one column in every monospace font
_PLAIN = re.compile(r"[\x20-\x7e\u00a0-\u00ac\u00ae-\u017f]*")
# drawn inside the character before them: emoji skin tones, Hangul vowel and final jamo of a decomposed syllable
_JOINED = re.compile(r"[\U0001F3FB-\U0001F3FF\u1160-\u11ff\ud7b0-\ud7ff]")
# A run of blank lines; the match ends right after its last line break, so the spaces that indent the
# next passage's first line stay with that passage (a cut after them put its first line in the one before).
_BLANK = re.compile(r"(?:\r\n|\r(?!\n)|\n)(?:[ \t\f\v]*(?:\r\n|\r(?!\n)|\n))+")
_BREAK = re.compile(r"\n|\r(?!\n)")  # where a row ends: a newline, or a carriage return that no newline follows
_BREAKS_ONLY = re.compile(r"[ \t]*[\r\n][ \t\r\n]*")  # a piece that is all line ending (a blank line)
UNKNOWN_NOTE = "not in the vocabulary; scored as the unknown token"


def _colour_css() -> str:
    rules = []
    for b in range(-STEPS, STEPS + 1):
        if b == 0:
            continue
        a = (0.06 + 0.09 * abs(b)) * (1.0 if b > 0 else 0.75)  # mistakes are what the eye should find first
        rgb = "214,39,40" if b > 0 else "31,119,180"
        rules.append(f".c{b + STEPS}{{background:rgba({rgb},{a:.2f})}}")
    return "".join(rules)


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;color:#222;background:#fff;margin:1.5em auto;max-width:1200px;padding:0 1em}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.05em;margin:1.2em 0 .4em}
.note{color:#555;font-size:13px;max-width:60em}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 8px;text-align:right}
th{background:#f4f4f4}th.l{text-align:left}td.l{text-align:left;color:#555;max-width:28em;overflow:hidden;white-space:nowrap;text-overflow:ellipsis}
.legend{display:flex;flex-wrap:wrap;gap:.4em 1.6em;align-items:center;font-size:12px;color:#333;margin:.6em 0 1em}
.legend svg{vertical-align:middle}.scale span{display:inline-block;width:14px;height:14px}
.passage{border-top:1px solid #e4e4e4;padding:.5em 0 .7em}
.ph{font-size:12px;color:#666;margin-bottom:.3em}.ph b{color:#222}
.text{font-family:ui-monospace,'DejaVu Sans Mono','Menlo','Consolas',monospace;font-size:14px}
.line{margin-bottom:7px}.line.pair{margin-bottom:12px;padding-bottom:4px;border-bottom:1px dashed #eee}.row{display:flex;align-items:flex-start}
.gut{flex:0 0 4.2em;font:11px system-ui,sans-serif;color:#999;padding-top:2px}
.row.before .txt{color:#666}
.txt{white-space:pre;line-height:19px;height:19px}
.spark{display:block;overflow:visible}
.spark path{vector-effect:non-scaling-stroke;fill:none;stroke-width:1.2}
.spark .i{stroke:#222}.spark .h{stroke:#999}.spark .clip{stroke:#222;stroke-width:2}
.spark .pos{fill:rgba(214,39,40,.55);stroke:#c62828}.spark .neg{stroke:#1f77b4;stroke-dasharray:3 2}
.spark .ax{stroke:#e2e2e2;stroke-width:1}
.t{position:relative;border-radius:2px}.t.nl{color:#bbb}.t.over{box-shadow:inset 0 2px 0 #222}
.t.unk{text-decoration:underline wavy #888}.w{display:inline-block;overflow:visible}
.t:hover{outline:1px solid #333;z-index:5}
.t:hover::after{content:attr(data-tip);position:absolute;left:0;top:21px;z-index:10;white-space:pre;
 background:#222;color:#fff;font:12px/1.35 ui-monospace,'DejaVu Sans Mono',monospace;padding:5px 8px;border-radius:4px;
 box-shadow:0 2px 6px rgba(0,0,0,.3);pointer-events:none}
""" + _colour_css()


@dataclass
class _Unit:
    """One displayed piece of text: a token (or tokens sharing a span) or an uncovered gap."""

    start: int
    end: int
    tokens: list[int] = field(default_factory=list)


def _units(text: str, spans: Sequence[tuple[int, int]]) -> list[_Unit]:
    """Tokens as non-overlapping pieces covering the text; byte pieces of one character are merged."""
    units: list[_Unit] = []
    pos = 0
    for k, (s, e) in enumerate(spans):
        s, e = max(int(s), 0), min(int(e), len(text))
        if units and units[-1].tokens and s < pos and e <= pos:  # same (or inner) span as before: merge
            units[-1].tokens.append(k)
            continue
        s = max(s, pos)
        if s > pos:
            units.append(_Unit(pos, s))  # characters no token covers
        if e <= s:
            if units and units[-1].tokens:
                units[-1].tokens.append(k)
            continue
        units.append(_Unit(s, e, [k]))
        pos = e
    if pos < len(text):
        units.append(_Unit(pos, len(text)))
    return units


def _shown(piece: str) -> str:
    """Text as displayed on one row: newline → ↵, carriage return → ␍, tab → →, other control characters → ·.

    A carriage return is a token the model scored, so it gets a column of its own like any other."""
    return _CONTROL.sub("·", piece.replace("\r", "␍").replace("\n", "↵").replace("\t", "→"))


def _columns(shown: str) -> int:
    """Columns a piece takes on its row: two for East Asian wide and full-width characters, none for
    combining marks, invisible formatting characters and what a font draws inside the character before
    (skin tones, the character after a zero-width joiner, Hangul jamo after the first); a character
    followed by the emoji variation selector U+FE0F takes two. At least one per piece, so every
    scored token has a place to hover and a step on the sparkline."""
    n, last, joined = 0, 0, False
    for c in shown:
        if joined or _JOINED.match(c):  # drawn inside the previous character
            joined = False
            continue
        if c == "\u200d":  # zero-width joiner: the next character joins this one's glyph
            joined = True
            continue
        if c == "\ufe0f":  # emoji presentation: the character before it is drawn two columns wide
            n += 2 - last
            last = 2
            continue
        if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me", "Cf"):
            continue
        last = 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1
        n += last
    return max(n, 1)


def _boxed(shown: str) -> str:
    """The CSS that pins a piece to its columns when its glyphs may not be one column each (a
    fallback font draws CJK, symbols or a lone combining mark at its own width): without it the
    text would drift away from the sparkline's columns for the rest of the row."""
    return "" if _PLAIN.fullmatch(shown) else f' style="width:{_columns(shown)}ch"'


def _rows(text: str, units: list[_Unit]) -> list[list[tuple[_Unit, str]]]:
    """Units laid out in rows: break after a line break (`_BREAK`), wrap long lines at the last space."""
    breaks = {m.start() for m in _BREAK.finditer(text)}
    rows: list[list[tuple[_Unit, str]]] = []
    row: list[tuple[_Unit, str]] = []
    width = 0
    for u in units:
        piece = text[u.start:u.end]
        shown = _shown(piece)
        if not shown:
            continue
        if not row and rows and _BREAKS_ONLY.fullmatch(piece):
            rows[-1].append((u, shown))  # a blank line's line ending ends the line above instead of sitting alone
            continue
        if row and width + _columns(shown) > WRAP:
            cut = max((k + 1 for k, (_, s) in enumerate(row) if s[-1:] == " " and k + 1 > len(row) // 2), default=len(row))
            rows.append(row[:cut])
            row = row[cut:]
            width = sum(_columns(s) for _, s in row)
        row.append((u, shown))
        width += _columns(shown)
        if any(k in breaks for k in range(u.start, u.end)):
            rows.append(row)
            row, width = [], 0
    if row:
        rows.append(row)
    return rows


def _passages(text: str) -> list[tuple[int, int]]:
    """Blank-line separated passages as character ranges covering the whole text."""
    cuts = [m.end() for m in _BLANK.finditer(text) if 0 < m.end() < len(text)]
    edges = [0, *cuts, len(text)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _nansum(xs) -> float:
    """Sum of the scored values; NaN only when none is scored."""
    vals = [x for x in xs if not math.isnan(x)]
    return math.fsum(vals) if vals else math.nan


class _Values:
    """Scores as Python floats per display unit (sums over merged tokens), normalised by log|V|."""

    def __init__(self, scores: TokenScores, units: list[_Unit]):
        lv = scores.log_vocab
        surprisal, entropy, s2 = scores.surprisal.tolist(), scores.entropy.tolist(), scores.s2.tolist()
        self.log_vocab = lv
        self.by_unit: dict[int, tuple[float, float, float, float, float]] = {}
        for u in units:
            if not u.tokens:
                continue
            # a unit's first token may be the text's first, which nothing predicts (NaN): the others still count
            i, h, s = (_nansum(v[k] for k in u.tokens) for v in (surprisal, entropy, s2))
            self.by_unit[id(u)] = (i, h, i / lv, h / lv, s)

    def get(self, u: _Unit) -> tuple[float, float, float, float, float] | None:
        v = self.by_unit.get(id(u))
        return None if v is None or math.isnan(v[0]) else v


def _num(x: float | None, spec: str = ".3f") -> str:
    """A number as the page prints it: a masked token's surprisal is ∞, not Python's "inf"; NaN is –."""
    if x is None or math.isnan(x):
        return "–"
    if math.isinf(x):
        return ("+∞" if "+" in spec else "∞") if x > 0 else "−∞"
    return format(x, spec)


def _fmt(x: float | None, signed: bool = False) -> str:
    return _num(x, "+.3f" if signed else ".3f")


def _tip(piece: str, v: tuple[float, float, float, float, float] | None, other: tuple | None, label: str,
         unknown: bool = False, tokens: int = 1) -> str:
    head = f"{label}{piece!r}"
    if tokens > 1:  # byte pieces of one character: their sum may pass 1 though no single token's ratio does
        head += f"\nsums over its {tokens} tokens"
    if unknown:  # the model read the unknown id, not this character: say so right under the character
        head += f"\n{UNKNOWN_NOTE}"
    if v is None:
        return f"{head}\nno score (nothing predicts the first token)"
    i, h, ni, nh, s = v
    lines = [head, f"i/log|V| {_num(ni)}   i {_num(i, '.2f')} nats", f"h/log|V| {_num(nh)}   h {_num(h, '.2f')} nats",
             f"s₂       {_num(s, '+.3f')}"]
    if other is not None:
        lines.append(f"Δs₂ vs before {_num(s - other[4], '+.3f')}")
    return "\n".join(lines)


def _cls(s: float) -> str:
    """Colour class: |s₂| < BIN stays white, so only clear surprises (or clear hits) are tinted.

    Values past the scale (±∞ included) take the end step; s₂ > 1 adds `over` (a tick along the top),
    since the end step alone cannot tell 1.1 from 40."""
    if math.isnan(s):
        return f"c{STEPS}"
    b = STEPS if s >= STEPS * BIN else -STEPS if s <= -STEPS * BIN else int(s / BIN)
    return f"c{b + STEPS}" + (" over" if s > 1.0 else "")


def _unit_interval(x: float) -> float:
    """x clipped to [0, 1] for the sparkline; ∞ becomes 1, so no coordinate is ever inf or nan."""
    return 0.0 if math.isnan(x) else min(max(x, 0.0), 1.0)


def _step(points: list[tuple[float, float, float | None]], y) -> str:
    """Step line through (x0, x1, value) columns; None breaks the line."""
    out, open_ = [], False
    for x0, x1, v in points:
        if v is None:
            open_ = False
            continue
        yy = y(v)
        out.append(f"{'L' if open_ else 'M'}{x0:g} {yy:.1f}H{x1:g}")
        open_ = True
    return "".join(out)


def _area(points: list[tuple[float, float, float | None]], y, base: float) -> str:
    """Filled step area above `base` for runs of positive values."""
    out, run = [], []
    for x0, x1, v in [*points, (0, 0, None)]:
        if v is not None and v > 0:
            run.append((x0, x1, v))
            continue
        if run:
            path = f"M{run[0][0]:g} {base}" + "".join(f"V{y(v):.1f}H{x1:g}" for _, x1, v in run) + f"V{base}Z"
            out.append(path)
            run = []
    return "".join(out)


def _spark(row: list[tuple[_Unit, str]], vals: _Values) -> str:
    cols, pts_i, pts_h, pts_s = 0, [], [], []
    clipped, clipped_s = [], []
    for u, shown in row:
        x0, x1 = cols, cols + _columns(shown)
        cols = x1
        v = vals.get(u)
        pts_i.append((x0, x1, None if v is None else _unit_interval(v[2])))
        pts_h.append((x0, x1, None if v is None else _unit_interval(v[3])))
        s = None if v is None or math.isnan(v[4]) else max(-1.0, min(v[4], 1.0))  # finite, ±∞ included
        pts_s.append((x0, x1, s))
        if v is not None and v[2] > 1.0:
            clipped.append((x0, x1))
        if v is not None and v[4] > 1.0:
            clipped_s.append((x0, x1))
    top_base, bot_base = BAND, 2 * BAND + GAP
    y_top = lambda v: top_base - v * (BAND - 1)  # noqa: E731
    y_bot = lambda v: bot_base - min(abs(v), 1.0) * (BAND - 1)  # noqa: E731
    pos = [(a, b, None if s is None or s <= 0 else s) for a, b, s in pts_s]
    neg = [(a, b, None if s is None or s >= 0 else s) for a, b, s in pts_s]
    height = bot_base + 1
    w = max(cols, 1)
    parts = [f'<path class="ax" d="M0 {top_base}H{w}M0 {bot_base}H{w}"/>',
             f'<path class="h" d="{_step(pts_h, y_top)}"/>', f'<path class="i" d="{_step(pts_i, y_top)}"/>']
    if clipped:
        parts.append('<path class="clip" d="' + "".join(f"M{a:g} 0.5H{b:g}" for a, b in clipped) + '"/>')
    if clipped_s:  # the same tick at the top of the s₂ band
        top = bot_base - BAND + 0.5
        parts.append('<path class="clip s2" d="' + "".join(f"M{a:g} {top:g}H{b:g}" for a, b in clipped_s) + '"/>')
    parts.append(f'<path class="pos" d="{_area(pos, y_bot, bot_base)}"/>')
    parts.append(f'<path class="neg" d="{_step(neg, y_bot)}"/>')
    return (f'<svg class="spark" viewBox="0 0 {w} {height}" preserveAspectRatio="none" width="{w}" height="{height}" '
            f'style="width:{w}ch;height:{height}px" aria-hidden="true">{"".join(parts)}</svg>')


def _row_html(text: str, row: list[tuple[_Unit, str]], vals: _Values, other: _Values | None, label: str,
              unknown: Sequence[bool] | None = None) -> str:
    spans = []
    for u, shown in row:
        v = vals.get(u)
        piece = text[u.start:u.end]
        box = _boxed(shown)
        if not u.tokens:
            spans.append(f'<span class="w"{box}>{html.escape(shown)}</span>' if box else html.escape(shown))
            continue
        unk = unknown is not None and any(unknown[k] for k in u.tokens)
        tip = _tip(piece, v, None if other is None else other.get(u), "", unk, len(u.tokens))
        cls = ("t " + (_cls(v[4]) if v is not None else "c8") + (" nl" if "\n" in piece or "\r" in piece else "")
               + (" unk" if unk else "") + (" w" if box else ""))
        spans.append(f'<span class="{cls}"{box} data-tip="{html.escape(tip, quote=True)}">{html.escape(shown)}</span>')
    gut = f'<div class="gut">{label}</div>' if label else ""
    cls = f"row {label}" if label else "row"
    return f'<div class="{cls}">{gut}<div><div class="txt">{"".join(spans)}</div>{_spark(row, vals)}</div></div>'


def _legend() -> str:
    def swatch(inner: str) -> str:
        return f'<svg width="34" height="12" viewBox="0 0 34 12">{inner}</svg>'

    scale = "".join(f'<span class="c{b + STEPS}" title="s₂ ≈ {b * BIN:+.3f}"></span>' for b in range(-STEPS, STEPS + 1))
    items = [
        swatch('<path d="M0 9H12V3H22V7H34" fill="none" stroke="#222" stroke-width="1.4"/>') + " surprisal i/log|V|",
        swatch('<path d="M0 8H12V5H22V9H34" fill="none" stroke="#999" stroke-width="1.4"/>') + " entropy h/log|V|",
        swatch('<path d="M6 11V2H20V11Z" fill="rgba(214,39,40,.55)" stroke="#c62828"/>') + " +s₂ (more surprised than the model expected)",
        swatch('<path d="M0 11H8V5H26V11H34" fill="none" stroke="#1f77b4" stroke-dasharray="3 2" stroke-width="1.4"/>')
        + " −s₂, mirrored (less surprised than expected)",
        swatch('<path d="M0 11H34" stroke="#e2e2e2"/><path d="M8 1.5H26" stroke="#222" stroke-width="2"/>')
        + " tick at the top: above 1, clipped (i/log|V| or +s₂)",
        f'<span class="scale">s₂ −1 {scale} ≥ +1</span>',
    ]
    return '<div class="legend">' + "".join(f"<span>{x}</span>" for x in items) + "</div>"


def _means_row(cells: list[str]) -> str:
    return "<tr>" + "".join(cells) + "</tr>"


def _check(scores: TokenScores, n: int, what: str) -> None:
    if len(scores) != n:
        raise AnchoringError(f"{what} has {len(scores)} tokens but the text has {n} token spans")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def surprise_page(text: str, token_spans: Sequence[tuple[int, int]], scores: TokenScores, *, title: str,
                  before: TokenScores | None = None, unknown: Sequence[bool] | None = None) -> str:
    """The page as a string. `scores` are the model's (after the edit, when `before` is given).

    `unknown` flags, per token, the ones the tokenizer could only encode as its unknown id: their
    tooltips say so, since the score is the unknown token's, not the character's (see `unknown_tokens`)."""
    _check(scores, len(token_spans), "scores")
    if before is not None:
        _check(before, len(token_spans), "before")
    if unknown is not None and len(unknown) != len(token_spans):
        raise AnchoringError(f"unknown has {len(unknown)} flags but the text has {len(token_spans)} token spans")
    units = _units(text, token_spans)
    rows = _rows(text, units)
    after_vals = _Values(scores, units)
    before_vals = _Values(before, units) if before is not None else None
    passages = _passages(text) or [(0, 0)]

    starts = torch.tensor([s for s, _ in token_spans], dtype=torch.long)

    def means(sc: TokenScores, lo: int, hi: int) -> dict[str, float]:
        keep = (starts >= lo) & (starts < hi)
        sub = TokenScores(sc.surprisal[keep], sc.entropy[keep], sc.s2[keep], sc.log_vocab)
        m = sub.mean()
        scored = int((keep & ~torch.isnan(sc.surprisal)).sum())  # the first token is predicted by nothing
        return {"i": m["surprisal"] / sc.log_vocab, "h": m["entropy"] / sc.log_vocab, "s2": m["s2"], "n": scored}

    # rows grouped by passage (a row belongs to the passage its first unit starts in)
    body, table = [], []
    r = 0
    for p, (lo, hi) in enumerate(passages):
        rows_here = []
        while r < len(rows) and (rows[r][0][0].start < hi or p == len(passages) - 1):
            rows_here.append(rows[r])
            r += 1
        m = means(scores, lo, hi)
        mb = means(before, lo, hi) if before is not None else None
        snippet = html.escape(" ".join(text[lo:hi].split())[:60])
        if mb is None:
            head = (f'<b>¶ {p + 1}</b> · {m["n"]} tokens · mean i/log|V| <b>{_fmt(m["i"])}</b> · '
                    f'h/log|V| <b>{_fmt(m["h"])}</b> · s₂ <b>{_fmt(m["s2"], True)}</b>')
            table.append(_means_row([f"<td>{p + 1}</td>", f'<td class="l">{snippet}</td>', f"<td>{m['n']}</td>",
                                     f"<td>{_fmt(m['i'])}</td>", f"<td>{_fmt(m['h'])}</td>", f"<td>{_fmt(m['s2'], True)}</td>"]))
        else:
            head = (f'<b>¶ {p + 1}</b> · {m["n"]} tokens · mean s₂ before <b>{_fmt(mb["s2"], True)}</b> → after '
                    f'<b>{_fmt(m["s2"], True)}</b> · i/log|V| {_fmt(mb["i"])} → {_fmt(m["i"])} · h/log|V| {_fmt(mb["h"])} → {_fmt(m["h"])}')
            table.append(_means_row([f"<td>{p + 1}</td>", f'<td class="l">{snippet}</td>', f"<td>{m['n']}</td>",
                                     f"<td>{_fmt(mb['i'])}</td>", f"<td>{_fmt(m['i'])}</td>", f"<td>{_fmt(mb['h'])}</td>",
                                     f"<td>{_fmt(m['h'])}</td>", f"<td>{_fmt(mb['s2'], True)}</td>", f"<td>{_fmt(m['s2'], True)}</td>",
                                     f"<td>{_fmt(m['s2'] - mb['s2'], True)}</td>"]))
        lines = []
        for row in rows_here:
            if before_vals is None:
                lines.append(f'<div class="line">{_row_html(text, row, after_vals, None, "", unknown)}</div>')
            else:
                lines.append('<div class="line pair">' + _row_html(text, row, before_vals, None, "before", unknown)
                             + _row_html(text, row, after_vals, before_vals, "after", unknown) + "</div>")
        body.append(f'<section class="passage"><div class="ph">{head}</div><div class="text">{"".join(lines)}</div></section>')

    total = means(scores, 0, len(text) + 1)
    if before is None:
        header = "<tr><th>¶</th><th class='l'>begins</th><th>tokens</th><th>i/log|V|</th><th>h/log|V|</th><th>s₂</th></tr>"
        tokens = f"{total['n']} token{'s' if total['n'] != 1 else ''}"
        overall = (f"mean over {tokens}: i/log|V| <b>{_fmt(total['i'])}</b>, h/log|V| <b>{_fmt(total['h'])}</b>, "
                   f"s₂ <b>{_fmt(total['s2'], True)}</b>")
    else:
        tb = means(before, 0, len(text) + 1)
        header = ("<tr><th>¶</th><th class='l'>begins</th><th>tokens</th><th>i/log|V| before</th><th>i/log|V| after</th>"
                  "<th>h/log|V| before</th><th>h/log|V| after</th>"
                  "<th>s₂ before</th><th>s₂ after</th><th>Δs₂</th></tr>")
        tokens = f"{total['n']} token{'s' if total['n'] != 1 else ''}"
        overall = (f"mean over {tokens}: s₂ before <b>{_fmt(tb['s2'], True)}</b> → after <b>{_fmt(total['s2'], True)}</b>; "
                   f"i/log|V| {_fmt(tb['i'])} → {_fmt(total['i'])}; h/log|V| {_fmt(tb['h'])} → {_fmt(total['h'])}")
    note = (f'<p class="note">{overall}. log|V| = {scores.log_vocab:.3f} nats. iₜ = −log p(xₜ), hₜ = −Σ p log p of the '
            "prediction for token t, s₂ = (iₜ − hₜ)/log|V|. The first token has no score. Hover a token for its numbers.</p>")
    opened = " open" if len(passages) <= 12 else ""
    summary = f"<details{opened}><summary>per-passage means</summary><table>{header}{''.join(table)}</table></details>"
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='generator' content='{GENERATOR}'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{note}{_legend()}{summary}{''.join(body)}</body></html>")
    # a byte that is not UTF-8 in a command-line argument reaches Python as a lone surrogate: the
    # tokenizer reads it as its unknown token, and the page shows it as U+FFFD (UTF-8 cannot hold it)
    return _LONE_SURROGATE.sub("\ufffd", page)


def unknown_tokens(tokenizer: SpanTokenizer, text: str) -> list[bool] | None:
    """Per token of `text`, whether it is the unknown id; None for a tokenizer without one.

    Only the character tokenizer has an unknown id (0, for every character not seen in training);
    byte-level BPE encodes any text exactly."""
    if getattr(tokenizer, "kind", None) != "char":
        return None
    return [i == 0 for i in tokenizer.encode(text)]


def unknown_characters(tokenizer: SpanTokenizer, text: str) -> str:
    """The distinct characters of `text` that `tokenizer` maps to its unknown id, in order of first appearance."""
    flags = unknown_tokens(tokenizer, text)
    if not flags or not any(flags):
        return ""
    return "".join(dict.fromkeys(text[s:e] for (s, e), f in zip(tokenizer.spans(text), flags) if f))


def render_surprise(model: LanguageModel, tokenizer: SpanTokenizer, text: str, *, context: int | None = None,
                    edited_model: LanguageModel | None = None, title: str = "Surprisal and entropy",
                    stride: int | None = None) -> str:
    """Score `text` with `model` (and `edited_model`, shown as *after*) and return the page.

    `context` defaults to the model's `.context` attribute (NormalizedTransformer has one); longer
    texts are scored with sliding windows (`evaluate.surprise.windows`).
    """
    if not text:
        raise AnchoringError("nothing to score: the text is empty")
    if context is None:
        context = getattr(model, "context", None)
        if context is None:
            raise AnchoringError("context is unknown: pass context= (the model has no .context attribute)")
    spans, scores = score_text(model, tokenizer, text, context=context, stride=stride)
    unknown = unknown_tokens(tokenizer, text)
    if edited_model is None:
        return surprise_page(text, spans, scores, title=title, unknown=unknown)
    _, after = score_text(edited_model, tokenizer, text, context=context, stride=stride)
    return surprise_page(text, spans, after, title=title, before=scores, unknown=unknown)


def is_page(path: Path) -> bool:
    """True for a file whose head carries this module's generator mark, or (a page written before the
    mark) begins as these pages do and holds their tooltip rule."""
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError:
        return False
    if f"<meta name='generator' content='{GENERATOR}'>".encode() in head:
        return True
    return head.startswith(b"<!doctype html><html lang='en'><head><meta charset='utf-8'>") and b".t:hover::after" in head


def check_page_path(path: Path) -> None:
    """Where a page may go: not a folder, and not over a file that is not a page written here (a
    mistyped path must not turn a run's config, or the text being scored, into HTML)."""
    if path.is_dir():
        raise AnchoringError(f"{str(path)!r} is a directory; give the page's file name")
    if path.exists() and not is_page(path):
        raise AnchoringError(f"{str(path)!r} exists and is not a surprisal page; give a new file name "
                             "(only a page written here is replaced)")


def write_surprise_page(path: Path | str, page_html: str) -> Path:
    """Write the page atomically (a reader never sees half a page) and return its path.

    An existing file is replaced only when it is a page written here: a mistyped path must not turn a
    run's config or the text being scored into HTML."""
    path = Path(path)
    check_page_path(path)
    write_atomic(path, page_html)
    return path
