"""Figure-only experiments (1.1 colour spaces, 1.4 parameter transitions, 2.1 intervention lobes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anchoring import runs
from anchoring.control import parse_falloff
from anchoring.kinds.base import Kind, Progress
from anchoring.kinds.figures.config import FiguresExperiment
from anchoring.report import figures, html


class FiguresKind(Kind):
    name = "figures"
    config = FiguresExperiment
    trains = False

    def validate(self, cfg: FiguresExperiment) -> None:
        for lobe in cfg.lobes:
            parse_falloff(lobe.falloff)

    def execute(self, cfg: FiguresExperiment, path: Path, progress: Progress | None) -> dict[str, Any]:
        sections = [("Overview", f"<p>{html.html.escape(cfg.description)}</p>")]
        if cfg.figures == "lobes":
            sections += lobe_sections(cfg, path)
        else:
            made = figures.colour_spaces() if cfg.figures == "colour-spaces" else figures.timing_functions()
            for name, fig in made:
                figures.save(fig, path / "figures" / f"{name}.png")
                sections.append((name.replace("_", " "), html.image_html(path / "figures" / f"{name}.png", name)))
        runs.write_atomic(path / runs.REPORT, html.page(f"anchoring: {cfg.name}", sections))
        return {"experiment": cfg.name, "upstream": cfg.upstream, "kind": "figures",
                "figures": sorted(p.name for p in (path / "figures").glob("*.png"))}

    def summary_lines(self, summary: dict[str, Any]) -> list[Any]:
        return [f"figures: {', '.join(summary.get('figures', []))}"]


KIND = FiguresKind()


def lobe_sections(cfg: FiguresExperiment, path: Path) -> list[tuple[str, str]]:
    """Every configured falloff/mapper as polar lobes and strength curves."""
    sections = []
    for method in ("suppress", "repel"):
        shapes = {f"{lobe.name} ({lobe.falloff})": parse_falloff(lobe.falloff) for lobe in cfg.lobes if lobe.method == method}
        if not shapes:
            continue
        figures.save(figures.intervention_lobes(shapes, method), path / "figures" / f"{method}_lobes.png")
        figures.save(figures.strength_curves(shapes), path / "figures" / f"{method}_strength.png")
        sections += [(f"{method}: lobes", html.image_html(path / "figures" / f"{method}_lobes.png", f"{method} lobes")),
                     (f"{method}: strength vs alignment", html.image_html(path / "figures" / f"{method}_strength.png", "strength"))]
    return sections
