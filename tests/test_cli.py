import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from anchoring import experiments, load_run
from anchoring.cli import app
from anchoring.experiments import load_config

runner = CliRunner()
SPEC = experiments.find("anchored")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, message, out=None):
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    if out is not None:
        assert not Path(out).exists(), "a failed command must not write a run directory"


def spec_with_schedule(tmp_path, schedule):
    text = SPEC.read_text().replace('schedule = "anchored.csv"', f"schedule = '''\n{schedule}'''")
    p = tmp_path / "bad.toml"
    p.write_text(text)
    return p


def test_list_shows_the_default():
    r = invoke("list")
    assert r.exit_code == 0
    line = next(x for x in r.stdout.splitlines() if x.startswith("anchored "))
    assert "[2.4.1]" in line and "(default)" in line
    names = [x.split()[0] for x in r.stdout.splitlines() if x.strip()]
    assert names == sorted(names) and names.index("lm-anchor") < names.index("lm-anchor-cleared")  # by name, not file


@pytest.mark.parametrize("args,message", [
    (["run", "nosuch"], "unknown experiment 'nosuch'"),
    (["run", "--set", "model.widht=3"], "unknown --set key 'model.widht'"),
    (["run", "--set", "nothing"], "expected key=value"),
    (["run", "--set", "model.latent_dim=many"], "model.latent_dim"),
    (["run", "--set", "model.latent_dim=-1"], "error: --set: model.latent_dim: Input should be greater"),  # not the file
    (["run", "--seeds", "0"], "--seeds must be a positive integer, got 0"),
    (["run", "--seeds", "-3"], "--seeds must be a positive integer, got -3"),
    (["run", "--steps", "0"], "--steps must be a positive integer, got 0"),
    (["run", "--seed", "-1"], "--seed must be ≥ 0"),
    (["run", "--set", "train.seeds=0"], "seeds must be a positive integer"),
    (["run", "--set", "terms.0.kind=repel"], "unknown regularizer 'repel'"),
    (["run", "--set", "terms.9.kind=anchor"], "not an index below 3"),
    (["run", "anchored", "--nproc", "2"], "--nproc is for 'lm' experiments; 'anchored' is a 'colour' experiment"),
    (["run", "lm-control", "--nproc", "0"], "--nproc must be a positive integer, got 0"),
    (["run", "lm-control", "--nproc", "3"], "--nproc 3: lm.batch_size 16 does not split over 3 processes"),
    (["run", "lm-control", "--nproc", "2", "--set", "lm.nproc=4"], "--nproc or --set lm.nproc, not both"),
    (["run", "lm-control", "--set", "text.split_seed=18446744073709551616"], "split_seed"),
    (["run", "curriculum", "--set", "data.space=\"hsv\"", "--set", "data.hsv_shape=[36,0,6]"], "hsv_shape"),
    (["run", "lm-anchor-milton", "--set", "evaluate.eval_chars=3000"],  # already shuffled: not "set it to shuffled"
     "(evaluate.eval_chars, evaluate.order = 'shuffled') hold no passage with 'milton'; raise evaluate.eval_chars"),
    (["run", "lm-unlearning", "--set", 'lm.arms=["anchored"]'],  # a check across keys: the file and the --set together
     "lm-unlearning.toml with --set lm.arms: config: unlearning.enabled needs the control arm"),
])
def test_bad_arguments(tmp_path, args, message):
    out = tmp_path / "run"
    assert_one_line_error(invoke(*args, "--out", out), message, out)


