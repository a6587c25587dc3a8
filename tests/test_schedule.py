
import pytest
import torch

from anchoring import experiments
from anchoring.errors import AnchoringError
from anchoring.kinds.colour.objective import build_objective, build_timeline
from anchoring.schedule import Timeline, Track, parse_dopesheet

ANCHORED = """STEP,PHASE,ACTION,lr,separate,anchor,subspace
0,Train,,1e-8,,0.01,0.01
+10,,,0.01,,,
+0.5,,,,,,0.1
750,,,0.1,0.01,0.1,
+0.5,,,,,,0.1
+0.9,,,0.1,0,0,0
1500,,,0.05,,,
"""


def keys(track):
    return [(int(t), v) for t, v in track.keys]


def test_published_schedule_resolves_relative_steps():
    tl = parse_dopesheet(ANCHORED)
    assert tl.steps == 1501
    assert keys(tl.tracks["lr"]) == [(0, 1e-8), (10, 0.01), (750, 0.1), (1425, 0.1), (1500, 0.05)]
    assert keys(tl.tracks["subspace"]) == [(0, 0.01), (375, 0.1), (1125, 0.1), (1425, 0.0)]
    assert keys(tl.tracks["separate"]) == [(750, 0.01), (1425, 0.0)]
    v = tl.values(0)
    assert v["separate"] == 0.01  # before its first key, the first value holds
    assert tl.values(1500) == {"lr": 0.05, "separate": 0.0, "anchor": 0.0, "subspace": 0.0}
    assert tl.phases == [(0, "Train")]
    assert tl.table().shape == (1501, 4)


def test_minjerk_formula():
    tr = Track([(100, 1.0), (200, 3.0)])
    for u in (0.0, 0.25, 0.5, 0.8):
        expect = 1.0 + 2.0 * (10 * u**3 - 15 * u**4 + 6 * u**5)
        assert tr(100 + 100 * u) == pytest.approx(expect, abs=1e-12)
    assert tr(50) == 1.0 and tr(250) == 3.0
    assert tr.velocity(100) == pytest.approx(0.0) and tr.velocity(200 - 1e-9) == pytest.approx(0.0, abs=1e-6)


def test_linear_step_and_log_interpolation():
    tl = parse_dopesheet("STEP,a:linear:linear,b:linear:step,c:log:linear,d:log\n0,0,1,1e-4,1e-4\n100,10,5,1e-2,1e-2\n")
    assert tl.values(25)["a"] == pytest.approx(2.5)
    assert tl.values(99)["b"] == 1.0 and tl.values(100)["b"] == 5.0  # step: hold, then jump at the key
    assert tl.values(50)["c"] == pytest.approx(1e-3)  # halfway in log space = geometric mean
    assert tl.values(50)["d"] == pytest.approx(1e-3)  # min-jerk is symmetric at its midpoint too
    assert tl.values(25)["d"] == pytest.approx(10 ** (-4 + 2 * (10 / 64 - 15 / 256 + 6 / 1024)))


def test_rows_out_of_order_are_an_error():
    text = """STEP,PHASE,ACTION,x
0,Warm,,0
+10,,,1
-20,Main,"snapshot,checkpoint",2
+0.25,,,3
100,,,4
+5,Tail,snapshot,
200,,,5
"""
    # -20 is 20 before the next absolute row (100) = 80, but the +0.25 row after it is 25: out of order
    with pytest.raises(AnchoringError, match="line 5: STEP '\\+0.25' resolves to 25, before the previous row's 80"):
        parse_dopesheet(text)


def test_relative_steps_in_order():
    tl = parse_dopesheet("""STEP,PHASE,ACTION,x
0,Warm,,0
+10,,,1
+0.5,Main,"snapshot,checkpoint",2
-20,,,3
100,,,4
+5,Tail,snapshot,
200,,,5
""")
    assert keys(tl.tracks["x"]) == [(0, 0), (10, 1), (50, 2), (80, 3), (100, 4), (200, 5)]
    assert tl.phases == [(0, "Warm"), (50, "Main"), (105, "Tail")]
    assert tl.phase_at(49) == "Warm" and tl.phase_at(50) == "Main" and tl.phase_at(150) == "Tail"
    assert tl.actions == {50: ["snapshot", "checkpoint"], 105: ["snapshot"]}
    assert tl.steps == 201


