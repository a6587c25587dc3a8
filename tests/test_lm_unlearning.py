"""The LM unlearning evaluation on a tiny run: every method a row, anchoring's deletion hits the
concept harder than the rest, R is relative to the oracle filter, curves have one point per step,
and the numbers repeat exactly; plus the post-hoc and edit building blocks on their own."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from anchoring import experiments, lifecycle, runs
from anchoring.cli import app
from anchoring.control.erasure import mean_difference
from anchoring.errors import AnchoringError
from anchoring.kinds.lm import report
from anchoring.kinds.lm import unlearning as ul
from anchoring.kinds.lm import unlearning_table as ut
from anchoring.kinds.lm.edits import Suppressed, delete, matched_directions, orthonormal
from anchoring.kinds.lm.figures import coverage_figure
from anchoring.models import NormalizedTransformer
from test_lm_kind import SCHEDULE, tiny, write_corpus

ARMS = '["anchored","control","weak-filtered","oracle-filtered"]'
UNLEARNING = ["unlearning.enabled=true", "unlearning.relearn_k=[2]", "unlearning.relearn_steps=3",
              "unlearning.recover_steps=3", "unlearning.eval_chars=1500", "unlearning.fit_positions=600"]


@pytest.fixture(scope="module")
def unlearned(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("lm-unlearn-corpus") / "texts")
    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=400", f"lm.arms={ARMS}", *UNLEARNING))
    out = tmp_path_factory.mktemp("lm-unlearn") / "run"
    outcome = lifecycle.run(cfg.model_copy(update={"schedule": SCHEDULE}), out)
    return out, outcome.summary


def test_every_method_is_a_row_and_anchoring_delete_hits_the_concept(unlearned):
    path, summary = unlearned
    u = summary["unlearning"]
    methods = {r["method"] for r in u["rows"]}
    rows = {r["method"]: r for r in u["rows"]}
    a = rows["anchoring · delete"]
    assert methods == {"anchoring · delete", "anchoring · blind", "anchoring · suppress", "anchoring · matched random move",
                       "anchoring · matched random deletion", ul.MATCHED_BLIND, "mean-difference · delete",
                       "mean-difference · blind", "mean-difference · suppress", "LEACE · delete", "LEACE · blind",
                       "LEACE · suppress", "weak filter", "oracle filter", *([ul.MATCHED_COST] if a["retain_cost"] > ul.TINY else [])}
    b, rb = rows["anchoring · blind"], rows[ul.MATCHED_BLIND]  # the readers' edit: attacked; its control: not
    assert b["fine_tuned"] and set(b["relearn"]) == {"2"} and "leftover" not in b and b["before"] == a["before"]
    assert not rb["fine_tuned"] and not rb["relearn"] and b["d_forget_concept"] > rb["d_forget_concept"]
    assert rows["mean-difference · blind"]["fine_tuned"] and rows["LEACE · blind"]["fine_tuned"]
    line = summary["targets"]["anchoring · blind: Δforget at concept positions ≥ 0.5 nats/char"]
    assert line["median"] == pytest.approx(b["d_forget_concept"])
    assert "Δforget (concept) of anchoring · blind ≥ 3 × mean-difference · blind" in summary["targets"]
    assert a["d_forget_concept"] > a["retain_cost"] and a["d_forget_concept"] > 0.05, a
    assert rows["oracle filter"]["R"] == 1.0
    assert rows["anchoring · delete"]["leftover"] < 1e-5  # a basis axis: removed exactly
    assert all(0.0 <= rows[m]["leftover"] < 1.0 for m in ("mean-difference · delete", "LEACE · delete"))
    assert "leftover" not in rows["anchoring · suppress"] and "leftover" not in rows["oracle filter"]
    assert all(math.isfinite(r["R"]) for r in u["rows"])
    for hook in ("anchoring · suppress", "mean-difference · suppress", "LEACE · suppress"):  # attacked with the hook in place
        assert rows[hook]["fine_tuned"] and set(rows[hook]["relearn"]) == {"2"}, hook
    ctl = rows["anchoring · matched random move"]
    assert not ctl["fine_tuned"] and not ctl["relearn"] and ctl["recover_steps"] is None and ctl["d_forget_concept"] != 0.0
    assert ctl["d_forget_concept"] != rows["anchoring · suppress"]["d_forget_concept"]
    rnd = rows["anchoring · matched random deletion"]  # the delete row's control: other axes, removed exactly, not attacked
    assert not rnd["fine_tuned"] and not rnd["relearn"] and rnd["recover_steps"] is None and rnd["leftover"] < 1e-5
    assert rnd["before"] == a["before"] and rnd["d_forget_concept"] != a["d_forget_concept"]
    assert set(rows["weak filter"]["relearn"]) == {"2"}
    header, table = ut.table(u)
    assert [r[-1] for r in table if r[0] == "anchoring · matched random deletion"] == ["control", "control"]
    assert len(table) == 2 * len(methods) and all(len(r) == len(header) for r in table)
    assert (path / "figures" / "unlearning_tradeoff.png").stat().st_size > 3000
    assert (path / "figures" / "relearning_curves.png").stat().st_size > 3000
    assert "Unlearning" in (path / "report.html").read_text()
    from anchoring.kinds.lm.shards import sweep_row

    row = sweep_row(summary)  # what a coverage sweep's grid report shows for this point
    assert row["anchoring · delete_d_forget_concept"] == pytest.approx(a["d_forget_concept"])
    assert row["oracle filter_R"] == 1.0
    t = summary["targets"]["anchoring · delete: Δforget at concept positions ≥ 0.5 nats/char"]
    assert t["median"] == pytest.approx(a["d_forget_concept"]) and t["met"] == (a["d_forget_concept"] >= 0.5)
    md = rows["mean-difference · delete"]
    ratio = summary["targets"]["Δforget (concept) of anchoring · delete ≥ 3 × mean-difference · delete"]["median"]
    assert ratio == pytest.approx(a["d_forget_concept"] / md["d_forget_concept"]) or md["d_forget_concept"] <= 0
    r = CliRunner().invoke(app, ["show", str(path)])
    assert r.exit_code == 0 and "unlearning" in r.stdout and "they are fine-tuned" in r.stdout


def test_every_rows_derived_numbers_follow_from_its_losses_and_curves(unlearned):
    """Each row's stored selectivity, kept share and steps to recover, recomputed from its own losses and
    from the per-step curves the run wrote: the definitions of docs/method.md, row by row."""
    path, summary = unlearned
    u = summary["unlearning"]
    points = pd.read_csv(path / u["curves"]).to_dict("records")
    checked = {"kept": 0, "recover": 0}
    for r in u["rows"]:
        want = ul.selectivity(r["d_forget_concept"], r["retain_cost"])
        got = r["selectivity"]
        assert (math.isnan(want) and (got is None or math.isnan(got))) or got == pytest.approx(want), r["method"]
        for k, rel in (r.get("relearn") or {}).items():
            curve = [p for p in points if p["method"] == r["method"] and p["seed"] == r["seed"] and p["fine_tune"] == f"relearn K={k}"]
            curve.sort(key=lambda p: p["step"])
            lowest, start = min(p["forget_concept"] for p in curve), curve[0]["forget_concept"]
            assert rel["lowest"] == pytest.approx(lowest) and rel["after_edit"] == pytest.approx(start)
            assert rel["relearned"] == pytest.approx(lowest - curve[0]["control_concept"])
            # kept is measured from the unedited model's own loss on the same text: for an edit of the anchored arm
            # that is not the control's (for the filters and post-hoc edits "before" is the control itself)
            if r["arm"] == "anchored":
                assert rel["before_edit"] != pytest.approx(curve[0]["control_concept"], abs=1e-4)
            if start - rel["before_edit"] >= ul.KEPT_FLOOR:
                assert rel["kept"] == pytest.approx((lowest - rel["before_edit"]) / (start - rel["before_edit"]))
                checked["kept"] += 1
            else:
                assert rel["kept"] is None or math.isnan(rel["kept"])
        if r["fine_tuned"]:
            rec = sorted((p for p in points if p["method"] == r["method"] and p["seed"] == r["seed"]
                          and p["fine_tune"] == "recover"), key=lambda p: p["step"])
            first = next((p["step"] for p in rec if p["forget_concept"] <= p["control_concept"]), None)
            assert r["recover_steps"] == first and ut._nothing_to_recover(r) == (first == 0), r["method"]
            checked["recover"] += 1
    assert checked["recover"] >= 5 and checked["kept"] >= 1, checked


def test_the_mean_difference_deletion_is_compared_at_anchorings_retain_cost(unlearned):
    """The ≥ 3 × target is stated at one retain cost: the dearer mean-difference deletion is dialled down
    to the anchored deletion's cost (bisection on the strength), and the target line divides by that row."""
    path, summary = unlearned
    rows = {(r["method"], r["seed"]): r for r in summary["unlearning"]["rows"]}
    seeds = sorted({s for _m, s in rows})
    for seed in seeds:
        a, md = rows["anchoring · delete", seed], rows["mean-difference · delete", seed]
        got = rows.get((ul.MATCHED_COST, seed))
        assert (got is not None) == (a["retain_cost"] > ul.TINY)
        if got is None:
            continue
        assert got["before"] == md["before"] and not got["fine_tuned"] and got["relearn"] == {}
        assert 0.0 < got["strength"] <= 1.0
        if md["retain_cost"] <= a["retain_cost"]:  # already cheaper in full: left as it is
            assert got["strength"] == 1.0 and got["after"] == md["after"]
        else:
            assert got["strength"] < 1.0 and got["retain_cost"] == pytest.approx(a["retain_cost"], abs=2e-3)
    line = summary["targets"].get("Δforget (concept) of anchoring · delete ≥ 3 × mean-difference · delete at the same retain cost")
    matched = [rows[ul.MATCHED_COST, s] for s in seeds if (ul.MATCHED_COST, s) in rows]
    assert (line is not None) == bool(matched)
    if matched:
        want = ut.ranked_median([ul.ratio(rows["anchoring · delete", r["seed"]]["d_forget_concept"], r["d_forget_concept"])
                                 for r in matched])
        assert line["median"] == pytest.approx(want, nan_ok=True) and line["strengths"] == [r["strength"] for r in matched]
        assert ut.matched_note({"rows": []}) == "" and "β = " in ut.matched_note(summary["unlearning"])
        header, table = ut.table(summary["unlearning"])
        assert all(r[-1] == "–" for r in table if r[0] == ul.MATCHED_COST)


def test_cost_matching_finds_the_strength_that_costs_the_asked_retain_loss(unlearned):
    """On the run's control and its mean-difference directions: half the full deletion's retain cost is
    found at a strength strictly between 0 and 1, within the bisection's tolerance, and a cost above the
    full deletion's gives the full deletion."""
    from anchoring.kinds.lm import evaluate as ev

    path, summary = unlearned
    run = lifecycle.load_run(path)
    cfg, data = run.config, run.data
    control = run.arms["control"][0]
    es = ev.eval_set(data, cfg.lm.tokens, cfg.evaluate.eval_chars, cfg.evaluate.after, order=cfg.evaluate.order)
    dirs = [mean_difference_direction(control, cfg, data, run.seeds[0])]
    before = ul.losses(control, es)["retain"]
    full = ul.losses(delete(control, dirs), es)["retain"] - before
    assert full > 1e-3, full  # the tiny control does use the direction
    beta, got = ul.cost_matched(control, dirs, full / 2, before, es, cfg.evaluate.batch_size, iters=20)
    assert 0.0 < beta < 1.0 and got["retain"] - before == pytest.approx(full / 2, abs=2e-4)
    assert ul.losses(delete(control, dirs, beta), es)["retain"] == pytest.approx(got["retain"], abs=1e-7)
    assert ul.cost_matched(control, dirs, 2 * full, before, es, cfg.evaluate.batch_size)[0] == 1.0
    given = ul.losses(delete(control, dirs), es)  # the full deletion's losses passed in: the same search
    assert ul.cost_matched(control, dirs, full / 2, before, es, cfg.evaluate.batch_size, iters=20, full=given) == (beta, got)


def mean_difference_direction(model, cfg, data, seed):
    from anchoring.kinds.lm import posthoc
    from anchoring.kinds.lm.direction import anchored_sites

    fit = posthoc.fit(model, cfg, data, seed, anchored_sites(cfg))["mean-difference"]
    return next(iter(fit.directions.values()))


def test_a_partial_deletion_removes_that_share_of_the_component():
    from anchoring.control.surgery import project_out

    torch.manual_seed(2)
    model = NormalizedTransformer(11, 16, 2, 2, 16).eval()
    v = torch.nn.functional.normalize(torch.randn(16), dim=0)
    embeddings, writers = model.residual_writers()
    half = project_out(model, v, embeddings, writers, 0.25)
    assert torch.allclose(half.embed.weight @ v, 0.75 * (model.embed.weight @ v), atol=1e-6)
    assert torch.allclose(v @ half.blocks[1].mlp.down.weight, 0.75 * (v @ model.blocks[1].mlp.down.weight), atol=1e-6)
    w = torch.randn(16)
    w = w - (w @ v) * v  # the part off v is untouched
    assert torch.allclose(half.embed.weight @ w, model.embed.weight @ w, atol=1e-6)
    full = project_out(model, v, embeddings, writers, 1.0)  # strength 1: the component is gone
    assert (full.embed.weight @ v).abs().max() < 1e-6 and (v @ full.blocks[0].attn.o.weight).abs().max() < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(delete(model, [v], 0.0).state_dict().values(), model.state_dict().values()))
    with pytest.raises(AnchoringError, match=r"strength must be in \[0, 1\]"):
        project_out(model, v, embeddings, writers, 1.5)


def test_a_deleted_model_is_back_on_the_sphere_with_the_direction_still_gone():
    """The projection shortens the embedding rows and writer columns it touches; left short, the
    deleted model's logits differ (by up to 0.23 here) from those of the model its own training
    would keep, and the relearning attack's first step would renormalise them as a jump."""
    torch.manual_seed(3)
    model = NormalizedTransformer(11, 16, 3, 2, 16).eval()
    v = torch.nn.functional.normalize(torch.randn(16), dim=0)
    out = delete(model, [v])
    for w, dim in [(out.embed.weight, 1), *[(lin.weight, 0) for b in out.blocks for lin in (b.attn.o, b.mlp.down)]]:
        assert torch.allclose(torch.linalg.vector_norm(w, dim=dim), torch.ones(()), atol=1e-5)
    assert (out.embed.weight @ v).abs().max() < 1e-6
    assert max(float((v @ lin.weight).abs().max()) for b in out.blocks for lin in (b.attn.o, b.mlp.down)) < 1e-6


def test_blinding_a_reader_removes_its_response_to_the_direction_and_nothing_else():
    from anchoring.control.surgery import blind_readers
    from anchoring.kinds.lm.edits import blind, downstream_readers, first_site

    torch.manual_seed(4)
    model = NormalizedTransformer(11, 16, 3, 2, 16).eval()
    v = torch.nn.functional.normalize(torch.randn(16), dim=0)
    readers = downstream_readers(model, "blocks.0")
    assert readers == [f"blocks.{i}.{p}" for i in (1, 2) for p in ("attn.q", "attn.k", "attn.v", "mlp.up")] + ["unembed"]
    assert len(downstream_readers(model, "embed")) == 13
    out = blind_readers(model, v, readers)
    x = torch.randn(5, 16)
    for name in readers:  # lin(x + t·v) = lin(x): the reader no longer sees the direction
        lin = out.get_submodule(name)
        assert torch.allclose(lin(x + 3.0 * v), lin(x), atol=1e-5), name
        w = torch.randn(16)
        w = w - (w @ v) * v
        assert torch.allclose(lin.weight @ w, model.get_submodule(name).weight @ w, atol=1e-5)  # the rest is kept
    for name in ("blocks.0.attn.q", "blocks.0.mlp.up", "blocks.1.attn.o", "blocks.2.mlp.down"):
        assert torch.equal(out.get_submodule(name).weight, model.get_submodule(name).weight), name
    half = blind_readers(model, v, ["unembed"], 0.5)
    assert torch.allclose(half.unembed.weight @ v, 0.5 * (model.unembed.weight @ v), atol=1e-6)
    deep = NormalizedTransformer(11, 16, 12, 2, 16).eval()
    assert first_site(deep, ["blocks.10", "blocks.2"]) == "blocks.2"  # residual order, not the names' sort order
    by_first = blind(deep, [v], ["blocks.10", "blocks.2"])
    assert (by_first.blocks[3].attn.k.weight @ v).abs().max() < 1e-6
    assert torch.allclose(by_first.blocks[2].attn.k.weight, deep.blocks[2].attn.k.weight, atol=1e-6)
    two = blind(model, [torch.eye(16)[0], torch.eye(16)[0] + torch.eye(16)[3]], ["blocks.0"])  # a subspace: its whole span
    for axis in (0, 3):
        assert (two.blocks[1].attn.v.weight[:, axis]).abs().max() < 1e-6 and (two.unembed.weight[:, axis]).abs().max() < 1e-6
    edited_ = blind(model, [v], ["blocks.0"])  # back on the sphere, still blind
    assert torch.allclose(edited_.blocks[1].attn.q.weight.norm(dim=1), torch.ones(16), atol=1e-5)
    assert (edited_.blocks[2].mlp.up.weight @ v).abs().max() < 1e-6
    with pytest.raises(AnchoringError, match="not a residual site"):
        downstream_readers(model, "blocks.7")
    with pytest.raises(AnchoringError, match="not a Linear reading a 16-wide"):
        blind_readers(model, v, ["blocks.0.mlp.down"])
    with pytest.raises(AnchoringError, match=r"strength must be in \[0, 1\]"):
        blind_readers(model, v, readers, -0.1)


def test_the_matched_control_row_is_what_intervene_reports(unlearned):
    """The table and `anchoring intervene` score the same control on the same batches: one number."""
    import json

    path, summary = unlearned
    row = next(r for r in summary["unlearning"]["rows"] if r["method"] == "anchoring · matched random move")
    r = CliRunner().invoke(app, ["intervene", str(path), "--concept", "violence", "--name", "ctl"])
    assert r.exit_code == 0, r.stderr
    got = json.loads((path / "interventions" / "ctl" / "summary.json").read_text())["rows"]
    m = next(x for x in got if x["arm"] == "anchored · matched random move" and x["seed"] == row["seed"])
    assert m["concept after"] - m["concept before"] == pytest.approx(row["d_forget_concept"], abs=1e-9)
    assert m["retain after"] - m["retain before"] == pytest.approx(row["retain_cost"], abs=1e-9)


def test_relearning_curves_have_a_point_per_step_and_repeat_exactly(unlearned):
    import pandas as pd

    path, summary = unlearned
    curves = pd.read_csv(path / ul.CURVES)
    relearn = curves[curves.fine_tune == "relearn K=2"]
    attacked = [r["method"] for r in summary["unlearning"]["rows"] if r["fine_tuned"]]
    assert "anchoring · suppress" in attacked and "anchoring · matched random move" not in attacked
    assert sorted(relearn.method.unique()) == sorted(attacked)
    assert all(len(g) == 3 + 1 for _m, g in relearn.groupby("method"))
    run = lifecycle.load_run(path)
    models = {(arm, s): m for arm in run.arms for s, m in zip(run.seeds, run.arms[arm])}
    again = ul.evaluate(run.config, run.data, models)
    twice = ul.evaluate(run.config, run.data, models)
    assert repr(again["rows"]) == repr(twice["rows"]) and repr(again["curve_points"]) == repr(twice["curve_points"])  # NaN-safe
    first = {r["method"]: r for r in summary["unlearning"]["rows"]}
    for r in again["rows"]:  # the same numbers as during the run (weights reloaded from disk)
        assert r["d_forget_concept"] == pytest.approx(first[r["method"]]["d_forget_concept"], abs=1e-5)


def test_mean_difference_points_from_the_unlabelled_to_the_labelled_mean():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(400, 6, generator=g)
    labels = torch.arange(400) % 3 == 0
    acts[labels] += torch.tensor([0.0, 3.0, 0.0, 0.0, -1.0, 0.0])
    v = mean_difference(acts, labels)
    gap = acts[labels].mean(0) - acts[~labels].mean(0)
    assert torch.allclose(v, gap / gap.norm(), atol=1e-6) and v[1] > 0.9


def test_suppress_touches_only_the_concepts_half_space_and_keeps_the_state_on_the_sphere():
    torch.manual_seed(0)
    model = NormalizedTransformer(11, 16, 2, 2, 16).eval()
    v = torch.nn.functional.normalize(torch.randn(16), dim=0)
    seen = {}
    handle = model.blocks[1].register_forward_pre_hook(lambda _m, args: seen.__setitem__("h", args[0]))
    try:
        h0 = torch.nn.functional.normalize(torch.randn(1, 4, 16), dim=-1)
        with torch.no_grad():  # replace blocks.0's output by a fixed state, then suppress it
            for keep_norm in (None, False):  # None: the model's own flag (unit residual: keep the length)
                sup = Suppressed(model, ["blocks.0"], [v], keep_norm=keep_norm)
                for sign in (-1.0, 1.0):
                    h = h0 - (h0 @ v)[..., None] * v + sign * 0.5 * v
                    fix = model.blocks[0].register_forward_hook(lambda _m, _i, _o, h=h: h.clone())
                    sup(torch.zeros(1, 4, dtype=torch.long))
                    fix.remove()
                    if sign < 0:
                        assert torch.equal(seen["h"], h)  # negative component along v: untouched
                        continue
                    assert torch.allclose(seen["h"] @ v, torch.zeros(1, 4), atol=1e-6)  # positive one removed
                    if keep_norm is None:  # the same direction as the projection, at the old length
                        assert torch.allclose(seen["h"].norm(dim=-1), h.norm(dim=-1), atol=1e-6)
                        assert torch.allclose(seen["h"], torch.nn.functional.normalize(h - 0.5 * v, dim=-1)
                                              * h.norm(dim=-1, keepdim=True), atol=1e-6)
                    else:
                        assert torch.allclose(seen["h"], h - 0.5 * v, atol=1e-6)
    finally:
        handle.remove()


def test_a_subspace_concept_is_suppressed_on_both_sides_of_every_axis():
    """The subspace term counts energy (Σ z_d² over the dims), so a labelled state may sit at −e_d: the
    suppression of a subspace concept removes the whole component, where a direction's removes only
    its positive half-space. `edited` picks it for a run whose concept is anchored in dims."""
    torch.manual_seed(6)
    model = NormalizedTransformer(11, 16, 2, 2, 16).eval()
    e0, e1 = torch.eye(16)[0], torch.eye(16)[1]
    seen = {}
    handle = model.blocks[1].register_forward_pre_hook(lambda _m, args: seen.__setitem__("h", args[0]))
    h0 = torch.nn.functional.normalize(torch.randn(1, 4, 16), dim=-1)
    h = h0.clone()
    h[..., 0], h[..., 1] = -0.6, 0.3  # negative along e0, positive along e1
    try:
        with torch.no_grad():
            fix = model.blocks[0].register_forward_hook(lambda _m, _i, _o: h.clone())
            Suppressed(model, ["blocks.0"], [e0, e1], subspace=True)(torch.zeros(1, 4, dtype=torch.long))
            both = seen["h"].clone()
            Suppressed(model, ["blocks.0"], [e0, e1])(torch.zeros(1, 4, dtype=torch.long))
            halves = seen["h"].clone()
            fix.remove()
    finally:
        handle.remove()
    assert torch.allclose(both[..., :2], torch.zeros(1, 4, 2), atol=1e-6)  # both signs gone
    assert torch.allclose(both.norm(dim=-1), h.norm(dim=-1), atol=1e-6)  # at the old length
    assert float(halves[..., 0].max()) < -0.1 and abs(float(halves[..., 1].max())) < 1e-6  # half-spaces: −e0 stays
    from anchoring import experiments
    from anchoring.kinds.lm.edits import edited

    for name, expected in (("lm-anchor-subspace", True), ("lm-anchor", False)):
        cfg = experiments.load(name)
        m = NormalizedTransformer(11, cfg.lm.width, cfg.lm.layers, cfg.lm.heads, 16)
        assert edited(m, cfg, "suppress").subspace is expected, name


def test_the_attack_on_a_hook_fine_tunes_the_weights_around_it_and_keeps_the_hook():
    """Fine-tuning a suppressed model moves the inner model's weights, keeps them on the sphere, and
    leaves the hook in place: the state it edits still has no positive component along the direction."""
    torch.manual_seed(4)
    model = NormalizedTransformer(11, 16, 2, 2, 16).eval()
    v = torch.nn.functional.normalize(torch.randn(16), dim=0)
    sup = Suppressed(model, ["blocks.0"], [v])
    g = torch.Generator().manual_seed(0)
    batches = lambda step: torch.randint(0, 11, (4, 9), generator=g)  # noqa: E731
    seen_model = {}
    curve = ul.finetune(sup, batches, 5, 1e-2, lambda m: (seen_model.setdefault("m", m), {"n": 0.0})[1])
    m = seen_model["m"]  # the copy `finetune` trains (score sees it before the first step and after each)
    assert len(curve) == 6 and m is not sup and m.inner is not model
    assert all(torch.equal(a, b) for a, b in zip(sup.inner.state_dict().values(), model.state_dict().values()))  # original untouched
    assert not torch.equal(m.inner.blocks[0].attn.q.weight, model.blocks[0].attn.q.weight)  # the weights moved
    assert torch.allclose(m.inner.blocks[0].attn.q.weight.norm(dim=1), torch.ones(16), atol=1e-5)  # on the sphere
    seen = {}
    handle = m.inner.blocks[1].register_forward_pre_hook(lambda _m, args: seen.__setitem__("h", args[0]))
    with torch.no_grad():
        m(torch.randint(0, 11, (3, 8), generator=g))
    handle.remove()
    assert float((seen["h"] @ v).max()) <= 1e-6  # the hook still removes the positive half-space


def test_own_hooks_run_as_given_and_models_off_the_sphere_keep_the_plain_projection():
    """The LEACE eraser and the midpoint hook are defined by a property of their output, which a
    rescale would undo, so `edits` hooks are not wrapped; a model that does not declare a unit
    residual stream gets the plain projection."""
    torch.manual_seed(3)
    model = NormalizedTransformer(11, 16, 2, 2, 16).eval()
    seen = {}
    handle = model.blocks[1].register_forward_pre_hook(lambda _m, args: seen.__setitem__("h", args[0]))
    tokens = torch.randint(0, 11, (2, 6))
    with torch.no_grad():
        model(tokens)
        plain = seen["h"].clone()
        Suppressed(model, ["blocks.0"], [], edits={"blocks.0": lambda h: 0.5 * h})(tokens)
    handle.remove()
    assert torch.equal(seen["h"], 0.5 * plain)  # not rescaled back to length 1
    v = torch.nn.functional.normalize(torch.randn(4), dim=0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Identity())  # no unit_residual flag
    x = torch.randn(5, 3)
    with torch.no_grad():
        z = net[0](x)
        out = Suppressed(net, ["1"], [v])(x)
    assert torch.allclose(out, z - torch.relu(z @ v)[:, None] * v, atol=1e-6)


def test_suppressing_at_the_last_block_does_not_just_flatten_the_logits():
    """The unembedding of a normalised transformer reads the last state's length as the logits' scale:
    a projection that shortens the state makes every next token less certain. Keeping the length
    leaves the logits' spread where it was."""
    torch.manual_seed(2)
    model = NormalizedTransformer(17, 16, 2, 2, 16).eval()
    tokens = torch.randint(0, 17, (3, 12))
    from anchoring.anchor import Capture

    with torch.no_grad(), Capture(model, ["blocks.1"]) as cap:
        logits = model(tokens)
        h = cap.acts["blocks.1"][0, 5]
        other = torch.randn(16)
        other -= (other @ h) * h / (h @ h)
        v = torch.nn.functional.normalize(0.95 * h / h.norm() + 0.31 * other / other.norm(), dim=0)  # cos(h, v) ≈ 0.95
        kept = Suppressed(model, ["blocks.1"], [v])(tokens)
        shrunk = Suppressed(model, ["blocks.1"], [v], keep_norm=False)(tokens)
    c = float(h @ v / h.norm())
    # without the length the edit is the same state, shorter: every logit times √(1 − c²) ≈ 0.31
    assert torch.allclose(shrunk[0, 5], kept[0, 5] * (1 - c * c) ** 0.5, atol=1e-4)
    assert float(kept[0, 5].std()) > 0.8 * float(logits[0, 5].std())  # kept: the spread stays


def test_deleting_several_directions_leaves_no_component_along_any():
    torch.manual_seed(1)
    model = NormalizedTransformer(13, 16, 3, 2, 16).eval()
    a = torch.randn(16)
    dirs = [a, a + 0.3 * torch.randn(16), torch.randn(16)]  # far from orthogonal
    out = delete(model, dirs)
    basis = orthonormal(dirs)
    assert len(basis) == 3
    from anchoring.anchor import Capture

    sites = ["embed", *[f"blocks.{i}" for i in range(3)]]
    with torch.no_grad(), Capture(out, sites) as cap:
        out(torch.randint(0, 13, (2, 10)))
        for s in sites:
            for b in basis:
                assert (cap.acts[s] @ b).abs().max() < 1e-5, s


def test_after_training_only_a_basis_axis_is_deleted_exactly():
    """Each block steps by a per-dimension α. A fresh model has one α everywhere, so any direction is
    removed exactly (the test above); once training makes α uneven, a slanted direction leaks back in
    through it, while a basis axis (the anchors) stays at exactly zero. `residual_component` is what
    `anchoring delete` and the unlearning rows ("direction left") report."""
    from anchoring.control.surgery import residual_component

    torch.manual_seed(5)
    model = NormalizedTransformer(13, 16, 3, 2, 16).eval()
    with torch.no_grad():
        for b in model.blocks:
            b.alpha_attn.uniform_(0.05, 0.5)
            b.alpha_mlp.uniform_(0.05, 0.5)
    tokens = torch.randint(0, 13, (2, 10))
    sites = ["embed", *[f"blocks.{i}" for i in range(3)]]
    axis, slanted = torch.eye(16)[3], torch.nn.functional.normalize(torch.randn(16), dim=0)
    with torch.no_grad():
        assert residual_component(delete(model, [axis]), axis, tokens, sites) < 1e-6
        assert residual_component(delete(model, [slanted]), slanted, tokens, sites) > 0.01
        assert residual_component(model, slanted, tokens, sites) > residual_component(delete(model, [slanted]), slanted, tokens, sites)


def test_the_matched_deletion_removes_as_many_other_directions():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    axes = [torch.eye(16)[0], torch.eye(16)[5]]
    got = matched_directions(axes, g())
    picked = [int(v.argmax()) for v in got]
    assert len(got) == 2 and len(set(picked)) == 2 and not {0, 5} & set(picked)  # other basis axes, exactly
    assert all(float(v.max()) == 1.0 and float(v.abs().sum()) == 1.0 for v in got)
    assert [int(v.argmax()) for v in matched_directions(axes, g())] == picked  # the seed decides
    assert len({int(v.argmax()) for s in range(20) for v in matched_directions(axes, torch.Generator().manual_seed(s))}) > 4
    slanted = [torch.nn.functional.normalize(torch.randn(16, generator=g()), dim=0)]
    (w,) = matched_directions(slanted, g())
    assert abs(float(w @ slanted[0])) < 1e-6 and abs(float(w.norm()) - 1) < 1e-6 and float(w.abs().max()) < 1.0
    with pytest.raises(AnchoringError, match="no direction is left"):
        matched_directions(list(torch.eye(4)), g())


def test_coverage_figure_draws_r_against_coverage():
    pts = [(c, m, r) for c in (0.1, 0.3, 1.0) for m, r in (("anchoring · delete", c), ("weak filter", c * c))]
    fig = coverage_figure(pts + [(0.3, "weak filter", float("nan")), (0.3, "anchoring · matched random move", 7.0)])
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()[:2]] == ["anchoring · delete", "weak filter"]
    assert "anchoring · matched random move" not in [line.get_label() for line in ax.get_lines()]  # a control, not a method
    assert ax.get_ylim()[1] < 7.0
    assert list(ax.get_lines()[1].get_ydata()) == pytest.approx([0.01, 0.09, 1.0])
    three = [(0.3, "anchoring · delete", r) for r in (0.1, 0.2, 0.9)]  # three seeds: the median, as the table gives
    assert list(coverage_figure(three).axes[0].get_lines()[0].get_ydata()) == pytest.approx([0.2])


@pytest.mark.parametrize("override,message", [("unlearning.relearn_k=[0]", "relearn_k"),
                                              ('lm.arms=["anchored"]', "needs the control arm"),
                                              ("unlearning.distil_noise=0", "distil_noise"),
                                              ("unlearning.distil_steps=10", "has no anchored arm")])
def test_bad_unlearning_config_is_one_line(tmp_path, override, message):
    from anchoring.errors import AnchoringError

    arms = ['lm.arms=["control","oracle-filtered"]'] if "distil_steps" in override else []  # no anchored arm to distil
    with pytest.raises((AnchoringError, ValueError)) as e:
        experiments.load("lm-anchor-passages", tiny(tmp_path, "unlearning.enabled=true", *arms, override))
    assert message in str(e.value) and "\n" not in str(e.value).strip()


def test_the_leace_range_is_the_difference_of_means_for_one_binary_label():
    from anchoring.control.erasure import leace
    from anchoring.kinds.lm.posthoc import range_direction

    g = torch.Generator().manual_seed(2)
    acts = torch.randn(600, 8, generator=g) @ torch.randn(8, 8, generator=g)  # correlated features
    labels = torch.arange(600) % 4 == 0
    acts[labels] += torch.randn(8, generator=g)
    v = range_direction(acts, leace(acts, labels.float()))
    assert torch.nn.functional.cosine_similarity(v, mean_difference(acts, labels), dim=0).abs() > 0.999  # up to sign


def test_medians_rank_never_recovered_and_free_edits_as_the_extremes():
    assert ut.ranked_median([float("inf"), float("inf"), 0.5]) == float("inf")
    assert ut.ranked_median([float("inf"), 7.0, 3.0]) == 7.0
    assert ut.ranked_median([float("nan"), 2.0, 4.0]) == 3.0
    rows = [{"method": "m", "seed": s, "weights_edited": True, "recover_steps": rec, "before": dict.fromkeys(("forget", "concept", "retain"), 1.0),
             "after": dict.fromkeys(("forget", "concept", "retain"), 1.0), "d_forget": 0.0, "d_forget_concept": dc,
             "retain_cost": rc, "selectivity": ul.ratio(dc, rc), "R": 0.0, "relearn": {}}
            for s, rec, dc, rc in ((0, None, 0.3, 0.0), (1, None, 0.2, -0.01), (2, 7, 0.5, 1.0))]
    unlearning = {"rows": rows, "relearn_k": [], "recover_cap": 50}
    # summary.json stores inf as null: `anchoring show` must print what the run printed
    for u in (unlearning, json.loads(json.dumps(runs._finite(unlearning)))):
        header, table = ut.table(u)
        median = table[0]
        assert median[1] == "median" and median[header.index("steps to recover")] == "> 50"
        assert median[header.index("selectivity")] == float("inf")
        assert [r[header.index("selectivity")] for r in table[1:]] == [float("inf"), float("inf"), 0.5]


def test_targets_count_an_edit_that_removed_nothing_as_keeping_nothing():
    """"kept" is undefined on a seed whose edit barely moved the forget loss; the robustness target
    counts that seed as keeping nothing, rather than letting the one seed that worked decide, and a
    mean-difference edit that removed nothing loses the ratio on every line alike."""
    def row(method: str, seed: int, d: float, kept: float | None = None) -> dict:
        losses = dict.fromkeys(("forget", "concept", "retain"), 1.0)
        return {"method": method, "seed": seed, "d_forget_concept": d, "d_forget": d, "retain_cost": 0.01, "R": 1.0,
                "before": losses, "after": losses, "weights_edited": True, "fine_tuned": kept is not None,
                "recover_steps": None, "relearn": {} if kept is None else {"64": {"kept": kept, "relearned": 0.0}}}
    rows = [row("anchoring · delete", 0, 0.3, 0.9), row("anchoring · delete", 1, 0.005, float("nan")),
            row("anchoring · delete", 2, 0.004, float("nan")),
            *[row("mean-difference · delete", s, d) for s, d in ((0, 0.0), (1, 0.001), (2, 0.002))]]
    got = ut.targets({"rows": rows, "relearn_k": [4, 64]})
    kept = got["anchoring · delete keeps ≥ 50% of Δforget after relearning on K = 64"]
    assert kept["median"] == 0.0 and not kept["met"] and kept["undefined_seeds"] == 2
    header, table = ut.table({"rows": rows, "relearn_k": [64], "recover_cap": 50})
    median = next(t for t in table if t[:2] == ["anchoring · delete", "median"])
    assert median[header.index("kept K=64")] == 0.0  # the table's median counts them as the target line does
    assert math.isnan(next(t for t in table if t[:2] == ["anchoring · delete", 1])[header.index("kept K=64")])  # per seed: undefined
    rows[1]["relearn"]["64"]["kept"] = rows[2]["relearn"]["64"]["kept"] = 0.7
    assert ut.targets({"rows": rows, "relearn_k": [64]})["anchoring · delete keeps ≥ 50% of Δforget after relearning on K = 64"]["met"]
    three = got["Δforget (concept) of anchoring · delete ≥ 3 × mean-difference · delete"]
    assert three["median"] == pytest.approx(5.0)  # inf (seed 0: the baseline removed nothing), 5, 2; not 3.5
    assert not [t for t in got if t.startswith("R (")]  # no oracle filter row: R has nothing to be relative to
    rows.append({**row("oracle filter", 0, 0.4), "weights_edited": False})
    assert "R (anchoring · delete vs oracle filter) ≥ 0.5" in ut.targets({"rows": rows, "relearn_k": [64]})


def test_a_distilled_row_broken_in_its_distillation_and_in_its_repair_is_counted_under_each():
    """Since the distilled rows are repaired too, one seed's distillation and another's repair can break on
    the same row: the target line counts each under its own cause and the notes list each under its own
    rate. The repair note says the students were repaired only where their rows show it (a summary from
    before their repair has no `edit_only`)."""
    nan = float("nan")
    before = dict.fromkeys(("forget", "concept", "retain"), 1.0)

    def row(seed: int, broke: str | None = None, repaired: bool = True) -> dict:
        out = {"method": ul.DISTILLED, "seed": seed, "d_forget_concept": nan if broke else 0.3, "d_forget": nan if broke else 0.3,
               "retain_cost": nan if broke else 0.01, "before": before, "weights_edited": True, "fine_tuned": True,
               "after": dict.fromkeys(before, nan) if broke else {"forget": 1.3, "concept": 1.3, "retain": 1.01},
               "recover_steps": None, "relearn": {} if broke else {"64": {"kept": 0.8, "relearned": 0.1}}}
        if repaired and broke != "the distillation's":
            out["edit_only"] = before
        return {**out, "repair_diverged": f"{broke} fine-tuning diverged at step 2"} if broke else out

    u = {"rows": [row(0, "the distillation's"), row(1, "the repair's"), row(2)], "relearn_k": [64], "distil_steps": 3,
         "distil_noise": 1.0, "distil_lr": 1e30, "repair_steps": 2, "repair_lr": 1e30}
    line = ut.targets(u)[f"{ul.DISTILLED}: Δforget at concept positions ≥ 0.5 nats/char"]
    assert not line["met"] and line["repair_diverged_seeds"] == 1 and line["distil_diverged_seeds"] == 1, line
    said = report.left_out_note(line)
    assert "(1 seed's repair diverged, left out: not met)" in said and "(1 seed's distillation diverged" in said, said
    notes = ut.diverged_note(u)
    assert "1 repair(s) diverged at unlearning.repair_lr 1e+30, so everything after the edit is undefined there" in notes
    assert notes.endswith(f"{ul.DISTILLED} seed 0") and f"{ul.DISTILLED} seed 1." in notes, notes
    assert "the distilled rows after their distillation" in ut.repair_note(u)
    old = {**u, "rows": [row(s, repaired=False) for s in range(3)]}  # written before the distilled rows were repaired
    assert "every edit (not the filters and the distilled rows) was repaired" in ut.repair_note(old)


def test_a_seed_whose_repair_diverged_fails_every_target_line_of_its_method_and_is_counted_once():
    """Medians leave an undefined seed out, so a method whose repair broke on one seed of three would be
    judged on the other two alone: its lines must say MISS and name the broken seed once, not also as
    an undefined one, and a ratio line counts a seed once where both sides broke. The targets are read
    from summary.json too, where NaN is null."""
    nan = float("nan")

    def row(method: str, seed: int, d: float, cost: float, broke: bool = False) -> dict:
        before = dict.fromkeys(("forget", "concept", "retain"), 1.0)
        after = dict.fromkeys(before, nan) if broke else {"forget": 1 + d, "concept": 1 + d, "retain": 1 + cost}
        out = {"method": method, "seed": seed, "d_forget_concept": nan if broke else d, "d_forget": nan if broke else d,
               "retain_cost": nan if broke else cost, "before": before, "after": after, "weights_edited": True,
               "fine_tuned": True, "recover_steps": None, "relearn": {} if broke else {"64": {"kept": 0.8, "relearned": 0.1}}}
        return {**out, "repair_diverged": "the repair's fine-tuning diverged at step 2"} if broke else out

    rows = [row("anchoring · delete", 0, 0.9, 0.01, broke=True), row("anchoring · delete", 1, 0.9, 0.01),
            row("anchoring · delete", 2, 0.8, 0.015), row("mean-difference · delete", 0, 0.1, 0.01, broke=True),
            row("mean-difference · delete", 1, 0.1, 0.01), row("mean-difference · delete", 2, 0.1, 0.01),
            *[{**row("oracle filter", s, 0.5, 0.0), "weights_edited": False} for s in range(3)]]
    for s in range(3):
        ul.set_r([r for r in rows if r["seed"] == s])
    for u in ({"rows": rows, "relearn_k": [64]}, json.loads(json.dumps(runs._finite({"rows": rows, "relearn_k": [64]})))):
        got = {k: v for k, v in ut.targets(u).items() if "anchoring · delete" in k}
        assert len(got) == 5 and all(not t["met"] and t["repair_diverged_seeds"] == 1 for t in got.values()), got
        assert all(not t.get("undefined_seeds") for t in got.values()), got  # the broken seed is not also "undefined"
        d = got["anchoring · delete: Δforget at concept positions ≥ 0.5 nats/char"]
        assert d["median"] == pytest.approx(0.85)  # the two seeds that survived met it: the line still says MISS
        assert "(1 seed's repair diverged, left out: not met)" in report.left_out_note(d)
    rows[0] = row("anchoring · delete", 0, 0.9, 0.01)
    rows[3] = row("mean-difference · delete", 0, 0.1, 0.01)
    for s in range(3):
        ul.set_r([r for r in rows if r["seed"] == s])
    three = ut.targets({"rows": rows, "relearn_k": [64]})["Δforget (concept) of anchoring · delete ≥ 3 × mean-difference · delete"]
    assert three["met"] and "repair_diverged_seeds" not in three
    rows[3] = {**row("mean-difference · delete", 0, 0.1, 0.01, broke=True), "R": nan}  # only the comparison's repair broke
    three = ut.targets({"rows": rows, "relearn_k": [64]})["Δforget (concept) of anchoring · delete ≥ 3 × mean-difference · delete"]
    assert not three["met"] and three["repair_diverged_seeds"] == 1 and not three["undefined_seeds"]


def test_r_is_undefined_when_the_oracle_filter_removed_nothing():
    def rows(oracle: float) -> list[dict]:
        return [{"method": "oracle filter", "d_forget_concept": oracle}, {"method": "anchoring · suppress", "d_forget_concept": -0.06},
                {"method": "anchoring · delete", "d_forget_concept": 0.03}]
    ok = rows(0.2)
    ul.set_r(ok)
    assert [r["R"] for r in ok] == pytest.approx([1.0, -0.3, 0.15])
    for d in (-0.1, 0.0):  # a negative Δ must not flip every row's sign
        bad = rows(d)
        ul.set_r(bad)
        assert all(math.isnan(r["R"]) for r in bad)


def test_a_ratio_never_divides_by_a_change_the_table_prints_as_zero():
    """A mean-difference deletion that removed 0.0006 nats/char read as "53 ×"; an oracle filter that
    removed 0.0005 would have made every R a thousandfold."""
    assert ul.ratio(0.032, 0.0006) == float("inf") and ul.ratio(0.05, -0.01) == float("inf")
    assert math.isnan(ul.ratio(0.0005, 0.0006)) and math.isnan(ul.ratio(-0.02, 0.0))
    assert ul.ratio(0.058, 0.0043) == pytest.approx(13.49, abs=0.01) and ul.ratio(-0.02, 0.01) == pytest.approx(-2.0)
    rows = [{"method": "oracle filter", "d_forget_concept": 0.0005}, {"method": "anchoring · delete", "d_forget_concept": 0.03}]
    ul.set_r(rows)
    assert all(math.isnan(r["R"]) for r in rows)
    assert "under 0.001 (+0.0005), too small to divide by" in ut.r_note({"rows": [{**r, "seed": 0} for r in rows]})


def test_a_seed_without_a_cost_matched_row_is_counted_as_undefined_not_dropped():
    losses = dict.fromkeys(("forget", "concept", "retain"), 1.0)

    def row(method: str, seed: int, d: float, cost: float = 0.01) -> dict:
        return {"method": method, "seed": seed, "d_forget_concept": d, "d_forget": d, "retain_cost": cost, "R": 1.0,
                "before": losses, "after": losses, "weights_edited": True, "fine_tuned": False, "recover_steps": None,
                "relearn": {}, "strength": 0.5}
    rows = [row("anchoring · delete", 0, 0.05), row("anchoring · delete", 1, 0.04), row("anchoring · delete", 2, 0.06, cost=0.0),
            row("mean-difference · delete", 0, 0.02), row("mean-difference · delete", 1, 0.02), row("mean-difference · delete", 2, 0.02),
            row(ul.MATCHED_COST, 0, 0.01), row(ul.MATCHED_COST, 1, 0.002)]  # seed 2: the anchored deletion cost nothing
    got = ut.targets({"rows": rows, "relearn_k": []})
    matched = got["Δforget (concept) of anchoring · delete ≥ 3 × mean-difference · delete at the same retain cost"]
    assert matched["undefined_seeds"] == 1 and matched["median"] == pytest.approx(12.5)  # 5 and 20 over seeds 0 and 1


def test_the_cost_matched_strength_meets_a_small_cost_to_within_two_percent(monkeypatch):
    """Retain cost 0.01·β²: asked for 5e-5, an absolute tolerance of 1e-4 stopped at β = 1/16 (3.9e-5,
    22% short); the relative tolerance keeps halving."""
    import anchoring.kinds.lm.edits as edits

    monkeypatch.setattr(edits, "delete", lambda model, directions, beta: beta)
    monkeypatch.setattr(ul, "losses", lambda beta, es, bs: {"forget": 1.0, "concept": 1.0 + beta, "retain": 1.0 + 0.01 * beta ** 2})
    for cost in (5e-5, 2e-4, 0.004):
        beta, got = ul.cost_matched(None, [], cost, 1.0, None, 16)
        assert abs(got["retain"] - 1.0 - cost) <= 0.02 * cost, (cost, beta)
    beta, got = ul.cost_matched(None, [], 0.02, 1.0, None, 16)  # the full deletion costs less: as it is
    assert beta == 1.0 and got["retain"] == pytest.approx(1.01)


def test_saved_seeds_are_keyed_by_the_scoring_version(monkeypatch):
    cfg = experiments.load("lm-anchor")
    models = {("control", 0): torch.nn.Linear(2, 2)}
    key = ul.seed_key(cfg, models, 0)
    assert ul.seed_key(cfg, models, 0) == key
    monkeypatch.setattr(ul, "SCORING", ul.SCORING + 1)
    assert ul.seed_key(cfg, models, 0) != key


def test_a_retain_cost_below_the_tables_resolution_gives_no_selectivity_and_nothing_deleted_is_nd():
    """A cost that prints as 0.000 read as a selectivity of −25; an edit that left the concept no harder
    than the control's read as "recovered in 0 steps" and pulled the median down."""
    assert math.isnan(ul.selectivity(-0.00509, 0.000201)) and ul.selectivity(0.05, 0.0004) == float("inf")
    assert math.isnan(ul.selectivity(0.0012, 0.0003))  # noise over noise is not a free edit
    assert ul.selectivity(0.05, 0.01) == pytest.approx(5.0)
    losses = dict.fromkeys(("forget", "concept", "retain"), 1.0)

    def row(seed: int, rec: int | None, oracle: bool = False) -> dict:
        return {"method": "oracle filter" if oracle else "anchoring · delete", "seed": seed, "weights_edited": not oracle,
                "fine_tuned": not oracle, "before": losses, "after": losses, "d_forget": 0.0,
                "d_forget_concept": -0.163 if oracle else 0.1, "retain_cost": 0.01, "R": float("nan"), "relearn": {},
                "recover_steps": rec}
    u = {"rows": [row(0, 0), row(1, 6), row(2, 10), row(0, None, oracle=True)],
         "relearn_k": [64], "recover_cap": 50, "relearn_steps": 40, "note": "n"}
    header, table = ut.table(u)
    rec = header.index("steps to recover")
    got = {t[1]: t[rec] for t in table if t[0] == "anchoring · delete"}
    assert got == {"median": 8.0, 0: "nd", 1: 6, 2: 10}  # seed 0 out of the median, not a 0 in it
    assert "steps to recover is nd" in ut.nothing_to_recover_note(u) and "anchoring · delete (seed 0)" in ut.nothing_to_recover_note(u)
    assert "R is undefined (–) throughout" in ut.r_note(u) and "(−0.1630), negative: without" in ut.r_note(u)
    assert "(–)" in ut.r_note(json.loads(json.dumps(runs._finite({**u, "rows": [
        *u["rows"][:3], {**u["rows"][3], "d_forget_concept": float("nan")}]}))))  # NaN read back as null
    u["rows"][1]["recover_steps"] = u["rows"][2]["recover_steps"] = 0  # every seed nd: so is the median
    assert next(t for t in ut.table(u)[1] if t[:2] == ["anchoring · delete", "median"])[rec] == "nd"
    u["rows"] = [r for r in u["rows"] if r["method"] != "oracle filter"]
    assert "no oracle-filter arm" in ut.r_note(u)
    for r in u["rows"]:
        r["retain_cost"] = 0.0  # a free edit: selectivity +∞, printed as the report and the targets print it
    from rich.console import Console

    console = Console(width=400, record=True)
    for line in ut.lines(u):
        console.print(line)
    text = console.export_text()
    assert "∞" in text and "inf" not in text and "relearned K=64" in text and "no oracle-filter arm" in text


@pytest.mark.parametrize("unlearning", ["true", "false"])
def test_anchor_sites_outside_the_residual_stream_are_refused_before_training(unlearning):
    """Alignment, probes and every edit read the residual stream, so an anchor elsewhere would train
    for nothing and fail at the summary: refused by `validate`, with or without unlearning."""
    from anchoring.errors import AnchoringError
    from anchoring.kinds.lm.checks import validate

    cfg = experiments.load("lm-anchor-passages", ['lm.arms=["anchored","control"]', f"unlearning.enabled={unlearning}",
                                         'terms.0.site="blocks.1.mlp"'])
    with pytest.raises(AnchoringError, match="residual-stream anchor sites"):
        validate(cfg, data=False)


def test_the_relearning_figure_draws_the_control_as_the_mean_over_seeds():
    from anchoring.kinds.lm.figures import relearning_curves

    points = [{"fine_tune": "relearn K=4", "k": 4, "method": "m", "seed": s, "step": i, "forget_concept": 2.0 - 0.1 * i + up,
               "control_concept": c} for s, c, up in ((0, 1.0, 0.0), (1, 1.0, 0.0), (2, 2.5, 0.9)) for i in range(3)]
    fig = relearning_curves(points, [4])
    dashed = [line for line in fig.axes[0].lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_ydata()[0] == pytest.approx(1.5)  # two seeds at 1.0 count twice
    (curve,) = [line for line in fig.axes[0].lines if line.get_linestyle() == "-"]  # the method's mean, as its axis says
    assert list(curve.get_xdata()) == [0, 1, 2] and list(curve.get_ydata()) == pytest.approx([2.3, 2.2, 2.1])
    cut = [p for p in points if not (p["seed"] == 2 and p["step"] == 2)]  # seed 2's attack diverged after step 1
    fig = relearning_curves(cut, [4])
    solid = [line for line in fig.axes[0].lines if line.get_linestyle() == "-"]
    marks = [line for line in fig.axes[0].lines if line.get_marker() == "x"]
    assert len(solid) == 1 and list(solid[0].get_xdata()) == [0, 1]  # not the two other seeds' mean at step 2 (a jump)
    assert list(solid[0].get_ydata()) == pytest.approx([2.3, 2.2]) and len(marks) == 1 and list(marks[0].get_xdata()) == [1]


def test_repair_fine_tunes_on_retain_text_and_keeps_the_edit(unlearned):
    """`unlearning.repair_steps`: every edit (not the filters) is fine-tuned on retain windows with the
    edit put back after each step, so the deleted axis is still exactly gone, the repair lowers the
    retain loss the edit left, and the table says so."""
    path, summary = unlearned
    assert all("edit_only" not in r for r in summary["unlearning"]["rows"])  # off by default
    run = lifecycle.load_run(path)
    models = {(arm, s): m for arm in run.arms for s, m in zip(run.seeds, run.arms[arm])}
    cfg = run.config.model_copy(update={"unlearning": run.config.unlearning.model_copy(
        update={"repair_steps": 6, "repair_lr": 1e-3, "relearn_steps": 0, "recover_steps": 0})})
    got = ul.evaluate(cfg, run.data, models)
    rows = {r["method"]: r for r in got["rows"]}
    assert ul.MATCHED_COST not in rows
    for name in ("weak filter", "oracle filter"):  # trained arms, not edits
        assert "edit_only" not in rows[name]
    plain = {r["method"]: r for r in summary["unlearning"]["rows"]}
    for name in ("anchoring · delete", "anchoring · blind", "anchoring · suppress", "mean-difference · delete"):
        r = rows[name]
        assert r["repair_steps"] == 6 and r["before"] == plain[name]["before"], name
        assert r["edit_only"]["retain"] == pytest.approx(plain[name]["after"]["retain"], abs=1e-5), name  # the edit alone
        assert r["after"]["retain"] < r["edit_only"]["retain"], name  # the repair lowered the retain loss
    assert rows["anchoring · delete"]["leftover"] < 1e-5  # the deleted axis stayed out through the repair
    alone = rows[ul.REPAIR_ONLY]  # the control arm repaired, no edit: a control, never attacked
    assert alone["edit_only"] == alone["before"] == rows["mean-difference · delete"]["before"] and not alone["fine_tuned"]
    assert alone["after"]["retain"] < alone["before"]["retain"]
    assert ul.REPAIR_ONLY not in {r["method"] for r in summary["unlearning"]["rows"]}
    assert "repaired before scoring: 6 fine-tuning steps" in " ".join(str(x) for x in ut.lines(got)[1:])


def test_a_repair_without_re_editing_lets_a_deleted_direction_back():
    """The constraint is what keeps the edit: the same retain fine-tune without `redo` writes along the
    deleted axis again, with it every writer stays orthogonal to it."""
    torch.manual_seed(5)
    model = NormalizedTransformer(11, 16, 2, 2, 16).eval()
    axis = torch.eye(16)[3]
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 11, (40, 4, 9), generator=g)
    after = delete(model, [axis])
    m = ul.Method("anchoring · delete", "anchored", model, after, True, [axis], lambda x: delete(x, [axis]))
    kept = ul.repair(m.after, m.redo, lambda step: data[step], 8, 1e-2)
    loose = ul.repair(after, None, lambda step: data[step], 8, 1e-2)

    def along(x):  # the largest write along the axis: an embedding row, or a writer's output column
        writes = [x.embed.weight.T, *[w for b in x.blocks for w in (b.attn.o.weight, b.mlp.down.weight)]]
        return max(float((axis @ w).abs().max()) for w in writes)

    assert along(after) < 1e-6 and along(kept) < 1e-6
    assert along(loose) > 1e-3
    assert not torch.equal(kept.blocks[0].attn.q.weight, after.blocks[0].attn.q.weight)  # it did train


def test_the_recovery_does_not_replay_the_repairs_retain_windows(unlearned):
    """A repaired model recovers on retain windows it has not just been repaired on: the recovery's
    retain half is drawn apart from the repair's windows, step by step, though both come from the
    same retain passages of the same seed."""
    path, _ = unlearned
    run = lifecycle.load_run(path)
    seed, window, n = run.seeds[0], run.config.lm.tokens, run.config.unlearning.relearn_batch
    fix = ul.repair_windows(run.data, window, seed)
    mix_f, mix_r = ul.recovery_windows(run.data, ul.forget_passages(run.data, seed), window, seed)
    half = max(1, n // 2)
    assert mix_r.length == fix.length  # the same retain passages
    for step in range(5):
        assert not torch.equal(mix_r.batch(step, half), fix.batch(step, n)[:half]), step
        assert not torch.equal(mix_r.batch(step, half), mix_f.batch(step, half)), step


def test_relearn_on_a_finished_run_gives_the_in_run_table_and_takes_its_own_attack(unlearned, tmp_path, monkeypatch):
    """`anchoring relearn` on an LM run recomputes the table the run printed after training (same
    methods, same numbers), and --samples/--steps change the attack; it writes everything or nothing."""
    import pandas as pd

    path, summary = unlearned
    r = CliRunner().invoke(app, ["relearn", str(path)])
    assert r.exit_code == 0, r.stderr
    out = path / "relearn" / "violence"
    got = json.loads((out / "summary.json").read_text())
    first = {(x["method"], x["seed"]): x for x in summary["unlearning"]["rows"]}
    assert sorted((x["method"], x["seed"]) for x in got["unlearning"]["rows"]) == sorted(first)
    for x in got["unlearning"]["rows"]:
        want = first[x["method"], x["seed"]]
        assert x["d_forget_concept"] == pytest.approx(want["d_forget_concept"], abs=1e-5), x["method"]
        assert x["retain_cost"] == pytest.approx(want["retain_cost"], abs=1e-5), x["method"]
        assert x["recover_steps"] == want["recover_steps"], x["method"]
        for k, v in want["relearn"].items():
            assert x["relearn"][k]["relearned"] == pytest.approx(v["relearned"], abs=1e-5), (x["method"], k)
            assert x["relearn"][k]["kept"] == pytest.approx(v["kept"], abs=1e-4, nan_ok=True), (x["method"], k)
    assert set(got["targets"]) == set(ut.targets(summary["unlearning"])) and got["targets"]
    assert "Δforget" in r.stdout and "wrote" in r.stdout
    shown = CliRunner().invoke(app, ["show", str(out)])  # the table again, later, from what the attack wrote
    assert shown.exit_code == 0, shown.stderr
    assert shown.stdout.splitlines()[:-1] == r.stdout.splitlines()[:-1] and f"relearning attack on {path}" in shown.stdout
    assert f"relearning attack: {out}" in CliRunner().invoke(app, ["show", str(path)]).stdout
    with monkeypatch.context() as m:  # from inside the attack's folder
        m.chdir(out)
        assert CliRunner().invoke(app, ["show", "."]).stdout == shown.stdout
    r = CliRunner().invoke(app, ["relearn", str(path), "--samples", "1,3", "--steps", "2", "--concept", "violence",
                                 "--eval-chars", "3000", "--attack-unedited"])
    assert r.exit_code == 0, r.stderr
    again = json.loads((out / "summary.json").read_text())
    assert again["unlearning_config"]["eval_chars"] == 3000
    assert again["unlearning_config"]["attack_unedited"] and "kept vs unedited K=3" in r.stdout
    assert all("kept_unedited" in rec for x in again["unlearning"]["rows"] for rec in x["relearn"].values())
    assert again["unlearning"]["eval_positions"]["curves"] > got["unlearning"]["eval_positions"]["curves"]  # 3000 > 1500
    curves = pd.read_csv(out / ul.CURVES)
    relearned = curves[curves.fine_tune.str.startswith("relearn")]
    assert sorted(relearned.k.unique()) == [1, 3]
    assert all(len(g) == 2 + 1 for _key, g in relearned.groupby(["method", "k"]))
    assert (out / "figures" / "relearning_curves.png").is_file() and (out / "figures" / "unlearning_tradeoff.png").is_file()
    assert not [p for p in (path / "relearn").iterdir() if p.name.startswith(".")]  # the staging folder is gone


@pytest.mark.parametrize("args, message", [
    (["--threshold", "0.1"], "--threshold is for colour runs"),
    (["--no-baseline"], "--baseline/--no-baseline is for colour runs"),
    (["--concept", "red"], "this run anchors 'violence'"),
    (["--steps", "-1"], "--steps must be a positive integer, got -1"),
    (["--steps", "0"], "--steps must be a positive integer, got 0"),  # ran the table with no attack at all
    (["--samples", "0"], "--samples: relearn_k entries must be positive passage counts"),
    (["--eval-chars", "199"], "--eval-chars: Input should be greater than or equal to 200"),
    (["--repair-steps", "-2"], "--repair-steps: Input should be greater than or equal to 0"),
    (["--repair-lr", "0"], "--repair-lr: Input should be greater than 0"),
    (["--distil-steps", "-1"], "--distil-steps: Input should be greater than or equal to 0"),
    (["--distil-noise", "1.5"], "--distil-noise: Input should be less than or equal to 1"),
    (["--distil-noise", "0"], "--distil-noise: Input should be greater than 0"),
    (["--distil-lr", "0"], "--distil-lr: Input should be greater than 0"),
    (["--samples", "4,99999999"], "--samples: K = 99,999,999 asks for more passages than the"),  # was capped silently
])
def test_relearn_on_an_lm_run_refuses_bad_input_in_one_line(unlearned, args, message):
    path, _summary = unlearned
    before = sorted(p.name for p in path.rglob("*"))
    r = CliRunner().invoke(app, ["relearn", str(path), *args])
    assert r.exit_code != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in path.rglob("*")) == before


def test_relearn_needs_the_control_arm(tmp_path):
    corpus = write_corpus(tmp_path / "texts")
    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=5", 'lm.arms=["anchored"]'))
    out = tmp_path / "run"
    lifecycle.run(cfg.model_copy(update={"schedule": SCHEDULE}), out)
    r = CliRunner().invoke(app, ["relearn", str(out)])
    assert r.exit_code != 0 and "measured against the control arm" in r.stderr, r.stderr
    assert not (out / "relearn").exists()


def test_a_stopped_relearn_keeps_the_earlier_attack_and_leaves_nothing_half_written(unlearned, monkeypatch):
    from anchoring.kinds.lm import control

    path, _summary = unlearned
    out = path / "relearn" / "violence"
    if out.parent.exists():  # another test's attack: start as a first attack would
        import shutil

        shutil.rmtree(out.parent)

    def stopped(cfg, where, *args, **kwargs):
        (where / ul.CURVES).write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(control, "unlearning", stopped)
    r = CliRunner().invoke(app, ["relearn", str(path)])
    assert r.exit_code == 130 and not (path / "relearn").exists(), r.stderr  # not even an empty relearn/
    monkeypatch.undo()
    assert CliRunner().invoke(app, ["relearn", str(path), "--steps", "1"]).exit_code == 0
    earlier = (out / "summary.json").read_bytes()
    monkeypatch.setattr(control, "unlearning", stopped)
    r = CliRunner().invoke(app, ["relearn", str(path)])
    assert r.exit_code == 130 and (out / "summary.json").read_bytes() == earlier
    assert sorted(p.name for p in (path / "relearn").iterdir()) == ["violence"]


def test_relearn_refuses_a_run_written_by_delete(unlearned, tmp_path):
    path, _summary = unlearned
    r = CliRunner().invoke(app, ["delete", str(path), "--concept", "violence", "--out", str(tmp_path / "deleted")])
    assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(app, ["relearn", str(tmp_path / "deleted")])
    assert r.exit_code != 0 and "written by `anchoring delete`" in r.stderr and str(path) in r.stderr, r.stderr
    assert not (tmp_path / "deleted" / "relearn").exists()


def test_a_colour_relearn_without_flags_gets_the_functions_own_defaults(monkeypatch, tmp_path):
    """The CLI's options are optional so that an LM run can take its own; a colour run must still get
    exactly what its function defaults to, and every flag given must reach it."""
    from anchoring.cli import edit as cli
    from anchoring.kinds.base import EditResult
    from anchoring.kinds.base import Kind as Base

    seen = []

    class Kind(Base):
        name = "colour"

        def relearn(self, run, **options):
            seen.append(options)
            return EditResult("relearn", [], [])

    class Run:
        config = type("C", (), {"kind": "colour"})()

    monkeypatch.setattr(cli, "open_run", lambda *a, **k: Run())
    monkeypatch.setattr(cli, "kind_of", lambda cfg: Kind())
    assert CliRunner().invoke(app, ["relearn", str(tmp_path)]).exit_code == 0
    assert set(seen[-1]) == {"progress"}
    r = CliRunner().invoke(app, ["relearn", str(tmp_path), "--concept", "red", "--samples", "1,4", "--steps", "5", "--lr",
                                 "0.1", "--retain", "3", "--threshold", "0.02", "--no-baseline"])
    assert r.exit_code == 0, r.stderr
    assert {k: v for k, v in seen[-1].items() if k != "progress"} == {
        "concept": "red", "samples": [1, 4], "steps": 5, "lr": 0.1, "retain": 3, "threshold": 0.02, "baseline": False}


def test_the_cli_table_keeps_every_method_name_whole_on_a_narrow_terminal(unlearned):
    """rich cut a table wider than the terminal (80 columns, or piped output) to "anch…" in every
    row, so the methods could not be told apart; a narrow terminal now gets one method per line.
    Undefined cells print as a dash, as in the report, and steps as whole numbers."""
    from rich.console import Console

    _, summary = unlearned
    u = summary["unlearning"]
    names = list(dict.fromkeys(r["method"] for r in u["rows"]))

    def shown(width: int) -> str:
        c = Console(width=width, record=True, soft_wrap=True)
        with c.capture() as cap:
            for line in ut.lines(u):
                c.print(line)
        return cap.get()

    narrow, wide = shown(80), shown(400)
    assert "┃" not in narrow and "…" not in narrow
    for name in names:
        assert any(line.startswith(f"{name}: Δforget ") for line in narrow.splitlines()), name
    assert "┃" in wide and all(name in wide for name in names)
    for text in (narrow, wide):
        assert "nan" not in text
    recover = [line.rsplit("steps to recover ", 1)[1] for line in narrow.splitlines() if "steps to recover " in line]
    assert recover and not any(v.endswith(".000") for v in recover), recover  # 12, 12.5 or "> 100", never 12.000


def test_relearn_names_the_flag_to_pass_when_the_runs_own_k_is_too_large(unlearned):
    """A finished run's unlearning.relearn_k cannot be changed; the refusal says to pass --samples."""
    from anchoring.kinds import kind_of

    path, _summary = unlearned
    run = lifecycle.load_run(path)
    u = run.config.unlearning.model_copy(update={"relearn_k": [2, 10**6]})
    run.config = run.config.model_copy(update={"unlearning": u})
    before = sorted(p.name for p in path.rglob("*"))
    with pytest.raises(AnchoringError, match=r"^the run's unlearning.relearn_k: K = 1,000,000 asks for more passages "
                                             r"than the [\d,]+ training passages .* pass --samples with every K ≤"):
        kind_of(run.config).relearn(run)
    assert sorted(p.name for p in path.rglob("*")) == before  # nothing written


def test_losses_are_nats_per_character_over_each_class_of_position():
    """Uniform logits cost log V per token; forget is concept plus other positions of reference-positive
    passages, each divided by the characters its tokens complete (not by the tokens)."""
    from anchoring.kinds.lm import evaluate as lev

    V = 7

    class Uniform(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape, V)

    cls = torch.tensor([[lev.PAD, lev.CONCEPT, lev.OTHER, lev.RETAIN]])
    es = lev.EvalSet(torch.tensor([[0, 1, 2, 3]]), torch.zeros(1, 4, dtype=torch.long),
                     torch.tensor([[1.0, 1.0, 3.0, 2.0]]), cls, [0])
    got = ul.losses(Uniform(), es)
    log_v = math.log(V)
    assert got["forget"] == pytest.approx(2 * log_v / 4) and got["concept"] == pytest.approx(log_v)
    assert got["retain"] == pytest.approx(log_v / 2)


def test_a_rows_differences_are_after_minus_before():
    before = {"forget": 1.0, "concept": 2.0, "retain": 1.5}
    after = {"forget": 1.25, "concept": 2.75, "retain": 1.5625}
    r = ul._row("m", 0, "anchored", True, before, after, True)
    assert (r["d_forget"], r["d_forget_concept"], r["retain_cost"]) == (0.25, 0.75, 0.0625)
    assert r["selectivity"] == pytest.approx(ul.selectivity(0.75, 0.0625))


def test_an_attack_is_scored_at_its_lowest_point_not_its_last():
    curve = [{"concept": c} for c in (3.0, 1.0, 2.0)]  # overshoots, then climbs back
    rec = ul.relearn_record(curve, before_edit=0.5, control=0.8, passages=4)
    assert rec["lowest"] == 1.0 and rec["relearned"] == pytest.approx(0.2) and rec["kept"] == pytest.approx(0.2)
    assert (rec["after_edit"], rec["before_edit"], rec["passages"]) == (3.0, 0.5, 4)
    assert math.isnan(ul.relearn_record([{"concept": 0.505}], 0.5, 0.8, 4)["kept"])  # removed under KEPT_FLOOR



def test_an_attack_that_never_got_below_the_edit_is_named_under_the_table():
    """Its kept is 1 by the definition (the lowest point is the start), which reads as an edit that held
    when the fine-tune only made the model worse."""
    def row(method: str, seed: int, curves: dict[int, tuple[float, ...]], diverged: bool = False) -> dict:
        relearn = {str(k): {**ul.relearn_record([{"concept": c} for c in curve], before_edit=0.5, control=0.8, passages=k),
                            **({"diverged": True} if diverged else {})} for k, curve in curves.items()}
        return {"method": method, "seed": seed, "relearn": relearn}

    up, down = (1.0, 1.3, 1.2), (1.0, 0.7, 0.9)
    u = {"relearn_k": [4, 64], "rows": [
        row("anchoring · delete", 0, {4: up, 64: down}), row("anchoring · delete", 1, {4: up, 64: up}),
        row("SGTM", 0, {4: down, 64: down}), row("SGTM", 1, {4: up}, diverged=True),
        row("oracle filter", 0, {4: (0.505, 0.6)})]}  # removed too little for a share: the other note's
    assert [r["relearn"]["4"]["kept"] for r in u["rows"][:2]] == [1.0, 1.0]
    note = ut.never_lower_note(u)
    assert note.endswith(": anchoring · delete (K = 4: seeds 0, 1; K = 64: seed 1)"), note
    assert "SGTM" not in note and "oracle" not in note
    assert ut.never_lower_note({**u, "rows": [u["rows"][2]]}) == ""
    losses = dict.fromkeys(("forget", "concept", "retain"), 1.0)
    scored = {"weights_edited": True, "fine_tuned": True, "before": losses, "after": losses, "d_forget": 0.1,
              "d_forget_concept": 0.1, "retain_cost": 0.01, "R": 0.5, "recover_steps": 3}
    full = {**u, "rows": [{**scored, **r} for r in u["rows"]], "note": "n", "relearn_steps": 2}
    assert note in ut.lines(full) and note in ut.notes(full)  # under the CLI's table, and on the report's page (`notes`)

def test_cost_matching_keeps_the_strength_whose_cost_was_nearest(monkeypatch):
    """With too few bisection steps to reach the tolerance, the strength kept is the nearest one tried,
    not the last one."""
    import anchoring.kinds.lm.edits as edits

    monkeypatch.setattr(edits, "delete", lambda model, directions, beta: beta)  # the "model" is its strength
    monkeypatch.setattr(ul, "losses", lambda beta, es, bs: {"retain": 1.0 + beta**2, "concept": beta, "forget": beta})
    beta, got = ul.cost_matched(None, [torch.eye(4)[0]], 0.3, 1.0, None, 1, iters=2)  # tries 0.5 (0.25), 0.75 (0.56)
    assert beta == 0.5 and got["concept"] == 0.5


def test_the_midpoint_suppression_removes_only_what_lies_beyond_the_class_midpoint():
    from anchoring.kinds.lm.posthoc import beyond_midpoint

    edit = beyond_midpoint(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1]), torch.tensor([1.0, 0.0]))  # c = 1
    assert torch.equal(edit(torch.tensor([[3.0, 5.0]])), torch.tensor([[1.0, 5.0]]))
    assert torch.equal(edit(torch.tensor([[0.5, 5.0]])), torch.tensor([[0.5, 5.0]]))


def test_matched_deletions_never_pick_a_concept_axis():
    concept = [torch.eye(8)[0], torch.eye(8)[5]]
    for seed in range(50):
        picked = matched_directions(concept, torch.Generator().manual_seed(seed))
        axes = {int(v.abs().argmax()) for v in picked}
        assert len(axes) == 2 and not axes & {0, 5}, seed


def test_the_matched_move_of_a_subspace_hook_avoids_the_whole_subspace():
    """`Suppressed(…, subspace=True, random_control=…)` hands the subspace to the random turn to avoid: the
    control then adds no concept energy to any state (only the displacement's own direction avoided, it would)."""
    torch.manual_seed(6)
    model = NormalizedTransformer(11, 16, 2, 2, 16).eval()
    concept = [torch.eye(16)[0], torch.eye(16)[1], torch.eye(16)[2]]
    seen = {}
    handle = model.blocks[1].register_forward_pre_hook(lambda _m, args: seen.__setitem__("h", args[0]))
    h = torch.nn.functional.normalize(torch.randn(128, 16, 16), dim=-1)
    try:
        with torch.no_grad():
            fix = model.blocks[0].register_forward_hook(lambda _m, _i, _o: h.clone())
            Suppressed(model, ["blocks.0"], concept, subspace=True, random_control=7)(torch.zeros(128, 16, dtype=torch.long))
            fix.remove()
    finally:
        handle.remove()
    energy = lambda x: x[..., :3].norm(dim=-1)  # noqa: E731
    assert not torch.allclose(seen["h"], h)  # the states were moved
    assert bool((energy(seen["h"]) <= energy(h) + 1e-5).all())


def table_json(out: dict) -> str:
    """An evaluation's rows and curve points as one string: NaN-safe equality of two evaluations."""
    return json.dumps([out["rows"], out["curve_points"]], default=lambda o: o.item())


def count_seeds(monkeypatch, stop_in=()) -> tuple[list[int], set[int]]:
    """Record each seed the evaluation computes rather than reads back (it draws that seed's forget
    passages once), and raise a Ctrl-C there for the seeds in `stop_in` (a set the caller may empty)."""
    real, computed, stop = ul.forget_passages, [], set(stop_in)

    def counted(data, seed):
        computed.append(seed)
        if seed in stop:
            raise KeyboardInterrupt
        return real(data, seed)

    monkeypatch.setattr(ul, "forget_passages", counted)
    return computed, stop


def test_an_interrupted_unlearning_evaluation_resumes_from_its_finished_seeds(unlearned, tmp_path, monkeypatch):
    """The evaluation takes minutes per seed at full size. A stop keeps the seeds already finished, and
    the resumed evaluation gives exactly the numbers of an unbroken one; saved seeds are reused only
    for the same config and weights."""
    path, _ = unlearned
    run = lifecycle.load_run(path)
    models = {(arm, s): ms[0] for arm, ms in run.arms.items() for s in (0, 1)}  # the run's models as two seeds' work
    whole = table_json(ul.evaluate(run.config, run.data, models))
    partial = tmp_path / "partial"
    computed, stop_in = count_seeds(monkeypatch, stop_in=[1])  # Ctrl-C in the second seed
    with pytest.raises(KeyboardInterrupt):
        ul.evaluate(run.config, run.data, models, partial=partial)
    stop_in.clear()
    assert sorted(p.name for p in partial.iterdir()) == ["seed0.json"]
    assert table_json(ul.evaluate(run.config, run.data, models, partial=partial)) == whole
    assert computed == [0, 1, 1]  # the resumed evaluation computed only seed 1
    computed.clear()
    assert table_json(ul.evaluate(run.config, run.data, models, partial=partial)) == whole and computed == []
    changed = dict(models)
    changed["anchored", 1] = copy.deepcopy(models["anchored", 1])
    with torch.no_grad():
        changed["anchored", 1].embed.weight[0, 0] += 1e-3
    ul.evaluate(run.config, run.data, changed, partial=partial)
    assert computed == [1]  # other weights in seed 1: computed again; seed 0 kept
    computed.clear()
    other = run.config.model_copy(update={"unlearning": run.config.unlearning.model_copy(update={"relearn_steps": 2})})
    ul.evaluate(other, run.data, models, partial=partial)
    assert computed == [0, 1]  # other options: nothing reused


def test_an_evaluation_stopped_inside_a_seed_keeps_the_methods_it_finished(unlearned, tmp_path, monkeypatch):
    """One seed holds many methods, each minutes of fine-tuning at full size: a stop keeps the methods the
    seed finished, the resumed evaluation scores only the rest, and the table, curves and progress equal
    an unbroken evaluation's. Saved methods that are not this evaluation's first ones are not reused."""
    path, _ = unlearned
    run = lifecycle.load_run(path)
    models = {(arm, 0): ms[0] for arm, ms in run.arms.items()}
    ticks: list[tuple[int, int]] = []
    whole = table_json(ul.evaluate(run.config, run.data, models, progress=lambda d, t: ticks.append((d, t))))
    unbroken_end, ticks[:] = ticks[-1], []
    real, scored, stop_at = ul.score_method, [], [3]

    def counted(m, *args, **kwargs):
        scored.append(m.name)
        if len(scored) in stop_at:
            raise KeyboardInterrupt
        return real(m, *args, **kwargs)

    monkeypatch.setattr(ul, "score_method", counted)
    partial = tmp_path / "partial"
    with pytest.raises(KeyboardInterrupt):
        ul.evaluate(run.config, run.data, models, partial=partial)
    saved = json.loads((partial / "seed0.json").read_text())
    assert not saved["complete"] and [r["method"] for r in saved["rows"]] == scored[:2]
    assert saved["done"] > 0  # the first method's fine-tuning steps, counted for the bar
    names, stop_at[:] = list(scored), []
    scored.clear()
    assert table_json(ul.evaluate(run.config, run.data, models, partial=partial, progress=lambda d, t: ticks.append((d, t)))) == whole
    assert scored and scored[0] == names[2] and names[0] not in scored and names[1] not in scored  # the rest only
    assert ticks[-1] == unbroken_end and ticks[0][0] == saved["done"]
    assert json.loads((partial / "seed0.json").read_text())["complete"]
    # a seed file whose methods are not this evaluation's first ones (another version's order) is not reused
    saved["rows"] = saved["rows"][::-1]
    (partial / "seed0.json").write_text(json.dumps(saved))
    scored.clear()
    assert table_json(ul.evaluate(run.config, run.data, models, partial=partial)) == whole and scored[:2] == names[:2]


def test_a_run_and_an_attack_keep_finished_seeds_where_a_stop_leaves_them(unlearned, tmp_path, monkeypatch):
    """A run saves its evaluation's seeds in the run folder, which resume reads; `anchoring relearn` saves
    them beside its staging folder, which a stop removes. Both clear them once the results are written."""
    import shutil

    path, summary = unlearned
    copy_ = tmp_path / "run"
    shutil.copytree(path, copy_, ignore=shutil.ignore_patterns("relearn"))
    (copy_ / runs.SUMMARY).unlink()  # as a run stopped while it evaluated leaves it
    real, seen = ul.evaluate, []

    def watched(*args, partial=None, **kwargs):
        out = real(*args, partial=partial, **kwargs)
        seen.append((partial, sorted(p.name for p in partial.iterdir())))
        return out

    monkeypatch.setattr(ul, "evaluate", watched)
    lifecycle.resume(copy_)
    assert seen == [(copy_ / ul.PARTIAL, ["seed0.json"])] and not (copy_ / ul.PARTIAL).exists()
    got = json.loads((copy_ / runs.SUMMARY).read_text())["unlearning"]["rows"]
    assert [r["method"] for r in got] == [r["method"] for r in summary["unlearning"]["rows"]]
    assert [r["d_forget_concept"] for r in got] == pytest.approx([r["d_forget_concept"] for r in summary["unlearning"]["rows"]],
                                                                 abs=1e-5)  # weights reloaded from disk, as above
    seen.clear()
    r = CliRunner().invoke(app, ["relearn", str(copy_), "--steps", "1"])
    assert r.exit_code == 0, r.stderr
    assert seen == [(copy_ / "relearn" / f".violence-{ul.PARTIAL}", ["seed0.json"])]
    assert sorted(p.name for p in (copy_ / "relearn").iterdir()) == ["violence"]
    assert not (copy_ / "relearn" / "violence" / ul.PARTIAL).exists()
    # an attack stopped after its seed finished (here: while it scores the targets) is run again without
    # evaluating that seed again
    real_targets = ut.targets

    def stop(unlearning):
        raise KeyboardInterrupt

    monkeypatch.setattr(ut, "targets", stop)
    computed, _ = count_seeds(monkeypatch)
    assert CliRunner().invoke(app, ["relearn", str(copy_), "--steps", "2"]).exit_code == 130
    assert computed == [0] and (copy_ / "relearn" / f".violence-{ul.PARTIAL}" / "seed0.json").is_file()
    monkeypatch.setattr(ut, "targets", real_targets)
    r = CliRunner().invoke(app, ["relearn", str(copy_), "--steps", "2"])
    assert r.exit_code == 0 and computed == [0], r.stderr
    assert json.loads((copy_ / "relearn" / "violence" / runs.SUMMARY).read_text())["unlearning"]["relearn_steps"] == 2
    assert sorted(p.name for p in (copy_ / "relearn").iterdir()) == ["violence"]


def test_a_run_stopped_in_its_evaluation_resumes_without_redoing_the_finished_seeds(tmp_path, monkeypatch):
    """The whole path: `lifecycle.run` stopped in seed 1's evaluation, then `resume` in a fresh config
    read from config.toml (the saved seed's key must survive that round trip), gives the table an
    unbroken run gives."""
    corpus = write_corpus(tmp_path / "texts")
    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=30", "train.seeds=2", 'lm.arms=["anchored","control"]',
                                                      *UNLEARNING, "unlearning.posthoc=[]"))
    cfg = cfg.model_copy(update={"schedule": SCHEDULE})
    unbroken = lifecycle.run(cfg, tmp_path / "unbroken").summary["unlearning"]["rows"]
    computed, stop_in = count_seeds(monkeypatch, stop_in=[1])
    out = tmp_path / "stopped"
    with pytest.raises(lifecycle.TrainingInterrupted):
        lifecycle.run(cfg, out)
    assert sorted(p.name for p in (out / ul.PARTIAL).iterdir()) == ["seed0.json"] and not (out / runs.SUMMARY).exists()
    stop_in.clear()
    computed.clear()
    rows = lifecycle.resume(out).summary["unlearning"]["rows"]
    assert computed == [1] and not (out / ul.PARTIAL).exists()
    assert [(r["method"], r["seed"]) for r in rows] == [(r["method"], r["seed"]) for r in unbroken]
    assert json.dumps(rows, default=lambda o: o.item()) == json.dumps(unbroken, default=lambda o: o.item())  # NaN-safe


def test_a_relearning_attack_that_blows_up_is_recorded_as_broken_not_as_a_deletion_that_held(unlearned):
    """A fine-tune at a learning rate that broke it reported the lowest loss reached before the NaN
    (Python's `min` passes NaN by) and no recovery: a deletion that held, read off a failed attack.
    Failing the whole evaluation instead would lose a run that trained for hours, so the row says
    the attack broke, its "kept" and recovery are undefined, and the target is not met on it."""
    path, _summary = unlearned
    try:
        _check_a_broken_attack(path)
    finally:
        shutil.rmtree(path / "relearn", ignore_errors=True)  # the module's run is shared with other tests


def _check_a_broken_attack(path) -> None:
    r = CliRunner().invoke(app, ["relearn", str(path), "--lr", "1e30", "--steps", "3"])
    assert r.exit_code == 0, r.stderr
    got = json.loads((path / "relearn" / "violence" / "summary.json").read_text())
    attacked = [x for x in got["unlearning"]["rows"] if x.get("relearn")]
    assert attacked and all(a.get("diverged", "").startswith("fine-tuning diverged at step") for x in attacked
                            for a in x["relearn"].values())
    assert all(a["kept"] is None and a["relearned"] is None for x in attacked for a in x["relearn"].values())  # undefined
    assert all(x["recover_steps"] is None and x["recover_diverged"] for x in attacked if x["recover_steps"] != 0)
    robust = [v for k, v in got["targets"].items() if "keeps ≥ 50%" in k]
    assert robust and all(not t["met"] and t["diverged_seeds"] for t in robust)
    assert "fine-tune(s) diverged at unlearning.relearn_lr 1e+30" in r.stdout.replace("\n", " ")
    assert "attack diverged, left out: not met" in r.stdout.replace("\n", " ")  # the target line says why it missed
    header, rows = ut.table(got["unlearning"])
    steps = header.index("steps to recover")
    assert any(row[steps] == ul.DIVERGED for row in rows) and not any(str(row[steps]).startswith(">") for row in rows)
    curves = pd.read_csv(path / "relearn" / "violence" / ul.CURVES)
    assert curves[["forget_concept", "forget", "retain"]].notna().all().all()  # each curve stops at its last finite point


def test_a_repair_that_blows_up_is_recorded_on_its_row_and_scored_again_at_another_rate(unlearned):
    """A repair that diverged in the evaluation after training stopped the whole run with one line: the
    trained arms were kept, but the run never finished, and `relearn` could not score it at another
    rate. Now the row records the broken repair (everything after the edit undefined, its targets not
    met) and `anchoring relearn --repair-lr` scores the run again."""
    path, _summary = unlearned
    try:
        r = CliRunner().invoke(app, ["relearn", str(path), "--steps", "2", "--repair-steps", "3", "--repair-lr", "1e30"])
        assert r.exit_code == 0, r.stderr
        got = json.loads((path / "relearn" / "violence" / "summary.json").read_text())
        rows = {x["method"]: x for x in got["unlearning"]["rows"]}
        broken = [x for x in rows.values() if x.get("repair_diverged")]
        assert rows["anchoring · delete"] in broken and rows["LEACE · delete"] in broken
        assert all(x["repair_diverged"].startswith("the repair's fine-tuning diverged at step") for x in broken)
        assert all(x["after"]["concept"] is None and x["d_forget_concept"] is None and not x["relearn"] for x in broken)
        assert all(x.get("recover_diverged") for x in broken if x["fine_tuned"])
        for name in ("weak filter", "oracle filter"):  # trained arms, not edits: never repaired, scored as always
            assert "repair_diverged" not in rows[name] and rows[name]["after"]["concept"] is not None
        lines = {k: v for k, v in got["targets"].items() if "anchoring · delete" in k and "same retain cost" not in k}
        counts = {k: t.get("repair_diverged_seeds") for k, t in lines.items()}
        assert lines and all(not t["met"] and t.get("repair_diverged_seeds") == 1 for t in lines.values()), counts
        said = r.stdout.replace("\n", " ")
        assert "repair(s) diverged at unlearning.repair_lr 1e+30" in said and "repair diverged, left out: not met" in said
        header, table = ut.table(got["unlearning"])
        steps = header.index("steps to recover")
        assert next(t for t in table if t[:2] == ["anchoring · delete", 0])[steps] == ul.DIVERGED
        # the same run scored again at a rate the repair survives: every row defined
        r = CliRunner().invoke(app, ["relearn", str(path), "--steps", "2", "--repair-steps", "3", "--repair-lr", "1e-4"])
        assert r.exit_code == 0, r.stderr
        got = json.loads((path / "relearn" / "violence" / "summary.json").read_text())
        assert not any(x.get("repair_diverged") for x in got["unlearning"]["rows"])
        assert all(x["edit_only"] for x in got["unlearning"]["rows"] if x["method"] not in ("weak filter", "oracle filter"))
    finally:
        shutil.rmtree(path / "relearn", ignore_errors=True)  # the module's run is shared with other tests


def test_a_run_an_earlier_version_stopped_at_a_diverging_repair_resumes_and_only_evaluates(unlearned, tmp_path):
    """An earlier version stopped a run whose unlearning repair diverged after training, with diverged.txt,
    and refused to resume it ("would meet the same step again"): hours of training with no way to a
    table. Such a run now resumes and evaluates again; a run whose training diverged is still refused."""
    path, summary = unlearned
    copy_ = tmp_path / "run"
    shutil.copytree(path, copy_, ignore=shutil.ignore_patterns("relearn"))
    (copy_ / runs.SUMMARY).unlink()
    (copy_ / runs.DIVERGED).write_text("the repair of anchoring · delete (seed 0): fine-tuning diverged at step 2 of 3 "
                                       "(lr 1e+30): its loss is not finite; give a smaller unlearning.repair_lr\n")
    r = CliRunner().invoke(app, ["show", str(copy_)])
    assert r.exit_code == 2 and "has not finished" in r.stderr and "anchoring resume" in r.stderr, r.stderr
    r = CliRunner().invoke(app, ["resume", str(copy_), "-q"])
    assert r.exit_code == 0, r.stderr
    assert not (copy_ / runs.DIVERGED).exists()
    got = json.loads((copy_ / runs.SUMMARY).read_text())
    assert [x["d_forget_concept"] for x in got["unlearning"]["rows"]] == pytest.approx(
        [x["d_forget_concept"] for x in summary["unlearning"]["rows"]], nan_ok=True)  # trained nothing: the same models
    (copy_ / runs.SUMMARY).unlink()
    (copy_ / runs.DIVERGED).write_text("training diverged at step 7: the loss is not finite\n")
    r = CliRunner().invoke(app, ["resume", str(copy_), "-q"])
    assert r.exit_code == 2 and "would meet the same step again" in r.stderr, r.stderr


def test_the_evaluations_progress_moves_by_each_methods_planned_steps(unlearned):
    """A fine-tune that stops early (a repair or attack that diverged, a recovery that got there) left its
    planned steps unticked: the bar lagged further behind with every such method, its time left wrong,
    and jumped to the end at the last one. Now the bar stands at each method's planned end after it."""
    import itertools

    path, _summary = unlearned
    run = lifecycle.load_run(path)
    u = run.config.unlearning.model_copy(update={"repair_steps": 2, "repair_lr": 1e30, "relearn_steps": 2})
    cfg = run.config.model_copy(update={"unlearning": u})
    models = {(a, s): m for a, ms in run.arms.items() for s, m in zip(run.seeds, ms)}
    seen: list[int] = []
    out = ul.evaluate(cfg, run.data, models, progress=lambda done, total: seen.append(done))
    assert any(r.get("repair_diverged") for r in out["rows"])  # those stopped after a step of their two
    bounds = list(itertools.accumulate(ul.method_ticks(m, u) for m in ul.methods(cfg, run.data, models, run.seeds[0])))
    assert set(bounds) <= set(seen) and seen == sorted(seen), (bounds, seen)


def test_the_unlearning_evaluation_after_training_reports_to_the_runs_progress(tmp_path):
    """The run's bar stood at the end of training while the evaluation fine-tuned (it drew a bar of
    its own instead, on a terminal only); now its steps reach the run's progress, up to its total."""
    corpus = write_corpus(tmp_path / "texts")
    cfg = experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=5", 'lm.arms=["anchored","control"]', *UNLEARNING))
    seen: list[tuple[int, int]] = []
    lifecycle.run(cfg.model_copy(update={"schedule": SCHEDULE}), tmp_path / "run",
                  progress=lambda done, total: seen.append((done, total)))
    after = [(d, t) for d, t in seen if t != 10]  # 2 jobs × 5 steps trained; then the fine-tuning steps
    assert after and after[-1][0] == after[-1][1] and [d for d, _ in after] == sorted(d for d, _ in after), seen


def test_the_distilled_deletion_is_a_row_with_its_control_and_its_own_targets(unlearned):
    """`unlearning.distil_steps`: the deleted anchored model, distilled into a student that starts near it
    (noise 0.2), keeps most of the deletion's rise in concept loss; the same distillation of the unedited
    model, its control, does not raise it as much; the control is not attacked, the distilled deletion is,
    both are repaired after their distillation when the other edits are, and the table names both, with
    target lines of their own."""
    path, summary = unlearned
    run = lifecycle.load_run(path)
    models = {(arm, s): m for arm in run.arms for s, m in zip(run.seeds, run.arms[arm])}
    u = run.config.unlearning.model_copy(update={"distil_steps": 30, "distil_noise": 0.2, "distil_lr": 1e-3,
                                                  "recover_steps": 0, "repair_steps": 2})
    cfg = run.config.model_copy(update={"unlearning": u})
    seen: list[tuple[int, int]] = []
    got = ul.evaluate(cfg, run.data, models, progress=lambda done, total: seen.append((done, total)))
    rows = {r["method"]: r for r in got["rows"]}
    plain = {r["method"]: r for r in summary["unlearning"]["rows"]}
    d, alone, delete_ = rows[ul.DISTILLED], rows[ul.DISTIL_ONLY], plain["anchoring · delete"]
    assert d["before"] == alone["before"] == delete_["before"]  # both start from the anchored model
    assert d["fine_tuned"] and set(d["relearn"]) == {"2"} and "leftover" not in d
    assert not alone["fine_tuned"] and not alone["relearn"]
    for r in (d, alone):  # repaired after the distillation: the unrepaired student is kept beside the repaired one
        assert r["repair_steps"] == 2 and r["edit_only"]["retain"] != pytest.approx(r["after"]["retain"], abs=1e-6), r
    assert "the distilled rows after their distillation, with no edit to re-apply" in ut.repair_note(got)
    assert d["d_forget_concept"] > alone["d_forget_concept"] + 0.5 * delete_["d_forget_concept"], (d, alone, delete_)
    assert d["after"]["retain"] != pytest.approx(delete_["after"]["retain"], abs=1e-4)  # a student, not the deleted model
    assert alone["retain_cost"] > 0.01  # a student that falls short of its teacher costs ordinary text
    assert got["distil_steps"] == 30
    total = sum(ul.method_ticks(m, u) for m in ul.methods(cfg, run.data, models, run.seeds[0]))
    assert all(t == total and d_ <= t for d_, t in seen) and seen[-1][0] == total  # the distillations' steps counted
    distilling = ul.method_ticks(ul.distil_methods(cfg, models["anchored", run.seeds[0]], run.seeds[0])[1], u)
    assert distilling == 30 + 2  # the control: its distillation and repair (not attacked)
    assert any("anchoring · delete → distil: the deleted anchored model distilled" in n for n in ut.notes(got))
    assert f"{ul.DISTILLED} keeps ≥ 50% of Δforget after relearning on K = 2" in ut.targets(got)
    assert ul.DISTILLED not in plain  # off by default


