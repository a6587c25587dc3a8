"""Job processes stop together, whichever process a stop reaches, even one waiting for work."""

import multiprocessing
import os
import signal
import threading
import time

import pytest

from anchoring.train.skeleton import TrainingInterrupted
from anchoring.train.workers import run_jobs
from pool_jobs import job


def _wait_for(path, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def test_sigterm_to_an_idle_worker_stops_the_busy_one_cleanly(tmp_path):
    """A worker whose job is done waits for the next one. With the default handlers a SIGTERM killed
    it, the pool called itself broken, and the run ended in BrokenProcessPool while the other job
    trained on to its end; now the busy job saves and stops, and the run stops as a stop does."""

    def signal_the_idle_worker():
        _wait_for(tmp_path / "short.done")
        _wait_for(tmp_path / "long.pid")
        time.sleep(0.5)  # the short job's worker is back at the pool's queue, with no job left to take
        os.kill(int((tmp_path / "short.pid").read_text()), signal.SIGTERM)

    poke = threading.Thread(target=signal_the_idle_worker)
    poke.start()
    t0 = time.monotonic()
    # the short job ends only once the other worker has taken the long one
    with pytest.raises(TrainingInterrupted):
        run_jobs(job, [(str(tmp_path), "short", 0.5, False, False, "long.pid"), (str(tmp_path), "long", 30.0)], 2)
    poke.join()
    assert (tmp_path / "short.pid").read_text() != (tmp_path / "long.pid").read_text()
    assert (tmp_path / "long.stopped").exists() and not (tmp_path / "long.done").exists()
    assert time.monotonic() - t0 < 25


def test_a_job_that_fails_stops_the_others_and_is_reported_as_itself(tmp_path):
    """The failing job was submitted second: waiting on the futures in order, the parent used to
    let the first train to its end before it looked at the failure."""
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="bad failed"):
        run_jobs(job, [(str(tmp_path), "long", 30.0), (str(tmp_path), "bad", 0.0, True)], 2)
    assert (tmp_path / "long.stopped").exists() and not (tmp_path / "long.done").exists()
    assert time.monotonic() - t0 < 25


def test_a_stop_while_the_others_are_still_stopping_keeps_the_failure_and_leaves_no_worker(tmp_path):
    """A job fails; another has not reached its next check yet (still loading, say) when a SIGTERM
    reaches the parent. The parent used to raise at once: the failure was reported as an interrupt,
    and the busy worker was left behind."""

    def sigterm_the_parent():
        _wait_for(tmp_path / "bad.pid")
        _wait_for(tmp_path / "busy.pid")
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    poke = threading.Thread(target=sigterm_the_parent)
    poke.start()
    with pytest.raises(ValueError, match="bad failed"):
        run_jobs(job, [(str(tmp_path), "busy", 4.0, False, True), (str(tmp_path), "bad", 0.0, True, False, "busy.pid")], 2)
    poke.join()
    assert (tmp_path / "busy.done").exists()  # it ran to its end under the parent, not orphaned
    assert not multiprocessing.active_children()


def test_jobs_queued_behind_a_stop_never_start(tmp_path):
    """One worker, three jobs: once the first is stopped, the two queued after it do not run."""

    def stop_the_first():
        _wait_for(tmp_path / "a.pid")
        os.kill(int((tmp_path / "a.pid").read_text()), signal.SIGTERM)

    poke = threading.Thread(target=stop_the_first)
    poke.start()
    with pytest.raises(TrainingInterrupted):
        run_jobs(job, [(str(tmp_path), name, 20.0) for name in ("a", "b", "c")], 1)
    poke.join()
    assert (tmp_path / "a.stopped").exists()
    assert not any((tmp_path / f"{n}.pid").exists() for n in ("b", "c"))


def test_every_job_runs_when_nothing_stops_them(tmp_path):
    run_jobs(job, [(str(tmp_path), name, 0.0) for name in ("a", "b", "c")], 2)
    assert all((tmp_path / f"{n}.done").exists() for n in ("a", "b", "c"))


@pytest.mark.parametrize("how", ["sigterm to the parent", "ctrl-c to the group"])
def test_a_stop_while_the_workers_start_ends_the_run(tmp_path, how):
    """A signal that reached the workers while they still imported torch killed them; the broken pool
    then failed on the futures the parent had just cancelled, and the parent waited for ever, deaf to
    every further Ctrl-C. Now the run stops, and a Ctrl-C prints no worker's traceback."""
    import subprocess
    import sys

    from signals import child_pids

    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "from pool_jobs import job\n"
              "from anchoring.train.skeleton import TrainingInterrupted\n"
              "from anchoring.train.workers import run_jobs\n"
              "try:\n"
              "    run_jobs(job, [(sys.argv[2], f'j{i}', 30.0) for i in range(4)], 2)\n"
              "except TrainingInterrupted:\n"
              "    print('stopped')\n")
    proc = subprocess.Popen([sys.executable, "-c", script, os.path.dirname(__file__), str(tmp_path)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while not child_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the workers are importing: their own handlers are not in yet
    assert not list(tmp_path.glob("*.pid")), "a job started already: the stop no longer lands in the start-up"
    if how == "sigterm to the parent":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the run hung after a stop while its workers started")
    assert "stopped" in out, err
    if how == "ctrl-c to the group":
        assert "Traceback" not in err, err
