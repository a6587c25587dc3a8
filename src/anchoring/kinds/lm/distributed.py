"""Data-parallel training of an LM run on one machine: `lm.nproc` processes (gloo, CPU or CUDA).

How work maps onto ranks: the (arm, seed) jobs run one after another, and *every* job is split
over all ranks — rank r takes rows r·B/N … (r+1)·B/N − 1 of each step's global batch of B windows,
gradients are averaged over ranks before the (identical) optimiser step, and the concept terms use
the *global* count of labelled passages (or positions) as their denominator. So N processes train
the same model as one process taking the whole batch, up to the order of floating-point sums.
Every rank keeps its own checkpoint (`arms/<arm>-seed<s>.rank<r>.safetensors`; rank 0 without the
suffix), so an interrupted data-parallel run resumes with the same number of processes; the parent
then loads rank 0's finished checkpoint and evaluates as usual. The training loop makes the ranks
agree on when to stop and refuses to resume ranks whose checkpoints hold different steps.

Two ways to start the ranks: `lm.nproc = N` (or `anchoring run --nproc N`) spawns them from one
command and meets them through a file; or PyTorch's own launcher,
`torchrun --standalone --nproc-per-node N -m anchoring run lm-anchor --out DIR`, where every
worker runs the same command: rank 0 makes the run directory, trains its share and evaluates; the
other ranks join the group once rank 0 is in (so the directory and tokenizer exist), train their
share and write only their rank checkpoints. The backend is NCCL when training on CUDA with a GPU
per rank, gloo otherwise.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from anchoring import runtime
from anchoring.errors import AnchoringError
from anchoring.kinds.lm.config import LMExperiment
from anchoring.train.workers import drain_progress, job_progress, set_progress_queue, start_held


def backend(cfg: LMExperiment, world: int) -> str:
    """NCCL when the ranks train on CUDA and there is a GPU for each, else gloo."""
    from anchoring.kinds.lm.training import device_of

    return "nccl" if device_of(cfg).type == "cuda" and torch.cuda.device_count() >= world else "gloo"


def _train_jobs(cfg: LMExperiment, path: Path, jobs: list[tuple[str, int]], rank: int, world: int, init_method: str) -> None:
    import torch.distributed as dist

    from anchoring.kinds.lm.data import load_data
    from anchoring.kinds.lm.kind import checkpoint_path
    from anchoring.kinds.lm.training import train_arm

    if cfg.lm.batch_size % world:
        raise AnchoringError(f"lm.batch_size {cfg.lm.batch_size} does not split over {world} processes")
    torch.set_num_threads(1)
    name = backend(cfg, world)
    if name == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    # Building the first optimiser imports torch._dynamo, which keeps references to every process
    # group alive at that moment; destroy_process_group then cannot free gloo's worker threads, and
    # one of them may still be releasing a tensor when the interpreter shuts down: SIGABRT at exit
    # (about one torchrun run in 20 here). Imported before the group exists, it holds nothing.
    import torch._dynamo as _dynamo  # noqa: F401

    dist.init_process_group(name, init_method=init_method, rank=rank, world_size=world)
    try:
        data = load_data(cfg.text, path)
        for arm, seed in jobs:  # rank 0 tells the parent how far it is (every rank is at the same step)
            train_arm(cfg, data, seed, arm, checkpoint=checkpoint_path(path, arm, seed), rank=rank, world=world,
                      progress=job_progress((arm, seed)) if rank == 0 else None)
        dist.barrier()  # no rank closes its connections while another still finishes the last reduction
    finally:
        dist.destroy_process_group()


def _rank_main(rank: int, world: int, store: str, cfg: LMExperiment, path: Path, jobs: list[tuple[str, int]],
               steps_to: Any = None) -> None:
    # the parent started this process with Ctrl-C ignored, so that a Ctrl-C while it was still importing
    # printed no traceback; from here on a signal stops training as in one process (save, then stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    set_progress_queue(steps_to)
    # ranks meet through a file, not a TCP port: no race with other processes for a free port
    try:
        _train_jobs(cfg, path, jobs, rank, world, f"file://{store}")
    except KeyboardInterrupt:  # stopped outside the training loop (loading data, meeting, between jobs): torch's
        # spawn wrapper would exit 0 on a KeyboardInterrupt, as if the rank had finished, and the parent would
        # then train the unfinished job itself in one process
        from anchoring.train.skeleton import TrainingInterrupted

        raise TrainingInterrupted(-1) from None


def train_as_torchrun_rank(cfg: LMExperiment, path: Path, jobs: list[tuple[str, int]]) -> None:
    """This process's share of every job, under torchrun (its env names rank, world and rendezvous)."""
    rank, world = runtime.launched_by_torchrun() or (0, 1)
    _train_jobs(cfg, path, jobs, rank, world, "env://")


