"""A sweep's shards: the worker process's entry point, and the Ray backend's own logic with a
stand-in for Ray that runs each task in this process (how it starts and stops Ray, which shards it
sends, where the returned files land, what a failed task says). `test_speed.py` runs a real Ray
once, in the slow tests, and the local backend's worker pool; `test_lm_sweep.py` runs an LM sweep
through this stand-in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anchoring.errors import AnchoringError
from anchoring.sweep import backends
from anchoring.sweep.layout import DONE


class FakeRay:
    """What `run_ray` calls of Ray, recorded; tasks run when their result is asked for, in order."""

    def __init__(self) -> None:
        self.initialised, self.init_kwargs, self.task_options, self.shutdowns = False, None, None, 0
        self.sent: list[str] = []
        self.cancelled: list[str] = []
        self._refs: dict[int, tuple] = {}

    def is_initialized(self) -> bool:
        return self.initialised

    def init(self, **kwargs) -> None:
        self.init_kwargs, self.initialised = kwargs, True

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.initialised = False

    def remote(self, **options):
        self.task_options = options
        ray = self

        class Task:
            def __init__(self, fn) -> None:
                self.fn = fn

            def remote(self, *args) -> int:
                ray.sent.append(args[0])
                ref = len(ray._refs)
                ray._refs[ref] = (self.fn, args)
                return ref

        return Task

    def wait(self, refs: list[int], num_returns: int = 1):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref: int):
        fn, args = self._refs[ref]
        return fn(*args)

    def cancel(self, ref: int) -> None:
        self.cancelled.append(self._refs[ref][1][0])


class Config:
    def __init__(self, name: str) -> None:
        self.name = name

    def to_toml(self) -> str:
        return self.name


class Shard:
    def __init__(self, root: Path, name: str, point: int | None = None) -> None:
        self.dir, self.config = root / name, Config(name)
        self.point = name if point is None else point  # its grid point: its own, unless given
        self.dir.mkdir(parents=True)

    @property
    def name(self) -> str:
        return self.dir.name


@pytest.fixture
def ray(monkeypatch):
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    # a shard's "training": files at nested paths, named after its config
    monkeypatch.setattr(backends, "shard_payload", lambda toml: {f"arms/{toml}.bin": toml.encode(), "top.txt": b"t"})
    return fake


def test_ray_is_started_for_the_sweep_with_its_cpus_and_stopped_after(ray, tmp_path):
    backends.run_ray([Shard(tmp_path, "a")], workers=3, address=None, retries=2)
    assert ray.init_kwargs == {"log_to_driver": False, "num_cpus": 3, "include_dashboard": False}
    assert ray.task_options == {"num_cpus": 1, "max_retries": 2, "retry_exceptions": False}  # a dead worker's task runs again; a bug does not
    assert ray.shutdowns == 1 and not ray.initialised
    backends.run_ray([Shard(tmp_path, "b")], workers=3, address="ray://head:10001", retries=0)
    assert ray.init_kwargs == {"log_to_driver": False, "address": "ray://head:10001"}  # a cluster brings its own CPUs
    assert ray.task_options["max_retries"] == 0


def test_a_ray_the_caller_started_is_left_running(ray, tmp_path):
    ray.initialised = True
    backends.run_ray([Shard(tmp_path, "a")], workers=2, address=None, retries=1)
    assert ray.init_kwargs is None and ray.shutdowns == 0 and ray.initialised


def test_only_unfinished_shards_are_sent_and_their_files_land_at_their_paths(ray, tmp_path):
    shards = [Shard(tmp_path, n) for n in ("a", "b", "c")]
    (shards[1].dir / DONE).write_text("ok\n")
    seen = []
    backends.run_ray(shards, workers=2, address=None, retries=0, progress=lambda done, total: seen.append((done, total)))
    assert ray.sent == ["a", "c"]
    assert seen == [(1, 3), (2, 3), (3, 3)]
    for s in (shards[0], shards[2]):
        assert (s.dir / "arms" / f"{s.name}.bin").read_bytes() == s.name.encode() and (s.dir / "top.txt").is_file()
        assert (s.dir / DONE).is_file()
    assert not (shards[1].dir / "arms").exists()


def test_a_failed_task_names_its_shard_and_leaves_it_unfinished(ray, monkeypatch, tmp_path):
    def payload(toml: str) -> dict[str, bytes]:
        if toml == "b":
            raise ValueError("the shard's config is broken\nmore lines")
        return {"x": b"1"}

    monkeypatch.setattr(backends, "shard_payload", payload)
    shards = [Shard(tmp_path, n) for n in ("a", "b")]
    with pytest.raises(AnchoringError, match=r"^shard b failed under Ray: ValueError: the shard's config is broken$"):
        backends.run_ray(shards, workers=2, address=None, retries=0)
    assert (shards[0].dir / DONE).is_file() and not (shards[1].dir / DONE).exists()
    assert ray.shutdowns == 1  # stopped on the way out, too


def test_a_diverged_task_in_a_grid_marks_its_shard_and_drops_its_point_while_the_others_train(ray, monkeypatch, tmp_path):
    """In a grid, one point's divergence stopped the whole sweep, so the healthy points had no report.
    Ray raises a task's own exception as an instance of it; here the stand-in raises it as it is."""
    from anchoring.sweep.layout import DIVERGED
    from anchoring.train.skeleton import Diverged

    class RayTaskError(Diverged):  # what Ray raises: its own error, as an instance of the task's, with the task's as .cause
        def __init__(self, cause: Exception) -> None:
            super().__init__(f"ray::_ray_shard() (pid=123, ip=10.0.0.1)\n  File \"worker.py\", line 1\n{cause}")
            self.cause = cause

    def payload(toml: str) -> dict[str, bytes]:
        if toml == "p1a":
            raise RayTaskError(Diverged("training diverged by step 7"))
        return {"x": b"1"}

    monkeypatch.setattr(backends, "shard_payload", payload)
    shards = [Shard(tmp_path, "p0", 0), Shard(tmp_path, "p1a", 1), Shard(tmp_path, "p1b", 1), Shard(tmp_path, "p2", 2)]
    seen = []
    backends.run_ray(shards, workers=2, address=None, retries=0, keep_going=True,
                     progress=lambda done, total: seen.append(done))
    assert (shards[1].dir / DIVERGED).read_text() == "diverged: training diverged by step 7\n"
    assert ray.cancelled == ["p1b"] and not (shards[2].dir / DONE).exists()  # its point cannot be merged
    assert (shards[0].dir / DONE).is_file() and (shards[3].dir / DONE).is_file()
    assert seen[-1] == 4
    ray.sent.clear()
    backends.run_ray(shards, workers=2, address=None, retries=0, keep_going=True)  # a continuation trains nothing
    assert ray.sent == []
    with pytest.raises(AnchoringError, match="^shard p1a diverged: training diverged by step 7; retrying"):
        backends.run_ray([Shard(tmp_path / "one", "p1a")], workers=1, address=None, retries=0)  # one point: it stops


