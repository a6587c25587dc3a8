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
