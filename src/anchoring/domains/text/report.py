"""`anchoring labels`: how a concept's labelling functions behave on a corpus, as a table and a report.

Everything is computed and validated first; `report.html` (self-contained, no external URLs) and
`summary.json` are written atomically at the very end, so bad input leaves `--out` untouched.
"""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path

import numpy as np

from anchoring.atomic import write_atomic
from anchoring.domains.text.corpus import GENRE, load_corpus
from anchoring.domains.text.labelling import Passages, concept_spans, functions, score_matrix
from anchoring.domains.text.weak import combiner, reference_labels, weak_set
from anchoring.errors import AnchoringError
from anchoring.runs import staged, write_json

GOLD = Path(__file__).resolve().parent / "data" / "violence_gold.csv"  # package data: installed with the code


def read_gold(path: Path = GOLD) -> list[dict]:
    """Rows of the hand-labelled gold file (comment lines start with '#')."""
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines(keepends=True) if not ln.startswith("#")]
    return list(csv.DictReader(io.StringIO("".join(lines))))


def gold_scores(rows: list[dict]) -> dict:
    """Precision/recall of the reference violence labels on the gold set, per stratum and combined."""
    p = Passages([r["text"] for r in rows], [GENRE.get(r["work"], "comedy") for r in rows], [r["speaker"] for r in rows])
    pred = reference_labels(p, "violence").astype(bool)
    y = np.array([r["label"] == "1" for r in rows])
    strata = np.array([r["stratum"] for r in rows])
    out = {}
    for name in [*sorted(set(strata)), "combined"]:
        m = np.ones(len(rows), bool) if name == "combined" else strata == name
        tp, fp, fn = int((pred & y & m).sum()), int((pred & ~y & m).sum()), int((~pred & y & m).sum())
        out[name] = {"n": int(m.sum()), "gold_positives": int((y & m).sum()), "tp": tp, "fp": fp, "fn": fn,
                     "precision": tp / (tp + fp) if tp + fp else float("nan"), "recall": tp / (tp + fn) if tp + fn else float("nan")}
    return out


def _highlight(text: str, spans: list[tuple[int, int]]) -> str:
    out, last = [], 0
    for s, e in spans:
        out += [html.escape(text[last:s]), f"<mark>{html.escape(text[s:e])}</mark>"]
        last = e
    out.append(html.escape(text[last:]))
    return "".join(out).replace("\n", "<br>")


