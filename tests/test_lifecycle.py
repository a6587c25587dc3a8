"""The run lifecycle at its edges: an edit's training stopped by Ctrl-C, summaries that are valid JSON
but not a run's, resumes without a config digest, run folders claimed by two runs at once, and
flags or --set items that were quietly misread. Each test failed before the fix it covers."""

import hashlib
import json
import os
import shutil
import signal
from contextlib import contextmanager
from datetime import datetime

import pytest

from anchoring import AnchoringError, cli, experiments, lifecycle, load_run, runs
from test_robustness import invoke, one_line_error  # the CLI helpers those tests share


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A finished one-seed colour run of 40 steps; tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("lifecycle") / "run"
    r = invoke("run", "--seeds", "1", "--steps", "40", "--out", out, "-q")
    assert r.exit_code == 0, r.stderr
    return out


@pytest.fixture()
def run_copy(short_run, tmp_path):
    return shutil.copytree(short_run, tmp_path / "run")


# --- Ctrl-C during an edit ------------------------------------------------------------------------

def test_ctrl_c_during_relearns_baseline_is_one_line_and_the_baseline_resumes(run_copy, monkeypatch):
    """It used to end in a TrainingInterrupted traceback with exit code 1."""

    @contextmanager
    def ctrl_c_at_step_10(label, enabled):
        def update(done, total):
            if done == 10:
                os.kill(os.getpid(), signal.SIGINT)  # the training loop's handler turns it into a clean stop

        yield update

    monkeypatch.setattr(cli.edit, "progress_bar", ctrl_c_at_step_10)
    attack = ["relearn", run_copy, "--samples", "1", "--steps", "5"]
    r = invoke(*attack)
    base = run_copy / "relearn" / "red" / "baseline-run"
    assert r.exit_code == 130, (r.exit_code, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "after step 10; checkpoint saved" in r.stderr and f"anchoring resume {base}" in r.stderr, r.stderr
    monkeypatch.undo()
    one_line_error(invoke("show", base.parent), "is a relearning attack that has not finished; run `anchoring relearn")
    r = invoke("resume", base, "-q")  # what the line says to do: the baseline finishes from step 10 …
    assert r.exit_code == 0, r.stderr
    weights = (base / runs.CONFIG_DIGEST).read_text(), (base / "checkpoint.safetensors").read_bytes()
    r = invoke(*attack)  # … and the attack, run again, uses it instead of training it anew
    assert r.exit_code == 0, r.stderr
    assert ((base / runs.CONFIG_DIGEST).read_text(), (base / "checkpoint.safetensors").read_bytes()) == weights
    assert (run_copy / "relearn" / "red" / "summary.json").is_file()
    shown = invoke("show", run_copy / "relearn" / "red")  # the attack's table again, from its summary.json
    assert shown.exit_code == 0, shown.stderr
    assert shown.stdout.splitlines()[:-1] == r.stdout.splitlines()[:-1] and "relearning red" in shown.stdout


def test_show_of_an_attack_or_intervention_never_written_names_the_ones_there(run_copy):
    """A typo in the concept (`relearn/blue` for `relearn/red`) was told to run the attack "again to
    finish it", as if it had been started."""
    one_line_error(invoke("show", run_copy / "relearn" / "blue"), "does not exist; " + str(run_copy) + " has no relearning "
                   "attack yet (`anchoring relearn` writes one)")
    one_line_error(invoke("show", run_copy / "interventions" / "suppres"), "does not exist; " + str(run_copy)
                   + " has no intervention yet (`anchoring intervene` writes one)")
    (run_copy / "relearn" / "red").mkdir(parents=True)
    (run_copy / "interventions" / "suppress").mkdir(parents=True)
    one_line_error(invoke("show", run_copy / "relearn" / "blue"), "has the relearning attacks red")
    one_line_error(invoke("show", run_copy / "interventions" / "suppres"), "has the interventions suppress")


def test_relearn_run_again_goes_on_with_its_interrupted_baseline(run_copy, monkeypatch):
    """Run again without `resume`, the attack used to delete the baseline's checkpoint and train it anew."""
    seen: list[int] = []

    @contextmanager
    def ctrl_c_at_step_10(label, enabled):
        def update(done, total):
            seen.append(done)
            if done == 10:
                os.kill(os.getpid(), signal.SIGINT)

        yield update

    monkeypatch.setattr(cli.edit, "progress_bar", ctrl_c_at_step_10)
    attack = ["relearn", run_copy, "--samples", "1", "--steps", "5"]
    assert invoke(*attack).exit_code == 130
    seen.clear()

    @contextmanager
    def watch(label, enabled):
        yield lambda done, total: seen.append(done)

    monkeypatch.setattr(cli.edit, "progress_bar", watch)
    r = invoke(*attack)
    assert r.exit_code == 0, r.stderr
    assert seen and min(seen) > 10, seen[:3]  # went on from the checkpoint, not from step 0


def test_ctrl_c_during_an_edit_that_trains_no_run_is_one_line(run_copy, monkeypatch):
    from anchoring.kinds.colour import control

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(control, "finetune", interrupted)
    r = invoke("relearn", run_copy, "--samples", "1", "--steps", "5", "--no-baseline")
    assert r.exit_code == 130 and "Traceback" not in r.stdout + r.stderr, (r.exit_code, r.stderr)
    assert r.stderr.strip() == "interrupted before the attack was complete; run the command again"


# --- summaries that are JSON but not a run's --------------------------------------------------------

@pytest.mark.parametrize("summary", [{"kind": "bogus"}, {"kind": "lm"}, {"seeds": [0], "kind": "colour"}, {},
                                     [1], {"experiment": "x", "seeds": [0]}, {"experiment": "x"},
                                     {"experiment": "x", "kind": "lm", "models": []}])
def test_show_says_in_one_line_that_a_damaged_summary_is_not_its_runs(run_copy, summary):
    """The kind is the validated config's, not the summary's: a KeyError, a TypeError and a silent
    exit 0 with nothing printed before."""
    (run_copy / "summary.json").write_text(json.dumps(summary))
    one_line_error(invoke("show", run_copy), f"{str(run_copy / 'summary.json')!r} is not a summary of a 'colour' run")


def test_show_still_prints_a_good_summary_and_tolerates_odd_timing(run_copy):
    r = invoke("show", run_copy)
    assert r.exit_code == 0 and "seeds anchored" in r.stdout, r.stderr
    summary = json.loads((run_copy / "summary.json").read_text())
    total = summary["timing"]["total_s"]
    assert f"wall time {total:.1f} s (as the run recorded it, without the command's start-up)" in r.stdout  # the run's record, not show's own time
    summary["timing"] = "soon"
    (run_copy / "summary.json").write_text(json.dumps(summary))
    r = invoke("show", run_copy)
    assert r.exit_code == 0 and "seeds anchored" in r.stdout and "wall time" not in r.stdout, r.stderr  # unknown: not 0.0


def test_a_fault_in_a_kinds_lines_is_not_blamed_on_a_summary_just_computed(tmp_path, monkeypatch):
    """Only a summary read back from disk is judged damaged; a fresh one's KeyError is a fault to see."""
    from anchoring.kinds import REGISTRY

    def broken(summary):
        raise KeyError("a fault in summary_lines")

    monkeypatch.setattr(REGISTRY["colour"], "summary_lines", broken)
    with pytest.raises(KeyError, match="a fault in summary_lines"):
        lifecycle.Outcome(tmp_path, {"experiment": "x", "kind": "colour"}, "colour").lines()
    with pytest.raises(AnchoringError, match="is not a summary of a 'colour' run"):
        lifecycle.Outcome(tmp_path, {"experiment": "x", "kind": "colour"}, "colour", from_disk=True).lines()


def test_load_run_refuses_a_summary_that_is_not_a_dict(run_copy):
    (run_copy / "summary.json").write_text("[1, 2]")
    with pytest.raises(AnchoringError, match="is not a summary of a 'colour' run"):
        load_run(run_copy)


# --- seeds, flags and --set items -------------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--seeds", "5"], ["--seed", "5"], ["--seeds", "2", "--seed", "1"]])
def test_seed_flags_next_to_a_seed_list_are_refused(tmp_path, flags):
    """`--set train.seed_list=[3,4] --seeds 5` trained seeds 3 and 4 without a word."""
    out = tmp_path / "x"
    r = invoke("run", "--set", "train.seed_list=[3,4]", *flags, "--steps", "5", "--out", out, "-q")
    one_line_error(r, "train.seed_list [3, 4] sets the seeds, so --seed")
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["relearn", "RUN", "--samples", "abc"], "--samples 'abc': expected comma-separated integers"),
    (["run", "intervention-lobes", "--seeds", "2"], "--seeds does not apply to 'intervention-lobes': a 'figures' experiment"),
    (["run", "intervention-lobes", "--steps", "2"], "--steps does not apply to 'intervention-lobes'"),
    (["run", "lm-control", "--select", "pareto"], "--select does not apply to 'lm-control': a 'lm' experiment has no evaluate.select"),
    (["sweep", "intervention-lobes", "--seed", "2"], "--seed does not apply to 'intervention-lobes'"),
])
def test_messages_name_the_flag_that_was_given(short_run, tmp_path, args, message):
    """They named `--dims` for relearn's --samples, and `--set` keys for flags."""
    args = [short_run if a == "RUN" else a for a in args]
    out = tmp_path / "x"
    one_line_error(invoke(*args, *([] if args[0] == "relearn" else ["--out", out])), message)
    assert not out.exists()


