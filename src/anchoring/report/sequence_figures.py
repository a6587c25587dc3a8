"""Figures for the colour transformer: alignment maps, accuracy vs redness, training curves."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from anchoring.report.figures import plt


def alignment_maps(maps: dict[str, np.ndarray], rows: list[str], cols: list[str], title: str) -> Figure:
    """One heatmap per model: rows = layers (sites), columns = line positions; value = a statistic of cos(h, anchor)."""
    fig, axes = plt.subplots(1, len(maps), figsize=(3.6 * len(maps) + 0.8, 0.5 * len(rows) + 1.6), squeeze=False)
    lim = max(0.1, max(float(np.nanmax(np.abs(m))) for m in maps.values()))
    im = None
    for ax, (name, m) in zip(axes[0], maps.items()):
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_title(name, fontsize=9)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=10)
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
    """Loss terms over steps, one panel per metric; `curves[arm]` is `(seeds, steps, metrics)`."""
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, (k, name) in zip(axes[0], enumerate(names)):
        for arm, c in curves.items():
            y = c[:, :, k]
            if np.all(np.isnan(y)):
                continue
            med = np.nanmedian(y, 0)
            window = max(1, len(med) // 100)
            smooth = np.convolve(med, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(len(smooth)) + window - 1, smooth, label=arm, lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yscale("log" if name != "task" else "linear")
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
