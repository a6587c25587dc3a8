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
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch

from anchoring.errors import AnchoringError
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


@contextmanager
def start_held() -> Iterator[None]:
    """While child processes are spawned: Ctrl-C ignored, which they inherit until they set their own
    handlers (a Ctrl-C while they import then prints no tracebacks, and kills none of them), and a
    SIGTERM held and delivered once every child is known; a stop half-way through starting data-parallel
    ranks left the started ones waiting in the rendezvous for ever.
    (A Ctrl-C in these few milliseconds is lost.) Outside the main thread signals are not ours to set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda got, _frame: caught.append(got))}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            signal.raise_signal(signal.SIGTERM)


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
            futures: list[Any] = []
            try:
                with start_held():  # the pool spawns its workers as jobs are submitted
                    for job in jobs:
                        futures.append(pool.submit(_job, fn, tuple(job)))
                wait(futures, return_when=FIRST_EXCEPTION)  # the first job to fail or stop, not the first submitted
            except BaseException:  # Ctrl-C or SIGTERM to this process
                interrupted = True
            # whatever ended the wait, the jobs still running save and stop after their next step, and the
            # queued ones see the flag and return at once. They are not cancelled: a worker killed while it
            # starts (a signal before its handlers are in) breaks the pool, and Python 3.11's pool then
            # fails on setting the error of a cancelled future, so the wait below never ended.
            stop.value = True
            while True:  # until every job has saved and stopped: a second stop here must not orphan them
                try:
                    wait(futures)
                    break
                except BaseException:
                    interrupted, stop.value = True, True
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # joins the workers, which have nothing left to do
    errors = [e for f in futures if not f.cancelled() and (e := f.exception()) is not None]
    stops = (TrainingInterrupted, KeyboardInterrupt) + ((BrokenProcessPool,) if interrupted else ())  # a worker the stop killed
    failed = [e for e in errors if not isinstance(e, stops)]
    if failed:  # a real failure wins over the stops it caused, and over a Ctrl-C that came after it
        if isinstance(failed[0], BrokenProcessPool):  # a worker killed from outside (the OOM killer), with no stop asked
            raise AnchoringError("a worker process died without a word (killed from outside, out of memory?); every "
                                 "job's last checkpoint is kept, and resume continues from them") from None
        raise failed[0]
    if interrupted or errors or any(f.cancelled() for f in futures):
        raise TrainingInterrupted(-1, None)


_PROGRESS: Any = None  # in a job process of `run_jobs_reporting`: where `job_progress` sends its steps


def set_progress_queue(queue: Any) -> None:
    """In a job or rank process: where `job_progress` sends its steps (None: nowhere)."""
    global _PROGRESS
    _PROGRESS = queue


def job_progress(key: Hashable, every: int = 10) -> Callable[[int], None]:
    """A `progress(step)` for a training loop inside a job of `run_jobs_reporting`: every `every`
    steps it tells the parent how far job `key` is (more often would cost the job time)."""
    def report(step: int) -> None:
        if _PROGRESS is not None and step % every == 0:
            _PROGRESS.put((key, step))

    return report


def run_jobs_reporting(fn: Callable[..., None], jobs: Sequence[tuple], workers: int,
                       progress: Callable[[int, int], None] | None, total: int,
                       done: dict[Hashable, int] | None = None) -> None:
    """`run_jobs`, with the steps of every job added up into `progress(done, total)` here, so a run
    trained in processes moves its progress bar as one trained here does (`fn` hands
    `job_progress(key)` to its loop). `done`: the steps each job had already trained (a resume)."""
    if progress is None:
        run_jobs(fn, jobs, workers)
        return
    queue = mp.get_context("spawn").Queue()
    steps: dict[Hashable, int] = dict(done or {})
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            drain_progress(queue, steps, progress, total, wait=0.2)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        run_jobs(fn, jobs, workers, set_progress_queue, (queue,))
    finally:
        stop.set()
        listener.join()
    drain_progress(queue, steps, progress, total)  # what the jobs said after the listener's last look
    progress(total, total)  # every job finished: its last steps need not fall on a report


def drain_progress(queue: Any, steps: dict[Hashable, int], progress: Callable[[int, int], None] | None, total: int,
                   wait: float | None = None) -> None:
    """What the jobs' `job_progress` said since the last look (waiting up to `wait` s for a first word),
    into `steps` per job and, after each word, their sum into `progress`: every report arrives, in
    order, however late the look (the words are every tenth step, so this costs nothing)."""
    said = False
    while True:
        try:
            key, step = queue.get(timeout=wait) if wait and not said else queue.get_nowait()
        except Exception:  # queue.Empty, or the queue closing at shutdown
            break
        steps[key], said = step, True
        if progress is not None:
            progress(sum(steps.values()), total)