def test_set_into_a_list_the_spec_does_not_write_starts_from_its_default():
    """lm-control's spec has no [unlearning]; the index went into an empty dict ("Input should be a valid list")."""
    cfg = experiments.load("lm-control", ["unlearning.relearn_k.0=8"])
    assert cfg.unlearning.relearn_k == [8, *experiments.load("lm-control", []).unlearning.relearn_k[1:]]


@pytest.mark.parametrize("item", ["train.seeds=true", "train.seed=false", "train.steps=true", "train.checkpoint_every=true",
                                  "train.seed_list=[true]", "model.latent_dim=true"])
def test_a_boolean_for_an_integer_is_refused(item):
    """`--set train.seeds=true` trained one seed."""
    with pytest.raises(AnchoringError, match="not true/false"):
        experiments.load("anchored", [item])
    assert experiments.load("anchored", ["model.normalize=false"]).model.normalize is False  # booleans still set booleans


# --- config digest ----------------------------------------------------------------------------------

def test_resume_without_a_config_digest_warns_in_one_line(run_copy):
    """Old runs have no config.sha256: resumed, but no longer silently unchecked."""
    (run_copy / "summary.json").unlink()
    (run_copy / runs.CONFIG_DIGEST).unlink()
    r = invoke("resume", run_copy, "-q")
    assert r.exit_code == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "has no config.sha256" in warnings[0] and "without checking" in warnings[0], r.stderr
    (run_copy / "summary.json").unlink()
    with pytest.warns(UserWarning, match="has no config.sha256"):
        lifecycle.resume(run_copy)


