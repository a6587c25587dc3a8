"""An LM experiment as sweep shards (`anchoring.sweep`): a shard is one grid point × a block of
seeds, and trains every (arm, seed) job of its block, one after another in its one process, into
its own `arms/{arm}-seed{seed}.safetensors` (the same resumable per-job checkpoints `run` writes),
next to the tokenizer it trained (`tokenizer.json`). Merging gathers a point's job checkpoints and
the tokenizer into the point's run directory; `run` there then finds every job at its last step and
only loads and evaluates, exactly as a run that trained them itself.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from anchoring.atomic import sync_dir, sync_file, temp_stem, write_atomic
from anchoring.errors import AnchoringError
from anchoring.evaluate.stats import median
from anchoring.kinds.base import StepCallback
from anchoring.kinds.lm.config import LMExperiment
from anchoring.kinds.lm.data import CORPUS, TOKENIZER, load_data
from anchoring.kinds.lm.kind import arms, checkpoint_path
from anchoring.kinds.lm.training import build_model, build_objective, build_timeline, train_arm
from anchoring.resources import release_freed_memory
from anchoring.train.checkpoint import steps_done


def jobs(cfg: LMExperiment) -> list[tuple[str, int]]:
    return [(arm, seed) for seed in cfg.train.member_seeds() for arm in arms(cfg)]


def total_steps(cfg: LMExperiment) -> int:
    return build_timeline(cfg, build_objective(cfg, build_model(cfg, 8))).steps


def seed_blocks(cfg: LMExperiment, blocks: list[list[int]]) -> list[list[int]]:
    if cfg.lm.nproc > 1:
        raise AnchoringError("sweeps train each job in one process; remove lm.nproc (data parallel) or use `anchoring run`")
    return blocks


def train_shard(cfg: LMExperiment, shard_dir: Path, callbacks: Sequence[StepCallback] = ()) -> None:
    """Every (arm, seed) job of the shard's seeds, each resuming from its checkpoint; `callbacks`
    see the steps of whichever job is training."""
    data = load_data(cfg.text, shard_dir)  # writes (or, retried, reads) the tokenizer
    report = None
    if callbacks:
        def report(done: int) -> None:
            for cb in callbacks:
                cb(done - 1)
    for arm, seed in jobs(cfg):
        train_arm(cfg, data, seed, arm, checkpoint=checkpoint_path(shard_dir, arm, seed), progress=report)
        release_freed_memory()  # a sweep worker trains job after job


def shard_files(cfg: LMExperiment, shard_dir: Path) -> list[Path]:
    return [Path(TOKENIZER), Path(CORPUS), *[checkpoint_path(Path(), arm, seed) for arm, seed in jobs(cfg)]]


def _link(src: Path, dst: Path) -> None:
    """`dst` becomes the same file as `src` (a hard link; a copy across file systems), atomically.
    Resuming or re-saving in `dst`'s run replaces the link by rename, so the shard's file never changes."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f"{temp_stem(dst.name)}.", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
            sync_file(tmp)
        os.replace(tmp, dst)
        sync_dir(dst.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def merge_shards(cfg: LMExperiment, shard_dirs: list[Path], path: Path) -> None:
    """The point's job checkpoints (each from the one shard that trained it, at the last step) and
    the shards' tokenizer (identical in all of them) into run directory `path`."""
    toks = {d: (d / TOKENIZER).read_bytes() for d in shard_dirs if (d / TOKENIZER).is_file()}
    if not toks:
        raise AnchoringError(f"no shard of {str(path)!r} saved its tokenizer")
    if len(set(toks.values())) != 1:
        raise AnchoringError(f"the shards of {str(path)!r} trained different tokenizers; they cannot be merged")
    write_atomic(path / TOKENIZER, next(iter(toks.values())))
    prints = {(d / CORPUS).read_bytes() for d in shard_dirs if (d / CORPUS).is_file()}
    if len(prints) > 1:  # e.g. Ray nodes whose labelling packages differ
        raise AnchoringError(f"the shards of {str(path)!r} trained on different corpora, splits or labels "
                             f"({CORPUS} differs); they cannot be merged")
    if prints:
        write_atomic(path / CORPUS, prints.pop())
    steps = total_steps(cfg)
    for arm, seed in jobs(cfg):
        found = [checkpoint_path(d, arm, seed) for d in shard_dirs if checkpoint_path(d, arm, seed).is_file()]
        if not found:
            raise AnchoringError(f"no shard of {str(path)!r} holds the {arm} arm of seed {seed}")
        if steps_done(found[0]) != steps:
            raise AnchoringError(f"{str(found[0])!r} stopped at step {steps_done(found[0])} of {steps}")
        _link(found[0], checkpoint_path(path, arm, seed))


def sweep_row(summary: dict[str, Any]) -> dict[str, Any]:
    """Medians over seeds: per arm the validation loss (all, concept, retain positions; nats/char) and
    the margin at each anchored site; per unlearning method (when the run has them) R and Δforget, and,
    where some seed's repair or attack diverged, how many: the medians leave those seeds out."""
    row: dict[str, Any] = {"seeds": len(summary.get("seeds") or [])}
    for arm in summary.get("arms") or []:
        med = summary["median"][arm]
        for k in ("all", "concept", "retain"):
            row[f"{arm}_loss_{k}"] = med["loss"][k]
        for site in summary.get("anchored_sites") or []:
            row[f"{arm}_margin@{site}"] = med["alignment"][site]["margin"]
    unlearning = summary.get("unlearning")
    rows = (unlearning.get("rows") if isinstance(unlearning, dict) else None) or []
    for method in dict.fromkeys(r["method"] for r in rows if "method" in r):
        mine = [r for r in rows if r.get("method") == method]
        for key in ("R", "d_forget_concept"):
            row[f"{method}_{key}"] = median(r[key] for r in mine if r.get(key) is not None)
        broke = sum(bool(r.get("repair_diverged")) or any(a.get("diverged") for a in (r.get("relearn") or {}).values())
                    for r in mine)
        if broke:
            row[f"{method}_diverged_seeds"] = broke
    return row


def grid_figures(out: Path, results: list) -> list[tuple[str, Path]]:
    """R against label coverage when the grid varies `text.coverage` and the points were scored for
    unlearning: one line per method and setting of the grid's other axes (never averaged across
    them), the median over seeds (`figures.coverage_figure`). No figure when no point has an R (a run
    without the oracle-filtered arm has none, and R is undefined wherever the oracle filter removed
    nothing, as in a run too short to learn the concept)."""
    from anchoring.kinds.lm.figures import CONTROL_ROWS, coverage_figure
    from anchoring.report.figures import save

    points = []
    for extra, o in results:
        cov = [float(e.split("=", 1)[1]) for e in extra if e.startswith("text.coverage=")]
        others = ", ".join(e for e in extra if not e.startswith("text.coverage="))
        rows = (o.summary.get("unlearning") or {}).get("rows") or []
        if cov and rows:
            points += [(cov[0], r["method"] + (f" · {others}" if others else ""), r.get("R")) for r in rows
                       if r["method"] not in CONTROL_ROWS]
    if len({c for c, _m, _r in points}) < 2 or not any(r is not None and math.isfinite(r) for _c, _m, r in points):
        return []
    path = out / "figures" / "r_vs_coverage.png"
    save(coverage_figure(points), path)
    return [("R (Δforget at concept positions over the oracle filter's) against weak-label coverage", path)]
