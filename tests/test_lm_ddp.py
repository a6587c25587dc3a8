"""Data-parallel LM training (gloo, 2 processes) trains the same model as one process."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from anchoring import experiments, lifecycle
from test_lm_kind import tiny, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("lm-ddp") / "texts", files=2, paragraphs=80)


SPANS = [o for o in tiny("CORPUS") if not o.startswith("terms.")] + ['terms.0.site="blocks.1"', 'terms.1.site="blocks.1"']


@pytest.mark.parametrize("experiment", ["lm-anchor-passages", "lm-anchor"])
def test_two_processes_equal_one_with_the_same_global_batch(corpus, tmp_path, experiment):
    """Passage labels pooled by mellowmax, and the shipped span labels (per-position selection)."""
    if experiment == "lm-anchor":
        base = [o.replace("CORPUS", str(corpus)) for o in SPANS] + ["train.steps=8", 'lm.arms=["anchored","control"]',
                                                                    "evaluate.shade_passages=0"]
    else:
        base = tiny(corpus, "train.steps=12", 'lm.arms=["anchored","control"]', "evaluate.shade_passages=0",
                    'terms.0.positions="mellowmax:3"')
    one = lifecycle.run(experiments.load(experiment, base), tmp_path / "one")
    seen: list[tuple[int, int]] = []
    two = lifecycle.run(experiments.load(experiment, [*base, "lm.nproc=2"]), tmp_path / "two",
                        progress=lambda done, total: seen.append((done, total)))
    if experiment == "lm-anchor-passages":  # the bar follows rank 0 (it stood still until the ranks ended): every 10th step
        assert [d for d, t in seen if t == 24] == [10, 20, 24], seen
    a, b = load_file(str(tmp_path / "one" / "checkpoint.safetensors")), load_file(str(tmp_path / "two" / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), (k, float((a[k] - b[k]).abs().max()))
    assert (tmp_path / "two" / "arms" / "anchored-seed0.rank1.safetensors").is_file()
    assert (two.summary["timing"]["processes"], two.summary["timing"]["parallel"]) == (2, "data-parallel ranks")
    l1 = {r["arm"]: r["loss"]["all"] for r in one.summary["models"]}
    l2 = {r["arm"]: r["loss"]["all"] for r in two.summary["models"]}
    assert l1 == pytest.approx(l2, abs=1e-4)
    # the logged curves are the global batch's: the ranks' means averaged, not summed
    m1, m2 = (pd.read_csv(tmp_path / run / "metrics.csv") for run in ("one", "two"))
    logged = list(m1.columns[m1.columns.get_loc("loss"):])  # loss, task, the terms, labelled passages
    assert any("@" in c for c in logged)
    assert m1[logged].notna().to_numpy().any()
    pd.testing.assert_frame_equal(m1[logged], m2[logged], rtol=1e-4, atol=1e-5)


def test_a_rank_leaves_no_gloo_threads_behind_after_training(corpus, tmp_path):
    """A rank's process group is really destroyed when its jobs end: gloo worker threads that
    outlive it can abort the process at interpreter exit (seen as SIGABRT under torchrun)."""
    import subprocess
    import sys

    cfg = experiments.load("lm-anchor", [o.replace("CORPUS", str(corpus)) for o in SPANS] + ["train.steps=2", 'lm.arms=["control"]'])
    spec = tmp_path / "spec.toml"
    spec.write_text(cfg.to_toml())
    code = f"""