def test_a_merged_sweep_records_its_config_digest_and_resume_checks_it(tmp_path):
    out = tmp_path / "s"
    r = invoke("sweep", "anchored", "--seeds", "1", "--workers", "1", "--steps", "20", "--out", out, "-q")
    assert r.exit_code == 0, r.stderr
    text = (out / runs.CONFIG).read_text()
    assert (out / runs.CONFIG_DIGEST).read_text().strip() == hashlib.sha256(text.encode()).hexdigest()
    (out / "summary.json").unlink()  # as a sweep stopped while merging leaves it
    (out / runs.CONFIG).write_text(text.replace("steps = 20", "steps = 10"))
    # not resumed as a run (that trains anew from an edited config): the sweep merges its shards again
    one_line_error(invoke("resume", out), "is a sweep that has not finished; continue it with the command")
    r = invoke("sweep", "anchored", "--seeds", "1", "--workers", "1", "--steps", "20", "--out", out, "-q")
    assert r.exit_code == 0, r.stderr
    assert (out / runs.CONFIG).read_text() == text and (out / "summary.json").is_file()


# --- run folder names -------------------------------------------------------------------------------

def test_generated_run_folders_are_claimed_when_picked(tmp_path, monkeypatch):
    """Two runs started in the same second both picked the one free name, then shared it."""

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2024, 1, 2, 3, 4, 5)

    monkeypatch.setattr(runs, "datetime", Frozen)
    first = runs.new_run_dir("exp", None, root=tmp_path)
    second = runs.new_run_dir("exp", None, root=tmp_path)
    assert first.is_dir() and second.is_dir() and first != second
    assert [first.name, second.name] == ["20240102-030405", "20240102-030405-2"]
    # a name taken between the look and the claim is skipped, not shared
    real_mkdir = type(first).mkdir

    def taken_meanwhile(self, *a, **k):
        if self.name == "20240102-030405-3" and not self.exists():
            real_mkdir(self)  # another process got there first
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(type(first), "mkdir", taken_meanwhile)
    assert runs.new_run_dir("exp", None, root=tmp_path).name == "20240102-030405-4"


