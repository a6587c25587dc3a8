"""Figures people look at instead of reading tables; each returns a matplotlib Figure."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from anchoring.schedule import Timeline  # noqa: E402

BACKGROUND = "#808080"  # mid grey: neither black nor white points vanish


def latent_slices(z: torch.Tensor, rgb: torch.Tensor, seeds: list[int], anchor: torch.Tensor | None = None,
                  max_seeds: int = 8) -> Figure:
    """Every axis-aligned 2-D projection of the latent, one row per seed, points in their true colour."""
    z = z[:max_seeds].numpy()
    n_seeds, _, dims = z.shape
    pairs = list(itertools.combinations(range(dims), 2)) or [(0, 0)]
    fig, axes = plt.subplots(n_seeds, len(pairs), figsize=(1.9 * len(pairs), 1.9 * n_seeds), squeeze=False)
    colours = rgb.clamp(0, 1).numpy()
    order = np.argsort(rgb.sum(-1).numpy())  # draw dark first so bright hues stay visible
    for i, j in itertools.product(range(n_seeds), range(len(pairs))):
        ax = axes[i, j]
        a, b = pairs[j]
        ax.set_facecolor(BACKGROUND)
        ax.add_patch(plt.Circle((0, 0), 1.0, fill=False, lw=0.5, color="white"))
        ax.scatter(z[i, order, a], z[i, order, b], c=colours[order], s=4, linewidths=0, rasterized=True)
        if anchor is not None:
            ax.scatter([anchor[a]], [anchor[b]], marker="x", c="black", s=30)
        ax.set_xlim(-1.15, 1.15)
        ax.set_ylim(-1.15, 1.15)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
            ax.set_title(f"dims {a}–{b}", fontsize=8)
        if j == 0:
            ax.set_ylabel(f"seed {seeds[i]}", fontsize=8)
    fig.tight_layout(pad=0.3)
    return fig


def running_mean(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` steps that skips exact zeros and NaNs.

    A concept term is exactly 0 on batches with no labelled sample; averaging those in
    would show label sparsity, not the loss.
    """
    valid = np.isfinite(y) & (y != 0)
    kernel = np.ones(window)
    total = np.convolve(np.where(valid, y, 0.0), kernel)[: len(y)]
    count = np.convolve(valid.astype(float), kernel)[: len(y)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def loss_curves(metrics: torch.Tensor, names: list[str], seeds: list[int], window: int = 25) -> Figure:
    """One panel per metric, a line per seed (running mean over `window` steps), log scale."""
    m = metrics.numpy().astype(np.float64)
    cols = min(len(names), 3)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    steps = np.arange(m.shape[0])
    for k, name in enumerate(names):
        ax = axes[k // cols, k % cols]
        for i, s in enumerate(seeds):
            y = running_mean(m[:, i, k], window)
            ax.plot(steps, np.where(y > 0, y, np.nan), lw=0.8, alpha=0.8, label=f"seed {s}" if k == 0 else None)
        ax.set_yscale("log")
        ax.set_title(f"{name} (mean of {window} steps)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for k in range(len(names), rows * cols):
        axes[k // cols, k % cols].axis("off")
    if len(seeds) <= 10:
        axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def schedule_plot(timeline: Timeline) -> Figure:
    """Each scheduled hyperparameter over the run, phases shaded and actions marked."""
    table = timeline.table()
    names = timeline.names
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 1.5 * len(names) + 0.4), sharex=True, squeeze=False)
    steps = np.arange(timeline.steps)
    bounds = [s for s, _ in timeline.phases] + [timeline.steps]
    for k, name in enumerate(names):
        ax = axes[k, 0]
        for p, (start, phase) in enumerate(timeline.phases):
            ax.axvspan(start, bounds[p + 1], color=f"C{p % 10}", alpha=0.08)
            if k == 0:
                ax.text(start, 1.02, phase, transform=ax.get_xaxis_transform(), fontsize=7)
        for s in timeline.actions:
            ax.axvline(s, color="k", lw=0.5, ls=":")
        ax.plot(steps, table[:, k], lw=1.2)
        for t, _ in timeline.tracks[name].keys:
            if t < timeline.steps:
                ax.plot([t], [table[int(t), k]], "o", ms=3, color="k")
        ax.set_ylabel(name, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return fig


def save(fig: Figure, path, dpi: int = 80) -> None:
    """PNG via an atomic rename; figures are closed so long sessions do not leak memory."""
    import io

    from anchoring.atomic import write_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def hue_error_curves(curves: torch.Tensor, values, title: str) -> Figure:
    """Error vs hue (median over seeds, band = min–max) at several values (brightness)."""
    c = curves.numpy()
    hues = np.arange(c.shape[-1]) * 360.0 / c.shape[-1]
    fig, ax = plt.subplots(figsize=(6.5, 3.0))
    for k, v in enumerate(values):
        med = np.median(c[:, k], axis=0)
        ax.plot(hues, med, lw=1.5, label=f"v = {v:g}")
        ax.fill_between(hues, c[:, k].min(0), c[:, k].max(0), alpha=0.15)
    ax.set_xlabel("hue (degrees; red = 0)")
    ax.set_ylabel("MSE after edit")
    ax.set_xticks(range(0, 361, 30))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def reconstruction_grid(truth: torch.Tensor, outputs: torch.Tensor, names, seeds: list[int], max_seeds: int = 8) -> Figure:
    """Each cell: the model's output colour as background, the true colour as a small inset."""
    out = outputs[:max_seeds].clamp(0, 1).numpy()
    n_seeds, n = out.shape[:2]
    fig, ax = plt.subplots(figsize=(0.55 * n + 1.2, 0.55 * n_seeds + 1.0))
    for i in range(n_seeds):
        for j in range(n):
            ax.add_patch(plt.Rectangle((j, n_seeds - 1 - i), 1, 1, color=out[i, j]))
            ax.add_patch(plt.Rectangle((j + 0.3, n_seeds - 1 - i + 0.3), 0.4, 0.4, color=truth[j].numpy(), ec="white", lw=0.5))
    ax.set_xlim(0, n)
    ax.set_ylim(0, n_seeds)
    ax.set_xticks(np.arange(n) + 0.5, names, rotation=60, fontsize=7)
    ax.set_yticks(np.arange(n_seeds) + 0.5, [f"seed {s}" for s in reversed(seeds[:n_seeds])], fontsize=7)
    ax.set_aspect("equal")
    fig.tight_layout()
    return fig


def intervention_lobes(shapes: dict, method: str = "suppress") -> Figure:
    """Polar lobes: intervention magnitude vs angle to the concept, and where a unit point lands."""
    from anchoring.control.falloff import BezierMapper, FalloffMapper
    from anchoring.control.interventions import repel, suppress

    theta = torch.linspace(-np.pi, np.pi, 721)
    pts = torch.stack([torch.cos(theta), torch.sin(theta)], -1)
    v = torch.tensor([1.0, 0.0])
    fig = plt.figure(figsize=(9, 4.2))
    ax1 = fig.add_subplot(1, 2, 1, projection="polar")
    ax2 = fig.add_subplot(1, 2, 2)
    for name, shape in shapes.items():
        if method == "suppress":
            moved = suppress(pts, v, shape)
        else:
            mapper = shape if isinstance(shape, (BezierMapper, FalloffMapper)) else FalloffMapper(shape)
            moved = repel(pts, v, mapper)
        magnitude = (moved - pts).norm(dim=-1)
        ax1.plot(theta.numpy(), magnitude.numpy(), label=name)
        ax2.scatter(moved[:, 0].numpy(), moved[:, 1].numpy(), s=3, label=name)
    ax1.set_title(f"{method}: |change| vs angle to concept", fontsize=9)
    ax1.set_rlabel_position(135)  # radial tick labels in the back-left quadrant, off the lobes (they point at 0°)
    ax1.tick_params(axis="y", labelsize=7)
    ax2.plot(pts[:, 0].numpy(), pts[:, 1].numpy(), color="grey", lw=0.5, ls=":")
    ax2.arrow(0, 0, 1, 0, head_width=0.04, color="red")
    ax2.set_aspect("equal")
    ax2.set_title("where the unit circle goes (concept → red arrow)", fontsize=9)
    ax2.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def strength_curves(shapes: dict) -> Figure:
    """g(α) (or m(α)) against alignment α ∈ [0, 1]."""
    alpha = torch.linspace(0, 1, 201)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name, shape in shapes.items():
        ax.plot(alpha.numpy(), shape(alpha).numpy(), label=name)
    ax.set_xlabel("alignment α = max(0, cos)")
    ax.set_ylabel("strength g(α) / mapped cosine m(α)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def relearn_curves(curves: list[dict], threshold: float) -> Figure:
    """Concept error vs fine-tuning step, median over seeds, one colour per K; solid = anchored."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    models = sorted({c["model"] for c in curves})
    ks = sorted({c["K"] for c in curves})
    for mi, model in enumerate(models):
        for ki, k in enumerate(ks):
            sel = [c for c in curves if c["model"] == model and c["K"] == k]
            steps = sorted({c["step"] for c in sel})
            med = [np.median([c["error"] for c in sel if c["step"] == s]) for s in steps]
            ax.plot(steps, med, color=f"C{ki}", ls=["-", "--", ":"][mi % 3], label=f"{model}, K={k}")
    ax.axhline(threshold, color="k", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("concept MSE (median over seeds)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def phase_history(snapshots: dict[int, torch.Tensor], rgb: torch.Tensor, dims: tuple[int, int], seed_index: int,
                  phases: list[tuple[int, str]], thumbs: int = 8) -> Figure:
    """A strip of small latent slices at chosen steps (phase starts first), the final one large."""
    steps = sorted(snapshots)
    wanted = sorted({min(steps, key=lambda s: abs(s - p)) for p, _ in phases} | set(steps[:: max(1, len(steps) // thumbs)]))
    wanted = [s for s in wanted if s != steps[-1]][: thumbs - 1] + [steps[-1]]
    colours = rgb.clamp(0, 1).numpy()
    order = np.argsort(rgb.sum(-1).numpy())
    fig = plt.figure(figsize=(1.6 * len(wanted), 1.6 + 4.2))
    grid = fig.add_gridspec(2, len(wanted), height_ratios=[1, 2.6])
    phase_of = {s: next((name for start, name in reversed(phases) if start <= s), "") for s in wanted}

    # one scale for every panel: unit latents fit ±1.15, un-normalised ones set their own
    lim = max([1.15] + [float(snapshots[s][seed_index][:, list(dims)].abs().max()) * 1.05 for s in wanted])

    def draw(ax, step, size):
        z = snapshots[step][seed_index].numpy()
        ax.set_facecolor(BACKGROUND)
        ax.scatter(z[order, dims[0]], z[order, dims[1]], c=colours[order], s=size, linewidths=0)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])

    for i, s in enumerate(wanted):
        ax = fig.add_subplot(grid[0, i])
        draw(ax, s, 2)
        ax.set_title(f"{s}\n{phase_of[s]}", fontsize=7)
    big = fig.add_subplot(grid[1, :])
    draw(big, steps[-1], 10)
    big.set_title(f"final (step {steps[-1]}), dims {dims[0]}–{dims[1]}", fontsize=9)
    fig.tight_layout()
    return fig


def colour_spaces() -> list[tuple[str, Figure]]:
    """The RGB cube, the HSV wheel (hue × saturation at full value) and the HSV cylinder."""
    from anchoring.domains.colour import hsv_grid, hsv_to_rgb, rgb_grid

    out = []
    cube = rgb_grid(10).numpy()
    fig = plt.figure(figsize=(5, 5))
    ax = fig.add_subplot(projection="3d")
    ax.scatter(cube[:, 0], cube[:, 1], cube[:, 2], c=cube, s=12, depthshade=False)
    ax.set_xlabel("R")
    ax.set_ylabel("G")
    ax.set_zlabel("B")
    ax.set_title("RGB cube (10³ points)")
    out.append(("rgb_cube", fig))

    h = torch.linspace(0, 1, 181)
    s = torch.linspace(0, 1, 30)
    hh, ss = torch.meshgrid(h, s, indexing="ij")
    rgb = hsv_to_rgb(torch.stack([hh, ss, torch.ones_like(hh)], -1)).numpy()
    fig = plt.figure(figsize=(5, 5))
    ax = fig.add_subplot(projection="polar")
    ax.scatter((hh * 2 * np.pi).numpy().ravel(), ss.numpy().ravel(), c=rgb.reshape(-1, 3), s=6, linewidths=0)
    ax.set_yticklabels([])
    ax.set_title("HSV wheel (v = 1): angle = hue, radius = saturation", fontsize=10)
    out.append(("hsv_wheel", fig))

    pts, hsv = hsv_grid(36, 6, 6)
    theta = hsv[:, 0].numpy() * 2 * np.pi
    fig = plt.figure(figsize=(5, 5))
    ax = fig.add_subplot(projection="3d")
    ax.scatter(hsv[:, 1].numpy() * np.cos(theta), hsv[:, 1].numpy() * np.sin(theta), hsv[:, 2].numpy(), c=pts.numpy(), s=10,
               depthshade=False)
    ax.set_zlabel("value")
    ax.set_title("HSV cylinder (36 × 6 × 6)")
    out.append(("hsv_cylinder", fig))
    return out


def timing_functions() -> list[tuple[str, Figure]]:
    """Easing between two keyframes in every mode, and a transition re-targeted twice mid-flight."""
    from anchoring.schedule import Track

    steps = np.arange(0, 101)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for space in ("linear", "log"):
        for interp in ("minjerk", "linear", "step"):
            tr = Track([(10, 0.01), (90, 1.0)], space=space, interp=interp)
            ax.plot(steps, [tr(t) for t in steps], label=f"{space}:{interp}", ls="-" if space == "linear" else "--")
    ax.set_xlabel("step")
    ax.set_ylabel("value (keys 0.01 at 10, 1.0 at 90)")
    ax.legend(fontsize=7)
    ax.set_title("timing functions")
    fig.tight_layout()
    result = [("timing_functions", fig)]

    original = Track([(0, 0.0), (100, 1.0)])
    moved = Track([(0, 0.0), (100, 1.0)])
    moved.retarget(35, 0.3, 70)   # the metric says: stop short
    moved.retarget(55, 0.9, 100)  # ...then: go on after all
    fine = np.linspace(0, 100, 1001)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(6, 4.6), sharex=True)
    a1.plot(fine, [original(t) for t in fine], color="grey", ls=":", label="keyframes only")
    a1.plot(fine, [moved(t) for t in fine], label="re-targeted at 35 and 55")
    a2.plot(fine, [original.velocity(t) for t in fine], color="grey", ls=":")
    a2.plot(fine, [moved.velocity(t) for t in fine])
    for ax in (a1, a2):
        for t in (35, 55):
            ax.axvline(t, color="k", lw=0.5, ls="--")
    a1.set_ylabel("value")
    a2.set_ylabel("velocity")
    a2.set_xlabel("step")
    a1.legend(fontsize=7)
    # continuous where the targets change; where the eased curve would overshoot, it holds the bound,
    # and its velocity drops to zero there (the lower panel shows that step, not hides it)
    a1.set_title("re-targeting mid-flight: no jump in value or velocity at 35 and 55;\n"
                 "where the curve would overshoot its target it holds it (velocity drops to 0)", fontsize=9)
    fig.tight_layout()
    result.append(("retargeting", fig))
    return result


def compare_curves(arms: dict[str, dict[str, list[float]]], window: int = 25) -> Figure:
    """Loss of each variant (median over seeds of a running mean, band = min–max), on one axis."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for k, (name, m) in enumerate(arms.items()):
        seed = np.array(m["seed"])
        curves = np.stack([running_mean(np.array(m["loss"])[seed == s], window) for s in sorted(set(seed))])
        steps = np.arange(curves.shape[1])
        ax.plot(steps, np.median(curves, 0), color=f"C{k}", label=name)
        ax.fill_between(steps, curves.min(0), curves.max(0), color=f"C{k}", alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (mean of {window} steps)")
    ax.legend()
    fig.tight_layout()
    return fig


def thumbnail_grid(z: torch.Tensor, rgb: torch.Tensor, titles: list[str], dims: tuple[int, int], cols: int = 8) -> Figure:
    """One small latent slice per configuration (e.g. per subset of terms), true colours."""
    n = len(titles)
    rows = -(-n // cols)
    lines = max((t.count(" + ") + 1 for t in titles), default=1)  # a title's terms, one per line
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, (1.85 + 0.14 * lines) * rows), squeeze=False)
    colours = rgb.clamp(0, 1).numpy()
    order = np.argsort(rgb.sum(-1).numpy())
    for k in range(rows * cols):
        ax = axes[k // cols, k % cols]
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= n:
            ax.axis("off")
            continue
        zi = z[k].numpy()
        lim = max(1.15, float(np.abs(zi[:, list(dims)]).max()) * 1.05)
        ax.set_facecolor(BACKGROUND)
        ax.scatter(zi[order, dims[0]], zi[order, dims[1]], c=colours[order], s=2, linewidths=0)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(titles[k].replace(" + ", "\n+ "), fontsize=6)
    fig.tight_layout()
    return fig