@pytest.mark.parametrize("text,message", [
    ("STEP,x\nabc,1\n", "line 2: bad STEP 'abc'"),
    ("STEP,x\n0,1\n+x,2\n", "line 3: bad STEP '\\+x'"),
    ("STEP,x\n0,1\n+0.5,2\n", "needs a later absolute row"),
    ("STEP,x:linear:cubic\n0,1\n", "unknown interpolation 'cubic'"),
    ("STEP,x:sqrt\n0,1\n", "unknown space 'sqrt'"),
    ("STEP,x\n0,1\n10,fast\n", "line 3, column 'x': 'fast' is not a number"),
    ("STEP,x:log\n0,1\n10,0\n", "log-space values must be > 0"),
    ("STEP,x,x\n0,1,2\n", "column 'x' appears twice"),
    ("STEP,x\n10,1\n5,2\n", "resolves to 5, before the previous row's 10"),
    ("STEP,x\n-10,1\n5,2\n", "line 2: STEP resolves to -5 < 0"),  # 10 steps before step 5
    ("STEP,x\n0,1\n0,2\n", "line 3, column 'x': step 0 is keyed twice"),
    ("STEP,x,y\n0,1,\n", "column 'y' has no values"),
    ("x,STEP\n0,1\n", "first column must be STEP"),
    ("STEP,x\n0,1,2,3\n", "4 cells but the header has 2"),
    ("", "empty dopesheet"),
])
def test_malformed_dopesheets(text, message):
    """Every error is one line that starts with the file it is about (a run may read several)."""
    with pytest.raises(AnchoringError, match=f"^my-schedule.csv[ :].*{message}") as e:
        parse_dopesheet(text, source="my-schedule.csv")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("interp", ["minjerk", "linear"])
def test_retarget_has_no_jump_in_value_or_velocity(interp):
    tr = Track([(0, 0.0), (100, 1.0), (300, 0.5)], interp=interp)
    before_v, before_dv = tr(40), tr.velocity(40)
    tr.retarget(40, 2.0, 120)
    h = 1e-4
    assert tr(40) == pytest.approx(before_v, abs=1e-12)
    assert tr.velocity(40) == pytest.approx(before_dv, rel=1e-9)
    # numerically continuous from both sides
    assert (tr(40) - tr(40 - h)) / h == pytest.approx((tr(40 + h) - tr(40)) / h, rel=1e-3)
    assert tr(120) == pytest.approx(2.0)
    assert tr.velocity(120 - 1e-9) == pytest.approx(0.0, abs=1e-6)
    assert tr(300) == pytest.approx(0.5)  # later keyframes are still reached
    assert tr(30) == pytest.approx(Track([(0, 0.0), (100, 1.0)], interp=interp)(30))  # the past is untouched


def test_a_retarget_never_overshoots_its_start_or_its_goal():
    """From the current velocity a quintic can overshoot: a weight falling 1 → 0, raised mid-way to
    0.75, first kept falling and dipped below zero (a term rewarded instead of penalised)."""
    tr = Track([(0, 1.0), (20, 0.0)])
    start = tr(10)
    tr.retarget(10, 0.75, 60)
    values = [tr(t) for t in range(10, 61)]
    assert min(values) >= start - 1e-12 and max(values) <= 0.75 + 1e-12, (min(values), max(values))
    assert tr(60) == pytest.approx(0.75)
    rising = Track([(0, 0.0), (20, 1.0)])
    rising.retarget(10, 0.6, 30)  # heading up fast, told to stop at 0.6
    assert max(rising(t) for t in range(10, 31)) <= 0.6 + 1e-12


def test_a_reactive_decision_moves_the_weight_only_the_way_it_asks():
    """A violated target raises the weight, never lowers it; a relaxed one lowers it, never raises it.
    A weight the dopesheet put above `highest` used to be pulled down to it on a violation."""
    from anchoring.schedule.reactive import Reactive

    tl = Timeline({"w": Track([(0, 0.1)])}, steps=200)
    high = torch.full((10, 2), 1.0)  # the metric is above its target: violated
    low = torch.full((10, 2), 0.001)
    capped = Reactive(param="w", metric="m", target=0.01, every=10, factor=2.0, highest=0.05, relax=True)
    assert capped.decide(10, high, tl) is None  # already past the cap: stay, do not lower
    floored = Reactive(param="w", metric="m", target=0.01, every=10, factor=2.0, lowest=0.2, relax=True)
    assert floored.decide(10, low, tl) is None  # already under the floor: stay, do not raise
    free = Reactive(param="w", metric="m", target=0.01, every=10, factor=2.0, relax=True)
    assert free.decide(10, high, tl).value == pytest.approx(0.2) and free.decide(10, low, tl).value == pytest.approx(0.05)