def test_shards_stopped_at_different_steps_are_not_merged(tmp_path):
    """Merging a shard saved at step 10 with one at step 20 would give a model whose members were trained
    for different lengths under one step count."""
    import torch

    from anchoring.train.checkpoint import FORMAT, atomic_save, concat_members

    paths = []
    for step in (10, 20):
        paths.append(tmp_path / f"s{step}.safetensors")
        atomic_save({"param.w": torch.zeros(1, 2)}, paths[-1], {"format": FORMAT, "step": str(step)})
    with pytest.raises(AnchoringError, match=r"different steps \[10, 20\]"):
        concat_members(paths, tmp_path / "merged.safetensors")
    assert not (tmp_path / "merged.safetensors").exists()


def test_a_studys_sub_run_started_with_other_settings_is_not_reused(tmp_path):
    """A resumed study reuses a finished sub-run only when it was started from the very same config."""
    cfg = experiments.load("anchored", ["train.steps=5"])
    (tmp_path / runs.CONFIG).write_text(experiments.load("anchored", ["train.steps=6"]).to_toml())
    with pytest.raises(AnchoringError, match="started with other settings"):
        lifecycle._run_or_continue(cfg, tmp_path, None)


def test_a_resume_interrupted_before_it_trains_says_how_to_resume(tmp_path, monkeypatch):
    """Ctrl-C while `resume` still checks the run wrote nothing, so the run stays resumable and the
    message must say so (it said "nothing to resume")."""
    from typer.testing import CliRunner

    path = tmp_path / "r"
    path.mkdir()
    lifecycle.write_config(path, experiments.load("anchored", ["train.steps=5"]))  # a run stopped before its first step

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(lifecycle, "validate", interrupted)
    r = CliRunner().invoke(cli.app, ["resume", str(path), "-q"])
    assert r.exit_code == 130 and f"anchoring resume {path}" in r.stderr and "nothing to resume" not in r.stderr, r.stderr
    monkeypatch.undo()
    r = CliRunner().invoke(cli.app, ["resume", str(path), "-q"])
    assert r.exit_code == 0 and (path / runs.SUMMARY).is_file(), r.stderr


