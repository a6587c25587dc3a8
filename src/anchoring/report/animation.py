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


class _FrameRenderer:
    """One figure for every frame: only the points, limits and title change between frames.

    Building and laying out a fresh figure per snapshot dominated the report's time; moving
    the scatter offsets of a figure built once is several times cheaper and looks the same.
    """

    def __init__(self, colours: np.ndarray, order: np.ndarray, dims: tuple[int, int], seeds: list[int]) -> None:
        self.order, self.dims = order, dims
        n = len(seeds)
        self.fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 2.6), squeeze=False, dpi=72)
        self.axes = list(axes[0])
        self.points = []
        for ax, seed in zip(self.axes, seeds):
            ax.set_facecolor(BACKGROUND)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"seed {seed}", fontsize=8)
            self.points.append(ax.scatter(np.zeros(len(order)), np.zeros(len(order)), c=colours[order], s=5, linewidths=0))
        self.title = self.fig.suptitle("", fontsize=9)
        self.fig.tight_layout()

    def __call__(self, z: torch.Tensor, step: int) -> Image.Image:
        d0, d1 = self.dims
        for ax, pts, zi in zip(self.axes, self.points, z.numpy()):
            pts.set_offsets(np.column_stack([zi[self.order, d0], zi[self.order, d1]]))
            lim = max(1.15, float(np.abs(zi[:, [d0, d1]]).max()) * 1.05)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
        self.title.set_text(f"step {step}  (dims {d0}–{d1})")
        self.fig.canvas.draw()
        return Image.fromarray(np.asarray(self.fig.canvas.buffer_rgba())[..., :3].copy())

    def close(self) -> None:
        plt.close(self.fig)


def evolution_frames(snapshots: dict[int, torch.Tensor], rgb: torch.Tensor, dims: tuple[int, int], seeds: list[int],
                     max_seeds: int = 4) -> list[Image.Image]:
    colours = rgb.clamp(0, 1).numpy()
    order = np.argsort(rgb.sum(-1).numpy())
    shown = seeds[:max_seeds]
    render = _FrameRenderer(colours, order, dims, shown)
    try:
        return [render(snapshots[s][: len(shown)], s) for s in sorted(snapshots)]
    finally:
        render.close()


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
