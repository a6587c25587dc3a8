"""Latent evolution as an animation: one frame per training snapshot, points in their true colours.

GIF always (Pillow, which matplotlib already needs); MP4 too when an `ffmpeg` binary is on PATH.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from anchoring.atomic import write_atomic  # noqa: E402
from anchoring.report.figures import BACKGROUND  # noqa: E402


def _frame(z: torch.Tensor, colours: np.ndarray, order: np.ndarray, dims: tuple[int, int], seeds: list[int], step: int) -> Image.Image:
    n = len(seeds)
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 2.6), squeeze=False)
    for i in range(n):
        ax = axes[0, i]
        ax.set_facecolor(BACKGROUND)
        zi = z[i].numpy()
        ax.scatter(zi[order, dims[0]], zi[order, dims[1]], c=colours[order], s=5, linewidths=0)
        lim = max(1.15, float(np.abs(zi[:, list(dims)]).max()) * 1.05)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"seed {seeds[i]}", fontsize=8)
    fig.suptitle(f"step {step}  (dims {dims[0]}–{dims[1]})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def evolution_frames(snapshots: dict[int, torch.Tensor], rgb: torch.Tensor, dims: tuple[int, int], seeds: list[int],
                     max_seeds: int = 4) -> list[Image.Image]:
    colours = rgb.clamp(0, 1).numpy()
    order = np.argsort(rgb.sum(-1).numpy())
    shown = seeds[:max_seeds]
    return [_frame(snapshots[s][: len(shown)], colours, order, dims, shown, s) for s in sorted(snapshots)]


def write_gif(frames: list[Image.Image], path: Path, ms_per_frame: int = 150) -> None:
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0,
                   optimize=False, disposal=1)
    write_atomic(path, buf.getvalue())


def write_mp4(frames: list[Image.Image], path: Path, fps: int = 8) -> bool:
    """Encode with the ffmpeg binary if there is one; returns whether an MP4 was written."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        for i, f in enumerate(frames):
            f.save(Path(tmp) / f"{i:05d}.png")
        out = Path(tmp) / "out.mp4"
        cmd = [ffmpeg, "-loglevel", "error", "-y", "-framerate", str(fps), "-i", str(Path(tmp) / "%05d.png"),
               "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-pix_fmt", "yuv420p", str(out)]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            return False
        write_atomic(path, out.read_bytes())
    return True