def test_retarget_log_track_and_timeline_cache():
    tl = Timeline({"lr": Track([(0, 1e-3), (100, 1e-1)], space="log")}, steps=101)
    assert tl.table()[100, 0] == pytest.approx(0.1)
    mid = tl.values(50)["lr"]
    tl.retarget("lr", 50, 1e-4, 90)
    assert tl.values(50)["lr"] == pytest.approx(mid)
    assert tl.table()[90, 0] == pytest.approx(1e-4)  # cached table was rebuilt
    assert tl.table()[95, 0] == pytest.approx(10**-2.5)  # then on to the untouched key at 100 (log midpoint)
    with pytest.raises(AnchoringError, match="no schedule column 'wd'"):
        tl.retarget("wd", 1, 1.0, 2)


def test_rescaled_timeline_keeps_shape():
    tl = parse_dopesheet(ANCHORED)
    short = tl.rescaled(151)
    assert short.steps == 151
    assert keys(short.tracks["anchor"]) == [(0, 0.01), (75, 0.1), (142, 0.0)]
    assert short.values(150)["lr"] == pytest.approx(0.05)


def test_a_short_run_keeps_every_keyframe_of_its_schedule():
    """Cut to 60 steps, the 10-step warm-up lands within step 0: it used to be dropped there (lr 0.01
    from the first step), while a hand-written schedule keying one step twice is refused."""
    tl = parse_dopesheet(ANCHORED)
    short = tl.rescaled(60)
    assert {n: len(t.keys) for n, t in short.tracks.items()} == {n: len(t.keys) for n, t in tl.tracks.items()}
    assert short.values(0)["lr"] == pytest.approx(1e-8) and short.values(1)["lr"] > 1e-3
    times = [t for t, _ in short.tracks["lr"].keys]
    assert times == sorted(times) and 0 < times[1] < 1  # the warm-up's end keeps its place inside step 0..1
    assert keys(tl.rescaled(151).tracks["anchor"]) == [(0, 0.01), (75, 0.1), (142, 0.0)]  # no collision: whole steps
    for steps in (2, 3, 10):  # at 10 the tail key (8.55) used to round onto the last one (9) and vanish
        cut = tl.rescaled(steps)
        assert {n: len(t.keys) for n, t in cut.tracks.items()} == {n: len(t.keys) for n, t in tl.tracks.items()}, steps
    assert [t for t, _ in Track([(0, 0), (3, 1), (4, 2)]).rescaled(0.2).keys] == pytest.approx([0, 0.6, 1])


def test_schedule_and_terms_must_match():
    cfg = experiments.load("anchored")
    extra = cfg.model_copy(update={"schedule": "STEP,lr,separate,anchor,subspace,wd\n0,0.01,0.01,0.01,0.01,0.1\n"})
    with pytest.raises(AnchoringError, match="schedule column 'wd' is not used by any term"):
        build_timeline(extra, build_objective(extra))
    missing = cfg.model_copy(update={"schedule": "STEP,lr,separate,anchor\n0,0.01,0.01,0.01\n"})
    with pytest.raises(AnchoringError, match="schedule has no column 'subspace'"):
        build_timeline(missing, build_objective(missing))
    no_lr = cfg.model_copy(update={"schedule": "STEP,separate,anchor,subspace\n0,0.01,0.01,0.01\n"})
    with pytest.raises(AnchoringError, match="schedule has no column 'lr'"):
        build_timeline(no_lr, build_objective(no_lr))
    bad_action = cfg.model_copy(update={"schedule": cfg.schedule.replace("0,Train,,", "0,Train,explode,", 1)})
    with pytest.raises(AnchoringError, match="ACTION 'explode'"):
        build_timeline(bad_action, build_objective(bad_action))


def test_reactive_controller_raises_a_weight_until_its_loss_is_low(tmp_path):
    from anchoring.kinds.colour.training import train

    # the subspace (planarity) weight starts tiny; the controller must raise it until vibrant
    # colours leave dims 2-3 (subspace loss below 0.02)
    cfg = experiments.load("anchored", ["train.seeds=2", "train.steps=400", "train.checkpoint_every=100"])
    cfg = cfg.model_copy(update={
        "schedule": "STEP,lr,separate,anchor,subspace:log\n0,1e-8,0.01,0.05,1e-4\n10,0.01,,,\n399,0.02,,,\n",
        "reactive": [__import__("anchoring.kinds.colour.config", fromlist=["ReactiveConfig"]).ReactiveConfig(
            param="subspace", metric="subspace:vibrant", target=0.02, every=50, factor=3.0, highest=0.5, ease=40)],
    })
    full = train(cfg, tmp_path / "full")
    assert full.decisions, "the controller never acted"
    track = full.timeline.tracks["subspace"]
    assert track(399) > 1e-3  # raised from 1e-4
    for d in full.decisions:  # every re-target is continuous in value
        assert track(d.at) == pytest.approx(track(d.at - 1e-6), rel=1e-4)
    assert all(d.value <= 0.5 for d in full.decisions)
    # the metric it steers: above the target at first, below it at the end (median over seeds of a window's mean)
    loss = full.metrics[:, :, full.metric_names.index("subspace:vibrant")]
    assert loss[:50].mean(0).median() > 0.02
    assert loss[-50:].mean(0).median() < 0.02

    def kill(step, _r):
        if step == 230:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        train(cfg, tmp_path / "broken", callbacks=[kill])
    resumed = train(cfg, tmp_path / "broken")
    assert [vars(d) for d in resumed.decisions] == [vars(d) for d in full.decisions]
    assert torch.equal(resumed.metrics, full.metrics)


def test_reactive_config_is_validated():
    from anchoring.kinds.colour.config import ReactiveConfig

    cfg = experiments.load("anchored")
    bad = cfg.model_copy(update={"reactive": [ReactiveConfig(param="wd", metric="recon", target=0.1)]})
    with pytest.raises(AnchoringError, match="no column 'wd' to steer"):
        build_timeline(bad, build_objective(bad))
    bad = cfg.model_copy(update={"reactive": [ReactiveConfig(param="anchor", metric="nope", target=0.1)]})
    with pytest.raises(AnchoringError, match="unknown metric 'nope'"):
        build_timeline(bad, build_objective(bad))


def test_a_shipped_schedule_named_on_the_command_line_is_found_from_any_directory(tmp_path, monkeypatch):
    """`--set schedule=NAME.csv` reads NAME.csv where the user stands if it is there, else the
    shipped schedule of that name; a name that is neither is still a one-line error."""
    monkeypatch.chdir(tmp_path)
    light = experiments.load("lm-anchor", ["schedule=lm-spans-light.csv"])
    assert light.schedule == (experiments.HERE / "lm-spans-light.csv").read_text()
    assert light.schedule != experiments.load("lm-anchor").schedule
    own = "STEP,lr,anchor,anti-subspace\n0,0.001,0.5,0.5\n"
    (tmp_path / "lm-spans-light.csv").write_text(own)
    assert experiments.load("lm-anchor", ["schedule=lm-spans-light.csv"]).schedule == own
    with pytest.raises(AnchoringError, match="cannot read schedule"):
        experiments.load("lm-anchor", ["schedule=no-such-schedule.csv"])


def test_a_fraction_step_beyond_the_next_absolute_row_is_blamed_on_its_own_line():
    with pytest.raises(AnchoringError, match=r"line 3: STEP '\+1.5' is a fraction .* between \+0.0 and \+1.0"):
        parse_dopesheet("STEP,lr\n0,0.1\n+1.5,0.2\n100,0.3\n")
    assert [t for t, _ in parse_dopesheet("STEP,lr\n0,0.1\n+0.25,0.2\n100,0.3\n").tracks["lr"].keys] == [0, 25, 100]
    # the nearest step, not the one before it; a half goes to the even step (Python's round, as README says)
    for frac, step in (("+0.75", 8), ("+0.72", 7), ("+0.25", 2), ("+0.35", 4)):
        keys = parse_dopesheet(f"STEP,lr\n0,0.1\n{frac},0.2\n10,0.3\n").tracks["lr"].keys
        assert [t for t, _ in keys] == [0, step, 10], frac


