"""Where a deleted concept lands, drawn: one row per seed, red's post-ablation cosines to the named colours.

Takes the dict from `anchoring.kinds.colour.deletion.deletion_landing`. Each row shows, as
colour-coded cells, cos(red's residual direction, each named colour's latent), with the
colour the ablated model actually decodes red to as a swatch at the end of the row and the
red error written over it. A clean deletion reads as a row whose bright cells sit on the
greys (or on colours far from red) and whose swatch is not red.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from anchoring.report.figures import plt


def landing_cosines(landing: dict, seeds: list[int], max_seeds: int = 32) -> Figure:
    """Heat map seeds × named colours of cos(after, colour latent), plus the decoded swatch per seed."""
    cos = landing["cos_after"][:max_seeds].numpy()
    decoded = landing["decoded"][:max_seeds].clamp(0, 1).numpy()
    err = landing["error"][:max_seeds].numpy()
    names = list(landing["names"])
    n_seeds, n = cos.shape
    fig, ax = plt.subplots(figsize=(0.45 * (n + 2) + 1.5, 0.3 * n_seeds + 1.4))
    im = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", extent=(0, n, n_seeds, 0))
    for i in range(n_seeds):
        ax.add_patch(plt.Rectangle((n + 0.3, i), 1.4, 1, color=decoded[i]))
        ax.text(n + 1.0, i + 0.5, f"{err[i]:.2f}", ha="center", va="center", fontsize=6,
                color="white" if decoded[i].mean() < 0.5 else "black")
    ax.set_xlim(0, n + 1.8)
    ax.set_xticks(list(np.arange(n) + 0.5) + [n + 1.0], names + ["decoded"], rotation=60, fontsize=7)
    ax.set_yticks(np.arange(n_seeds) + 0.5, [f"seed {s}" for s in seeds[:n_seeds]], fontsize=7)
    ax.set_title("red after ablating its dims: cosine to each named colour's latent", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    return fig


def landing_plane(landing: dict, seeds: list[int], cols: int = 4, max_seeds: int = 16) -> Figure:
    """Per seed: named colours' latents and red's residual on the plane of the residual's two largest dims."""
    after = landing["after"][:max_seeds].numpy()
    refs = landing["reference_latents"][:max_seeds].numpy()
    from anchoring.domains.colour import named_rgb

    colours = named_rgb().numpy() if refs.shape[1] == len(named_rgb()) else None
    k = len(after)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    for j in range(rows * cols):
        ax = axes[j // cols, j % cols]
        ax.set_xticks([])
        ax.set_yticks([])
        if j >= k:
            ax.axis("off")
            continue
        a, b = np.argsort(-np.abs(after[j]))[:2]
        ax.set_facecolor("#808080")
        ax.add_patch(plt.Circle((0, 0), 1.0, fill=False, lw=0.5, color="white"))
        ax.scatter(refs[j, :, a], refs[j, :, b], c=colours if colours is not None else "white", s=25, edgecolors="black", linewidths=0.3)
        ax.scatter([after[j, a]], [after[j, b]], marker="*", s=90, c=[landing["decoded"][j].clamp(0, 1).numpy()], edgecolors="black")
        ax.set_xlim(-1.15, 1.15)
        ax.set_ylim(-1.15, 1.15)
        ax.set_aspect("equal")
        ax.set_title(f"seed {seeds[j]}: x dim {a}, y dim {b}, err {float(landing['error'][j]):.2f}", fontsize=7)
    fig.tight_layout()
    return fig
