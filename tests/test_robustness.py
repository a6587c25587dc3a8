"""Nothing silently wrong: stale sweeps, edited runs, divergence, stuck states, and bad input that
used to end in a traceback. Each test failed before the fix it covers."""

import json
import math
import os
import shlex
import stat
import string
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from anchoring import AnchoringError, experiments, lifecycle, load_run, runs
from anchoring.cli import app
from anchoring.kinds import validate_config
from anchoring.schedule import parse_dopesheet
from anchoring.train.checkpoint import read_checkpoint

runner = CliRunner()
SHORT = ["--steps", "40", "-q"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(r, message):
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr


# --- silent wrong results -------------------------------------------------------------------------

def test_a_sweep_with_other_settings_never_reuses_old_shards(tmp_path):
    base = ["sweep", "anchored", "--seeds", "2", "--workers", "2", "--steps", "30", "-q"]
    out = tmp_path / "s"
    assert invoke(*base, "--out", out).exit_code == 0
    old = read_checkpoint(out / "checkpoint.safetensors")[1]
    changed = ["--set", "terms.0.power=10", "--set", "model.normalize=false"]
    one_line_error(invoke(*base, *changed, "--out", out), "holds a sweep with other settings (it was started with "
                                                          "--set/--seeds/--steps ['train.seeds=2', 'train.steps=30'] (now")
    assert torch.equal(read_checkpoint(out / "checkpoint.safetensors")[1]["param.encoder.0.weight"], old["param.encoder.0.weight"])
    # the new settings into a fresh directory give other weights; the same settings continue in place
    assert invoke(*base, *changed, "--out", tmp_path / "fresh").exit_code == 0
    fresh = read_checkpoint(tmp_path / "fresh" / "checkpoint.safetensors")[1]
    assert not torch.equal(fresh["param.encoder.0.weight"], old["param.encoder.0.weight"])
    # the same command on the finished sweep: refused, not evaluated again (an interrupt would unfinish it)
    one_line_error(invoke(*base, "--out", out), f"is a finished sweep (`anchoring show {out}` prints it)")
    (out / runs.SUMMARY).unlink()  # as a sweep stopped while merging leaves it: a config.toml, but no run to resume
    one_line_error(invoke("resume", out), "is a sweep that has not finished; continue it with the command that started "
                                          "it: anchoring sweep anchored --set train.seeds=2 --set train.steps=30 --workers 2")
    assert invoke(*base, "--out", out).exit_code == 0  # documented way to continue: the same command again
    again = read_checkpoint(out / "checkpoint.safetensors")[1]
    assert all(torch.equal(again[k], old[k]) for k in old if k.startswith("param."))


def test_an_unfinished_sweep_names_the_command_that_continues_it_and_a_grid_key_cannot_be_set_twice(tmp_path):
    out = tmp_path / "g"
    base = ["sweep", "anchored", "--seeds", "1", "--workers", "1", "--steps", "20", "-q", "--grid", "terms.0.power=50,100"]
    for clash in ("terms.0.power=70", " terms.00.power = 70"):  # as written, or as the overrides read it
        one_line_error(invoke(*base, "--set", clash, "--out", out), f"--grid terms.0.power is also given as {clash!r}")
    one_line_error(invoke(*base[:-2], "--grid", "model.latent_dim=4,5", "--out", out),  # fails validation, not loading
                   "--grid point model.latent_dim=5: ")
    assert not out.exists()
    assert invoke(*base, "--out", out).exit_code == 0
    timing = json.loads((out / "points" / "terms.0.power=50" / runs.SUMMARY).read_text())["timing"]
    assert timing["train_s"] is None and timing["load_s"] > 0  # a merged point trained nothing (it recorded seconds)
    for name in (runs.SUMMARY, runs.REPORT):  # as a sweep stopped while it evaluated its points leaves it
        (out / name).unlink()
    r = invoke("resume", out)
    one_line_error(r, "is a sweep that has not finished; continue it with the command that started it: anchoring sweep")
    command = shlex.split(r.stderr.strip().split("started it: ")[1])
    assert command[-2:] == ["--out", str(out)]
    assert invoke(*command[1:], "-q").exit_code == 0 and (out / runs.REPORT).is_file()


def test_a_sweep_of_a_config_file_is_continued_by_that_file_from_anywhere(tmp_path, monkeypatch):
    spec = tmp_path / "mine.toml"  # its name inside is still 'anchored': the name alone would load the built-in
    spec.write_text(experiments.find("anchored").read_text().replace("[train]", "[train]\nsteps = 20", 1))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "g"
    base = ["sweep", "mine.toml", "--seeds", "1", "--workers", "1", "-q", "--set", "model.hidden=[12]",
            "--grid", "terms.0.power=50,100"]
    assert invoke(*base, "--out", out).exit_code == 0
    for name in (runs.SUMMARY, runs.REPORT):
        (out / name).unlink()
    monkeypatch.chdir(out)
    r = invoke("resume", out)
    command = shlex.split(r.stderr.strip().split("started it: ")[1])
    assert command[2] == str(spec)
    assert invoke(*command[1:], "-q").exit_code == 0 and (out / runs.REPORT).is_file()


def test_edits_after_pruning_hit_the_named_concept_or_are_refused(anchored_run, tmp_path):
    out, _ = anchored_run
    spare = tmp_path / "spare"  # prune dim 3, which neither red (dim 0) nor vibrant (dims 0-1) uses
    assert invoke("delete", out, "--dims", "3", "--method", "prune", "--out", spare).exit_code == 0
    twice = tmp_path / "twice"
    r = invoke("delete", spare, "--concept", "red", "--method", "ablate", "--out", twice)
    assert r.exit_code == 0, r.stderr
    edit = json.loads((twice / "edit.json").read_text())
    assert edit["dims"] == [0] and [e["method"] for e in edit["lineage"]] == ["prune", "ablate"]
    table = {row["colour"]: row for row in json.loads((twice / "summary.json").read_text())["edit_table"]}
    assert table["red"]["after"] > 0.2 and table["yellow"]["after"] < 0.1 and table["lime"]["after"] < 0.05
    r = invoke("intervene", spare, "--concept", "red", "--method", "suppress", "--name", "sup")
    assert r.exit_code == 0 and "red" in r.stdout, r.stderr

    pruned = tmp_path / "pruned"
    assert invoke("delete", out, "--concept", "red", "--method", "prune", "--out", pruned).exit_code == 0
    one_line_error(invoke("delete", pruned, "--concept", "red", "--out", tmp_path / "x"), "its dims were pruned")
    one_line_error(invoke("delete", out, "--concept", "red", "--repair-steps", "5", "--out", tmp_path / "x"),
                   "are for 'lm' runs")  # a colour run has no retain text to repair on
    r = invoke("delete", out, "--concept", "red", "--dims", "9", "--out", tmp_path / "x")  # not an intervention called 'ablate'
    assert r.stderr.strip() == "error: delete --method ablate: dims [9] must be within 0..3", r.stderr
    assert not (tmp_path / "x").exists()
    one_line_error(invoke("intervene", pruned, "--concept", "red"), "its dims were pruned")
    one_line_error(invoke("resume", pruned), "is an edited run")
    r = invoke("show", pruned)
    assert r.exit_code == 0 and "prune of red" in r.stdout and str(pruned / "report.html") in r.stdout.replace("\n", "")
    assert (pruned / "report.html").is_file()
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("lr", ["nan", "inf", "-0.1"])
def test_bad_schedule_values_are_refused_before_training(tmp_path, lr):
    sched = tmp_path / "s.csv"
    sched.write_text(f"STEP,lr,separate,anchor,subspace\n0,1e-8,0.01,0.01,0.01\n10,{lr},,,\n39,0.01,,,\n")
    r = invoke("run", "--set", f"schedule=\"{sched}\"", "--out", tmp_path / "r", *SHORT)
    one_line_error(r, "lr" if lr == "-0.1" else "not a finite number")
    assert not (tmp_path / "r").exists()


def test_divergence_stops_the_run_naming_step_and_keeps_the_last_good_checkpoint(tmp_path):
    sched = tmp_path / "s.csv"
    sched.write_text("STEP,lr,separate,anchor,subspace\n0,0.01,0.01,0.01,0.01\n20,0.01,,,\n21,1e30,,,\n39,1e30,,,\n")
    out = tmp_path / "r"
    r = invoke("run", "--seeds", "2", "--set", f"schedule=\"{sched}\"", "--set", "train.checkpoint_every=10", "--out", out, *SHORT)
    one_line_error(r, "training diverged at step")
    step = int(r.stderr.split("at step ")[1].split(":")[0])
    assert step >= 21
    done, tensors = read_checkpoint(out / "checkpoint.safetensors")
    assert done <= step and all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("param."))
    assert f"the checkpoint holds the run after its first {done} steps" in r.stderr and "in seed" in r.stderr, r.stderr
    assert not (out / "summary.json").exists()
    one_line_error(invoke("run", "--set", "terms.0.power=nan", "--out", tmp_path / "n", *SHORT), "finite number")
    assert not (tmp_path / "n").exists()


