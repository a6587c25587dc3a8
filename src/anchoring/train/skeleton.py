"""The one training loop every experiment kind plugs its step into.

It owns what must behave the same everywhere: resuming from a checkpoint, the learning rate
from the timeline, periodic and on-demand checkpoints, a clean stop on Ctrl-C / SIGTERM
(finish the step, save, raise `TrainingInterrupted`), refusing to go on after a non-finite
loss, and progress reporting. A kind supplies a `Task`: how to take one step, and what
state beyond parameters and optimiser a checkpoint must hold to resume bit for bit.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import torch

if TYPE_CHECKING:
    import numpy as np

from anchoring.errors import AnchoringError
from anchoring.train.checkpoint import read_checkpoint, restore_optimizer, save_checkpoint

Progress = Callable[[int, int], None]


class TrainingInterrupted(Exception):
    """Raised after a clean stop (Ctrl-C / SIGTERM): the checkpoint holds every finished step."""

    def __init__(self, step: int, run_dir: Path | None = None) -> None:
        super().__init__(f"interrupted after step {step}")
        self.step, self.run_dir = step, run_dir


class Diverged(AnchoringError):
    """A step produced a non-finite loss; the checkpoint still holds the last good state."""


class Task(Protocol):
    """What a kind provides to `fit`. A data-parallel task also has `world`, the number of ranks
    training it together (1 when absent), so that `fit` keeps those ranks on one step."""

    params: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    steps: int

    def lr(self, step: int) -> float:
        """Learning rate for `step` (from the timeline, possibly re-targeted)."""

    metric_names: list[str]

    def step(self, step: int) -> torch.Tensor:
        """One optimiser step (the loop has set the lr); returns this step's metrics, last dim
        indexed by `metric_names`, which the loop checks for divergence."""

    def after_step(self, step: int) -> bool:
        """Bookkeeping once `step` is done; True asks for a checkpoint now."""

    def state(self, steps_done: int) -> dict[str, torch.Tensor]:
        """Extra tensors a checkpoint needs to resume (metrics so far, snapshots, decisions …)."""

    def restore(self, steps_done: int, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what `state` saved."""