@pytest.mark.parametrize("schedule,message", [
    ("STEP,lr,separate,anchor,subspace\n0,0.01,0.01,0.01,0.01\nsoon,0.1,,,\n", "bad STEP 'soon'"),
    ("STEP,lr:linear:bouncy,separate,anchor,subspace\n0,0.01,0.01,0.01,0.01\n", "unknown interpolation 'bouncy'"),
    ("STEP,lr,separate,anchor,subspace\n0,0.01,0.01,lots,0.01\n", "'lots' is not a number"),
    ("STEP,lr,separate,anchor,subspace,planar\n0,0.01,0.01,0.01,0.01,1\n", "column 'planar' is not used by any term"),
    ("STEP,lr,separate,anchor\n0,0.01,0.01,0.01\n", "schedule has no column 'subspace'"),
])
def test_malformed_dopesheet(tmp_path, schedule, message):
    out = tmp_path / "run"
    assert_one_line_error(invoke("run", spec_with_schedule(tmp_path, schedule), "--out", out), message, out)


def test_unreadable_run_directories(tmp_path):
    assert_one_line_error(invoke("resume", tmp_path / "missing"), "is not a run directory")
    assert_one_line_error(invoke("show", tmp_path / "missing"), "is not a run directory")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.toml").write_text(SPEC.read_text().replace("anchored.csv", "nope.csv"))
    assert_one_line_error(invoke("show", broken), "cannot read schedule")
    (broken / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    assert_one_line_error(invoke("resume", broken), "cannot read schedule")
    (broken / "config.toml").write_text(load_config(SPEC).to_toml())
    assert_one_line_error(invoke("show", broken), "has not finished")
    assert_one_line_error(invoke("intervene", broken, "--concept", "red"), "has not finished training")
    from anchoring.errors import AnchoringError

    with pytest.raises(AnchoringError, match="is not a readable run"):
        load_run(broken)
    (broken / "architecture.json").write_text('{"kind": "colour-autoencoder"}')
    with pytest.raises(AnchoringError, match="cannot read checkpoint"), warnings.catch_warnings():
        warnings.simplefilter("error")  # the error alone, not also "has not finished training"
        load_run(broken)
    (broken / "architecture.json").write_text('["colour-autoencoder"]')
    with pytest.raises(AnchoringError, match=r"architecture.json' is not an architecture description$"):
        load_run(broken)
    (broken / "architecture.json").write_text('{"kind": "colour-autoencoder"}')
    (broken / "checkpoint.safetensors").unlink()
    with pytest.raises(AnchoringError, match=r"has no trained weights yet; `anchoring resume` it$"):
        load_run(broken)


def test_real_process_prints_one_line_and_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("anchoring")
    r = subprocess.run([str(exe), "run", "--steps", "-5", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --steps must be a positive integer, got -5"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("module", ["anchoring", "anchoring.cli"])
def test_python_dash_m_runs_the_command_with_its_one_line_errors(module, tmp_path):
    """`python -m anchoring.cli` ran the command until the CLI became a package; then it said only
    that a package cannot be executed."""
    r = subprocess.run([sys.executable, "-m", module, "run", "--steps", "-5", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert (r.returncode, r.stderr.strip()) == (2, "error: --steps must be a positive integer, got -5")
    assert not (tmp_path / "x").exists()


def test_refuses_to_overwrite_a_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert_one_line_error(invoke("run", "--out", out, "--steps", "5"), "already exists")


def test_short_run_writes_a_complete_rerunnable_directory(tmp_path):
    out = tmp_path / "short"
    r = invoke("run", "--seeds", "2", "--seed", "3", "--steps", "40", "--out", out, "--set", "train.checkpoint_every=25")
    assert r.exit_code == 0, r.stderr
    assert f"report: {out / 'report.html'}" in r.stdout.replace("\n", "")
    for name in ("config.toml", "architecture.json", "checkpoint.safetensors", "metrics.csv", "snapshots.safetensors",
                 "summary.json", "report.html", "figures/latent_slices.png", "figures/loss_curves.png", "figures/schedule.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp"))
    summary = json.loads((out / "summary.json").read_text())
    assert [s["seed"] for s in summary["seeds"]] == [3, 4]
    run = load_run(out)
    assert run.config.train.steps == 40 and run.seeds == [3, 4]
    metrics = run.metrics()
    loss = metrics[metrics.metric == "loss"]
    assert len(loss) == 40 * 2 and set(loss.seed) == {3, 4} and sorted(set(loss.step)) == list(range(40))
    assert {"anchor:red", "lr", "recon"} <= set(metrics.metric)
    deletions = sum(i.method in ("ablate", "prune") for i in run.config.interventions)
    # slices, losses, schedule, phase history; 2 per edit; 2 more per deletion (where the concept lands)
    figures = 4 + 2 * len(run.config.interventions) + 2 * deletions
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64") == figures and report.count("data:image/gif;base64") == 1
    assert set(summary["interventions"]) == {i.name for i in run.config.interventions}
    landing = summary["interventions"]["ablate-red"]["landing"]
    assert [r["seed"] for r in landing] == [3, 4] and all(0 <= r["residual_norm"] <= 1 for r in landing)
    # the resolved config re-runs as is, and gives the same numbers
    again = tmp_path / "again"
    assert invoke("run", out / "config.toml", "--out", again, "-q").exit_code == 0
    assert (again / "metrics.csv").read_text() == (out / "metrics.csv").read_text()
    assert invoke("show", out).exit_code == 0


def test_figure_only_lobes_experiment(tmp_path):
    out = tmp_path / "lobes"
    r = invoke("run", "ex-2.1", "--out", out)
    assert r.exit_code == 0, r.stderr
    for f in ("suppress_lobes.png", "suppress_strength.png", "repel_lobes.png", "repel_strength.png"):
        assert (out / "figures" / f).stat().st_size > 10_000, f
    assert (out / "report.html").read_text().count("data:image/png;base64") == 4
    names = [line.split()[0] for line in invoke("list").stdout.splitlines()]
    assert {"anchored", "anchored-single", "hue-plane", "isolated", "isolated-sparse", "intervention-lobes"} <= set(names)


def test_an_os_error_is_one_line_from_the_entry_point(monkeypatch, capsys):
    import anchoring.cli as cli

    def disk_full(args=None):
        raise OSError(28, "No space left on device", "/runs/x/arms/control-seed0.safetensors")

    monkeypatch.setattr(cli, "app", disk_full)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run"])
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: No space left on device: /runs/x/arms/control-seed0.safetensors"]


@pytest.mark.parametrize("command", ["run", "resume"])
def test_torchrun_workers_refuse_a_batch_they_cannot_share_before_any_directory_exists(tmp_path, monkeypatch, command):
    """Rank 0 would otherwise make the run directory and its config before a rank found the split impossible."""
    out = tmp_path / "run"
    if command == "resume":  # an interrupted run with batch 15, resumed under 2 torchrun workers
        out.mkdir()
        (out / "config.toml").write_text(experiments.load("lm-control", ["lm.batch_size=15"]).to_toml())
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["run", "lm-control", "--set", "lm.batch_size=15", "--out", str(out)] if command == "run" else ["resume", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "under torchrun: lm.batch_size 15 does not split over 2 processes" in r.stderr
    assert (not out.exists()) if command == "run" else sorted(p.name for p in out.iterdir()) == ["config.toml"]


@pytest.fixture()
def unfinished(tmp_path):
    """A short colour run whose summary is gone: a run stopped during its evaluation."""
    out = tmp_path / "run"
    assert invoke("run", "--seeds", "1", "--steps", "10", "--out", out, "-q").exit_code == 0
    (out / "summary.json").unlink()
    return out


def test_resume_refuses_a_config_edited_since_the_run_started(unfinished):
    """Its checkpoints were trained under the old settings; going on under new ones would mix two configs
    in one run (and a shorter `steps` would not fit the saved metrics at all)."""
    config = unfinished / "config.toml"
    original = config.read_text()
    config.write_text(original.replace("steps = 10", "steps = 5"))
    assert_one_line_error(invoke("resume", unfinished), "was edited after the run started")
    assert not (unfinished / "summary.json").exists()
    config.write_text(original)
    r = invoke("resume", unfinished, "-q")
    assert r.exit_code == 0, r.stderr


def test_the_api_says_a_run_in_training_has_no_metrics_yet_and_colour_input_must_be_rgb(unfinished):
    import torch

    from anchoring import AnchoringError, UnfinishedRunWarning, lifecycle

    (unfinished / "metrics.csv").unlink()  # as in a run stopped before its end
    with pytest.warns(UnfinishedRunWarning, match=r"has not finished training: its models are those of its last "
                                                              r"checkpoint .*`anchoring resume "):
        run = lifecycle.load_run(unfinished)  # it opened silently, half-trained models and all
    assert run.summary is None
    with pytest.raises(AnchoringError, match="has not finished training.*anchoring resume"):
        run.metrics()
    with pytest.raises(AnchoringError, match=r"encode expects RGB colours shaped \(\.\.\., 3\), got \(2, 4\)"):
        run.encode(torch.zeros(2, 4))


@pytest.mark.parametrize("args,message", [
    (["--method", "suppress", "--dims", "1"], "suppress acts along the concept's anchor; dims apply to"),
    (["--method", "zero", "--dims", "0,0"], "dims [0, 0] name a dim twice"),
])
def test_intervene_refuses_dims_it_would_ignore_or_repeat(tmp_path, args, message):
    out = tmp_path / "run"
    assert invoke("run", "--seeds", "1", "--steps", "10", "--out", out, "-q").exit_code == 0
    assert_one_line_error(invoke("intervene", out, "--concept", "red", *args), message)
    assert not (out / "interventions").exists()


def test_an_edit_or_attack_refuses_a_run_still_in_training(unfinished, tmp_path):
    assert_one_line_error(invoke("intervene", unfinished, "--concept", "red"), "has not finished training")
    assert not (unfinished / "interventions").exists()
    assert_one_line_error(invoke("delete", unfinished, "--concept", "red", "--out", tmp_path / "d"), "has not finished training",
                          tmp_path / "d")
    for options in (["--repair-steps", "2"], []):  # said first, before what is wrong with the options
        assert_one_line_error(invoke("delete", unfinished, "--out", tmp_path / "d", *options), "has not finished training",
                              tmp_path / "d")


def test_sigterm_outside_the_training_loop_stops_with_the_resume_hint(tmp_path, monkeypatch):
    """The loop turns SIGTERM into a clean stop; during evaluation it used to kill the process with no word."""
    import os
    import signal
    import time

    from anchoring import lifecycle

    def evaluating(cfg, out, progress=None):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(lifecycle, "run", evaluating)
    before = signal.getsignal(signal.SIGTERM)
    r = invoke("run", "--seeds", "1", "--steps", "10", "--out", tmp_path / "x")
    assert r.exit_code == 130 and "interrupted" in r.stderr, r.stderr
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handler is gone again


def test_ctrl_c_while_the_summary_is_written_says_to_resume(tmp_path, monkeypatch):
    from anchoring import runs

    real = runs.write_json

    def interrupted(path, data):
        if path.name == "summary.json":
            raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(runs, "write_json", interrupted)
    out = tmp_path / "run"
    r = invoke("run", "--seeds", "1", "--steps", "10", "--out", out, "-q")
    assert r.exit_code == 130 and f"continue with `anchoring resume {out}`" in r.stderr, r.stderr
    monkeypatch.setattr(runs, "write_json", real)
    assert invoke("resume", out, "-q").exit_code == 0 and (out / "summary.json").is_file()


def test_a_non_empty_folder_that_is_no_run_is_not_offered_for_resume(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = invoke("run", "--seeds", "1", "--steps", "10", "--out", tmp_path)
    assert_one_line_error(r, "already exists and is not empty")
    assert "resume" not in r.stderr


def test_a_check_across_keys_names_the_set_items_once(tmp_path):
    """A check of the whole config may stem from any --set item: each is named, once."""
    r = invoke("run", "lm-unlearning", "--set", 'lm.arms=["anchored"]', "--set", 'lm.arms=["anchored"]',
               "--set", "evaluate.eval_chars=3000", "--out", tmp_path / "run")
    assert_one_line_error(r, "lm-unlearning.toml with --set evaluate.eval_chars, lm.arms: config:", tmp_path / "run")


def test_version_is_the_installed_packages():
    from importlib.metadata import version

    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"anchoring {version('anchoring')}"


def test_a_term_named_like_its_weight_column_keeps_both_in_metrics(tmp_path):
    """`norm` the weight and `norm` the term shared one header name: read back, "norm" was the
    weight and "norm.1" the term."""
    out = tmp_path / "smooth"
    assert invoke("run", "smooth-curriculum", "--seeds", "1", "--steps", "5", "--out", out, "-q").exit_code == 0
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert len(header) == len(set(header)) and {"norm", "norm:weight", "planar", "planar:weight"} <= set(header)
    m = load_run(out).metrics()
    weights = m[m.metric == "norm:weight"].value
    assert not any(name.endswith(".1") for name in m.metric.unique()) and weights.max() > 0
    assert (m[m.metric == "norm"].value.to_numpy() != weights.to_numpy()).any()  # the term's value, not the weight


def test_a_sweep_table_keeps_the_digits_of_a_small_number():
    """A colour sweep's val_mse median (about 1e-3) printed with three decimals read 0.001 or 0.000."""
    from anchoring.cli.show import sweep_cell

    assert sweep_cell(0.00123) == "1.23e-03" and sweep_cell(-0.00456) == "-4.56e-03"
    assert sweep_cell(0.4567) == "0.457" and sweep_cell(0.0) == "0.000" and sweep_cell(None) == "–"
    assert sweep_cell(3) == "3" and sweep_cell(float("inf")) == "inf" and sweep_cell(True) == "True"


def test_the_bench_table_prints_each_figure_in_its_own_column(tmp_path, monkeypatch):
    """The printed table is what people read; only bench.json was checked, so an inverted ratio or
    swapped min/max columns would have gone unseen."""
    import anchoring.benchmarks as bench

    def suite(*args, **kwargs):
        return {"machine": {"torch": "x", "cpus": 2},
                "cases": [{"case": "plain loop", "median": 100.0, "min": 90.0, "max": 400.0, "unit": "steps/s", "peak_mb": 12.0},
                          {"case": "ensemble E=4", "median": 1234.0, "min": 1200.0, "max": 1300.0, "unit": "steps/s",
                           "vs_baseline": 2.0, "peak_mb": 50.0}]}

    monkeypatch.setattr(bench, "run_suite", suite)
    r = CliRunner().invoke(app, ["bench", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in r.stdout.splitlines() if line.count("│") == 8}
    assert rows["plain loop"] == ["100", "90", "400", "steps/s", "", "12"]
    assert rows["ensemble E=4"] == ["1,234", "1,200", "1,300", "steps/s", "2.00", "50"]


def test_the_progress_bars_time_left_counts_only_steps_made_since_it_opened(monkeypatch):
    """A resumed run's first report jumps from 0 to its checkpoint's step; the bar took that jump for
    speed, so its time left started near zero and stayed wrong for half a minute."""
    import rich.progress

    from anchoring.cli import common

    made = []

    class Recorded(rich.progress.Progress):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(common, "Progress", Recorded)
    with common.progress_bar("resume", True) as update:
        update(900, 1000)  # where the checkpoint left it
        for done in range(901, 911):
            update(done, 1000)
        task = made[0].tasks[0]
        assert sum(s.completed for s in task._progress) <= 10 and task.completed >= 900
        update(0, 50)  # a new total (the evaluation after training): its own speed from here
        assert made[0].tasks[0].total == 50 and not list(made[0].tasks[0]._progress)
