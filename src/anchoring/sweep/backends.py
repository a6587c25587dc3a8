"""Where shards run: local worker processes (one thread each), or Ray tasks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from anchoring.atomic import write_atomic
from anchoring.errors import AnchoringError
from anchoring.sweep import to_train
from anchoring.sweep.layout import DIVERGED, DIVERGED_EXIT, DONE
from anchoring.sweep.worker import shard_payload
from anchoring.train.skeleton import Diverged
from anchoring.train.workers import sigterm_interrupts

Progress = Callable[[int, int], None]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"  # one core per process: the shards are the parallelism
    return env


def _next_log(shard_dir: Path) -> Path:
    """The shard's next attempt log: logs of an interrupted sweep stay, and a continued sweep numbers after them."""
    nums = [int(m.group(1)) for p in shard_dir.glob("attempt*.log") if (m := re.fullmatch(r"attempt(\d+)\.log", p.name))]
    return shard_dir / f"attempt{max(nums, default=0) + 1}.log"


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while a worker is started and recorded, then deliver them.

    An interrupt that landed after the fork but before the worker was recorded in `running` would
    leave a worker that nobody stops, training into the shard for as long as its steps last. Held
    here, the signal reaches its usual handler just after, when `_stop` knows the worker."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda got, _frame: caught.append(got)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def _stop(running: dict) -> None:
    """SIGTERM first: a worker's training loop saves a checkpoint and stops (one that Ctrl-C reached
    already takes the SIGTERM as the same stop); SIGKILL only a worker that hangs."""
    for proc, _, _ in running.values():
        if proc.poll() is None:
            proc.terminate()
    for proc, _, log in running.values():
        try:
            proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # a hung worker, or a further Ctrl-C or SIGTERM
            proc.kill()
            proc.wait()
        finally:
            log.close()


def _diverged(shard, message: str, pending: list, keep_going: bool) -> None:
    """Record a shard's divergence. Without `keep_going` (one grid point: nothing could be merged)
    the sweep stops; otherwise the other points train on and the point's queued shards are dropped."""
    if not keep_going:
        raise AnchoringError(f"shard {shard.name} {message}; retrying would meet the same step again")
    write_atomic(shard.dir / DIVERGED, message + "\n")
    pending[:] = [s for s in pending if s.point != shard.point]


def run_local(shards: list, workers: int, retries: int, progress: Progress | None = None, *,
              keep_going: bool = False) -> None:
    """Keep up to `workers` shard processes busy; a shard whose process dies is started again.

    A restarted shard resumes from its own last checkpoint, and a shard writes `done` only
    after its final checkpoint, so a crash can cost time but never duplicates or loses steps.
    Ctrl-C, or a SIGTERM sent to this process alone, stops every worker (each saves first) before
    this returns, so no worker is left training into the sweep after its parent has gone.
    A shard that diverges is not retried; with `keep_going` (a grid) it is marked and the other
    points go on, since their reports are worth having.
    """
    pending = to_train(shards)
    lost: set = set()  # grid points where a shard diverged
    attempts = {s.name: 0 for s in shards}
    running: dict[str, tuple[subprocess.Popen, object, object]] = {}
    done = len(shards) - len(pending)
    if progress:
        progress(done, len(shards))
    with sigterm_interrupts():
        try:
            while pending or running:
                while pending and len(running) < workers:
                    s = pending.pop(0)
                    attempts[s.name] += 1
                    with _interrupts_held():
                        log = open(_next_log(s.dir), "w")
                        proc = subprocess.Popen([sys.executable, "-m", "anchoring.sweep.worker", str(s.dir)],
                                                stdout=log, stderr=subprocess.STDOUT, env=_env())
                        running[s.name] = (proc, s, log)
                time.sleep(0.05)
                for name, (proc, s, log) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    log.close()
                    del running[name]
                    if s.point in lost:  # stopped because its point diverged elsewhere: nothing to retry or report
                        continue
                    if code == 0 and (s.dir / DONE).is_file():
                        done += 1
                        if progress:
                            progress(done, len(shards))
                    elif code == DIVERGED_EXIT:  # deterministic: a retry resumes into the same divergence
                        said = [line for line in Path(log.name).read_text().splitlines() if line.startswith("diverged: ")]
                        _diverged(s, said[-1] if said else "diverged", pending, keep_going)
                        lost.add(s.point)
                        for proc2, s2, _ in running.values():  # the point cannot be merged: its other shards stop
                            if s2.point == s.point and proc2.poll() is None:
                                proc2.terminate()  # saves and stops, as on Ctrl-C
                        done = len(shards) - len(pending) - sum(s2.point not in lost for _, s2, _ in running.values())
                        if progress:
                            progress(done, len(shards))
                    elif attempts[name] <= retries:
                        pending.append(s)  # resumes from its checkpoint
                    else:
                        tail = Path(log.name).read_text().strip().splitlines()[-5:]
                        raise AnchoringError(f"shard {name} failed {attempts[name]} times (exit {code}): " + " | ".join(tail))
        finally:
            _stop(running)


def run_ray(shards: list, workers: int, address: str | None, retries: int, progress: Progress | None = None, *,
            keep_going: bool = False) -> None:
    """Each shard a Ray task (1 CPU); Ray re-runs a task whose worker died. Results come back as
    the bytes of the shard's result files, written into the shard directory here. A divergence is
    handled as `run_local` does (Ray does not retry a task's own exception)."""
    try:
        import ray
    except ImportError:
        raise AnchoringError("the ray backend needs Ray: pip install -c constraints.txt -e '.[ray]' (from the anchoring checkout)") from None
    started = not ray.is_initialized()
    if started:
        kwargs = {"address": address} if address else {"num_cpus": workers, "include_dashboard": False}
        ray.init(log_to_driver=False, **kwargs)
    try:
        task = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=False)(_ray_shard)
        todo = {task.remote(s.config.to_toml()): s for s in to_train(shards)}
        done = len(shards) - len(todo)
        if progress:
            progress(done, len(shards))
        while todo:
            ready, _ = ray.wait(list(todo), num_returns=1)
            s = todo.pop(ready[0])
            try:
                files = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - Ray wraps worker errors in its own types
                cause = getattr(e, "cause", None) or e  # Ray raises its own error as an instance of the task's too; its text
                if isinstance(cause, Diverged):  # is a whole traceback, the cause's is the one line
                    _diverged(s, f"diverged: {cause}", [], keep_going)
                    for ref, other in list(todo.items()):  # the point cannot be merged: its other shards are not needed
                        if other.point == s.point:
                            ray.cancel(ref)
                            del todo[ref]
                    done = len(shards) - len(todo)
                    if progress:
                        progress(done, len(shards))
                    continue
                raise AnchoringError(f"shard {s.name} failed under Ray: {type(e).__name__}: {str(e).splitlines()[0]}") from None
            for rel, data in files.items():
                write_atomic(s.dir / rel, data)
            write_atomic(s.dir / DONE, "ok\n")
            done += 1
            if progress:
                progress(done, len(shards))
    finally:
        if started:
            ray.shutdown()


def _ray_shard(config_toml: str) -> dict[str, bytes]:
    return shard_payload(config_toml)