def test_divergence_before_any_checkpoint_says_nothing_was_saved_and_names_the_seed():
    from anchoring.train.skeleton import divergence_message

    row = torch.tensor([[0.1, 0.2], [float("nan"), float("nan")]])
    line = divergence_message(5, 0.01, row, ["anchor:red", "loss"], seeds=[3, 4], saved=0)
    assert "anchor:red is not finite in seed 4" in line and "nothing was checkpointed yet" in line


def test_summaries_are_valid_json_with_null_for_a_missing_number(tmp_path):
    runs.write_json(tmp_path / "s.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None}}


# --- stuck states -----------------------------------------------------------------------------------

def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path):
    cfg = experiments.load("anchored", ["train.seeds=2", "train.steps=30"])
    out = tmp_path / "early"
    out.mkdir()
    runs.write_atomic(out / "config.toml", cfg.to_toml())  # all a run had written when it was killed
    r = invoke("resume", out, "-q")
    assert r.exit_code == 0, r.stderr
    ref = lifecycle.run(cfg, tmp_path / "ref")
    assert (out / "metrics.csv").read_text() == (ref.path / "metrics.csv").read_text()
    one_line_error(invoke("resume", out), "has already finished")


def test_interrupt_during_evaluation_says_how_to_resume(tmp_path, monkeypatch):
    from anchoring.kinds.colour import kind as colour_kind

    def broken(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(colour_kind, "finish", broken)
    r = invoke("run", "--seeds", "1", "--out", tmp_path / "r", *SHORT)
    assert r.exit_code == 130 and f"anchoring resume {tmp_path / 'r'}" in r.stderr.replace("\n", "")
    monkeypatch.undo()
    assert invoke("resume", tmp_path / "r", "-q").exit_code == 0


# --- one line instead of a traceback ----------------------------------------------------------------

def test_bad_input_is_one_line_and_writes_nothing(anchored_run, tmp_path):
    out, _ = anchored_run
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_line_error(invoke("run", "--out", "/proc/x/run", *SHORT), "cannot write under")
    one_line_error(invoke("run", "--set", "train.betas=[2,2]", "--out", tmp_path / "b", *SHORT), "betas")
    one_line_error(invoke("relearn", out, "--lr", "-1"), "--lr must be a positive number")
    one_line_error(invoke("relearn", out, "--samples", "100000", "--no-baseline"), "--samples 100000")
    one_line_error(invoke("relearn", out, "--samples", "4,1,4", "--no-baseline"), "--samples '4,1,4' names 4 twice")
    one_line_error(invoke("delete", out, "--concept", "red", "--out", out / "sub"), "is inside the source run")
    assert not (out / "sub").exists()
    one_line_error(invoke("relearn", out, "--threshold", "nan", "--no-baseline"), "--threshold must be a number ≥ 0")
    one_line_error(invoke("relearn", out, "--eval-chars", "5000", "--no-baseline"), "--eval-chars is for LM runs")
    one_line_error(invoke("relearn", out, "--repair-lr", "0.1", "--no-baseline"), "--repair-steps and --repair-lr are for LM runs")
    one_line_error(invoke("relearn", out, "--distil-steps", "10", "--no-baseline"), "--distil-noise and --distil-lr are for LM runs")
    one_line_error(invoke("relearn", out, "--attack-unedited", "--no-baseline"), "--attack-unedited is for LM runs")
    one_line_error(invoke("run", "--set", 'interventions.0.falloff="bezier:0.5,0,0.9,0.1,0"', "--out", tmp_path / "bz",
                          *SHORT), "a Bézier mapper only applies to repel")  # before training, not after
    one_line_error(invoke("intervene", out, "--concept", "red", "--site", "decoder"), "not the latent width")
    one_line_error(invoke("intervene", out, "--concept", "red", "--name", "../../x"), "--name")
    one_line_error(invoke("delete", out, "--concept", "red", "--out", a_file), "is a file")
    one_line_error(invoke("sweep", "--seeds", "1", "--out", a_file), "is a file")
    one_line_error(invoke("sweep", "--seeds", "1", "--grid", "train.seed=1,1", "--out", tmp_path / "g"), "given twice")
    one_line_error(invoke("run", "--seeds", "1000000000", "--out", tmp_path / "huge"), "GiB")
    assert not any((tmp_path / n).exists() for n in ("b", "g", "huge", "bz")) and not (out.parent / "x").exists()
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.toml", "architecture.json", "checkpoint.safetensors", "summary.json", "metrics.csv"):
        (copy / name).write_bytes((out / name).read_bytes())
    (copy / "summary.json").write_text("{not json")
    one_line_error(invoke("show", copy), "is corrupt")
    (copy / "summary.json").write_text("")
    one_line_error(invoke("show", copy), "is corrupt")
    (copy / "summary.json").write_bytes((out / "summary.json").read_bytes())
    (copy / "metrics.csv").write_bytes(b"\x00\x01garbage\nrows\n")
    with pytest.raises(AnchoringError, match="not a metrics table"):
        load_run(copy).metrics()
    whole = (out / "metrics.csv").read_bytes()
    (copy / "metrics.csv").write_bytes(whole[:-7])  # cut in the last row's numbers: it was read with those numbers cut
    with pytest.raises(AnchoringError, match="is cut short"):
        load_run(copy).metrics()
    (copy / "metrics.csv").write_bytes(whole)
    assert load_run(copy).metrics().equals(load_run(out).metrics())
    arch = json.loads((out / "architecture.json").read_text())
    del arch["seeds"]
    (copy / "architecture.json").write_text(json.dumps(arch))
    one_line_error(invoke("intervene", copy, "--concept", "red"), "has no 'seeds'")
    (copy / "architecture.json").write_text((out / "architecture.json").read_text())
    data = bytearray((copy / "checkpoint.safetensors").read_bytes())
    data[-3] ^= 0xFF  # one flipped bit pattern in the last tensor's bytes
    (copy / "checkpoint.safetensors").write_bytes(bytes(data))
    one_line_error(invoke("intervene", copy, "--concept", "red"), "is corrupt")


def test_version_and_ray_hint():
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout.strip().startswith("anchoring ")
    import builtins

    from anchoring.sweep import backends

    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("no ray here")
        return real_import(name, *a, **k)

    builtins.__import__ = no_ray
    try:
        with pytest.raises(AnchoringError, match=r"pip install -c constraints.txt -e '\.\[ray\]'"):
            backends.run_ray([], 1, None, 0, None)
    finally:
        builtins.__import__ = real_import


def test_a_ragged_dopesheet_row_is_an_error():
    with pytest.raises(AnchoringError, match="line 3: 2 cells but the header has 3"):
        parse_dopesheet("STEP,lr,a\n0,0.1,1\n10,0.2\n")


# --- fuzzing the parsers ----------------------------------------------------------------------------

CELLS = st.one_of(st.sampled_from(["", "0", "1", "+10", "-5", "+0.5", "1e-8", "nan", "inf", "-1", "x", "0.1", "a,b", "\"q\""]),
                  st.text(string.printable, max_size=6))
HEADERS = st.lists(st.sampled_from(["STEP", "PHASE", "ACTION", "lr", "lr:log", "w:linear:step", "x:bad", "w", "", "STEP"]),
                   min_size=0, max_size=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(HEADERS, st.lists(st.lists(CELLS, max_size=6), max_size=6))
def test_dopesheet_parser_parses_or_says_why_in_one_line(header, rows):
    text = "\n".join([",".join(header), *[",".join(r) for r in rows]])
    try:
        timeline = parse_dopesheet(text)
    except AnchoringError as e:
        assert "\n" not in str(e) and str(e)
        return
    table = timeline.table()
    assert table.shape[0] == timeline.steps and all(math.isfinite(float(v)) for v in table.ravel())


VALUES = st.one_of(st.integers(-3, 10**12), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
                   st.booleans(), st.lists(st.integers(-2, 9), max_size=4), st.none())
KEYS = st.sampled_from(["model.latent_dim", "model.hidden", "train.seeds", "train.seed", "train.steps", "train.betas",
                        "data.batch_size", "terms.0.power", "terms.9.power", "concepts.0.anchor", "kind", "nope",
                        "transformer.width", "evaluate.select", "interventions.0.method", "schedule", "train.fast"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(KEYS, VALUES), max_size=4))
def test_spec_parser_parses_or_says_why_in_one_line(items):
    import tomllib

    data = tomllib.loads(experiments.find("anchored").read_text())
    data["schedule"] = (experiments.HERE / "anchored.csv").read_text()
    for key, value in items:
        node = data
        parts = key.split(".")
        try:
            for p in parts[:-1]:
                node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
            if parts[-1].isdigit():
                node[int(parts[-1])] = value
            else:
                node[parts[-1]] = value
        except (IndexError, KeyError, TypeError, AttributeError):
            continue
    try:
        cfg = validate_config(data, "fuzz.toml")
        lifecycle.validate(cfg)
    except AnchoringError as e:
        assert "\n" not in str(e) and str(e)


def test_an_interrupted_comparison_resumes_its_variants(tmp_path, monkeypatch):
    from anchoring.kinds.colour import kind as colour_kind

    real = colour_kind.finish
    calls = {"n": 0}

    def second_fails(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(colour_kind, "finish", second_fails)
    out = tmp_path / "svs"
    r = invoke("run", "ex-1.6", "--seeds", "1", "--steps", "30", "--out", out, "-q")
    assert r.exit_code == 130 and "anchoring resume" in r.stderr
    monkeypatch.undo()
    first = (out / "variants" / "smooth" / "summary.json").read_text()
    r = invoke("resume", out, "-q")
    assert r.exit_code == 0, r.stderr
    assert (out / "variants" / "smooth" / "summary.json").read_text() == first  # the finished variant was reused
    assert {row["variant"] for row in json.loads((out / "summary.json").read_text())["comparison"]} == {"smooth", "stepped"}


def test_a_colour_run_refuses_the_lm_only_blind_edit_before_training():
    """`blind` is in the shared edit vocabulary for `anchoring delete --method blind` on LM runs; a colour
    experiment's [[interventions]] must not take it for some other edit."""
    import tomllib

    data = tomllib.loads(experiments.find("anchored").read_text())
    data["schedule"] = (experiments.HERE / "anchored.csv").read_text()
    data["interventions"] = [{"name": "b", "method": "blind", "concept": "red"}]
    with pytest.raises(AnchoringError, match="blind is an LM edit"):
        lifecycle.validate(validate_config(data, "blind.toml"))


def test_one_stop_delivered_twice_does_not_cut_the_final_save_short(monkeypatch):
    """Ctrl-C reaches a worker and its parent passes a SIGTERM on; a scheduler signals the group and the
    parent forwards it again. The duplicate must not abort the stop's save; a later second Ctrl-C does."""
    import os
    import signal

    from anchoring.train.skeleton import StopFlag

    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # at once: the same stop
        assert stop.set
        monkeypatch.setattr(StopFlag, "GRACE", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler as soon as the call returns


def test_an_atomic_write_reaches_the_disk_before_it_replaces_the_old_file(tmp_path, monkeypatch):
    """A rename can be written to disk before the data it points to; after a power cut the file
    would then be empty. The data must be synced before the rename, and the rename after it."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode)))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", None))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    runs.write_atomic(tmp_path / "metrics.json", "{}")
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]
    assert (tmp_path / "metrics.json").read_text() == "{}"


def test_report_tables_show_undefined_and_infinite_values_as_such():
    """A report cell of NaN read "nan" and one of ∞ "inf"; they mean undefined and unbounded."""
    import numpy as np

    from anchoring.report.html import table_html

    page = table_html(["a", "b", "c", "d", "e"], [[float("nan"), float("inf"), float("-inf"), 0.12345, np.float32("nan")]])
    assert page.count('<td title="undefined">–</td>') == 2
    assert '<td title="undefined">–</td>' in page and "<td>∞</td>" in page and "<td>−∞</td>" in page
    assert "<td>0.123</td>" in page and "nan" not in page and "inf" not in page
    # a column reads evenly (3.100 beside 3.058; 0.0393 beside −0.0019), whole numbers print whole, a column of tiny
    # numbers keeps their digits, and rounding to zero drops the sign
    page = table_html(["loss", "steps", "Δ", "mse"], [[3.1, 8.0, 0.03928, 7.722e-05], [3.058, -0.0, -0.0018868, 2.1e-4],
                                                     [3.0, 1.5, -0.00104, 1e-3]])
    for cell in ("3.100", "3.058", "3.000", "8.000", "0.000", "1.500", "0.0393", "-0.0019", "-0.0010", "7.722e-05", "0.00021",
                 "0.001"):
        assert f"<td>{cell}</td>" in page, (cell, page)
    assert "-0.0000" not in page and "-0.000<" not in page
    # a number under 0.001 beside larger ones keeps its digits: the same error before and after an edit
    # read 3.67e-05 and 0.0000, and one that rose read as one that fell
    page = table_html(["colour", "before", "after"], [["black", 3.67e-05, 3.67e-05], ["azure", 8.835e-05, 0.0712]])
    assert page.count("<td>3.67e-05</td>") == 2 and "<td>0.0712</td>" in page and "0.0000" not in page
    assert "<td>8</td>" in table_html(["steps"], [[8.0], [-0.0]]) and "<td>0</td>" in table_html(["steps"], [[-0.0]])


class _Weights:
    """A one-parameter task whose loss stays finite while its weight turns NaN at `bad_step`: a
    non-finite gradient with a finite loss, which the metric check alone does not see."""

    metric_names = ["loss"]

    def __init__(self, steps: int, bad_step: int):
        self.w = torch.nn.Parameter(torch.ones(3))
        self.params = {"w": self.w}
        self.optimizer = torch.optim.SGD([self.w], lr=0.1)
        self.steps, self.bad_step, self.seed = steps, bad_step, 7

    def lr(self, step):
        return 0.1

    def step(self, step):
        with torch.no_grad():
            self.w.add_(0.01 if step != self.bad_step else float("nan"))
        return torch.tensor([1.0])  # the loss of the step before the update: finite

    def after_step(self, step):
        return False

    def state(self, steps_done):
        return {}

    def restore(self, steps_done, tensors):
        if tensors.get("param.w") is not None and steps_done > 30:
            raise RuntimeError("The expanded size of the tensor (5) must match")


def test_weights_that_turned_non_finite_never_replace_the_last_good_checkpoint(tmp_path):
    from anchoring.train.checkpoint import read_checkpoint as read
    from anchoring.train.skeleton import Diverged, fit

    ck = tmp_path / "ck.safetensors"
    with pytest.raises(Diverged, match="the weights are not finite .*first 10 steps"):
        fit(_Weights(30, bad_step=19), checkpoint=ck, every=10)
    done, tensors = read(ck)
    assert done == 10 and torch.isfinite(tensors["param.w"]).all()


def test_a_checkpoint_longer_than_the_run_or_not_matching_its_state_is_one_error(tmp_path):
    from anchoring.train.skeleton import fit

    ck = tmp_path / "ck.safetensors"
    fit(_Weights(40, bad_step=-1), checkpoint=ck, every=10)
    with pytest.raises(AnchoringError, match="holds 40 steps, more than the 20"):
        fit(_Weights(20, bad_step=-1), checkpoint=ck, every=10)
    with pytest.raises(AnchoringError, match="does not match the run its config builds .*RuntimeError"):
        fit(_Weights(50, bad_step=-1), checkpoint=ck, every=10)


def test_a_stop_asked_by_the_parent_saves_first_then_interrupts(tmp_path):
    """Job processes are stopped through `should_stop`, not a signal of their own: a second SIGTERM
    more than the grace period after the first one is taken as "stop now, unsaved"."""
    from anchoring.train.checkpoint import read_checkpoint as read
    from anchoring.train.skeleton import TrainingInterrupted, fit

    ck = tmp_path / "ck.safetensors"
    task = _Weights(30, bad_step=-1)
    with pytest.raises(TrainingInterrupted):
        fit(task, checkpoint=ck, every=10, should_stop=lambda: float(task.w[0]) > 1.055)  # true after step 5
    assert read(ck)[0] == 6


def test_ctrl_c_while_the_command_starts_is_one_line_and_exit_130(monkeypatch, capsys):
    """Loading the command line takes seconds (torch, matplotlib); a Ctrl-C then printed a
    40-line traceback through the import machinery."""
    import importlib.abc
    import sys

    from anchoring import entry

    class Interrupted(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "anchoring.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "anchoring.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupted(), *sys.meta_path])
    with pytest.raises(SystemExit) as e:
        entry.main()
    assert e.value.code == 130
    assert capsys.readouterr().err == "interrupted while starting; nothing was done\n"


def test_ctrl_c_outside_every_commands_own_handler_still_says_so(monkeypatch, capsys, tmp_path):
    """typer turns a KeyboardInterrupt it catches itself (here while the run is being opened) into a
    silent exit 130; the command now says it was interrupted. A stop a command explains keeps its
    own line only."""
    from anchoring import cli

    def stop(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lifecycle, "load_run", stop)
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(tmp_path), "--prompt", "x"])
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"
    monkeypatch.setattr(lifecycle, "run", stop)
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "colour-wheel", "--out", str(tmp_path / "r"), "-q"])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == ["interrupted before the run directory was written; nothing to resume"]


def test_report_tables_escape_text_and_format_numpy_floats_like_floats():
    import numpy as np

    from anchoring.report.html import table_html

    page = table_html(["a<b"], [["x & <y>"]])
    assert "<th>a&lt;b</th>" in page and "<td>x &amp; &lt;y&gt;</td>" in page
    assert "<td>3.100</td>" in table_html(["a"], [[np.float32(3.1)], [np.float32(3.058)]])  # read evenly, as floats
    assert "<td>0.010</td>" in table_html(["a"], [[0.01], [0.5]])  # 0.01 itself is not "smaller than 0.01"


def test_a_resumed_run_leaves_its_final_checkpoint_at_the_last_step(tmp_path):
    """Commands after training (show, intervene, a sweep's merge) read the checkpoint, so a resumed
    run must write its last step too, not stay at the step it was stopped after."""
    from anchoring.train.checkpoint import read_checkpoint as read
    from anchoring.train.skeleton import TrainingInterrupted, fit

    ck = tmp_path / "ck.safetensors"
    task = _Weights(30, bad_step=-1)
    with pytest.raises(TrainingInterrupted):
        fit(task, checkpoint=ck, every=100, should_stop=lambda: float(task.w.detach()[0]) > 1.055)
    assert read(ck)[0] == 6
    assert fit(_Weights(30, bad_step=-1), checkpoint=ck, every=100) == 6  # resumed from step 6
    done, tensors = read(ck)
    assert done == 30 and tensors["param.w"].tolist() == pytest.approx([1.3] * 3)


class _OneTermDiverges(_Weights):
    metric_names = ["loss", "term"]

    def step(self, step):
        super().step(step)
        return torch.tensor([1.0, float("nan") if step == 4 else 0.5])  # one metric of the row


def test_one_metric_that_stops_being_finite_stops_the_run(tmp_path):
    from anchoring.train.skeleton import Diverged, fit

    with pytest.raises(Diverged, match="diverged at step 4: term is not finite"):
        fit(_OneTermDiverges(30, bad_step=-1), checkpoint=tmp_path / "ck.safetensors", every=100)


def test_a_safetensors_file_from_another_tool_is_not_taken_for_a_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from anchoring.train.checkpoint import read_checkpoint

    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})  # as transformers writes
    with pytest.raises(AnchoringError, match="is not an anchoring checkpoint"):
        read_checkpoint(tmp_path / "model.safetensors")


def test_sigterm_sets_the_stop_flag_and_the_old_handlers_come_back(monkeypatch):
    import signal

    from anchoring.train.skeleton import StopFlag

    outside = []
    previous = signal.signal(signal.SIGTERM, lambda *_: outside.append(1))  # not the default: that would end pytest
    try:
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        with StopFlag() as stop:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop: finish the step, save, stop
            assert stop.set and not outside
        assert {s: signal.getsignal(s) for s in before} == before
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_grid_values_are_stripped_and_a_grid_key_inside_a_set_value_is_refused(tmp_path):
    from anchoring.sweep import parse_grid

    assert parse_grid(["train.lr=1, 2 ,3"]) == [("train.lr", ["1", "2", "3"])]
    base = ["sweep", "anchored", "--seeds", "1", "--workers", "1", "--steps", "20", "-q", "--grid", "model.latent_dim=4,5"]
    one_line_error(invoke(*base, "--set", "model={latent_dim = 4}", "--out", tmp_path / "g"), "--grid model.latent_dim is also given")
    assert not (tmp_path / "g").exists()


class _FakeShard:
    """A shard process that finishes after a few polls, writing its `done` file unless told not to."""

    active = 0
    peak = 0

    def __init__(self, cmd, stdout=None, stderr=None, env=None):
        self.dir = Path(cmd[-1])
        self.polls = 0
        type(self).active += 1
        type(self).peak = max(type(self).peak, type(self).active)

    def poll(self):
        self.polls += 1
        if self.polls < 3:
            return None
        if self.polls == 3:
            type(self).active -= 1
            if not (self.dir / "no-done").exists():
                from anchoring.sweep.layout import DONE

                (self.dir / DONE).write_text("")
        return 0

    def terminate(self):
        pass

    def wait(self, timeout=None):
        return 0


def test_the_local_backend_keeps_at_most_workers_shards_running_and_needs_each_shards_done_file(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from anchoring.sweep import backends

    monkeypatch.setattr(backends.subprocess, "Popen", _FakeShard)
    monkeypatch.setattr(backends.time, "sleep", lambda s: None)
    shards = []
    for i in range(5):
        (tmp_path / f"s{i}").mkdir()
        shards.append(SimpleNamespace(name=f"s{i}", dir=tmp_path / f"s{i}", point=i))
    _FakeShard.active = _FakeShard.peak = 0
    backends.run_local(shards, workers=2, retries=0)
    assert _FakeShard.peak == 2 and _FakeShard.active == 0
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "no-done").write_text("")  # exits 0 without writing done: not finished
    with pytest.raises(AnchoringError, match="shard late failed 1 times"):
        backends.run_local([SimpleNamespace(name="late", dir=tmp_path / "late", point=0)], workers=1, retries=0)


@pytest.mark.parametrize("wrote_shard", [False, True])
def test_a_sweep_stopped_by_ctrl_c_says_whether_there_is_anything_to_continue(tmp_path, monkeypatch, wrote_shard):
    """A stop before any shard leaves nothing to continue and no generated folder; a stop after one
    names the folder to continue with. The workers' own saving is covered by test_speed."""
    from anchoring import sweep

    def stopped_sweep(experiment, path, **kwargs):
        if wrote_shard:
            (path / "shards" / "000").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "sweep", stopped_sweep)
    monkeypatch.chdir(tmp_path)
    r = invoke("sweep", "anchored", "--seeds", "2", "--workers", "2", "-q")
    assert r.exit_code == 130 and "Traceback" not in r.stdout + r.stderr
    if wrote_shard:
        (path,) = (tmp_path / "runs" / "anchored-sweep").iterdir()
        assert r.stderr.strip() == ("sweep interrupted; finished shards and checkpoints are kept — continue with "
                                    f"the same command and --out {Path('runs') / 'anchored-sweep' / path.name}")
    else:
        assert r.stderr.strip() == "sweep interrupted before any shard was written; nothing to continue"
        assert list(tmp_path.iterdir()) == []  # the generated runs/anchored-sweep/<time> went again


def test_delete_refuses_a_place_it_could_not_rename_into_before_any_work(anchored_run, tmp_path, monkeypatch):
    """`delete` writes a hidden sibling of --out and renames it into place. An empty --out that was
    writable passed the check even when its parent was not (or when it was a mount point), and the
    edit then failed after all its work, at the rename."""
    from anchoring.kinds.colour import control

    out, _ = anchored_run
    edited = []
    real_plan = control.make_plan

    def plan(*args, **kwargs):
        p = real_plan(*args, **kwargs)
        real_edit = p.edit_models
        p.edit_models = lambda models: edited.append(1) or real_edit(models)
        return p

    monkeypatch.setattr(control, "make_plan", plan)
    target = tmp_path / "mnt"
    target.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == os.fspath(target) or real_ismount(p))
    one_line_error(invoke("delete", out, "--concept", "red", "--out", target), "is a mount point")
    monkeypatch.setattr(os.path, "ismount", real_ismount)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: os.fspath(p) != os.fspath(tmp_path) and real_access(p, mode, **kw))
    one_line_error(invoke("delete", out, "--concept", "red", "--out", target), f"{str(tmp_path)!r} is not writable")
    assert edited == [] and list(tmp_path.iterdir()) == [target] and not any(target.iterdir())
    monkeypatch.setattr(os, "access", real_access)
    assert invoke("delete", out, "--concept", "red", "--out", target).exit_code == 0 and edited == [1]


def test_a_relearning_attack_that_blows_up_is_one_line_and_writes_no_table(anchored_run):
    """At a learning rate that broke the fine-tune, the attack's errors went NaN and the table said
    "not recovered": a deletion that held, read off an attack that had failed."""
    out, _ = anchored_run
    attack = out / "relearn" / "red"
    before = sorted(p.name for p in attack.iterdir()) if attack.exists() else None
    r = invoke("relearn", out, "--lr", "1e30", "--samples", "4", "--steps", "5", "--no-baseline")
    one_line_error(r, "the relearning attack on anchored (seed 0, K = 4): fine-tuning diverged at step")
    assert "give a smaller --lr" in r.stderr
    assert (sorted(p.name for p in attack.iterdir()) if attack.exists() else None) == before