def test_a_shard_is_marked_done_only_after_its_files_are_written(ray, monkeypatch, tmp_path):
    """A driver stopped while writing a shard's files (here: a full disk) must not leave the shard
    marked finished, or a continued sweep would merge it without its files."""
    write = backends.write_atomic

    def full_disk(path: Path, data) -> None:
        if path.name == "top.txt":
            raise OSError(28, "No space left on device")
        write(path, data)

    monkeypatch.setattr(backends, "write_atomic", full_disk)
    shard = Shard(tmp_path, "a")
    with pytest.raises(OSError, match="No space left"):
        backends.run_ray([shard], workers=1, address=None, retries=0)
    assert not (shard.dir / DONE).exists()


def test_a_finished_shard_is_not_read_or_trained_again(tmp_path):
    from anchoring.sweep.worker import run_shard

    (tmp_path / DONE).write_text("ok\n")
    threads = torch.get_num_threads()
    try:
        run_shard(tmp_path)  # no config here: a shard marked done returns before it would read one
    finally:
        torch.set_num_threads(threads)


def test_the_worker_entry_point_takes_exactly_one_shard_directory(tmp_path):
    for args in ([], [str(tmp_path), str(tmp_path)]):
        r = subprocess.run([sys.executable, "-m", "anchoring.sweep.worker", *args], capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr.startswith("usage: python -m anchoring.sweep.worker SHARD_DIR")


def test_the_fault_aid_kills_a_shard_once_when_the_given_step_is_done(tmp_path, monkeypatch):
    """The sweep tests' fault (`ANCHORING_SWEEP_FAULT_STEP=15`) stops the first attempt after its 15th
    step, once per shard: the retry's resume point and the tests' attempt counts rely on both."""
    from anchoring.sweep import worker

    kills = []
    monkeypatch.setattr(worker.os, "kill", lambda pid, sig: kills.append(sig))
    monkeypatch.setenv(worker.FAULT_ENV, "15")
    [cb] = worker._fault_callback(tmp_path)
    for step in range(14):
        cb(step)
    assert kills == []
    cb(14)  # the callback gets the 0-based step just trained: the 15th
    assert kills == [worker.signal.SIGKILL] and (tmp_path / "fault-injected").is_file()
    assert worker._fault_callback(tmp_path) == []  # the retry runs to the end


def test_a_shard_that_diverges_is_said_once_not_retried(tmp_path):
    """A divergence is deterministic: the sweep retried it twice more (each resumed into the same step)
    and then reported only 'failed 3 times'."""
    from typer.testing import CliRunner

    from anchoring.cli import app
    from anchoring.experiments import HERE

    schedule = (HERE / "anchored.csv").read_text()
    assert "1500,,,0.05,,," in schedule
    bad = tmp_path / "bad.csv"  # the learning rate eases towards 1e30 at the end: the loss is no longer finite
    bad.write_text(schedule.replace("1500,,,0.05,,,", "1500,,,1e30,,,"))
    out = tmp_path / "sweep"
    r = CliRunner().invoke(app, ["sweep", "anchored", "--seeds", "1", "--steps", "60", "--workers", "1",
                                 "--set", f"schedule={bad}", "--out", str(out), "-q"])
    assert r.exit_code == 2 and "diverged" in r.stderr and "retrying would meet the same step again" in r.stderr, r.stderr
    assert len(list(out.glob("shards/*/attempt*.log"))) == 1


def test_a_grid_point_that_diverges_leaves_the_other_points_reported(tmp_path):
    """One diverging grid point used to stop the sweep, and no point got a report. Now the healthy
    points are merged, reported and printed; the diverged one is named there and by the command's
    failure; continuing the sweep trains nothing and is refused as finished."""
    import json

    from typer.testing import CliRunner

    from anchoring.cli import app
    from anchoring.experiments import HERE

    schedule = (HERE / "anchored.csv").read_text()
    (tmp_path / "good.csv").write_text(schedule)
    (tmp_path / "bad.csv").write_text(schedule.replace("1500,,,0.05,,,", "1500,,,1e30,,,"))
    out = tmp_path / "sweep"
    args = ["sweep", "anchored", "--seeds", "1", "--steps", "60", "--workers", "1", "--out", str(out), "-q",
            "--grid", f"schedule={tmp_path / 'bad.csv'},{tmp_path / 'good.csv'}"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "1 grid point(s) diverged" in r.stderr and "bad.csv (diverged: training diverged" in r.stderr, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [p["point"] for p in summary["points"]] == [f"schedule={tmp_path / 'good.csv'}"]
    assert [d["point"] for d in summary["diverged"]] == [f"schedule={tmp_path / 'bad.csv'}"]
    assert (Path(summary["points"][0]["path"]) / "summary.json").is_file()
    page = (out / "report.html").read_text()
    assert "Diverged points" in page and "bad.csv" in page
    assert "sweep of anchored" in r.stdout and "report:" in r.stdout  # the healthy point's table comes before the failure
    shown = CliRunner().invoke(app, ["show", str(out)])
    assert shown.exit_code == 0 and "1 grid point(s) diverged" in shown.stdout, shown.output
    assert r.stdout.split("wall time")[0] == shown.stdout.split("report:")[0]  # one table, laid out alike (it was turned)
    logs = sorted(out.glob("shards/*/attempt*.log"))
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "is a finished sweep" in again.stderr, again.output
    assert sorted(out.glob("shards/*/attempt*.log")) == logs


def test_a_diverged_local_shard_stops_the_other_shards_of_its_point_and_none_is_retried(tmp_path, monkeypatch):
    """Only the queued shards of a diverged point were dropped: one already training trained on (hours,
    for an LM) for a point that could never be merged, and its failure would have been retried."""
    from types import SimpleNamespace

    from anchoring.sweep.layout import DIVERGED, DIVERGED_EXIT

    starts: list[str] = []
    stopped: list[tuple[str, int]] = []

    class Process:
        def __init__(self, argv, stdout, **_):
            self.dir, self.code = Path(argv[-1]), None
            starts.append(self.dir.name)
            if self.dir.name == "p1a":  # diverges at once
                stdout.write("diverged: training diverged by step 3\n")
                stdout.flush()
                self.code = DIVERGED_EXIT
            elif self.dir.name == "p0":
                (self.dir / DONE).write_text("")
                self.code = 0

        def poll(self):
            self.polls = getattr(self, "polls", 0) + 1
            if self.code is None and self.polls > 1000:  # trained to its end untold (and, as stopped, without `done`)
                self.code = 1
            return self.code

        def terminate(self):  # p1b trains until it is told to stop, then exits as a stopped worker does
            stopped.append((self.dir.name, getattr(self, "polls", 0)))
            self.code = -15

        def wait(self, timeout=None):
            return self.code

        def kill(self):
            self.code = -9

    monkeypatch.setattr(backends.subprocess, "Popen", Process)
    monkeypatch.setattr(backends.time, "sleep", lambda _s: None)
    shards = [SimpleNamespace(name=n, dir=tmp_path / n, point=pt) for n, pt in (("p1b", 1), ("p1a", 1), ("p0", 0))]
    for sh in shards:
        sh.dir.mkdir()
    backends.run_local(shards, workers=3, retries=2, keep_going=True)
    assert starts == ["p1b", "p1a", "p0"]  # p1b stopped, not started again
    assert [name for name, _ in stopped] == ["p1b"] and stopped[0][1] < 1000  # told to stop, not left to train on
    assert (tmp_path / "p1a" / DIVERGED).is_file() and (tmp_path / "p0" / DONE).is_file()
    assert not (tmp_path / "p1b" / DONE).exists()