import os
from pathlib import Path
from anchoring import experiments
from anchoring.kinds.lm.data import load_data
from anchoring.kinds.lm.distributed import _train_jobs
cfg = experiments.load({str(spec)!r})
out = Path({str(tmp_path / "run")!r}); (out / "arms").mkdir(parents=True)
load_data(cfg.text, out)
_train_jobs(cfg, out, [("control", 0)], 0, 1, "file://" + str(out / "store"))
print(sorted(open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "arms" / "control-seed0.safetensors").is_file()
    threads = r.stdout.strip().splitlines()[-1]
    assert "gloo" not in threads, threads


def test_torchrun_workers_train_the_same_model_as_one_process(corpus, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    base = tiny(corpus, "train.steps=6", 'lm.arms=["anchored","control"]', "evaluate.shade_passages=0",
                'terms.0.positions="mellowmax:3"')
    cfg = experiments.load("lm-anchor-passages", base)
    spec = tmp_path / "spec.toml"
    spec.write_text(cfg.to_toml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "anchoring", "run", str(spec), "--out", str(tmp_path / "tr"), "-q"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    one = lifecycle.run(cfg, tmp_path / "one")
    a, b = load_file(str(tmp_path / "one" / "checkpoint.safetensors")), load_file(str(tmp_path / "tr" / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), (k, float((a[k] - b[k]).abs().max()))
    assert (tmp_path / "tr" / "arms" / "control-seed0.rank1.safetensors").is_file()  # rank 1 trained its share
    assert lifecycle.show(tmp_path / "tr").summary["models"][0]["loss"]["all"] == pytest.approx(
        one.summary["models"][0]["loss"]["all"], abs=1e-4)
    # resumed under torchrun, rank 0 alone evaluates and reports; rank 1 only finishes its share
    shutil.copytree(tmp_path / "tr", tmp_path / "again")
    for name in ("summary.json", "report.html"):
        (tmp_path / "again" / name).unlink()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "anchoring", "resume", str(tmp_path / "again"), "-q"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count(str(tmp_path / "again" / "report.html")) == 1, r.stdout  # one report, printed by one rank
    assert lifecycle.show(tmp_path / "again").summary["models"][0]["loss"]["all"] == pytest.approx(
        one.summary["models"][0]["loss"]["all"], abs=1e-4)
    # without --out the workers could not agree on a directory: one clear line, nothing trained
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "anchoring", "run", str(spec), "-q"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "with --out DIR" in r.stderr


def test_sigterm_to_a_multi_worker_run_stops_its_workers_with_checkpoints(corpus, tmp_path):
    from signals import sigterm_stops_the_workers

    # three jobs on two workers: the third waits in the pool's queue and must not start after the stop
    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=20000", 'lm.arms=["anchored","control","weak-filtered"]',
                                                      "lm.workers=2", "train.checkpoint_every=5"))
    spec = tmp_path / "spec.toml"
    spec.write_text(cfg.to_toml())
    sigterm_stops_the_workers([str(spec)], tmp_path / "run")


def test_ranks_whose_checkpoints_hold_different_steps_refuse_to_resume(corpus, tmp_path):
    """A crash between two ranks' saves, or a resume with another number of processes, leaves the
    ranks' checkpoints at different steps; resuming them together would average gradients of
    different steps without a word, so every rank stops with one line instead."""
    import shutil

    from anchoring.errors import AnchoringError
    from anchoring.kinds.lm.data import load_data
    from anchoring.kinds.lm.distributed import train_data_parallel
    from anchoring.kinds.lm.kind import checkpoint_path

    base = [o.replace("CORPUS", str(corpus)) for o in SPANS] + ['lm.arms=["control"]']
    out = tmp_path / "run"
    (out / "arms").mkdir(parents=True)
    load_data(experiments.load("lm-anchor", base).text, out)
    train_data_parallel(experiments.load("lm-anchor", [*base, "train.steps=2"]), out, [("control", 0)], 2)
    rank0 = checkpoint_path(out, "control", 0)
    rank1 = rank0.with_name("control-seed0.rank1.safetensors")
    assert rank0.is_file() and rank1.is_file()
    longer = experiments.load("lm-anchor", [*base, "train.steps=4"])
    same = tmp_path / "same"
    shutil.copytree(out, same)
    train_data_parallel(longer, same, [("control", 0)], 2)  # both at step 2: they resume together
    rank1.unlink()  # rank 1 would start again at step 0 while rank 0 goes on from step 2
    with pytest.raises(AnchoringError, match=r"different steps \(0 and 2"):
        train_data_parallel(longer, out, [("control", 0)], 2)


def test_the_ranks_gradients_are_averaged_not_summed(tmp_path):
    """Adam all but cancels a constant scale of the gradient, so a reduction that summed instead of
    averaging moved the 1-vs-2-process comparison only through eps; the reduction is checked directly."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("ddp_average_worker.py")
    r = subprocess.run([sys.executable, str(worker), str(tmp_path)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        assert len(grads) == 3 and all(torch.equal(g, torch.full_like(g, 1.5 * (i + 1))) for i, g in enumerate(grads)), rank


def test_a_signal_that_reaches_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Ctrl-C or SIGTERM can reach one rank a step before another (or only one). The ranks agree after
    every step, so all of them stop after the same step with checkpoints at that step, instead of one
    rank stopping while the other waits in its next gradient reduction."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("ddp_stop_worker.py")
    r = subprocess.run([sys.executable, str(worker), str(tmp_path)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    got = [(tmp_path / f"result{rank}.txt").read_text() for rank in (0, 1)]
    assert got == ["stopped 4 4", "stopped 4 4"], got  # both after step 4 (rank 1 got the signal in step 3), both saved


def test_sigterm_to_a_data_parallel_run_stops_its_ranks_with_checkpoints(corpus, tmp_path):
    from signals import sigterm_stops_the_workers

    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=20000", 'lm.arms=["control"]', "lm.nproc=2",
                                                      "train.checkpoint_every=5"))
    spec = tmp_path / "spec.toml"
    spec.write_text(cfg.to_toml())
    sigterm_stops_the_workers([str(spec)], tmp_path / "run")  # rank 0's and rank 1's checkpoints


def test_a_stop_while_the_ranks_start_leaves_no_process_behind(corpus, tmp_path):
    """Stopped while its ranks were still importing, the command used to wait for ever (rank 0 waits in
    the rendezvous for a rank that is gone), and left ranks running after a second Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from signals import assert_gone, child_pids

    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=20000", 'lm.arms=["control"]', "lm.nproc=2"))
    spec = tmp_path / "spec.toml"
    spec.write_text(cfg.to_toml())
    proc = subprocess.Popen([sys.executable, "-m", "anchoring", "run", str(spec), "--out", str(tmp_path / "run"), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    deadline = time.time() + 120
    while time.time() < deadline and len(child_pids(proc.pid)) < 2 and not (tmp_path / "run" / "arms").exists():
        time.sleep(0.05)
    ranks = child_pids(proc.pid)
    assert len(ranks) >= 2 and not (tmp_path / "run" / "arms").exists(), "no rank started, or training began already"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130 and "anchoring resume" in err and "Traceback" not in err, err
    time.sleep(0.5)
    assert_gone(ranks)


def test_ranks_can_be_started_from_a_thread_that_owns_no_signals():
    """Only the main thread may set signal handlers; from another thread the start is not held."""
    import signal
    import threading

    from anchoring.train.workers import start_held as _start_held

    errors: list[BaseException] = []

    def start() -> None:
        try:
            with _start_held():
                pass
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=start)
    t.start()
    t.join()
    assert errors == []
    before = signal.getsignal(signal.SIGINT)
    with _start_held():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # inherited by the ranks while they start
    assert signal.getsignal(signal.SIGINT) is before


def test_a_rank_stopped_outside_its_training_loop_reports_the_stop(monkeypatch, tmp_path):
    """torch's spawn wrapper exits 0 on a KeyboardInterrupt: the rank must not pass for finished."""
    import signal

    import anchoring.kinds.lm.distributed as dd
    from anchoring.train.skeleton import TrainingInterrupted

    def stopped(*args):
        raise KeyboardInterrupt  # as a Ctrl-C while the rank loads its data

    monkeypatch.setattr(dd, "_train_jobs", stopped)
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(TrainingInterrupted):
            dd._rank_main(0, 2, str(tmp_path / "store"), None, tmp_path, [])
    finally:
        signal.signal(signal.SIGINT, before)


def test_torchrun_with_one_process_is_not_data_parallel(monkeypatch):
    from anchoring.runtime import launched_by_torchrun

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launched_by_torchrun() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert launched_by_torchrun() == (1, 2)


def test_a_sigterm_held_while_the_ranks_start_is_delivered_once_after():
    import os
    import signal

    from anchoring.train.workers import start_held as _start_held

    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, _frame: got.append(sig))
    try:
        with _start_held():
            os.kill(os.getpid(), signal.SIGTERM)
            assert got == []  # held while the ranks start
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_nproc_flag_reaches_the_config(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from anchoring.cli import app
    from anchoring.errors import AnchoringError

    seen = []

    def captured(cfg, out, progress=None):
        seen.append(cfg)
        raise AnchoringError("stopped by the test")

    monkeypatch.setattr(lifecycle, "run", captured)
    r = CliRunner().invoke(app, ["run", "lm-anchor", "--nproc", "2", "--out", str(tmp_path / "r"), "-q"])
    assert r.exit_code == 2 and "stopped by the test" in r.stderr, r.stderr
    assert seen[0].lm.nproc == 2


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_rank_0_makes_the_run_and_the_others_follow(monkeypatch, tmp_path, rank):
    from typer.testing import CliRunner

    from anchoring import runtime
    from anchoring.cli import app
    from anchoring.errors import AnchoringError
    from anchoring.kinds.lm import distributed

    made, followed = [], []

    def make(cfg, out, progress=None):
        made.append(out)
        raise AnchoringError("stopped by the test")

    monkeypatch.setattr(runtime, "launched_by_torchrun", lambda: (rank, 2))
    monkeypatch.setattr(distributed, "follow", lambda cfg, out: followed.append(out))
    monkeypatch.setattr(lifecycle, "run", make)
    CliRunner().invoke(app, ["run", "lm-anchor", "--out", str(tmp_path / "r"), "-q"])
    assert (len(made), len(followed)) == ((1, 0) if rank == 0 else (0, 1))


def test_a_rank_that_cannot_read_its_checkpoint_is_named_not_the_lost_connection(corpus, tmp_path):
    """torch reports the first rank to exit; when rank 1 cannot read its checkpoint, that is rank 0
    failing on gloo's "connection closed by peer", which hid the cause."""
    from anchoring.errors import AnchoringError
    from anchoring.kinds.lm.data import load_data
    from anchoring.kinds.lm.distributed import train_data_parallel
    from anchoring.kinds.lm.kind import checkpoint_path

    base = [o.replace("CORPUS", str(corpus)) for o in SPANS] + ['lm.arms=["control"]']
    out = tmp_path / "run"
    (out / "arms").mkdir(parents=True)
    load_data(experiments.load("lm-anchor", base).text, out)
    train_data_parallel(experiments.load("lm-anchor", [*base, "train.steps=2"]), out, [("control", 0)], 2)
    rank1 = checkpoint_path(out, "control", 0).with_name("control-seed0.rank1.safetensors")
    rank1.write_bytes(rank1.read_bytes()[:1000])
    with pytest.raises(AnchoringError, match=r"cannot read checkpoint .*rank1\.safetensors") as e:
        train_data_parallel(experiments.load("lm-anchor", [*base, "train.steps=4"]), out, [("control", 0)], 2)
    assert "Connection closed" not in str(e.value) and "\n" not in str(e.value)


def test_why_the_ranks_failed_is_said_in_one_line():
    """A rank killed from outside (the OOM killer's SIGKILL) raised torch's ProcessExitedException,
    which escaped as a traceback; a divergence in a rank lost its kind, so the run did not record it."""
    from pathlib import Path

    import torch.multiprocessing as tmp

    from anchoring.errors import AnchoringError
    from anchoring.kinds.lm.distributed import why_ranks_failed
    from anchoring.train.skeleton import Diverged

    lost = "Traceback (most recent call last):\n  ...\nRuntimeError: [pair.cc:553] Connection closed by peer"
    killed = tmp.ProcessExitedException("process 1 terminated with signal SIGKILL", error_index=1, error_pid=7,
                                        exit_code=-9, signal_name="SIGKILL")
    e = why_ranks_failed([lost], killed, Path("runs/x"))
    assert isinstance(e, AnchoringError) and "rank 1 was killed by SIGKILL" in str(e) and "anchoring resume runs/x" in str(e)
    raised = tmp.ProcessRaisedException("trace", 0, 7)
    diverged = "Traceback ...\nanchoring.train.skeleton.Diverged: training diverged at step 1: loss nan"
    e = why_ranks_failed([lost, diverged], raised, Path("r"))
    assert type(e) is Diverged and str(e) == "training diverged at step 1: loss nan"
    e = why_ranks_failed([lost, "Traceback ...\nanchoring.errors.AnchoringError: cannot read checkpoint 'x'"], raised, Path("r"))
    assert type(e) is AnchoringError and str(e) == "cannot read checkpoint 'x'"
    assert isinstance(why_ranks_failed([lost, "...\nanchoring.train.skeleton.TrainingInterrupted: interrupted after "
                                              "step 3"], raised, Path("r")), KeyboardInterrupt)
    e = why_ranks_failed([lost], raised, Path("r"))
    assert str(e).startswith("data-parallel training failed: RuntimeError: [pair.cc:553] Connection closed by peer;")


def test_a_finished_data_parallel_run_evaluates_without_starting_ranks(corpus, tmp_path, monkeypatch):
    """A resume after the last step (stopped in evaluation) used to start every rank to train nothing."""
    from anchoring.kinds.lm import distributed

    base = [o.replace("CORPUS", str(corpus)) for o in SPANS] + ['lm.arms=["control"]', "train.steps=2", "lm.nproc=2",
                                                                "evaluate.shade_passages=0"]
    out = tmp_path / "run"
    lifecycle.run(experiments.load("lm-anchor", base), out)
    (out / "summary.json").unlink()

    def started(*args, **kwargs):
        raise AssertionError("ranks started for a finished run")

    monkeypatch.setattr(distributed, "train_data_parallel", started)
    outcome = lifecycle.resume(out)
    assert (out / "summary.json").is_file() and outcome.summary["timing"]["train_s"] is None


def test_a_stopped_data_parallel_run_says_the_step_its_ranks_saved(corpus, tmp_path, monkeypatch):
    from anchoring.kinds.lm import distributed
    from anchoring.kinds.lm import kind as lm_kind
    from anchoring.kinds.lm.data import load_data
    from anchoring.train.skeleton import TrainingInterrupted

    base = [o.replace("CORPUS", str(corpus)) for o in SPANS] + ['lm.arms=["control"]']
    out = tmp_path / "run"
    (out / "arms").mkdir(parents=True)
    load_data(experiments.load("lm-anchor", base).text, out)
    distributed.train_data_parallel(experiments.load("lm-anchor", [*base, "train.steps=2"]), out, [("control", 0)], 2)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # as the ranks' stop reaches the command

    monkeypatch.setattr(distributed, "train_data_parallel", stop)
    with pytest.raises(TrainingInterrupted) as e:
        lm_kind.run(experiments.load("lm-anchor", [*base, "train.steps=4", "lm.nproc=2"]), out)
    assert e.value.step == 2


def test_a_torchrun_follower_stopped_by_a_signal_says_so_in_one_line(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from anchoring import runtime
    from anchoring.cli import app
    from anchoring.kinds.lm import distributed
    from anchoring.train.skeleton import TrainingInterrupted

    def interrupted(cfg, out):
        raise TrainingInterrupted(98)

    monkeypatch.setattr(runtime, "launched_by_torchrun", lambda: (1, 2))
    monkeypatch.setattr(distributed, "follow", interrupted)
    r = CliRunner().invoke(app, ["run", "lm-anchor", "--out", str(tmp_path / "r"), "-q"])
    assert r.exit_code == 130 and "rank 1: interrupted" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_nproc_flag_is_named_in_its_own_errors():
    from typer.testing import CliRunner

    from anchoring.cli import app

    r = CliRunner().invoke(app, ["run", "lm-anchor", "--nproc", "65", "--set", "lm.batch_size=130", "-q"])
    assert r.exit_code == 2 and "--nproc 65:" in r.stderr and "--set" not in r.stderr, r.stderr