def label_report(concept: str, corpus: str = "shakespeare", coverage: float = 0.3, false_positives: float = 0.0,
                 out: Path | None = None, seed: int = 0) -> tuple[list[tuple[str, str]], Path | None, bool]:
    """Rows (name, value) for a printed table, the report folder (None when `out` is None), and whether
    the report replaced an earlier one there."""
    functions(concept)  # validates the concept
    for flag, v in (("coverage", coverage), ("false-positives", false_positives)):
        if not 0.0 <= v <= 1.0:
            raise AnchoringError(f"--{flag} must be between 0 and 1, got {v}")
    replacing = out is not None and earlier_report(out)  # refused now, before the corpus is read and scored
    c = load_corpus(corpus)
    if concept == "milton" and all(d == "shakespeare" for d in c.domain):  # a folder's passages may be Milton's
        raise AnchoringError("concept milton needs the mixed corpus (--corpus mixed) or a folder of your own")
    p = Passages.of(c)
    names, scores = score_matrix(p, concept)
    fired = scores > 0
    ref = reference_labels(p, concept).astype(bool)
    prob = combiner(concept).probability(scores)
    weak = weak_set(ref, coverage, false_positives, seed).astype(bool)
    n = len(c)
    lengths = np.array([len(t) for t in c.texts])
    marked = 0
    spans_of = {}
    for i in np.flatnonzero(ref):
        sp = concept_spans(c.texts[i], concept)
        spans_of[int(i)] = sp
        marked += sum(e - s for s, e in sp)
    pair = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            both = int((fired[:, a] & fired[:, b]).sum())
            either = int((fired[:, a] | fired[:, b]).sum())
            conflict = int((fired[:, a] ^ fired[:, b]).sum())
            pair.append({"a": names[a], "b": names[b], "overlap": both, "jaccard": both / either if either else 0.0,
                         "conflict": conflict})
    rng = np.random.default_rng(seed)
    pos_ids, neg_ids = np.flatnonzero(ref), np.flatnonzero(~ref)
    show_pos = rng.choice(pos_ids, min(10, len(pos_ids)), replace=False).tolist() if len(pos_ids) else []
    show_neg = rng.choice(neg_ids, min(10, len(neg_ids)), replace=False).tolist() if len(neg_ids) else []
    gold = gold_scores(read_gold()) if concept == "violence" and corpus == "shakespeare" else None
    summary = {
        "concept": concept, "corpus": corpus, "passages": n, "characters": int(lengths.sum()),
        "coverage": coverage, "false_positives": false_positives, "seed": seed,
        "functions": {nm: float(fired[:, k].mean()) for k, nm in enumerate(names)},
        "combined_mean_probability": float(prob.mean()),
        "reference_positive_rate": float(ref.mean()),
        "weak_positive_rate": float(weak.mean()),
        "weak_coverage": float(weak[ref].mean()) if ref.any() else 0.0,
        "weak_false_positive_rate": float(weak[~ref].mean()) if (~ref).any() else 0.0,
        "share_passages_labelled": float(ref.mean()),
        "share_characters_in_positive_passages": float(lengths[ref].sum() / max(lengths.sum(), 1)),
        "share_characters_marked": float(marked / max(lengths.sum(), 1)),
        # a positive can come from sentiment or metadata alone, with no word to mark: with
        # `weak_labels = "spans"` such a weakly labelled passage trains as unlabelled text
        "reference_positives_with_a_span": float(np.mean([bool(v) for v in spans_of.values()])) if spans_of else 0.0,
        "weak_coverage_with_a_span": float(sum(bool(spans_of[i]) for i in np.flatnonzero(ref & weak)) / ref.sum())
        if ref.any() else 0.0,
        "pairs": pair, "gold": gold,
    }
    rows = [("passages", f"{n:,}"), ("characters", f"{summary['characters']:,}")]
    rows += [(f"fires: {nm}", f"{v:.3f}") for nm, v in summary["functions"].items()]
    rows += [("reference positive rate", f"{summary['reference_positive_rate']:.3f}"),
             ("reference positives with a span", f"{summary['reference_positives_with_a_span']:.3f}"),
             ("weak labels: coverage", f"{summary['weak_coverage']:.3f}"),
             ("weak labels: positives labelled", f"{int((weak & ref).sum()):,} of {int(ref.sum()):,}"),
             ("weak labels: coverage with a span ('spans' labels)", f"{summary['weak_coverage_with_a_span']:.3f}"),
             ("weak labels: false-positive rate", f"{summary['weak_false_positive_rate']:.3f}"),
             ("characters marked", f"{summary['share_characters_marked']:.4f}")]
    if gold:
        g = gold["combined"]
        rows += [("gold precision (combined)", f"{g['precision']:.3f} ({g['tp']}/{g['tp'] + g['fp']})"),
                 ("gold recall (combined)", f"{g['recall']:.3f} ({g['tp']}/{g['tp'] + g['fn']})")]
    if out is None:
        return rows, None, False

    def passage(i: int) -> str:
        meta = html.escape(f"{c.work[i]}:{c.line[i]} {c.speaker[i]}")
        sp = spans_of.get(i) or concept_spans(c.texts[i], concept)
        return f"<li><small>{meta} p={prob[i]:.2f}</small><br>{_highlight(c.texts[i], sp)}</li>"

    table = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>" for a, b in rows)
    pairs = "".join(f"<tr><td>{html.escape(r['a'])}</td><td>{html.escape(r['b'])}</td><td>{r['overlap']}</td>"
                    f"<td>{r['jaccard']:.3f}</td><td>{r['conflict']}</td></tr>" for r in pair)
    gold_html = ""
    if gold:
        gold_html = "<h2>Reference vs hand-labelled gold set</h2><table><tr><th>stratum</th><th>n</th><th>gold +</th>" \
                    "<th>precision</th><th>recall</th></tr>" + "".join(
                        f"<tr><td>{k}</td><td>{v['n']}</td><td>{v['gold_positives']}</td><td>{v['precision']:.3f}</td>"
                        f"<td>{v['recall']:.3f}</td></tr>" for k, v in gold.items()) + "</table>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>labels: {html.escape(concept)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:auto}}td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}
mark{{background:#fd6}}li{{margin:0.6em 0}}</style></head><body>
<h1>{html.escape(concept)} labels on {html.escape(corpus)}</h1>
<table>{table}</table>
<h2>Pairs of labelling functions</h2><p>overlap: both fire; conflict: exactly one fires.</p>
<table><tr><th>a</th><th>b</th><th>overlap</th><th>Jaccard</th><th>conflict</th></tr>{pairs}</table>
{gold_html}
<h2>10 random reference positives</h2><ol>{''.join(passage(i) for i in show_pos)}</ol>
<h2>10 random reference negatives</h2><ol>{''.join(passage(i) for i in show_neg)}</ol>
</body></html>"""
    # the two files arrive together or not at all: written into a hidden sibling that then takes the
    # folder's place (an earlier report is swapped out whole), so a full disk between them leaves
    # neither a new report beside an old summary nor a lone report.html that blocks the next try
    with staged(out, replace=True) as tmp:
        write_atomic(tmp / "report.html", page)
        write_json(tmp / "summary.json", summary)
    return rows, out, replacing


LABEL_FILES = {"summary.json", "report.html"}


def earlier_report(out: Path) -> bool:
    """Whether `out` holds an earlier labels report (which a new one replaces); False for a folder that is
    not there yet or is empty. Anything else there (a run, other files) is refused: the report's two files
    would overwrite a run's own `summary.json` and `report.html`."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise AnchoringError(f"--out {out} exists and is not a folder")
    names = {p.name for p in out.iterdir()}
    if not names:
        return False
    try:
        earlier = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if names <= LABEL_FILES and isinstance(earlier, dict) and {"concept", "functions"} <= set(earlier):
        return True
    raise AnchoringError(f"--out {out} holds other files than an earlier labels report ({', '.join(sorted(names)[:3])}"
                         f"{', …' if len(names) > 3 else ''}); give a new or empty folder")
