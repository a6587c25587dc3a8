"""One-line refusals of the building blocks' bad input, each naming what is wrong, that no other fast
test reaches: schedule tracks, dopesheet files, regularizer terms, concept specs, falloff shapes, config
files and selections by seed."""

from __future__ import annotations

import re
from typing import Callable

import pytest

from anchoring import experiments
from anchoring.anchor import Concept, build_term
from anchoring.anchor.concepts import build_concepts
from anchoring.config import ConceptConfig
from anchoring.control.falloff import Constant, parse_falloff
from anchoring.errors import AnchoringError
from anchoring.evaluate.selection import edit_summary
from anchoring.schedule.dopesheet import read_dopesheet
from anchoring.schedule.track import Track

CONCEPT = Concept("red", None, anchor=(1.0, 0.0, 0.0))

CASES: dict[str, tuple[Callable[[], object], str]] = {
    "track space": (lambda: Track([(0, 1.0)], space="cubic", name="lr"), r"^lr: unknown space 'cubic'"),
    "track interpolation": (lambda: Track([(0, 1.0)], interp="wobbly", name="lr"), r"^lr: unknown interpolation 'wobbly'"),
    "track without keys": (lambda: Track([], name="lr"), r"^lr: a track needs at least one keyframe$"),
    "track keyed twice": (lambda: Track([(5, 1.0), (5, 2.0)], name="lr"), r"^lr: two keyframes at step 5$"),
    "track log of zero": (lambda: Track([(0, 0.0)], space="log", name="lr"), r"^lr: log-space value must be > 0, got 0$"),
    "retarget backwards": (lambda: Track([(0, 1.0), (10, 2.0)], name="w").retarget(5, 3.0, until=5),
                           r"^w: retarget must end after it starts \(5 ≤ 5\)$"),
    "dopesheet file missing": (lambda: read_dopesheet("/nonexistent/s.csv"), r"^cannot read dopesheet '/nonexistent/s.csv': "),
    "anchor towards nothing": (lambda: build_term("anchor", "w", latent_dim=3, direction=[0.0, 0.0, 0.0]),
                               r"^term 'anchor': direction must be non-zero$"),
    "anti-subspace without dims": (lambda: build_term("anti-subspace", "w", latent_dim=3),
                                   r"^term 'anti-subspace': anti-subspace needs dims \(or a concept with dims\)$"),
    "residual-toward without a concept": (lambda: build_term("residual-toward", "w", latent_dim=3, dims=[0], toward=CONCEPT),
                                          r"residual-toward needs a concept \(whose residual it moves\)$"),
    "concept twice": (lambda: build_concepts([ConceptConfig(name="red"), ConceptConfig(name="red")], 3, lambda n: None),
                      r"^concept 'red' is defined twice$"),
    "anchor and axis": (lambda: build_concepts([ConceptConfig(name="red", anchor=[1, 0, 0], axis=0)], 3, lambda n: None),
                        r"^concept 'red': give an anchor or an axis, not both$"),
    "falloff power 0": (lambda: parse_falloff("power:0.2,0,1"), r"^falloff power p must be > 0, got 0.0 \(falloff 'power:0.2,0,1'"),
    "falloff ceiling below 0": (lambda: parse_falloff("linear:0.2,-1"), r"^falloff ceiling b must be ≥ 0, got -1.0"),
    "bezier outside the unit square": (lambda: parse_falloff("bezier:1.5,0,0.9,0.1,0"),
                                       r"^Bézier control x-coordinates must lie in \[0, 1\]"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_line_naming_what_is_wrong(case):
    make, message = CASES[case]
    with pytest.raises(AnchoringError, match=message) as e:
        make()
    assert "\n" not in str(e.value)


def test_no_falloff_given_is_the_full_constant_strength():
    assert parse_falloff(None) == Constant() == parse_falloff("")


def test_config_files_and_seed_lists_that_cannot_be_read_are_one_line(tmp_path):
    for bad in ("[]", "[-1]"):
        with pytest.raises(AnchoringError, match=r"^anchored.toml with --set train.seed_list: .*seed_list must be non-empty seeds ≥ 0$"):
            experiments.load("anchored", [f"train.seed_list={bad}"])
    (tmp_path / "broken.toml").write_text("kind = [\n")
    with pytest.raises(AnchoringError, match=r"^broken.toml: not valid TOML \("):
        experiments.load(str(tmp_path / "broken.toml"))
    (tmp_path / "latin.csv").write_bytes(b"STEP,lr\n0,1e-3 # \xe9t\xe9\n")  # Latin-1, not UTF-8
    spec = (experiments.HERE / "anchored.toml").read_text().replace('schedule = "anchored.csv"', 'schedule = "latin.csv"')
    (tmp_path / "mine.toml").write_text(spec)
    with pytest.raises(AnchoringError, match=r"^schedule '.*latin.csv' is not UTF-8 text$"):
        experiments.load(str(tmp_path / "mine.toml"))


def test_a_selection_by_seed_refuses_what_would_be_ambiguous():
    for seeds, selected, values, message in (([0, 0, 1], [0], [1.0, 2.0, 3.0], "seeds repeat"),
                                             ([0, 1, 2], [5], [1.0, 2.0, 3.0], r"selected seeds \[5\] are not among"),
                                             ([0, 1, 2], [1], [1.0, 2.0], "'red': 2 values for 3 seeds")):
        with pytest.raises(ValueError, match=message):
            edit_summary({"red": values}, seeds, selected)


@pytest.mark.parametrize("name", ["/tmp/elsewhere", "../../outside", "", "a b"])
def test_an_experiment_name_that_is_no_folder_name_is_refused(tmp_path, name):
    """The name becomes `runs/<name>/<time>`: an absolute one wrote outside `runs/`, `..` climbed out of
    it, and an empty one put the run straight into `runs/`."""
    from typer.testing import CliRunner

    from anchoring.cli import app

    r = CliRunner().invoke(app, ["run", "anchored", "--seeds", "1", "--steps", "3", "-q", "--set", f'name="{name}"',
                                 "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and f"experiment name {name!r} names the run's folder" in r.stderr, r.stderr
    assert "Value error" not in r.stderr and not (tmp_path / "run").exists()


def test_an_alias_shared_by_several_experiments_is_refused_not_resolved_to_the_first():
    """`ex-M4` opened lm-anchor (first by name) although six experiments carry M4."""
    with pytest.raises(AnchoringError, match=r"^'ex-M3' names \d+ experiments \(colour-transformer, .*\); give the name$"):
        experiments.find("ex-M3")
    assert experiments.find("ex-M4-ood").name == "lm-ood.toml" and experiments.find("ex-1.7").name == "sparse-labels.toml"


@pytest.mark.parametrize("experiment,item", [("anchored", "model.hidden=[true]"), ("anchored", "train.snapshot_every=true"),
                                             ("lm-control", "lm.mlp_hidden=true"), ("lm-control", "unlearning.relearn_k=[true]"),
                                             ("lm-control", "text.split=[true,0,0]"), ("colour-transformer", "language.op_weights=[true,1,1]")])
def test_true_or_false_for_any_number_is_refused(experiment, item):
    """pydantic reads true as 1: `model.hidden=[true]` trained a hidden layer of one unit, and only a few
    integer keys were checked (an optional one, `lm.mlp_hidden`, not at all)."""
    with pytest.raises(AnchoringError, match=rf"{item.split('=')[0]}: expected a number, not true/false"):
        experiments.load(experiment, [item])


def test_true_for_a_number_in_a_spec_file_is_refused(tmp_path):
    spec = tmp_path / "spec.toml"
    text = experiments.load("anchored", []).to_toml()
    spec.write_text(re.sub(r"(?m)^snapshot_every = \d+$", "snapshot_every = true", text))
    assert spec.read_text() != text
    with pytest.raises(AnchoringError, match=r"spec.toml: train.snapshot_every: expected a number"):
        experiments.load(str(spec))


def test_text_settings_refuse_nan():
    with pytest.raises(AnchoringError, match=r"text.coverage: Input should be a finite number"):
        experiments.load("lm-control", ["text.coverage=nan"])


@pytest.mark.parametrize("argv", [["anchored", "--seed", "18446744073709551615"],
                                  ["colour-transformer", "--seed", "20000000000000", "--seeds", "1"],
                                  ["lm-control", "--seed", "4294967296", "--seeds", "1"],
                                  ["anchored", "--set", "train.seed_list=[0,4294967296]"]])
def test_a_seed_too_large_for_torch_is_refused_before_the_run_is_made(tmp_path, argv):
    """It crashed with a traceback in the first step, leaving a run directory behind."""
    from typer.testing import CliRunner

    from anchoring.cli import app

    r = CliRunner().invoke(app, ["run", *argv, "--steps", "1", "--out", str(tmp_path / "r"), "-q"])
    assert r.exit_code == 2 and "seeds must be below 2**32" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("item", ["language.op_weights=[-1,1,1]", "language.op_weights=[0,0,0]",
                                  "language.split_seed=18446744073709551616"])
def test_colour_language_settings_torch_cannot_use_are_refused(item):
    """Each crashed in the first training step (or in validation) with a traceback."""
    with pytest.raises(AnchoringError, match=item.split("=")[0]):
        experiments.load("colour-transformer", [item])


def test_a_check_on_the_seed_count_sees_the_seeds_flag():
    """`--seeds 1` with one term_masks row was refused against the spec's 8 seeds."""
    from anchoring.cli.common import load_experiment

    cfg, _ = load_experiment("anchored", ["train.term_masks=[[true,true,false]]"], seeds=1)
    assert cfg.train.member_seeds() == [0] and len(cfg.train.term_masks) == 1


def test_seed_settings_a_seed_list_would_override_are_refused():
    """`--set train.seeds=5 --set train.seed=7` next to a seed_list trained the list's seeds, while
    config.toml still said seeds = 5, seed = 7 (the flags were already refused)."""
    from anchoring.cli.common import load_experiment

    with pytest.raises(AnchoringError, match=r"seed_list \[1, 2\] sets the seeds, so --set train.seeds would be ignored"):
        load_experiment("anchored", ["train.seed_list=[1,2]", "train.seeds=5"])
    assert load_experiment("anchored", ["train.seed_list=[1,2]"])[0].train.member_seeds() == [1, 2]


@pytest.mark.parametrize("item,whole", [("train.betas.0=0.5", "train.betas has a fixed length of 2"),
                                        ("train.seed_list.0=3", "train.seed_list is not set")])
def test_an_index_into_a_value_that_has_none_says_to_give_it_whole(item, whole):
    """It said the key was unknown, listing '(none)' as the valid keys."""
    with pytest.raises(AnchoringError, match=rf"{whole}; give the whole value, as in --set {item.split('.')[0]}"):
        experiments.load("anchored", [item])


def test_relative_paths_in_a_spec_are_relative_to_its_folder(tmp_path, monkeypatch):
    """A spec's schedule was read from its folder but its text.corpus from the current directory."""
    from anchoring.experiments import HERE

    (tmp_path / "spec" / "texts").mkdir(parents=True)
    spec = tmp_path / "spec" / "lm.toml"
    spec.write_text((HERE / "lm-control.toml").read_text().replace('corpus = "shakespeare"', 'corpus = "./texts"'))
    assert 'corpus = "./texts"' in spec.read_text()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert experiments.load(str(spec)).text.corpus == str(tmp_path / "spec" / "texts")
    assert experiments.load(str(spec), ["text.corpus=./here"]).text.corpus == str(tmp_path / "elsewhere" / "here")


def test_a_spec_with_a_byte_order_mark_is_read(tmp_path):
    spec = tmp_path / "bom.toml"
    spec.write_text("\ufeff" + experiments.load("anchored", []).to_toml(), encoding="utf-8")
    assert experiments.load(str(spec)).name == "anchored"


def test_a_variants_schedule_given_with_set_is_read_from_the_current_directory(tmp_path, monkeypatch):
    """It was looked for next to the built-in spec, while `--set schedule=` reads from here."""
    source = experiments.load("smooth-vs-stepped", []).variants[1].schedule  # another variant's, so the test can tell
    assert source != experiments.load("smooth-vs-stepped", []).variants[0].schedule
    (tmp_path / "mine.csv").write_text(source)
    monkeypatch.chdir(tmp_path)
    assert experiments.load("smooth-vs-stepped", ["variants.0.schedule=mine.csv"]).variants[0].schedule == source


def test_set_mends_a_bad_value_in_the_file(tmp_path):
    """The file was validated before its overrides were applied, so `--set` could not fix it."""
    spec = tmp_path / "bs1.toml"
    spec.write_text(re.sub(r"(?m)^batch_size = \d+$", "batch_size = 1", experiments.load("anchored", []).to_toml()))
    with pytest.raises(AnchoringError, match=r"bs1.toml: data.batch_size: Input should be greater than or equal to 2"):
        experiments.load(str(spec))
    assert experiments.load(str(spec), ["data.batch_size=64"]).data.batch_size == 64
    with pytest.raises(AnchoringError, match=r"bs1.toml: data.batch_size"):  # an override elsewhere: the file's error
        experiments.load(str(spec), ["train.steps=5"])


@pytest.mark.parametrize("item,why", [("terms.0.dims=[9]", "separation takes no dims"),
                                      ("terms.0.direction=[1,2]", "separation takes no direction"),
                                      ("interventions.2.falloff=linear:0,1", "ablate edits the weights at full strength"),
                                      ('interventions.2.sites=["nothing"]', "sites apply to transformer experiments")])
def test_colour_options_an_edit_or_term_would_not_use_are_refused(item, why):
    """Each was accepted, trained without effect, and written to config.toml as if it applied."""
    from anchoring.kinds import kind_of

    cfg = experiments.load("anchored", [item])
    with pytest.raises(AnchoringError, match=why):
        kind_of(cfg).validate(cfg)


def test_a_run_too_long_to_hold_names_the_steps_not_only_the_model():
    """--steps 100000000 was refused as 'lower model.hidden or model.latent_dim', while the per-step
    metrics and snapshots were what did not fit."""
    from anchoring.kinds import kind_of

    cfg = experiments.load("anchored", ["train.seeds=1", "train.steps=1000000000"])
    with pytest.raises(AnchoringError, match="fewer --steps or a larger train.snapshot_every"):
        kind_of(cfg).validate(cfg)


@pytest.mark.parametrize("text, message", [
    ('kind = "colour"\nname = "t"\n[train]\nstep = 5\n', r"t\.toml: train\.step: key means nothing for a 'colour' experiment "
                                                        r"\(did you mean train\.steps\?\)$"),
    ('kind = "lm"\nname = "t"\n[lm]\nwidht = 5\n', r"lm\.widht: .* \(did you mean lm\.width\?\)$"),
    ('kind = "lm"\nname = "t"\nshcedule = "x"\n', r"shcedule: .* \(did you mean schedule\?\)$"),
    ('kind = "transformer"\nname = "t"\n[language]\nzzz = 1\n', r"language\.zzz: key means nothing for a 'transformer' experiment$"),
])
def test_a_misspelt_key_in_a_spec_file_is_named_with_the_key_it_was_meant_to_be(tmp_path, text, message):
    """A spec file's unknown key said only that it meant nothing (`--set` lists the valid keys)."""
    spec = tmp_path / "t.toml"
    spec.write_text(text)
    with pytest.raises(AnchoringError, match=message):
        experiments.load(str(spec), [])
