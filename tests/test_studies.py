"""A compare study's variant names: each names a folder and a row, so a bad or repeated one is refused
before any variant trains."""

import pytest
from typer.testing import CliRunner

from anchoring import experiments, lifecycle
from anchoring.cli import app
from anchoring.config import VariantConfig
from anchoring.errors import AnchoringError
from anchoring.kinds.colour import kind as colour_kind

SMOOTH, STEPPED = "smooth-curriculum.csv", "stepped-curriculum.csv"


def _config_file(tmp_path, variants):
    """smooth-vs-stepped with its [[variants]] replaced, schedules given as absolute paths."""
    base = experiments.find("smooth-vs-stepped")
    text = base.read_text().split("[[variants]]")[0].replace(f'"{SMOOTH}"', f'"{base.parent / SMOOTH}"')
    blocks = "".join(f'[[variants]]\nname = "{n}"\nschedule = "{base.parent / s}"\n\n' for n, s in variants)
    rest = base.read_text().split("[model]", 1)[1]
    path = tmp_path / "study.toml"
    path.write_text(f"{text}{blocks}[model]{rest}")
    return path


CASES = {
    "same name, other schedules": ([("smooth", SMOOTH), ("smooth", STEPPED)], "'smooth' given more than once"),
    "same name, same schedule": ([("smooth", SMOOTH), ("smooth", SMOOTH)], "'smooth' given more than once"),
    "a path, not a name": ([("a/b", SMOOTH), ("stepped", STEPPED)], "'a/b' must each be one folder name"),
    "the parent folder": ([("..", SMOOTH), ("stepped", STEPPED)], "'..' must each be one folder name"),
    "hidden folder": ([(".x", SMOOTH), ("stepped", STEPPED)], "'.x' must each be one folder name"),
}


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*a, **k):
        pytest.fail("a variant trained before the study was refused")

    monkeypatch.setattr(colour_kind, "train", refuse)
    monkeypatch.setattr(lifecycle, "_execute", refuse)


@pytest.mark.parametrize("variants, message", CASES.values(), ids=CASES.keys())
def test_bad_variant_names_are_refused_in_one_line_before_training(tmp_path, variants, message, no_training):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", str(_config_file(tmp_path, variants)), "--seeds", "1", "--steps", "30",
                                 "--out", str(out), "-q"])
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "--out" not in lines[0]  # the problem is the config, not the output folder
    assert not out.exists()


@pytest.mark.parametrize("variants, message", CASES.values(), ids=CASES.keys())
def test_validate_refuses_bad_variant_names(variants, message):
    cfg = experiments.load("smooth-vs-stepped")
    cfg = cfg.model_copy(update={"variants": [VariantConfig(name=n, schedule=v.schedule)
                                              for (n, _), v in zip(variants, cfg.variants)]})
    with pytest.raises(AnchoringError, match=message.replace(".", r"\.")) as e:
        lifecycle.validate(cfg)
    assert "\n" not in str(e.value)


def test_distinct_safe_variant_names_pass():
    lifecycle.validate(experiments.load("smooth-vs-stepped"))  # smooth, stepped


STUDY_REFUSALS = [  # each used to train (or crash after writing a folder) instead of a line before anything
    ("regularizer-combinations", ["combine=['planar','planar']"], "combine names 'planar' more than once"),
    ("regularizer-combinations", ['reactive=[{param="norm", metric="loss", target=0.1}]'],
     "would steer every subset by the median of all of them"),
    ("regularizer-combinations", ["evaluate.min_cosine=-2.0"], "min_cosine"),
    ("regularizer-combinations", ['interventions=[{name="a", method="ablate", concept="red"}]'],
     "a combinations study runs no [[interventions]]"),
    ("anchored", ["combine=['anchor:red']"], 'combine is read by study = "combinations" only'),
    ("anchored", ['variants=[{name="a", schedule="anchored.csv"}, {name="b", schedule="anchored.csv"}]'],
     '[[variants]] are trained by study = "compare" only'),
]


@pytest.mark.parametrize("experiment, sets, message", STUDY_REFUSALS)
def test_study_settings_that_cannot_do_what_they_say_are_refused_before_training(experiment, sets, message, no_training):
    with pytest.raises(AnchoringError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        lifecycle.validate(experiments.load(experiment, ["train.seeds=1", "train.steps=5", *sets]))
    assert "\n" not in str(e.value)


def test_a_variant_whose_schedule_misses_a_column_is_named(tmp_path, no_training):
    bad = tmp_path / "no-repel.csv"
    base = experiments.find("smooth-vs-stepped").parent
    lines = (base / STEPPED).read_text().splitlines()
    drop = lines[0].split(",").index("repel")
    bad.write_text("\n".join(",".join(c for i, c in enumerate(r.split(",")) if i != drop) for r in lines) + "\n")
    cfg = experiments.load("smooth-vs-stepped")
    cfg = cfg.model_copy(update={"variants": [cfg.variants[0], VariantConfig(name="stepped", schedule=bad.read_text())]})
    with pytest.raises(AnchoringError, match="^variant 'stepped': schedule has no column 'repel'"):
        lifecycle.validate(cfg)


def test_a_combinations_study_without_an_anchor_shows_and_names_its_always_on_terms(tmp_path):
    """Its table printed through `show` used to fail on the NaN anchor median ("not a summary of a
    'colour' run"), and the rows did not say which terms were on for every member."""
    out = tmp_path / "rc"
    r = CliRunner().invoke(app, ["run", "regularizer-combinations", "--set", "train.steps=5", "--set", "train.seeds=1",
                                 "--set", "combine=['planar','norm']", "--set", "evaluate.concept=''", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.stderr
    shown = CliRunner().invoke(app, ["show", str(out)])
    assert shown.exit_code == 0, shown.stderr
    assert "anchor      –°" in shown.stdout and "on in every subset as well (not in combine): " in shown.stdout
    report = (out / "report.html").read_text()
    assert "On in every subset as well (not in combine)" in report and "anchor within" not in report
    assert '<a href="ensemble/report.html">' in report and (out / "ensemble" / "report.html").is_file()
    # the ensemble's page repeats seeds, one row per subset: each row says which terms it trained with
    page = (out / "ensemble" / "report.html").read_text()
    assert "<th>terms on</th>" in page
    assert "<td>separation+planar+norm-v+polar</td>" in page and "<td>separation+norm+norm-v+polar</td>" in page


def test_the_subset_thumbnails_titles_stay_clear_of_the_panel_above():
    """A subset of six terms has a six-line title; the rows were a fixed height and those titles ran
    into the panels above them (`regularizer-combinations`' combinations.png)."""
    import itertools

    import torch

    from anchoring.domains.colour import rgb_grid
    from anchoring.report import figures

    names = ["anchor", "separate", "unitarity", "norm", "planarity", "anti"]
    subsets = [" + ".join(c) for r in (1, 5, 6) for c in itertools.combinations(names, r)]  # long titles in the lower rows
    grid = rgb_grid(4)
    fig = figures.thumbnail_grid(torch.rand(len(subsets), len(grid), 4), grid, subsets, (0, 1))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_title()]
    for ax in axes:
        title = ax.title.get_window_extent(renderer)
        for other in axes:
            if other is not ax:
                assert not title.overlaps(other.get_window_extent(renderer)), (ax.get_title(), other.get_title())
    figures.plt.close(fig)