def follow(cfg: LMExperiment, path: Path) -> None:
    """A torchrun rank other than 0: train this rank's share of every (arm, seed) job, write nothing else."""
    from anchoring.kinds.lm.kind import arms

    train_as_torchrun_rank(cfg, path, [(arm, seed) for seed in cfg.train.member_seeds() for arm in arms(cfg)])


def train_data_parallel(cfg: LMExperiment, path: Path, jobs: list[tuple[str, int]], world: int,
                        progress: Callable[[int, int], None] | None = None, total: int = 0,
                        done: dict[tuple[str, int], int] | None = None) -> None:
    """Train every job with `world` data-parallel processes; returns when all checkpoints are final.
    `progress(done, total)` follows rank 0's steps (`done`: every job's steps before, as in a resume)."""
    import torch.multiprocessing as tmp

    if cfg.lm.batch_size % world:
        raise AnchoringError(f"lm.batch_size {cfg.lm.batch_size} does not split over lm.nproc = {world} processes")
    steps_to = tmp.get_context("spawn").Queue() if progress is not None else None
    steps = dict(done or {})
    with tempfile.TemporaryDirectory(prefix="anchoring-ddp-") as meet:
        ranks = None
        try:
            with start_held():
                ranks = tmp.start_processes(_rank_main, args=(world, os.path.join(meet, "store"), cfg, path, jobs, steps_to),
                                            nprocs=world, join=False, start_method="spawn")
            while not ranks.join(timeout=0.5, grace_period=GRACE_S):  # a failed rank: the others get GRACE_S to stop
                if steps_to is not None:
                    drain_progress(steps_to, steps, progress, total)
            if progress is not None:  # every job finished: its last steps need not fall on a report
                drain_progress(steps_to, steps, progress, total)  # what the ranks said since the last look
                progress(total, total)
        except (tmp.ProcessRaisedException, tmp.ProcessExitedException) as e:  # join has stopped the other ranks
            raise why_ranks_failed(_traces(ranks.error_files), e, path) from None
        except BaseException:  # Ctrl-C or SIGTERM: the ranks save and stop, or are stopped
            if ranks is not None:
                _stop_ranks(ranks.processes)
            raise


def _traces(error_files: list[str]) -> list[str]:
    """The tracebacks torch's spawn wrapper pickled for the ranks that raised, in rank order."""
    import pickle

    traces = []
    for name in error_files:
        try:
            with open(name, "rb") as fh:
                traces.append(pickle.load(fh))
        except (OSError, EOFError, pickle.UnpicklingError):  # that rank raised nothing (or was killed)
            pass
    return traces


def why_ranks_failed(traces: list[str], first: Exception, path: Path) -> BaseException:
    """The exception that says why the ranks stopped. torch reports the first rank to exit, which is
    often not the one with the cause: when rank 1 cannot read its checkpoint, rank 0 dies at the same
    moment of gloo's "connection closed by peer". So a project error from any rank wins; a divergence
    stays a `Diverged` (the run then records it as one process would); a rank stopped by a signal is
    a stop; and a rank killed from outside (the OOM killer's SIGKILL) is said in one line."""
    from anchoring.train.skeleton import Diverged

    if any("TrainingInterrupted" in t or "KeyboardInterrupt" in t for t in traces):
        return KeyboardInterrupt()
    last_lines = [t.strip().splitlines()[-1] for t in traces if t.strip()]
    for line in last_lines:
        name, sep, message = line.partition(": ")
        if sep and name.startswith("anchoring."):
            return Diverged(message) if name.rsplit(".", 1)[-1] == "Diverged" else AnchoringError(message)
    signal_name, rank = getattr(first, "signal_name", None), getattr(first, "error_index", "?")
    if signal_name:  # the others then fail on the lost connection: the kill is the cause
        why = f"rank {rank} was killed by {signal_name} (out of memory?)"
    elif last_lines:
        why = last_lines[0]
    elif hasattr(first, "exit_code"):
        why = f"rank {rank} exited with code {getattr(first, 'exit_code')}"
    else:
        why = "a rank failed"
    return AnchoringError(f"data-parallel training failed: {why}; the ranks' last checkpoints are kept, "
                          f"`anchoring resume {path}` continues from them")


GRACE_S = 20.0  # for a rank to finish its step and save its checkpoint after a stop


def _stop_ranks(processes) -> None:
    """Stop every rank still alive: a SIGINT first, which a training rank answers by saving and
    stopping; a rank that does not stop within `GRACE_S` (one still importing, or one waiting in the
    rendezvous for a peer that is gone) is killed. The caller then leaves no process behind."""
    import time

    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        try:
            os.kill(p.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + GRACE_S
    try:
        for p in alive:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:  # also after a further Ctrl-C while waiting: no rank outlives the command
        for p in alive:
            if p.is_alive():
                p.kill()
                p.join()