def test_a_sweep_stopped_between_its_merged_summary_and_its_record_is_completed_by_the_same_command(tmp_path, monkeypatch):
    """Without a grid the merged run's summary is written before the sweep adds its record to it; a stop
    in between must not leave a sweep that the same command calls finished."""
    from anchoring import sweep as sw

    out = tmp_path / "sw"
    real = lifecycle.finish_merged

    def then_stopped(path):
        real(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(lifecycle, "finish_merged", then_stopped)
    with pytest.raises(KeyboardInterrupt):
        sw.sweep("anchored", out, sets=["train.seeds=1", "train.steps=10"], workers=1)
    assert "sweep" not in json.loads((out / runs.SUMMARY).read_text())
    monkeypatch.undo()
    summary = sw.sweep("anchored", out, sets=["train.seeds=1", "train.steps=10"], workers=2)  # one seed: same shards
    assert "sweep" in json.loads((out / runs.SUMMARY).read_text())
    assert summary["sweep"] | {"shards": None} == {"backend": "local", "workers": 2, "planned_workers": 1,
                                                   "continued": True, "shards": None}
    with pytest.raises(AnchoringError, match="is a finished sweep"):
        sw.sweep("anchored", out, sets=["train.seeds=1", "train.steps=10"], workers=1)


# --- flags that must reach what they name, and the run's own bookkeeping ----------------------------

def test_relearn_no_baseline_reaches_the_attack(short_run, monkeypatch):
    from anchoring import kinds

    seen = {}

    def fake(run, **options):
        seen.update(options)
        raise AnchoringError("stopped by the test")

    monkeypatch.setattr(kinds.REGISTRY["colour"], "relearn", fake)
    one_line_error(invoke("relearn", short_run, "--no-baseline"), "stopped by the test")
    assert seen["baseline"] is False


def test_lm_only_options_of_delete_are_refused_on_a_colour_run(run_copy):
    one_line_error(invoke("delete", run_copy, "--concept", "red", "--repair-lr", "1e-3", "--out", run_copy.parent / "d"), "are for 'lm' runs")
    assert not (run_copy.parent / "d").exists()


def test_show_select_pareto_needs_a_pareto_selection(tmp_path):
    r = invoke("run", "colour-wheel", "--seeds", "1", "--steps", "20", "--out", tmp_path / "wheel", "-q")  # no edits
    assert r.exit_code == 0, r.stderr
    one_line_error(invoke("show", tmp_path / "wheel", "--select", "pareto"), "has no Pareto selection")


def test_the_recorded_wall_time_is_the_runs_own(tmp_path):
    import time

    cfg = experiments.load("anchored", ["train.seeds=1", "train.steps=20"])
    t0 = time.perf_counter()
    outcome = lifecycle.run(cfg, tmp_path / "run")
    wall = time.perf_counter() - t0
    assert 0 < outcome.summary["timing"]["total_s"] <= wall


def test_a_run_folder_with_a_config_always_has_its_digest(tmp_path, monkeypatch):
    """Stopped between the two writes, the folder must not hold a config that resume cannot check."""
    real = runs.write_atomic
    calls = []

    def second_write_stops(path, text):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, text)

    monkeypatch.setattr(runs, "write_atomic", second_write_stops)
    with pytest.raises((KeyboardInterrupt, lifecycle.TrainingInterrupted)):
        lifecycle.run(experiments.load("anchored", ["train.seeds=1", "train.steps=20"]), tmp_path / "run")
    assert not (tmp_path / "run" / runs.CONFIG).exists() or (tmp_path / "run" / runs.CONFIG_DIGEST).exists()
    # and nothing is left in its place: a lone digest once made `run --out` and `resume` refuse the folder
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(runs, "write_atomic", real)
    given = tmp_path / "given"  # an empty folder the user made stays, empty
    given.mkdir()
    calls.clear()
    monkeypatch.setattr(runs, "write_atomic", second_write_stops)
    with pytest.raises(KeyboardInterrupt):
        lifecycle.run(experiments.load("anchored", ["train.seeds=1", "train.steps=20"]), given)
    assert given.is_dir() and not any(given.iterdir())


def test_a_study_resumes_past_a_variant_stopped_before_its_config(tmp_path):
    """A variant folder holding only the digest (a stop between the two writes of an older version, or a
    full disk) once made the study impossible to resume ("already exists and is not empty")."""
    cfg = experiments.load("smooth-vs-stepped", ["train.seeds=1", "train.steps=20", 'description="spikes <b>& spread"'])
    out = tmp_path / "study"
    lifecycle.run(cfg, out)
    # each variant's own page says which variant it is, and a description is text, not markup
    for v in cfg.variants:
        page = (out / "variants" / v.name / runs.REPORT).read_text()
        assert f"<p>Variant &#x27;{v.name}&#x27; of smooth-vs-stepped, one arm of this comparison: spikes" in page
        assert "spikes &lt;b&gt;&amp; spread" in page and "<b>&" not in page
    assert "<p>spikes &lt;b&gt;&amp; spread</p>" in (out / runs.REPORT).read_text()
    variant = next(p for p in (out / "variants").iterdir() if p.is_dir())
    for p in variant.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (variant / runs.CONFIG_DIGEST).write_text("0" * 64 + "\n")
    (out / runs.SUMMARY).unlink()
    outcome = lifecycle.resume(out)
    assert (variant / runs.SUMMARY).is_file() and outcome.summary
    # the study's page links every variant's own report
    page = (out / runs.REPORT).read_text()
    assert all(f'<a href="variants/{v.name}/report.html">' in page for v in cfg.variants)


