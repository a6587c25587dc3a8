"""What every experiment kind provides, and the defaults for what a kind cannot do.

The lifecycle (`anchoring.lifecycle`) owns the run directory, atomic writes, timing, resume
and `show`; a kind owns its config section, its training jobs, evaluation, figures and report,
and the lines the CLI prints. Adding a kind is one package with a `KIND` object plus one line
in `anchoring.kinds.REGISTRY`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import pandas as pd
from torch import nn

from anchoring import runs
from anchoring.config import ExperimentBase, InterventionConfig
from anchoring.errors import AnchoringError

Progress = Callable[[int, int], None]
StepCallback = Callable[[int], None]  # called with the index of each finished training step


@dataclass
class Run:
    """A run directory opened for analysis: its config, trained models, summary and metrics."""

    path: Path
    config: Any
    seeds: list[int]
    models: list[nn.Module]
    summary: dict[str, Any] | None = field(default=None)

    @property
    def kind(self) -> str:
        return self.config.kind

    def metrics(self) -> pd.DataFrame:
        """metrics.csv in long format: one row per (step, seed[, arm], metric) with its value."""
        from anchoring.runs import read_metrics

        return read_metrics(self.path)


@dataclass
class ArmsRun(Run):
    """A run that trains several arms (anchored, control, filtered …) on every seed."""

    arms: dict[str, list[nn.Module]] = field(default_factory=dict)

    def model(self, arm: str | None = None, seed: int | None = None) -> nn.Module:
        """One arm's model for one seed (default: the first arm, the first seed)."""
        arm = next(iter(self.arms)) if arm is None else arm  # "" is no arm, not the default one
        if arm not in self.arms:
            raise AnchoringError(f"run has no arm {arm!r} (arms: {', '.join(self.arms)})")
        seed = self.seeds[0] if seed is None else seed
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed not in self.seeds:  # True == 1, 1.0 == 1
            raise AnchoringError(f"run has no seed {seed} (seeds: {self.seeds})")
        return self.arms[arm][self.seeds.index(seed)]


@dataclass
class EditResult:
    """What an intervention or deletion did, for the CLI to print and the user to find."""

    name: str
    lines: list[Any]  # rich renderables or plain strings, printed in order
    files: list[Path]
    summary: dict[str, Any] = field(default_factory=dict)


