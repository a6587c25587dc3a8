"""Figures of an LM run: training curves, alignment per layer, held-out text shaded by alignment."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from anchoring.evaluate.stats import median
from anchoring.kinds.lm.unlearning import CONTROL_ROWS, MATCHED_BLIND, MATCHED_DELETE  # drawn hollow, left out of R plots
from anchoring.report.figures import plt, running_mean


def training_curves(curves: dict[str, dict[str, np.ndarray]], window: int = 25) -> Figure:
    """One panel per metric; one line per arm (mean over seeds of a trailing mean)."""
    metrics = sorted({m for c in curves.values() for m in c})
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.0 * len(metrics), 3.0), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for arm, c in curves.items():
            if m in c and np.isfinite(c[m]).any():
                ys = np.stack([running_mean(row, window) for row in np.atleast_2d(c[m])])
                with warnings.catch_warnings():  # steps where no seed had a labelled passage stay NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    ax.plot(np.nanmean(ys, 0), label=arm, lw=1)
        ax.set_title("task loss" if m == "task" else f"term {m}\n(batches without a labelled position skipped)", fontsize=8)
        ax.set_ylabel("nats/token" if m == "task" else "term value", fontsize=8)  # per token: a BPE token holds several characters
        ax.set_xlabel(f"step (trailing mean of {window})", fontsize=8)
        ax.tick_params(labelsize=7)
    # the legend on the panel that draws the most arms: a term panel may hold the anchored arm alone
    fullest = max(axes[0], key=lambda a: len(a.get_lines()))
    if fullest.get_lines():
        fullest.legend(fontsize=7)
    fig.tight_layout()
    return fig


def alignment_bars(rows: list[dict], sites: list[str], arms: list[str]) -> Figure:
    """Mean alignment at concept and retain positions per layer and arm (median over seeds)."""
    fig, axes = plt.subplots(1, len(arms), figsize=(3.6 * len(arms), 3.0), squeeze=False, sharey=True)
    x = np.arange(len(sites))
    for ax, arm in zip(axes[0], arms):
        for k, (cls, colour) in enumerate((("concept", "#c0392b"), ("retain", "#7f8c8d"))):
            vals = [median(r["alignment"][s][cls] for r in rows if r["arm"] == arm) for s in sites]  # as the summary's
            ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, color=colour, label=f"{cls} positions")
        ax.set_xticks(x, [s.replace("blocks.", "L") for s in sites], fontsize=8)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(arm, fontsize=9)
    axes[0, 0].set_ylabel("mean cos(h, anchor), or share in the subspace", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def shaded_text(passages: list[tuple[str, str, np.ndarray, list[tuple[int, int]]]], cols: int = 90,
                what: str = "cos(h, anchor)") -> Figure:
    """Each passage's characters on a grid, background shaded by the alignment of the token they belong
    to (red: towards the anchor, blue: away), on a colour scale of ± the largest |alignment| shown (at least
    0.1), so small but real differences stay visible. `passages`: (title, text, alignment per token, token spans);
    `what` names the alignment in the figure's key."""
    scale = max([0.1, *[float(np.nanmax(np.abs(a))) for _t, _x, a, _s in passages if len(a)]])
    lines_per = []
    for _title, text, _a, _s in passages:
        n = sum(max(1, -(-len(line) // cols)) for line in text.split("\n"))
        lines_per.append(n + 1)
    total = sum(lines_per) + 1
    fig = plt.figure(figsize=(cols * 0.085 + 0.6, total * 0.2 + 0.6))
    ax = fig.add_axes([0.01, 0.01, 0.98, 0.98])
    ax.set_xlim(0, cols)
    ax.set_ylim(total, 0)
    ax.axis("off")
    cmap = plt.get_cmap("RdBu_r")
    ax.set_title(f"background: {what} of the character's token, blue −{scale:.2f} … white 0 … red +{scale:.2f}",
                 fontsize=7, loc="right")
    y = 0
    for title, text, align, spans in passages:
        ax.text(0, y + 0.5, title, fontsize=7, fontweight="bold", va="center")
        y += 1
        value = np.full(len(text), np.nan)
        for a, (s, e) in zip(align, spans):
            value[s:e] = a
        x = 0
        for i, ch in enumerate(text):
            if ch == "\n" or x >= cols:
                y, x = y + 1, 0
                if ch == "\n":
                    continue
            if np.isfinite(value[i]):
                ax.add_patch(plt.Rectangle((x, y), 1, 1, color=cmap(0.5 + 0.5 * float(np.clip(value[i] / scale, -1, 1))), lw=0))
            ax.text(x + 0.5, y + 0.5, ch, fontsize=6, family="monospace", ha="center", va="center")
            x += 1
        y += 1
    return fig


def _method_colours(methods: list[str]) -> dict[str, Any]:
    """One colour per method (up to 20 distinct), grey for control rows."""
    cmap = plt.get_cmap("tab20")
    real = [m for m in methods if m not in CONTROL_ROWS]
    return {**{m: cmap(i % 20) for i, m in enumerate(real)}, **{m: "0.45" for m in methods if m in CONTROL_ROWS}}


def unlearning_tradeoff(rows: list[dict]) -> Figure:
    """Δforget at concept positions against retain cost, one point per (method, seed)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colour = _method_colours(methods)
    fig, ax = plt.subplots(figsize=(7.6, 4.0))
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        xs, ys = [r["retain_cost"] for r in mine], [r["d_forget_concept"] for r in mine]
        if m in CONTROL_ROWS:  # hollow: the matched controls, for reference (square: the deletion's, diamond: the blinding's)
            ax.scatter(xs, ys, facecolors="none", edgecolors=colour[m], label=m, s=22,
                       marker={MATCHED_DELETE: "s", MATCHED_BLIND: "D"}.get(m, "o"))
        else:
            ax.scatter(xs, ys, color=colour[m], label=m, s=22)
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("retain cost (nats/char)", fontsize=8)
    ax.set_ylabel("Δforget at concept positions (nats/char)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # beside the axes: it hid points
    fig.tight_layout()
    return fig


def relearning_curves(points: list[dict], ks: list[int]) -> Figure:
    """Forget-concept loss against fine-tuning step, one panel per K, one line per method (mean over
    seeds; it ends with an × where a seed's fine-tune diverged); the control's loss on the same text dashed."""
    relearn = [p for p in points if p["fine_tune"].startswith("relearn")]
    methods = list(dict.fromkeys(p["method"] for p in relearn))
    colour = _method_colours(methods)
    fig, axes = plt.subplots(1, len(ks), figsize=(4.0 * len(ks) + 2.4, 3.2), squeeze=False, sharey=True)
    for ax, k in zip(axes[0], ks):
        mine = [p for p in relearn if p["k"] == k]
        for m in methods:
            by_seed: dict[int, dict[int, float]] = {}
            for p in mine:
                if p["method"] == m:
                    by_seed.setdefault(p["seed"], {})[p["step"]] = p["forget_concept"]
            if not by_seed:  # not attacked at this K: still in the legend, which the last panel draws
                ax.plot([], [], color=colour[m], lw=1.2, label=m)
                continue
            # a mean over the same seeds at every step: past a seed's curve cut at a divergence, the line would
            # become the other seeds' mean and jump; it ends there instead, with an ×
            steps = sorted(set.intersection(*(set(c) for c in by_seed.values())))
            ys = [float(np.mean([c[s] for c in by_seed.values()])) for s in steps]
            ax.plot(steps, ys, color=colour[m], lw=1.2, label=m)
            if steps and len(steps) < max(len(c) for c in by_seed.values()):
                ax.plot(steps[-1:], ys[-1:], color=colour[m], marker="x", ms=6, ls="none")
        if mine:
            per_seed = {p["seed"]: p["control_concept"] for p in mine}  # one control loss per seed, equal values or not
            ax.axhline(float(np.mean(list(per_seed.values()))), color="k", ls="--", lw=0.8,
                       label="control")
        ax.set_title(f"K = {k} forget passages", fontsize=9)
        ax.set_xlabel("fine-tuning step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("forget loss at concept positions (nats/char)\nmean over seeds", fontsize=8)
    axes[0, -1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)  # beside the last panel
    fig.tight_layout()
    return fig


def coverage_figure(points: list[tuple[float, str, float]]) -> Figure:
    """R (Δforget relative to the oracle filter) against weak-label coverage, one line per method;
    `points` = [(coverage, method, R)], the median of several seeds per coverage, as the sweep's table
    gives it (undefined and infinite R left out, as `stats.median` does). Control rows
    are left out: R counts any damage, and a control's would set the scale."""
    methods = list(dict.fromkeys(m for _c, m, _r in points if m not in CONTROL_ROWS))
    colour = _method_colours(methods)
    fig, ax = plt.subplots(figsize=(7.2, 3.6))
    for m in methods:
        covs = sorted({c for c, mm, _r in points if mm == m})
        ys = []
        for c in covs:
            vals = [r for cc, mm, r in points if mm == m and cc == c and r is not None and np.isfinite(r)]
            ys.append(float(np.median(vals)) if vals else np.nan)
        ax.plot(covs, ys, marker="o", ms=3, color=colour[m], label=m)
    ax.axhline(1.0, color="k", ls="--", lw=0.6)
    ax.set_xlabel("label coverage", fontsize=8)
    ax.set_ylabel("R = Δforget (concept) / oracle filter's\n(median over seeds)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig
