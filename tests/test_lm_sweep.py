"""LM experiments through `anchoring sweep`: a grid point's seeds trained as shards in worker
processes (one killed mid-training and resumed), merged into a run directory that only evaluates,
with the same weights and numbers as one `run` in one process."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from anchoring import experiments, lifecycle, sweep
from anchoring.errors import AnchoringError
from anchoring.kinds.lm.data import load_data
from anchoring.kinds.lm.shards import sweep_row
from anchoring.kinds.lm.training import LMTask, train_arm
from anchoring.sweep.worker import FAULT_ENV
from anchoring.train.checkpoint import steps_done
from test_lm_kind import SCHEDULE, tiny, write_corpus

STEPS = 20


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """A spec file of a tiny two-arm, two-seed LM experiment (the sweep takes a name or a path)."""
    root = tmp_path_factory.mktemp("lm-sweep")
    corpus = write_corpus(root / "texts")
    cfg = experiments.load("lm-anchor-passages", tiny(corpus, f"train.steps={STEPS}", "train.seeds=2",
                                             'lm.arms=["anchored","control"]'))
    path = root / "tiny-lm.toml"
    path.write_text(cfg.model_copy(update={"schedule": SCHEDULE}).to_toml())
    return path


def _numbers(x, prefix=""):
    """Every number in a summary, by its path (timings left out)."""
    if isinstance(x, dict):
        for k, v in x.items():
            if "timing" not in str(k) and not str(k).endswith("_s"):
                yield from _numbers(v, f"{prefix}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{prefix}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield prefix, float(x)


def _refuse_training(monkeypatch):
    def step(self, step):
        raise AssertionError(f"{self.arm} seed {self.seed} trained step {step} again")

    monkeypatch.setattr(LMTask, "step", step)


def test_lm_grid_sweep_equals_one_run_per_point(spec, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "15")  # every shard's first process dies at step 15 (checkpoint at 10)
    # the shards train in worker processes; this process only merges and evaluates, so any step here fails
    _refuse_training(monkeypatch)
    out = tmp_path / "sw"
    summary = sweep.sweep(str(spec), out, grid=sweep.parse_grid(["text.coverage=0.5,1.0"]), workers=2)
    shards = sorted((out / "shards").iterdir())
    assert [s.name for s in shards] == ["p000-s0-1", "p001-s0-1"]  # one shard per point: both seeds, both arms
    assert all((s / "attempt2.log").is_file() and not (s / "attempt3.log").exists() for s in shards)
    monkeypatch.undo()

    assert [p["point"] for p in summary["points"]] == ["text.coverage=0.5", "text.coverage=1.0"]
    for p in summary["points"]:
        assert p["seeds"] == 2
        for arm in ("anchored", "control"):
            for key in ("loss_all", "loss_concept", "loss_retain", "margin@blocks.0", "margin@blocks.1"):
                assert math.isfinite(p[f"{arm}_{key}"]), (arm, key)
    assert json.loads((out / "summary.json").read_text())["points"][1]["path"].endswith("text.coverage=1.0")
    assert "alignment per layer" in (out / "report.html").read_text()
    with pytest.raises(AnchoringError, match=r"is a sweep: its table is in .*report.html.*points/text.coverage=0.5"):
        lifecycle.show(out)  # was "not a run directory"
    from typer.testing import CliRunner

    from anchoring.cli import app

    r = CliRunner().invoke(app, ["show", str(out)])  # the CLI prints the grid's table (it refused, too)
    assert r.exit_code == 0, r.stderr
    row = next(x for x in r.stdout.splitlines() if "anchored_loss_retain" in x)
    assert [c.strip() for c in row.split("│")[2:4]] == [f"{p['anchored_loss_retain']:.3f}" for p in summary["points"]]
    assert "text.coverage=0.5" in r.stdout and str(out / "points" / "text.coverage=1.0") in r.stdout

    point = out / "points" / "text.coverage=0.5"
    run = lifecycle.load_run(point)
    assert run.config.text.coverage == 0.5 and run.seeds == [0, 1] and set(run.arms) == {"anchored", "control"}
    ref_path = tmp_path / "ref"
    ref = lifecycle.run(experiments.load(str(spec), ["text.coverage=0.5"]), ref_path)
    ref_run = lifecycle.load_run(ref_path)
    for arm in ("anchored", "control"):
        for seed in (0, 1):
            a, b = run.model(arm, seed).state_dict(), ref_run.model(arm, seed).state_dict()
            for k in a:
                torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=f"{arm} seed {seed} {k}")
    assert ref.summary["seeds"] == run.summary["seeds"]
    t = run.summary["timing"]  # the merged point trained nothing: no training seconds of its own, the jobs' own kept
    assert t["train_s"] is None and t["load_s"] >= 0 and ref.summary["timing"]["train_s"] > 0
    assert all(t[f"{arm}-seed{seed}_s"] > 0 for arm in ("anchored", "control") for seed in (0, 1))
    mine, theirs = dict(_numbers(run.summary)), dict(_numbers(lifecycle.show(ref_path).summary))  # both as saved
    assert mine.keys() == theirs.keys() and len(mine) > 50
    for k, v in theirs.items():
        assert mine[k] == pytest.approx(v, abs=1e-6, nan_ok=True), k
    assert (point / "metrics.csv").read_text().count("\n") == 1 + STEPS * 4  # nothing lost, nothing twice


def test_an_lm_sweep_on_ray_trains_each_shard_in_scratch_space_and_merges_like_a_run(spec, tmp_path, monkeypatch):
    """Every Ray task (a stand-in running in this process) runs the real shard body: the LM's
    checkpoints sit under `arms/` in a shard, so they must come back by their path, not their name."""
    from test_sweep_backends import FakeRay

    monkeypatch.setitem(sys.modules, "ray", FakeRay())
    out = tmp_path / "sw"
    sweep.sweep(str(spec), out, workers=2, backend="ray")
    shards = sorted((out / "shards").iterdir())  # one shard per seed
    assert [sorted(p.name for p in (d / "arms").iterdir()) for d in shards] == [
        [f"anchored-seed{s}.safetensors", f"control-seed{s}.safetensors"] for s in (0, 1)]
    run = lifecycle.load_run(out)
    ref = lifecycle.load_run(lifecycle.run(experiments.load(str(spec)), tmp_path / "ref").path)
    for arm in ("anchored", "control"):
        for seed in (0, 1):
            a, b = run.model(arm, seed).state_dict(), ref.model(arm, seed).state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a), (arm, seed)


def test_lm_sweep_plans_one_shard_per_seed_block(spec, tmp_path):
    _, shards = sweep.plan(str(spec), [], sweep.parse_grid(["text.coverage=0.5,1.0"]), 4, tmp_path)
    assert [(s.point, s.seeds) for s in shards] == [(0, [0]), (0, [1]), (1, [0]), (1, [1])]
    assert all(s.config.train.seed_list == s.seeds for s in shards)
    with pytest.raises(AnchoringError, match="lm.nproc"):
        sweep.plan(str(spec), ["lm.nproc=2"], [], 2, tmp_path)


def test_a_finished_lm_checkpoint_is_only_read(spec, tmp_path, monkeypatch):
    cfg = experiments.load(str(spec), ["train.steps=10"])
    data = load_data(cfg.text)
    ckpt = tmp_path / "a.safetensors"
    first = train_arm(cfg, data, 0, "anchored", checkpoint=ckpt)
    assert steps_done(ckpt) == 10
    before = ckpt.stat().st_mtime_ns, ckpt.read_bytes()
    _refuse_training(monkeypatch)
    again = train_arm(cfg, data, 0, "anchored", checkpoint=ckpt)
    assert (ckpt.stat().st_mtime_ns, ckpt.read_bytes()) == before  # not even re-saved
    for (k, v), w in zip(first.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(v, w), k


def test_lm_sweep_row_takes_unlearning_medians_when_present():
    summary = {"seeds": [0, 1], "arms": ["anchored"], "anchored_sites": ["blocks.1"],
               "median": {"anchored": {"loss": {"all": 1.5, "concept": 2.0, "retain": 1.4},
                                       "alignment": {"blocks.1": {"margin": 0.4}}}}}
    row = sweep_row(summary)
    assert row == {"seeds": 2, "anchored_loss_all": 1.5, "anchored_loss_concept": 2.0, "anchored_loss_retain": 1.4,
                   "anchored_margin@blocks.1": 0.4}
    summary["unlearning"] = {"rows": [{"method": "delete", "seed": 0, "R": 0.2, "d_forget_concept": 1.0},
                                      {"method": "delete", "seed": 1, "R": 0.4, "d_forget_concept": 3.0},
                                      {"method": "relearn", "seed": 0, "R": 0.9, "d_forget_concept": 0.5}]}
    row = sweep_row(summary)
    assert row["delete_R"] == pytest.approx(0.3) and row["delete_d_forget_concept"] == pytest.approx(2.0)
    assert row["relearn_R"] == 0.9 and row["relearn_d_forget_concept"] == 0.5
    assert not [k for k in row if k.endswith("_diverged_seeds")]
    summary["unlearning"]["rows"] += [{"method": "delete", "seed": 2, "R": None, "d_forget_concept": None,
                                       "repair_diverged": "the repair's fine-tuning diverged at step 1"},
                                      {"method": "relearn", "seed": 1, "R": 0.8, "d_forget_concept": 0.4,
                                       "relearn": {"64": {"diverged": "fine-tuning diverged at step 3"}}}]
    row = sweep_row(summary)  # the medians leave the broken seeds out, and the row says how many there were
    assert row["delete_R"] == pytest.approx(0.3) and row["delete_diverged_seeds"] == 1 and row["relearn_diverged_seeds"] == 1
    summary["arms"].append("control")  # each arm's own numbers, not the first arm's under every name
    summary["median"]["control"] = {"loss": {"all": 1.6, "concept": 2.1, "retain": 1.5}, "alignment": {"blocks.1": {"margin": 0.1}}}
    row = sweep_row(summary)
    assert (row["control_margin@blocks.1"], row["anchored_margin@blocks.1"]) == (0.1, 0.4)
    assert (row["control_loss_all"], row["control_loss_concept"], row["control_loss_retain"]) == (1.6, 2.1, 1.5)


def test_a_coverage_grid_draws_r_against_coverage(tmp_path):
    from types import SimpleNamespace

    from anchoring.kinds.lm.shards import grid_figures

    def point(cov, r_anchor):
        rows = [{"method": "oracle filter", "seed": 0, "R": 1.0}, {"method": "anchoring · delete", "seed": 0, "R": r_anchor}]
        return ([f"text.coverage={cov}"], SimpleNamespace(summary={"kind": "lm", "unlearning": {"rows": rows}}))

    figs = grid_figures(tmp_path, [point(0.1, 0.2), point(0.3, 0.5)])
    assert len(figs) == 1 and figs[0][1].stat().st_size > 5000
    assert grid_figures(tmp_path / "one", [point(0.3, 0.5)]) == []  # one coverage is no curve
    other = ([ "text.false_positives=0.1"], point(0.3, 0.5)[1])
    assert grid_figures(tmp_path / "fp", [other, other]) == []  # a grid that does not vary coverage


def test_r_against_coverage_keeps_the_grids_other_axes_apart(tmp_path, monkeypatch):
    """With a second grid axis, points of one coverage differ in more than their seeds: averaging them
    would draw an R that no run had. Without the oracle-filtered arm no point has an R: no figure."""
    from types import SimpleNamespace

    import anchoring.kinds.lm.figures as figures
    from anchoring.kinds.lm.shards import grid_figures
    from anchoring.kinds.lm.unlearning import MATCHED_DELETE

    drawn = []
    monkeypatch.setattr(figures, "coverage_figure", lambda points: drawn.append(points) or figures.plt.figure())

    def point(cov, fp, r):
        rows = [{"method": "anchoring · delete", "R": r}, {"method": MATCHED_DELETE, "R": 5.0}]
        return [f"text.coverage={cov}", f"text.false_positives={fp}"], SimpleNamespace(summary={"unlearning": {"rows": rows}})

    results = [point(0.1, 0, 0.2), point(0.1, 0.5, 0.8), point(1.0, 0, 0.4), point(1.0, 0.5, 0.6)]
    assert len(grid_figures(tmp_path, results)) == 1
    series = {}
    for cov, label, r in drawn[0]:
        series.setdefault(label, []).append((cov, r))
    assert series == {"anchoring · delete · text.false_positives=0": [(0.1, 0.2), (1.0, 0.4)],
                      "anchoring · delete · text.false_positives=0.5": [(0.1, 0.8), (1.0, 0.6)]}
    no_r = [([f"text.coverage={c}"], SimpleNamespace(summary={"unlearning": {"rows": [{"method": "m", "R": r}]}}))
            for c, r in ((0.3, float("nan")), (1.0, None))]
    assert grid_figures(tmp_path, no_r) == []


def test_shards_that_trained_on_different_corpora_are_not_merged(spec, tmp_path):
    from anchoring.kinds.lm.shards import merge_shards

    cfg = experiments.load(str(spec))
    shards = [tmp_path / "a", tmp_path / "b"]
    for i, d in enumerate(shards):
        d.mkdir()
        (d / "tokenizer.json").write_text('{"kind": "char", "chars": "ab"}')
        (d / "corpus.json").write_text(f'{{"sha256": "{i}", "passages": 1}}')
    (tmp_path / "point").mkdir()
    with pytest.raises(AnchoringError, match="trained on different corpora"):
        merge_shards(cfg, shards, tmp_path / "point")
    (shards[1] / "corpus.json").write_text('{"sha256": "0", "passages": 1}')  # the same corpus, another tokenizer
    (shards[1] / "tokenizer.json").write_text('{"kind": "char", "chars": "abc"}')
    with pytest.raises(AnchoringError, match="trained different tokenizers"):
        merge_shards(cfg, shards, tmp_path / "point")


def test_the_memory_check_counts_every_shard_that_trains_at_once(spec, tmp_path, monkeypatch):
    """Each shard process passes its own memory check, so the sweep must add up the shards its
    workers train side by side: four that fit alone may not fit together. Finished shards of a
    continued sweep train nothing, and a Ray cluster trains on its own machines."""
    from anchoring import resources
    from anchoring.kinds import kind_of
    from anchoring.kinds.lm.checks import memory_estimate
    from anchoring.sweep.layout import DONE

    grid = sweep.parse_grid(["text.coverage=0.5,1.0"])
    _, shards = sweep.plan(str(spec), [], grid, 4, tmp_path)
    one = max(kind_of(s.config).shard_memory(s.config) for s in shards)
    # a shard keeps checkpoints, not models: unlike a run, it is not charged for the models it finished
    more = shards[0].config.model_copy(update={"train": shards[0].config.train.model_copy(update={"seeds": 50})})
    assert kind_of(more).shard_memory(more) == kind_of(more).shard_memory(shards[0].config)
    assert memory_estimate(more) > memory_estimate(shards[0].config)
    monkeypatch.setattr(resources, "available_bytes", lambda: int(2.5 * one / 0.8))  # room for two, not four
    sweep.check_memory(shards, 2)
    with pytest.raises(AnchoringError, match="4 shards training at once.*--workers"):
        sweep.check_memory(shards, 4)
    with pytest.raises(AnchoringError, match="4 shards training at once"):
        sweep.sweep(str(spec), tmp_path / "sw", grid=grid, workers=4)
    assert not (tmp_path / "sw").exists()
    for s in shards[:2]:
        s.dir.mkdir(parents=True)
        (s.dir / DONE).write_text("ok\n")
    sweep.check_memory(shards, 4)  # two left to train

    def remote(*a, **k):
        raise RuntimeError("reached the Ray backend")

    monkeypatch.setattr("anchoring.sweep.backends.run_ray", remote)
    with pytest.raises(RuntimeError, match="reached the Ray backend"):
        sweep.sweep(str(spec), tmp_path / "sw-ray", grid=grid, workers=4, backend="ray", address="ray://cluster:10001")


def test_a_shard_stopped_before_the_last_step_is_not_merged(spec, tmp_path, monkeypatch):
    from anchoring.kinds.lm import shards
    from anchoring.kinds.lm.kind import checkpoint_path

    cfg = experiments.load(str(spec))
    shard = tmp_path / "a"
    shard.mkdir()
    (shard / "tokenizer.json").write_text('{"kind": "char", "chars": "ab"}')
    for arm, seed in shards.jobs(cfg):
        checkpoint_path(shard, arm, seed).parent.mkdir(parents=True, exist_ok=True)
        checkpoint_path(shard, arm, seed).write_bytes(b"x")
    (tmp_path / "point").mkdir()
    monkeypatch.setattr(shards, "steps_done", lambda _p: shards.total_steps(cfg) - 1)
    with pytest.raises(AnchoringError, match="stopped at step"):
        shards.merge_shards(cfg, [shard], tmp_path / "point")
    monkeypatch.setattr(shards, "steps_done", lambda _p: shards.total_steps(cfg))
    shards.merge_shards(cfg, [shard], tmp_path / "point")
    assert all(checkpoint_path(tmp_path / "point", arm, seed).is_file() for arm, seed in shards.jobs(cfg))


def test_a_shards_callbacks_see_each_step_counted_from_zero(spec, tmp_path, monkeypatch):
    from anchoring.kinds.lm import shards

    cfg = experiments.load(str(spec))
    monkeypatch.setattr(shards, "load_data", lambda *_a: None)

    def train_arm(cfg, data, seed, arm, checkpoint, progress):
        for done in range(1, 4):  # steps done so far, as training reports them
            progress(done)

    monkeypatch.setattr(shards, "train_arm", train_arm)
    seen: list[int] = []
    shards.train_shard(cfg, tmp_path, [seen.append])
    assert seen == [0, 1, 2] * len(shards.jobs(cfg))