class MetricRows:
    """Task bookkeeping for a single model whose metrics are one numpy row per step (`self.rows`):
    no per-step actions, and the rows so far are all a checkpoint needs beyond weights and Adam."""

    rows: "np.ndarray"

    def after_step(self, step: int) -> bool:
        return False

    def state(self, steps_done: int) -> dict[str, torch.Tensor]:
        return {"metrics": torch.from_numpy(self.rows)}

    def restore(self, steps_done: int, tensors: dict[str, torch.Tensor]) -> None:
        self.rows[:steps_done] = tensors["metrics"].numpy()[:steps_done]


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so state stays whole.

    A second signal gives up at once, but only from `GRACE` seconds after the first: one stop often
    arrives twice (Ctrl-C reaches a worker, and its parent passes a SIGTERM on; a scheduler signals
    the whole process group, and the parent forwards it again), and the duplicate must not cut the
    final save short."""

    GRACE = 2.0

    def __init__(self) -> None:
        self.set = False
        self._at = 0.0
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, *_: object) -> None:
        if self.set:
            if time.monotonic() - self._at > self.GRACE:  # a second Ctrl-C, later: give up immediately
                raise KeyboardInterrupt
            return
        self.set, self._at = True, time.monotonic()

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]


def _agree(value: int, device: torch.device) -> int:
    """The largest `value` over all ranks. A signal can reach one rank a step before another, and a
    crash can land between two ranks' saves; agreeing keeps the ranks on one step."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush denormal floats to zero while training.

    Terms like s^100 of cosines produce values below 1e-38, and CPU arithmetic on denormals is
    several times slower (the separation term's pow went from ~5 ms to ~1 ms at E=60). Losing
    values that small changes nothing measurable; the flag is put back as it was afterwards.
    """
    was_on = torch.tensor([1e-39]).item() == 0.0  # torch has no getter for the flag; a denormal tells
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported and not was_on:
            torch.set_flush_denormal(False)


def divergence_message(step: int, lr: float, row: torch.Tensor, names: list[str], seeds: list[int] | None = None,
                       saved: int = 0) -> str:
    """One line naming the step, the first metric that stopped being finite, the seeds it did so in
    (`seeds`: one per row of an ensemble's metrics) and what the checkpoint holds (`saved` steps)."""
    flat = row.reshape(-1, len(names))
    bad = [j for j in range(len(names)) if not bool(torch.isfinite(flat[:, j]).all())]
    named = [j for j in bad if names[j] != "loss"] or bad  # the total is NaN whenever any part is
    name = names[named[0]] if named else "loss"
    who = ""
    if seeds is not None and len(seeds) == flat.shape[0]:
        rows = [seeds[i] for i in range(flat.shape[0]) if not bool(torch.isfinite(flat[i]).all())]
        who = f" in seed{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows))}"
    return f"training diverged at step {step}: {name} is not finite{who} (lr {lr:g}); {_kept(saved)}"


def _kept(saved: int) -> str:
    """What the checkpoint on disk holds after a divergence, and what to do."""
    kept = (f"the checkpoint holds the run after its first {saved} steps, all finite, and resuming would meet the same step again"
            if saved else "nothing was checkpointed yet")
    return f"{kept} — lower the learning rate or the term's weight, in a new run"


def fit(task: Task, *, checkpoint: Path | None, every: int, progress: Progress | None = None,
        run_dir: Path | None = None, callbacks: tuple[Callable[[int], None], ...] = (),
        should_stop: Callable[[], bool] | None = None) -> int:
    """Train `task` from its checkpoint (if one exists) to `task.steps`; returns the first step run.
    `should_stop()`, asked after every step, stops the run as a signal would (save, then
    TrainingInterrupted): how a parent stops its job processes without sending signals.

    A step whose losses are not finite stops the run before anything of it is saved, with one
    line naming the step and the loss; the checkpoint on disk is the last good one.
    """
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        start, tensors = read_checkpoint(checkpoint)
        if start > task.steps:
            raise AnchoringError(f"checkpoint {checkpoint.name} holds {start} steps, more than the {task.steps} this run's "
                                 f"config trains; was the run's config changed since it was written?")
        for k, p in task.params.items():  # a config or tokenizer edited since the checkpoint: say so, copy nothing
            saved = tensors.get(f"param.{k}")
            if saved is None or saved.shape != p.shape:
                found = "missing" if saved is None else f"of shape {tuple(saved.shape)}"
                raise AnchoringError(f"checkpoint {checkpoint.name} does not match the model the run's config builds "
                                     f"({k}: {found}, the model's is {tuple(p.shape)}); was the run's config or "
                                     f"tokenizer changed since it was written?")
        with torch.no_grad():
            for k, p in task.params.items():
                p.copy_(tensors[f"param.{k}"])
        try:
            restore_optimizer(task.optimizer, task.params, tensors)
            task.restore(start, tensors)
        except (RuntimeError, KeyError, ValueError, IndexError) as e:  # the weights fit, the rest (terms, metrics) does not
            if isinstance(e, torch.OutOfMemoryError):
                raise
            raise AnchoringError(f"checkpoint {checkpoint.name} does not match the run its config builds "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); was the "
                                 f"run's config changed since it was written?") from None
    # the task's own count of data-parallel ranks: another process group in the process is not this model's
    device, world = next(iter(task.params.values())).device, int(getattr(task, "world", 1))
    if world > 1:  # data parallel: every rank must take up the same step, or the averaged gradients mix steps
        lo, hi = -_agree(-start, device), _agree(start, device)
        if lo != hi:
            where = f"checkpoint {checkpoint.name}" if checkpoint is not None else "the checkpoints"
            raise AnchoringError(f"the data-parallel ranks' checkpoints are at different steps ({lo} and {hi}; {where}), "
                                 f"so they cannot resume together; resume with the number of processes that wrote them, "
                                 f"or delete this job's checkpoints to train it again")

    saved = start  # steps the checkpoint on disk holds (0 without one)

    def save(done: int) -> None:
        nonlocal saved
        if checkpoint is not None:
            # a finite loss can still come with a non-finite gradient, and then the weights are no longer
            # finite: never let them replace the last good checkpoint
            bad = [k for k, p in task.params.items() if not bool(torch.isfinite(p).all())]
            if bad:
                raise Diverged(f"training diverged by step {done - 1}: the weights are not finite ({bad[0]}) though "
                               f"the losses were; {_kept(saved)}")
            save_checkpoint(checkpoint, done, task.params, task.optimizer, task.state(done))
            saved = done

    with StopFlag() as stop, flush_denormals():
        for step in range(start, task.steps):
            lr = task.lr(step)
            for group in task.optimizer.param_groups:
                group["lr"] = lr
            row = task.step(step)
            if not bool(torch.isfinite(row).all()):
                seeds = getattr(task, "member_seeds", None) or ([task.seed] if hasattr(task, "seed") else None)
                raise Diverged(divergence_message(step, lr, row, task.metric_names, seeds, saved))
            if task.after_step(step) or (step + 1) % every == 0:
                save(step + 1)
            if progress is not None:
                progress(step + 1, task.steps)
            for cb in callbacks:
                cb(step)
            asked = stop.set or (should_stop is not None and should_stop())
            if _agree(int(asked), device) if world > 1 else asked:  # every rank stops after the same step
                save(step + 1)
                raise TrainingInterrupted(step + 1, run_dir)
        if start < task.steps:  # a checkpoint already at the last step is only read, never rewritten
            save(task.steps)  # under the flag too: a stop during this save waits for it instead of losing it
        asked = stop.set or (should_stop is not None and should_stop())
        if _agree(int(asked), device) if world > 1 else asked:  # trained, but asked to stop before the evaluation
            raise TrainingInterrupted(task.steps, run_dir)
    return start