def test_a_study_whose_variants_were_started_with_another_description_resumes(tmp_path):
    """A variant's description names the variant now; a study stopped before that change wrote its
    variants' configs with the study's description, and resuming it was refused ("started with other
    settings") though nothing that changes a number differs. A changed setting is still refused."""
    import hashlib

    cfg = experiments.load("smooth-vs-stepped", ["train.seeds=1", "train.steps=20"])
    out = tmp_path / "study"
    lifecycle.run(cfg, out)
    v = cfg.variants[0]
    variant = out / "variants" / v.name
    text = (variant / runs.CONFIG).read_text()
    older = "\n".join(f"description = {json.dumps(cfg.description)}" if line.startswith("description = ") else line
                      for line in text.split("\n"))
    assert older != text and "Variant" not in older
    for body, ok in ((older, True), (older.replace("seed = 0", "seed = 1"), False)):
        (variant / runs.CONFIG).write_text(body)
        (variant / runs.CONFIG_DIGEST).write_text(hashlib.sha256(body.encode()).hexdigest() + "\n")
        (out / runs.SUMMARY).unlink(missing_ok=True)
        if ok:
            assert lifecycle.resume(out).summary["comparison"]
        else:
            with pytest.raises(AnchoringError, match="was started with other settings"):
                lifecycle.resume(out)


def test_ctrl_c_just_after_the_config_is_written_leaves_a_run_to_resume(tmp_path, monkeypatch):
    real = runs.write_atomic

    def stop_after_config(path, text):
        real(path, text)
        if path.name == runs.CONFIG:
            raise KeyboardInterrupt

    monkeypatch.setattr(runs, "write_atomic", stop_after_config)
    with pytest.raises((lifecycle.TrainingInterrupted, KeyboardInterrupt)) as stop:  # a bare Ctrl-C must not stop pytest
        lifecycle.run(experiments.load("anchored", ["train.seeds=1", "train.steps=20"]), tmp_path / "run")
    assert stop.type is lifecycle.TrainingInterrupted  # "continue with anchoring resume", not "nothing to resume"
    monkeypatch.setattr(runs, "write_atomic", real)
    assert lifecycle.resume(tmp_path / "run").summary["timing"]["total_s"] > 0  # and it resumes


def test_resume_checks_it_can_write_before_it_trains(run_copy, monkeypatch):
    (run_copy / runs.SUMMARY).unlink()  # an interrupted run, as far as resume can tell
    real = runs.check_writable

    def read_only(path):
        if path.name == runs.SUMMARY:
            raise AnchoringError(f"cannot write under {str(path)!r}: read-only (the test)")
        real(path)

    trained = []
    monkeypatch.setattr(runs, "check_writable", read_only)
    monkeypatch.setattr(lifecycle, "_execute", lambda *a: trained.append(a))
    with pytest.raises(AnchoringError, match="cannot write under"):
        lifecycle.resume(run_copy)
    assert not trained


def test_a_whole_summary_of_another_kind_is_not_taken_for_this_runs(run_copy):
    """Every field a colour summary has, but written by another kind: refused on its kind alone."""
    summary = json.loads((run_copy / "summary.json").read_text())
    summary["kind"] = "transformer"
    (run_copy / "summary.json").write_text(json.dumps(summary))
    one_line_error(invoke("show", run_copy), "is not a summary of a 'colour' run")


def test_a_sweep_refused_after_it_named_its_folder_leaves_no_folder(tmp_path, monkeypatch):
    from anchoring import sweep

    monkeypatch.chdir(tmp_path)  # the generated name lives under ./runs

    def refuse(*a, **kw):
        raise AnchoringError("refused by the test")

    monkeypatch.setattr(sweep, "sweep", refuse)
    one_line_error(invoke("sweep", "--seeds", "2", "--steps", "20", "--workers", "1", "-q"), "refused by the test")
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_dir() and not any(p.iterdir())]


