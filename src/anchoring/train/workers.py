"""Signals for a parent that trains in worker processes.

Ctrl-C reaches every process of the terminal's group, so each worker saves and stops by itself. A
SIGTERM sent to the parent alone (a scheduler, `kill PID`) does not: without passing it on, the
parent dies and its workers train on, unparented, into the run directory a later `resume` writes to.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import signal
import threading
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from anchoring.train.skeleton import TrainingInterrupted


@contextmanager
def sigterm_interrupts(pass_to_workers: bool = False) -> Iterator[None]:
    """Within the block a SIGTERM to this process raises KeyboardInterrupt here, the usual stop (the
    training loop, which installs its own handler, turns either into a clean stop); with
    `pass_to_workers`, it is first passed to this process's workers, each of which saves and stops."""

    def terminate(*_: object) -> None:
        if pass_to_workers:
            for child in mp.active_children():
                child.terminate()
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, terminate) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)


def sigterm_to_workers():
    """`sigterm_interrupts` for a parent of worker processes."""
    return sigterm_interrupts(pass_to_workers=True)


# --- a pool of job processes that stop together --------------------------------------------------

_STOP: Any = None  # in a job process: a flag shared with the parent and every other job


def stop_asked() -> bool:
    """In a job process: has any process of the pool been stopped? A training loop asks after every
    step (`fit(should_stop=stop_asked)`), saves and stops."""
    return _STOP is not None and bool(_STOP.value)


def _raise_stop(*_: object) -> None:
    # a plain store into shared memory: safe in a signal handler, which must not take a lock the
    # interrupted code may hold (an `mp.Event` takes one)
    _STOP.value = True


def _init_job_process(stop: Any, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    """A signal to a process that waits for its next job only raises the flag: with the default
    handlers it would die, the pool would call itself broken and end every job with an error
    instead of the clean stop. While a job trains, `fit`'s own handlers take over."""
    global _STOP
    _STOP = stop
    torch.set_num_threads(1)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop)
    if initializer is not None:
        initializer(*initargs)


def _job(fn: Callable[..., None], args: tuple) -> None:
    if stop_asked():  # stopped while this job waited in the pool's queue: do not start it
        raise TrainingInterrupted(-1, None)
    try:
        fn(*args)
    except BaseException:  # stopped, or failed (diverged, say): the other jobs save and stop too
        _STOP.value = True
        raise


def run_jobs(fn: Callable[..., None], jobs: Sequence[tuple], workers: int,
             initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> None:
    """`fn(*job)` for every job, in `workers` spawned processes of one torch thread each.

    Ctrl-C reaches the workers (same process group), and a SIGTERM sent to this process alone is
    passed on to them, so none trains on after its parent has gone. Once any job stops (a signal to
    the parent or to any one worker, or `fn` raising), a shared flag stops the others after their
    next step, with a checkpoint, and keeps queued jobs from starting: the pool hands a worker its
    next job before the current one ends, so cancelling futures is not enough. `fn` must stop
    when `stop_asked()` says so. A job that fails is reported as itself, even when the jobs it
    stopped ended first; a stop with no failure raises TrainingInterrupted (step -1: the jobs'
    steps differ)."""
    ctx = mp.get_context("spawn")
    stop = ctx.RawValue(ctypes.c_bool, False)
    interrupted = False
    with sigterm_to_workers():
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_job_process, initargs=(stop, initializer, initargs))
        try:
            futures = [pool.submit(_job, fn, tuple(job)) for job in jobs]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)  # the first job to fail or stop, not the first submitted
            except BaseException:  # Ctrl-C or SIGTERM to this process
                interrupted = True
            stop.value = True  # whatever ended the wait, the jobs still running save and stop after their next step
            for f in futures:  # not yet handed to a worker; those that were see the flag and do not start
                f.cancel()
            while True:  # until every job has saved and stopped: a second stop here must not orphan them
                try:
                    wait(futures)
                    break
                except BaseException:
                    interrupted, stop.value = True, True
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # joins the workers, which have nothing left to do
    errors = [e for f in futures if not f.cancelled() and (e := f.exception()) is not None]
    failed = [e for e in errors if not isinstance(e, (TrainingInterrupted, KeyboardInterrupt))]
    if failed:  # a real failure wins over the stops it caused, and over a Ctrl-C that came after it
        raise failed[0]
    if interrupted or errors or any(f.cancelled() for f in futures):
        raise TrainingInterrupted(-1, None)