def test_retargeting_keeps_the_acceleration_and_log_tracks_report_real_velocity():
    h = 1e-3
    tr = Track([(0, 0.0), (100, 1.0)])  # min-jerk: accelerating at step 20
    accel = (tr.velocity(20) - tr.velocity(20 - h)) / h
    tr.retarget(20, 0.5, 60)
    assert abs(accel) > 1e-5 and (tr.velocity(20 + h) - tr.velocity(20)) / h == pytest.approx(accel, rel=1e-2)
    lr = Track([(0, 1e-3), (100, 1e-1)], space="log")
    assert lr.velocity(50) == pytest.approx((lr(50 + h) - lr(50 - h)) / (2 * h), rel=1e-4)


def test_a_reactive_controller_reads_the_median_seed_and_skips_exact_zeros():
    from anchoring.schedule.reactive import Reactive

    r = Reactive(param="w", metric="m", target=0.5, every=10, factor=2.0, ease=50)
    assert r.window_value(torch.tensor([[0.0], [1.0], [1.0]])) == 1.0  # a batch without a labelled sample: 0, skipped
    assert r.window_value(torch.tensor([[1.0, 1.0, 4.0]])) == 1.0  # the median of three seeds, not their mean
    tl = Timeline({"w": Track([(0, 0.1)])}, steps=100)
    assert r.decide(90, torch.ones(10, 2), tl).until == 99  # eased over what is left of the run
    above = Reactive(param="w", metric="m", target=0.5, every=10, factor=2.0, keep="above")
    assert above.decide(10, torch.full((10, 2), 0.1), tl).value == pytest.approx(0.2)  # below a floor target: raised
    assert above.decide(10, torch.full((10, 2), 0.9), tl) is None
    nan, inf = float("nan"), float("inf")  # a seed that diverged is no evidence either way: the others decide
    assert r.window_value(torch.tensor([[1.0, nan], [1.0, inf]])) == 1.0
    assert r.window_value(torch.tensor([[nan], [inf]])) is None and r.decide(10, torch.tensor([[nan], [inf]]), tl) is None
    off = Timeline({"w": Track([(0, 0.0)])}, steps=100)  # a weight keyed at 0 can still be raised: ×factor alone would keep it 0
    raised = r.decide(10, torch.ones(10, 2), off)
    assert raised is not None and raised.value > 0


def test_a_runs_schedule_is_checked_column_by_column_naming_its_source():
    from anchoring.train.timeline import parse_schedule

    ok = "STEP,lr,anchor,extent\n0,0,0,0.5\n10,1e-3,1,1\n"  # lr 0 at a key (a warm-up from nothing) is fine
    t = parse_schedule(ok, "my.csv", ["anchor"], optional=("extent",))
    assert set(t.tracks) == {"lr", "anchor", "extent"}
    refused = {
        "STEP,bogus,lr,anchor\n0,1,1e-3,1\n": "column 'bogus' is not used by any term",  # the first column too
        ok: "column 'extent' is not used",  # extent only where the kind reads it
        "STEP,lr\n0,1e-3\n": "no column 'anchor'",
        "STEP,lr,anchor\n0,1e-3,1\n5,-1e-3,1\n10,1e-3,1\n": "my.csv: lr must be ≥ 0 at every key, got -0.001",
        "STEP,lr,anchor\n0,1e-3\n": "my.csv line 2",
    }
    for text, message in refused.items():
        with pytest.raises(AnchoringError, match=message):
            parse_schedule(text, "my.csv", ["anchor"])


@pytest.mark.parametrize("interp", ["minjerk", "step"])
def test_a_reactive_ease_stops_before_the_next_phase_so_its_keys_land_on_time(interp):
    """A decision at 1400 with a 50-step ease used to drop the Tail's key at 1425, and the term the
    Tail turns off kept its raised weight to the end of the run."""
    from anchoring.schedule.reactive import Reactive, apply

    tl = Timeline({"anchor": Track([(0, 0.1), (1400, 0.1), (1425, 0.0)], interp=interp)}, steps=1501,
                  phases=[(0, "Train"), (1425, "Tail")])
    r = Reactive(param="anchor", metric="m", target=0.01, every=100, factor=1.5, ease=50)
    d = r.decide(1400, torch.ones(10, 2), tl)
    assert d.until == 1424
    apply(tl, d)
    assert tl.values(1424)["anchor"] == pytest.approx(0.15)  # the decision holds until the phase
    assert all(tl.values(t)["anchor"] == 0.0 for t in (1425, 1450, 1500))  # and the Tail still turns it off
    assert r.decide(1300, torch.ones(10, 2), tl).until == 1350  # far from a phase: the whole ease
    assert r.decide(1424, torch.ones(10, 2), tl) is None  # no step left before the phase