def test_a_diverged_run_is_not_offered_for_resume_and_show_and_resume_say_it_diverged(tmp_path):
    """Every command used to point at `resume`, which met the same non-finite step again, forever."""
    sheet = tmp_path / "huge.csv"
    sheet.write_text("STEP,PHASE,ACTION,lr,separate,anchor,subspace\n0,Train,,1e30,0.01,0.01,0.01\n100,,,1e30,,,\n")
    out = tmp_path / "div"
    r = invoke("run", "anchored", "--steps", "100", "--seeds", "1", "--set", f"schedule={sheet}", "--out", out, "-q")
    one_line_error(r, "training diverged at step")
    assert "training diverged at step" in (out / runs.DIVERGED).read_text()
    for cmd, said in ((("show", out), "it has no results"), (("resume", out), "resuming would meet the same step again")):
        r = invoke(*cmd)
        one_line_error(r, "diverged (training diverged at step")
        assert said in r.stderr
    r = invoke("run", "anchored", "--steps", "100", "--seeds", "1", "--out", out, "-q")
    one_line_error(r, "already exists and is not empty (choose another --out)")
    assert "resume" not in r.stderr


@pytest.mark.parametrize("marker", [runs.SUMMARY, runs.EDIT])
def test_out_on_a_finished_or_edited_run_does_not_suggest_resume(tmp_path, marker):
    out = tmp_path / "done"
    out.mkdir()
    (out / runs.CONFIG).write_text("name = 'x'\n")
    (out / marker).write_text("{}")
    with pytest.raises(AnchoringError) as e:
        runs.new_run_dir("x", out)
    assert "choose another --out)" in str(e.value) and "resume" not in str(e.value)


def test_a_run_another_process_is_training_is_refused_until_that_one_ends(tmp_path):
    """A second `resume` of a run still training used to train it too, into the same checkpoints."""
    import fcntl

    cfg = experiments.load("anchored", ["train.seeds=1", "train.steps=5"])
    path = tmp_path / "r"
    path.mkdir()
    lifecycle.write_config(path, cfg)
    other = os.open(path, os.O_RDONLY | os.O_DIRECTORY)  # what the training process holds while it trains
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(AnchoringError, match="is being trained by another process"):
            lifecycle.resume(path)
        assert not (path / "checkpoint.safetensors").exists()
    finally:
        os.close(other)
    assert lifecycle.resume(path).summary["experiment"] == "anchored"  # that one gone, it trains


def test_a_second_run_into_the_same_new_folder_cannot_take_it_over(tmp_path, monkeypatch):
    """Two `run --out D` started together could both pass the empty-folder check; the second then wrote
    its config over the first's, and the first evaluated the second's checkpoint as its own. The lock
    was on config.toml, which the second replaced by a rename, so it never met the first's lock. Now
    one of them trains the folder and the other is refused, whichever checked first."""
    import threading

    out = tmp_path / "d"
    checked, go_on = threading.Event(), threading.Event()
    real = runs.new_run_dir

    def slow_first(name, where, *args, **kwargs):  # the first start pauses between its check and its writes
        result = real(name, where, *args, **kwargs)
        if threading.current_thread().name == "first" and not checked.is_set():
            checked.set()
            go_on.wait(30)
        return result

    monkeypatch.setattr(runs, "new_run_dir", slow_first)
    outcome: dict = {}

    def start(seed: int) -> None:
        try:
            outcome[seed] = lifecycle.run(experiments.load("anchored", ["train.seeds=1", "train.steps=5", f"train.seed={seed}"]), out)
        except AnchoringError as e:
            outcome[seed] = e

    t = threading.Thread(target=start, args=(0,), name="first")
    t.start()
    assert checked.wait(30)
    start(7)  # passes the same check while the folder is still empty
    go_on.set()
    t.join(60)
    won = [seed for seed, o in outcome.items() if not isinstance(o, AnchoringError)]
    assert len(won) == 1, outcome
    lost = outcome[7 if won == [0] else 0]
    assert "already exists and is not empty" in str(lost) or "being trained by another process" in str(lost)
    assert experiments.load(str(out / runs.CONFIG)).train.seed == won[0]  # the folder's config is the winner's
    assert [row["seed"] for row in outcome[won[0]].summary["seeds"]] == [won[0]]


def test_a_run_folder_deleted_while_it_trains_is_said_not_offered_for_resume(tmp_path, monkeypatch):
    """The trainer recreated the folder, without its config, and said `anchoring resume` it."""
    import shutil

    from anchoring.kinds.colour import kind as colour_kind

    cfg = experiments.load("anchored", ["train.seeds=1", "train.steps=5"])
    out = tmp_path / "gone"
    real = colour_kind.train

    def removed_then_trained(cfg, path, **kwargs):
        shutil.rmtree(path)
        return real(cfg, path, **kwargs)

    monkeypatch.setattr(colour_kind, "train", removed_then_trained)
    with pytest.raises(AnchoringError, match="was deleted or moved while the run trained"):
        lifecycle.run(cfg, out)