def test_relearn_refuses_to_distil_a_run_without_the_anchored_arm(unlearned):
    from anchoring.kinds.lm import control

    path, _summary = unlearned
    run = lifecycle.load_run(path)
    del run.arms["anchored"]  # a run that trained the control and filters only
    with pytest.raises(AnchoringError, match="--distil-steps distils anchoring's deletion, and this run has only control"):
        control.relearn(run, distil_steps=5)


def test_a_distillation_that_blows_up_is_recorded_on_its_rows_and_the_rest_of_the_table_stands(unlearned):
    """A distillation rate far too high breaks the student: its rows say so and are undefined after the
    edit, their target lines are not met and name the distillation, and every other row is as before."""
    path, summary = unlearned
    run = lifecycle.load_run(path)
    models = {(arm, s): m for arm in run.arms for s, m in zip(run.seeds, run.arms[arm])}
    u = run.config.unlearning.model_copy(update={"distil_steps": 3, "distil_lr": 1e30, "recover_steps": 0, "relearn_steps": 1})
    got = ul.evaluate(run.config.model_copy(update={"unlearning": u}), run.data, models)
    rows = {r["method"]: r for r in got["rows"]}
    for name in (ul.DISTILLED, ul.DISTIL_ONLY):
        assert rows[name]["repair_diverged"].startswith("the distillation's fine-tuning diverged"), rows[name]
        assert math.isnan(rows[name]["d_forget_concept"]) and "edit_only" not in rows[name]
    assert rows["anchoring · delete"]["d_forget_concept"] == pytest.approx(
        {r["method"]: r for r in summary["unlearning"]["rows"]}["anchoring · delete"]["d_forget_concept"], abs=1e-6)
    said = " ".join(ut.notes(got))
    assert "2 distillation(s) diverged at unlearning.distil_lr 1e+30" in said and "repair(s) diverged" not in said
    line = ut.targets(got)[f"{ul.DISTILLED}: Δforget at concept positions ≥ 0.5 nats/char"]
    assert not line["met"] and "(1 seed's distillation diverged, left out: not met)" in report.left_out_note(line)


def test_a_repair_that_blows_up_after_a_distillation_is_named_as_the_repair(unlearned):
    """The distilled rows are repaired like every edit; a repair rate far too high breaks them there, and
    their rows, target lines and notes say it was the repair, not the distillation, that diverged."""
    path, _summary = unlearned
    run = lifecycle.load_run(path)
    models = {(arm, s): m for arm in run.arms for s, m in zip(run.seeds, run.arms[arm])}
    u = run.config.unlearning.model_copy(update={"distil_steps": 3, "distil_lr": 1e-3, "repair_steps": 3, "repair_lr": 1e30,
                                                  "recover_steps": 0, "relearn_steps": 1})
    got = ul.evaluate(run.config.model_copy(update={"unlearning": u}), run.data, models)
    rows = {r["method"]: r for r in got["rows"]}
    for name in (ul.DISTILLED, ul.DISTIL_ONLY):
        assert rows[name]["repair_diverged"].startswith("the repair's"), rows[name]
        assert "edit_only" in rows[name] and math.isnan(rows[name]["d_forget_concept"])
    line = ut.targets(got)[f"{ul.DISTILLED}: Δforget at concept positions ≥ 0.5 nats/char"]
    assert not line["met"] and line["repair_diverged_seeds"] == 1 and "distil_diverged_seeds" not in line, line
    said = " ".join(ut.notes(got))
    assert f"{ul.DISTILLED} seed {run.seeds[0]}" in said and "distillation(s) diverged" not in said, said


def test_relearn_distil_steps_adds_the_distilled_rows_to_the_attack(unlearned):
    path, _summary = unlearned
    out = path / "relearn" / "violence"
    r = CliRunner().invoke(app, ["relearn", str(path), "--samples", "2", "--steps", "1", "--distil-steps", "2",
                                 "--distil-noise", "0.5", "--distil-lr", "1e-3"])
    assert r.exit_code == 0, r.stderr
    got = json.loads((out / "summary.json").read_text())
    rows = {x["method"]: x for x in got["unlearning"]["rows"]}
    assert {ul.DISTILLED, ul.DISTIL_ONLY} <= set(rows) and rows[ul.DISTILLED]["relearn"]
    assert got["unlearning_config"]["distil_steps"] == 2 and got["unlearning"]["distil_noise"] == 0.5
    assert "moved 0.5 of the way to a fresh model" in r.stdout.replace("\n", " ")


def test_attacking_the_unedited_models_counts_kept_from_where_the_attack_takes_them(unlearned):
    """`unlearning.attack_unedited`: every attack runs again on the unedited models (the anchored arm for
    anchoring's rows, the control for the post-hoc rows and the filters), from the same windows, and each
    attacked row gets that attack's drop and its kept share counted from there; the rows are otherwise
    those of the plain evaluation, the progress counts the extra attacks, and the table shows the column."""
    path, _summary = unlearned
    run = lifecycle.load_run(path)
    models = {(arm, s): m for arm in run.arms for s, m in zip(run.seeds, run.arms[arm])}
    u = run.config.unlearning.model_copy(update={"attack_unedited": True})
    cfg = run.config.model_copy(update={"unlearning": u})
    seen: list[tuple[int, int]] = []
    got = ul.evaluate(cfg, run.data, models, progress=lambda done, total: seen.append((done, total)))
    plain = ul.evaluate(run.config, run.data, models)
    seed = run.seeds[0]
    k = u.relearn_k[0]
    forget = ul.forget_passages(run.data, seed)
    w = ul.Windows(run.data, forget[:k], cfg.lm.tokens, seed, (ul.BATCH_SALT << 20) + k)
    small = ul.ev.eval_set(run.data, cfg.lm.tokens, u.eval_chars, cfg.evaluate.after, order=cfg.evaluate.order)
    drops = {}
    for arm in ("anchored", "control"):  # the attack on the unedited model, run here on its own
        curve = ul.finetune(models[arm, seed], lambda step: w.batch(step, u.relearn_batch), u.relearn_steps, u.relearn_lr,
                            lambda m: ul.losses(m, small, cfg.evaluate.batch_size))
        drops[arm] = curve[0]["concept"] - min(c["concept"] for c in curve)
    assert min(drops.values()) > 0.01  # this attack does lower the unedited models' concept loss, so the count differs
    attacked = [r for r in got["rows"] if r.get("relearn")]
    assert {r["method"] for r in attacked} >= {"anchoring · delete", "mean-difference · delete", "oracle filter"}
    for r, p in zip(got["rows"], plain["rows"]):
        assert r["method"] == p["method"] and r["d_forget_concept"] == p["d_forget_concept"]
        for key, rec in (r.get("relearn") or {}).items():
            old = p["relearn"][key]
            assert {x: rec[x] for x in old if x != "kept"} == {x: old[x] for x in old if x != "kept"}
            arm = "anchored" if r["method"].startswith("anchoring") else "control"
            assert rec["unedited"] == arm and rec["unedited_drop"] == pytest.approx(drops[arm], abs=1e-9), (r["method"], rec)
            rise = rec["after_edit"] - rec["before_edit"]
            if rise >= ul.KEPT_FLOOR:
                want = (rec["lowest"] - rec["before_edit"] + drops[arm]) / rise
                assert rec["kept_unedited"] == pytest.approx(want) and rec["kept"] == pytest.approx(old["kept"])
            else:
                assert math.isnan(rec["kept_unedited"])
    planned = ul._planned_ticks(ul.methods(cfg, run.data, models, seed), u)
    assert ul.unedited_ticks(ul.methods(cfg, run.data, models, seed), u) == 2 * u.relearn_steps  # anchored, control
    # the bar closes at its total anyway: the steps before it show that the extra attacks ticked
    assert (planned - 1, planned) in seen and seen[-1] == (planned, planned) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    head, rows = ut.table(got)
    col = head.index(f"{ut.UNEDITED} K={k}")
    med = next(row for row in rows if row[0] == "anchoring · delete" and row[1] == "median")
    mine = [r for r in got["rows"] if r["method"] == "anchoring · delete"]
    assert med[col] == pytest.approx(ut.ranked_median([ut.kept_for_median(r, k, "kept_unedited") for r in mine]), nan_ok=True)
    assert any(n.startswith("kept vs unedited") and f"anchored, seed {seed}: K={k}" in n for n in ut.notes(got))
    assert f"{ut.UNEDITED} K={k}" not in ut.table(plain)[0] and not any(n.startswith("kept vs") for n in ut.notes(plain))


def test_an_evaluation_stopped_in_the_attacks_on_the_unedited_models_annotates_its_saved_rows_on_resuming(
        unlearned, tmp_path, monkeypatch):
    """The attacks on the unedited models run after a seed's last method, so a stop there leaves every
    method saved but the seed unfinished: the resumed evaluation reads the rows back, runs those attacks
    and gives what an evaluation never stopped gives."""
    path, _summary = unlearned
    run = lifecycle.load_run(path)
    models = {(arm, s): m for arm in run.arms for s, m in zip(run.seeds, run.arms[arm])}
    u = run.config.unlearning.model_copy(update={"attack_unedited": True, "recover_steps": 0})
    cfg = run.config.model_copy(update={"unlearning": u})
    real = ul.attack_unedited

    def stop(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ul, "attack_unedited", stop)
    with pytest.raises(KeyboardInterrupt):
        ul.evaluate(cfg, run.data, models, partial=tmp_path)
    saved = json.loads((tmp_path / f"seed{run.seeds[0]}.json").read_text())
    assert not saved["complete"] and len(saved["rows"]) == len(ul.methods(cfg, run.data, models, run.seeds[0]))
    monkeypatch.setattr(ul, "attack_unedited", real)
    resumed = ul.evaluate(cfg, run.data, models, partial=tmp_path)
    assert all("kept_unedited" in rec for r in resumed["rows"] for rec in (r.get("relearn") or {}).values())
    assert table_json(resumed) == table_json(ul.evaluate(cfg, run.data, models))
    assert json.loads((tmp_path / f"seed{run.seeds[0]}.json").read_text())["complete"]


def test_an_unedited_attack_that_diverges_leaves_kept_vs_unedited_undefined_not_zero(monkeypatch):
    """An attack on an unedited model that diverges has no drop: the rows of that model get NaN (not a
    share counted from a broken curve), their medians leave them out rather than count 0, the note says
    why the cell is "–", the bar still moves by the attack's planned steps, and the rows of the other
    unedited model are counted from their own drop."""
    from types import SimpleNamespace

    from anchoring.kinds.lm.config import UnlearningConfig
    from anchoring.train.skeleton import Diverged

    a, c = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    ms = [ul.Method("anchoring · delete", "anchored", a, a, True),
          ul.Method("oracle filter", "oracle-filtered", c, c, True, repairable=False)]
    rows = [{"method": m.name, "seed": 0, "relearn": {"4": {"lowest": 1.2, "before_edit": 1.0, "after_edit": 1.5, "kept": 0.4}}}
            for m in ms]

    def fake_finetune(model, batches, steps, lr, score, tick=None, **_kwargs):
        if model is a:  # breaks after two of its three steps
            tick(), tick()
            e = Diverged("fine-tuning diverged at step 2 of 3")
            e.curve = [{"concept": 1.0}, {"concept": 0.9}]
            raise e
        for _ in range(steps):
            tick()
        return [{"concept": 1.0}, {"concept": 0.95}, {"concept": 0.97}, {"concept": 0.96}]

    monkeypatch.setattr(ul, "finetune", fake_finetune)
    at = SimpleNamespace(attack={4: SimpleNamespace(batch=lambda step, n: None)}, small=None, bs=1)
    u = UnlearningConfig(relearn_k=[4], relearn_steps=3, attack_unedited=True)
    ticks: list[int] = []
    ul.attack_unedited(ms, rows, at, u, ticks.append, {id(a): "anchored", id(c): "control"})
    assert sum(ticks) == 2 * 3 == ul.unedited_ticks(ms, u)
    broken, fine = rows[0]["relearn"]["4"], rows[1]["relearn"]["4"]
    assert broken["unedited"] == "anchored" and math.isnan(broken["unedited_drop"]) and math.isnan(broken["kept_unedited"])
    assert fine["unedited"] == "control" and fine["unedited_drop"] == pytest.approx(0.05)
    assert fine["kept_unedited"] == pytest.approx((1.2 - 1.0 + 0.05) / 0.5)
    assert math.isnan(ut.kept_for_median(rows[0], 4, "kept_unedited")) and ut.kept_for_median(rows[0], 4) == 0.4
    nothing = {"relearn": {"4": {"kept": float("nan"), "kept_unedited": float("nan")}}}  # an edit with nothing to keep
    assert ut.kept_for_median(nothing, 4, "kept_unedited") == 0.0 == ut.kept_for_median(nothing, 4)
    note = ut.unedited_note({"attack_unedited": True, "rows": rows})
    assert "anchored, seed 0: K=4 –" in note and "control, seed 0: K=4 0.050" in note and "diverged" in note
    assert ut.unedited_note({"rows": rows}) == ""  # a summary written without the option