class Kind:
    """Base class of the experiment kinds; subclasses override what applies to them."""

    name: ClassVar[str]
    config: ClassVar[type[ExperimentBase]]
    studies: ClassVar[frozenset[str]] = frozenset()  # which studies (compare, combinations, sweep) can wrap it
    trains: ClassVar[bool] = True
    # What the command line offers only where a kind has it, asked here rather than by the kind's name.
    # nproc_key: the config key of the number of data-parallel processes (`--nproc N`, torchrun: every
    # step's batch split over them); None: the kind does not train data-parallel
    nproc_key: ClassVar[str | None] = None
    delete_options: ClassVar[frozenset[str]] = frozenset()  # keyword options of `delete` beyond the spec
    relearn_label: ClassVar[str] = "baseline"  # what `relearn`'s progress bar says it is working on

    def unsupported(self, what: str) -> AnchoringError:
        return AnchoringError(f"`{what}` does not apply to {self.name!r} runs")

    def validate(self, cfg: Any) -> None:
        """Everything that can be checked before training, so bad input writes nothing."""

    def architecture(self, cfg: Any) -> dict[str, Any] | None:
        """What `load_run` needs to rebuild the models (None: nothing is trained)."""
        return None

    def execute(self, cfg: Any, path: Path, progress: Progress | None) -> dict[str, Any]:
        """Train (resuming from whatever checkpoints `path` holds), evaluate, draw and report;
        return the summary (the lifecycle adds timing and writes it)."""
        raise NotImplementedError

    def has_checkpoint(self, path: Path) -> bool:
        return False

    def concepts(self, cfg: Any) -> list[str]:
        """The concepts an edit of this config's runs can name; with exactly one, `--concept` may be left out."""
        return [c.name for c in getattr(cfg, "concepts", [])]

    def check_processes(self, cfg: Any, world: int) -> str | None:
        """Why training `cfg` cannot be split over `world` data-parallel processes (None: it can);
        asked of kinds with an `nproc_key` only."""
        return None

    def follow(self, cfg: Any, path: Path) -> None:
        """Under torchrun, a rank other than 0: train this rank's share of the run in `path`, write nothing else."""
        raise self.unsupported("torchrun")

    def open(self, path: Path, cfg: Any, arch: dict[str, Any], summary: dict[str, Any] | None) -> Run:
        raise self.unsupported("load_run")

    def summary_lines(self, summary: dict[str, Any]) -> list[Any]:
        """What the CLI prints for a finished run (rich renderables or plain strings)."""
        return []

    def intervene(self, run: Run, spec: InterventionConfig) -> EditResult:
        raise self.unsupported("intervene")

    def check_delete(self, cfg: Any, spec: InterventionConfig, **options: Any) -> None:
        """Refuse (AnchoringError) a deletion that the config alone rules out, before the run's models load;
        `delete` makes the same checks and any that need the models."""

    def delete(self, run: Run, spec: InterventionConfig, out: Path) -> EditResult:
        raise self.unsupported("delete")

    def relearn(self, run: Run, **options: Any) -> EditResult:
        raise self.unsupported("relearn")

    def intervention_lines(self, path: Path) -> list[Any]:
        """What `intervene` printed, read back from the folder it wrote (`show RUN/interventions/NAME`);
        empty when the folder holds no such files."""
        return []

    def attack_lines(self, summary: dict[str, Any]) -> list[Any]:
        """What `relearn` printed, read back from the summary it wrote (`show RUN/relearn/CONCEPT`)."""
        raise self.unsupported("relearn")

    # Sweeps (`anchoring.sweep`), for kinds whose `studies` include "sweep". A shard is one grid
    # point × a block of its seeds, trained in its own directory by its own process.

    sweep_figure: ClassVar[tuple[str, str] | None] = None  # (path in a run directory, caption) for the grid report

    def seed_blocks(self, cfg: Any, n: int) -> list[list[int]]:
        """The point's seeds in at most `n` contiguous blocks, one shard each; refuse what cannot be split."""
        seeds = cfg.train.member_seeds()
        n = max(1, min(len(seeds), n))
        size = math.ceil(len(seeds) / n)
        return [seeds[b:b + size] for b in range(0, len(seeds), size)]

    def shard_memory(self, cfg: Any) -> int:
        """Bytes one shard process holds while it trains `cfg` (a shard's config), as the kind's
        memory check estimates them; 0 where the kind has no estimate."""
        return 0

    def train_shard(self, cfg: Any, shard_dir: Path, callbacks: Sequence[StepCallback] = ()) -> None:
        """Train (resuming from whatever `shard_dir` holds) every seed of the shard's config into `shard_dir`."""
        raise self.unsupported("sweep")

    def shard_files(self, cfg: Any, shard_dir: Path) -> list[Path]:
        """The files (relative to `shard_dir`) a finished shard's result consists of: what a remote
        worker sends back and `merge_shards` reads."""
        raise self.unsupported("sweep")

    def merge_shards(self, cfg: Any, shard_dirs: list[Path], path: Path) -> None:
        """Combine a point's finished shards (in seed order) into run directory `path`, so that
        `execute` there finds every model trained and only evaluates."""
        raise self.unsupported("sweep")

    def grid_figures(self, out: Path, results: list[tuple[list[str], Any]]) -> list[tuple[str, Path]]:
        """Figures across the grid points of a sweep (written under `out/figures`), as (caption, path)."""
        return []

    def sweep_row(self, summary: dict[str, Any]) -> dict[str, Any]:
        """One grid point's line in the sweep report, from its run summary."""
        return {"seeds": len(summary.get("seeds") or [])}


def intervention_rows(path: Path, column: str) -> tuple[str, list[dict[str, Any]], dict[str, Any]] | None:
    """(name, rows, summary) of the summary.json an LM or transformer `intervene` wrote in `path`, or
    None when there is none whose rows have `column` (the kinds' tables differ, their files do not)."""
    summary = runs.read_json(path / runs.SUMMARY) if (path / runs.SUMMARY).is_file() else {}
    summary = summary if isinstance(summary, dict) else {}
    rows = summary.get("rows") or []
    if not (isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows) and column in rows[0]):
        return None
    return (summary.get("spec") or {}).get("name", path.name), rows, summary