def test_a_relearn_stopped_between_its_files_leaves_no_table_of_the_earlier_attack(run_copy, monkeypatch):
    """The summary was written before the figure: a stop there left the new table with the old figure,
    and a stop before the curves left the old table next to new curves."""
    from anchoring.kinds.colour import control

    attack = ["relearn", run_copy, "--samples", "1", "--steps", "3", "--no-baseline"]
    assert invoke(*attack).exit_code == 0
    summary = run_copy / "relearn" / "red" / runs.SUMMARY
    assert summary.is_file()

    def stopped(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(control.figures, "relearn_curves", stopped)
    assert invoke("relearn", run_copy, "--samples", "4", "--steps", "3", "--no-baseline").exit_code == 130
    assert not summary.exists()  # no table of the K = 1 attack beside the K = 4 curves
    one_line_error(invoke("show", summary.parent), "is a relearning attack that has not finished")


def test_a_full_disk_says_the_run_resumes(tmp_path, monkeypatch):
    """It printed only 'No space left on device', naming neither the run nor that it can be resumed."""
    import errno

    from anchoring.kinds.colour import kind as colour_kind

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(colour_kind, "train", full)
    out = tmp_path / "r"
    with pytest.raises(AnchoringError, match=rf"No space left on device \(in '{out}'\).*anchoring resume {out}"):
        lifecycle.run(experiments.load("anchored", ["train.seeds=1", "train.steps=5"]), out)


def test_show_on_a_run_training_now_does_not_offer_resume(tmp_path):
    import fcntl

    cfg = experiments.load("anchored", ["train.seeds=1", "train.steps=5"])
    path = tmp_path / "r"
    path.mkdir()
    lifecycle.write_config(path, cfg)
    with pytest.raises(AnchoringError, match="`anchoring resume` it"):
        lifecycle.show(path)
    other = os.open(path, os.O_RDONLY | os.O_DIRECTORY)  # as the training process holds it
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(AnchoringError, match="it is training now, in another process"):
            lifecycle.show(path)
    finally:
        os.close(other)


def test_a_resume_clears_the_temporary_files_a_killed_trainer_left_and_no_one_elses(run_copy):
    """A trainer SIGKILLed while writing a checkpoint left its hidden temporary file (as large as the
    model) in the run for good. The files of another command's folder are that command's."""
    (run_copy / runs.SUMMARY).unlink()  # an interrupted run, as far as resume can tell
    ours = [run_copy / ".checkpoint.safetensors.k3j_9xq2.tmp", run_copy / "figures" / ".hue.png.ab12cd34.tmp"]
    theirs = [run_copy / "relearn" / "red" / ".summary.json.zz99yy88.tmp", run_copy / "notes.tmp", run_copy / ".x.tmp",
              run_copy / "variants" / "a" / "interventions" / "sup" / ".colours.csv.ab12cd34.tmp"]  # a study's run's, too
    for f in ours + theirs:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"half a file")
    lifecycle.resume(run_copy)
    assert (run_copy / runs.SUMMARY).is_file()
    assert [f.exists() for f in ours] == [False, False] and all(f.exists() for f in theirs)


def test_a_run_that_could_not_write_its_config_leaves_no_empty_folders(tmp_path, monkeypatch):
    """Without --out, a full disk at the first write left an empty runs/<experiment>/ behind; a folder
    that holds other runs stays."""
    import errno

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs, "write_atomic", full)
    cfg = experiments.load("anchored", ["train.seeds=1", "train.steps=5"])
    with pytest.raises(OSError, match="No space left"):
        lifecycle.run(cfg, None)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == []
    (tmp_path / "runs" / "anchored" / "older").mkdir(parents=True)
    with pytest.raises(OSError, match="No space left"):
        lifecycle.run(cfg, None)
    assert [p.name for p in (tmp_path / "runs" / "anchored").iterdir()] == ["older"]
