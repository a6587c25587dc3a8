"""Figures for the colour transformer: alignment maps, accuracy vs redness, training curves."""

from __future__ import annotations

import textwrap

import numpy as np
from matplotlib.figure import Figure

from anchoring.report.figures import plt


def short_site(name: str) -> str:
    """'blocks.1.attn.k_site[head 0]' → 'blocks.1 keys h0': labels that fit beside a heatmap."""
    return (name.replace(".attn.k_site", " keys").replace(".attn.q_site", " queries")
            .replace("[head ", " h").replace("]", ""))


def fit_title(title: str, fig: Figure) -> str:
    """The title broken into lines that fit the figure's width (about 11 characters of 10-point text per
    inch): a one-arm figure cut the long titles off at both ends."""
    return textwrap.fill(title, max(30, int(fig.get_figwidth() * 11)))


def alignment_maps(maps: dict[str, np.ndarray], rows: list[str], cols: list[str], title: str) -> Figure:
    """One heatmap per model: rows = layers (sites), columns = line positions; value = a statistic of cos(h, anchor)."""
    rows = [short_site(r) for r in rows]
    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps) + 1.6, 0.5 * len(rows) + 1.6), squeeze=False)
    lim = max(0.1, max(float(np.nanmax(np.abs(m))) for m in maps.values()))
    im = None
    for ax, (name, m) in zip(axes[0], maps.items()):
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, fontsize=8)
        ax.set_yticks(range(len(rows)), rows if ax is axes[0, 0] else [], fontsize=8)
        ax.set_title(name, fontsize=9)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}".replace("-0.00", "0.00"), ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(fit_title(title, fig), fontsize=10)
    return fig


def colour_alignment(align: np.ndarray, rgb: np.ndarray, redness: np.ndarray, title: str) -> Figure:
    """cos(h, anchor) of every colour against its redness, dots in their own colour."""
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    ax.set_facecolor("#808080")
    ax.scatter(redness, align, c=np.clip(rgb, 0, 1), s=18, edgecolors="k", linewidths=0.3)
    ax.axhline(0, color="w", lw=0.6)
    ax.set_xlabel("redness r·(1 − g/2 − b/2)")
    ax.set_ylabel("cos(h, anchor)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def accuracy_vs_redness(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Figure:
    """Exact match against the redness of a line's reddest colour; one line per model/edit (median over seeds)."""
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    for name, (x, y) in curves.items():
        ax.plot(x, y, marker="o", ms=3, label=name)
    ax.set_xlabel("redness of the line's reddest colour")
    ax.set_ylabel("exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def training_curves(curves: dict[str, np.ndarray], names: list[str], title: str) -> Figure:
    """Loss terms over steps (mean over seeds, moving average), one panel per metric; `curves[arm]` is `(seeds, steps, metrics)`."""
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, (k, name) in zip(axes[0], enumerate(names)):
        for arm, c in curves.items():
            y = c[:, :, k].copy()
            if name not in ("loss", "task"):
                y[y == 0] = np.nan  # a concept term is exactly 0 in batches without a labelled line
            if np.all(np.isnan(y)):
                continue
            counts = (~np.isnan(y)).sum(0)
            med = np.where(counts > 0, np.nansum(y, 0) / np.maximum(counts, 1), np.nan)
            window = max(1, len(med) // 60)
            ok = ~np.isnan(med)
            box = np.ones(window)
            smooth = np.convolve(np.where(ok, med, 0.0), box, "same") / np.maximum(np.convolve(ok, box, "same"), 1)
            smooth[np.convolve(ok, box, "same") == 0] = np.nan
            ax.plot(np.arange(len(smooth)), smooth, label=arm, lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(fit_title(title, fig), fontsize=10)
    fig.tight_layout()
    return fig
