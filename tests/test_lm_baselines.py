"""The sgtm and routing arms: where their gradients land, what `ablated` zeroes, that plain models are
unchanged, and an end-to-end run that trains, writes and reopens both."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from anchoring import experiments, lifecycle
from anchoring.cli import app
from anchoring.errors import AnchoringError
from anchoring.kinds.lm.baselines import ablated, forget_masks, forget_units, routing
from anchoring.kinds.lm.data import load_data
from anchoring.kinds.lm.training import LMTask, build_model
from anchoring.models.ngpt import MLP, NormalizedTransformer
from test_lm_kind import tiny, write_corpus

ROUTE = ["routing.layers=[0]", "routing.extra_units=8"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("lm-baselines") / "texts", files=2, paragraphs=60)


def config(corpus, *extra: str):
    return experiments.load("lm-anchor-passages", tiny(corpus, "train.steps=6", "evaluate.shade_passages=0",
                                              'lm.arms=["control","sgtm","routing"]', *ROUTE, *extra))


def batch(task: LMTask):
    b = task.stream.batch(0, task.cfg.lm.batch_size, task.labels)
    return b.inputs, b.targets


def grads(task: LMTask, labelled: bool) -> dict[str, torch.Tensor]:
    x, y = batch(task)
    task.optimizer.zero_grad(set_to_none=True)
    loss = task._baseline_backward(x, y, torch.full(x.shape, labelled))
    with torch.no_grad():  # the split loss is the usual mean cross-entropy
        assert float(loss) == pytest.approx(float(F.cross_entropy(task.model(x).flatten(0, 1), y.flatten())), rel=1e-5)
    return {n: p.grad.clone() for n, p in task.model.named_parameters()}


def test_sgtm_labelled_positions_update_only_the_forget_entries(corpus):
    cfg = config(corpus)
    task = LMTask(cfg, load_data(cfg.text), 0, "sgtm")
    masks = task.forget
    width, hidden, d = cfg.lm.width, cfg.lm.width * cfg.lm.mlp_ratio, cfg.lm.width // cfg.lm.heads
    k = hidden // 16  # the default 1/16 of the units, one head
    for i in range(cfg.lm.layers):
        p = f"blocks.{i}."
        assert int(masks[p + "attn.q.weight"].sum()) == d * width and masks[p + "attn.q.weight"][-d:].all()
        assert int(masks[p + "attn.o.weight"].sum()) == d * width and masks[p + "attn.o.weight"][:, -d:].all()
        assert int(masks[p + "attn.s_qk"].sum()) == d and masks[p + "attn.s_qk"][-1].all()
        up = masks[p + "mlp.up.weight"]
        assert int(up.sum()) == 2 * k * width and up[hidden - k:hidden].all() and up[-k:].all()
        assert int(masks[p + "mlp.down.weight"].sum()) == k * width and masks[p + "mlp.s_u"][-k:].all()
    g = grads(task, labelled=True)
    for name, gr in g.items():
        m = masks.get(name, torch.zeros_like(gr, dtype=torch.bool))
        assert (gr[~m] == 0).all(), name
    assert all(g[n][m].abs().sum() > 0 for n, m in masks.items()), "forget entries learn"
    g = grads(task, labelled=False)
    for name in ("embed.weight", "blocks.0.attn.q.weight", "blocks.1.mlp.up.weight", "blocks.1.mlp.down.weight", "s_z"):
        m = masks.get(name, torch.zeros_like(g[name], dtype=torch.bool))
        assert g[name][~m].abs().sum() > 0, name


def test_routing_sends_labelled_gradients_to_the_extra_units_only(corpus):
    cfg = config(corpus)
    task = LMTask(cfg, load_data(cfg.text), 0, "routing")
    mlp = task.model.blocks[0].mlp
    H, n = mlp.hidden, mlp.hidden + mlp.extra
    assert mlp.extra == 8 and task.model.blocks[1].mlp.extra == 0

    def parts(g: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        up, down, su, sv = (g[f"blocks.0.mlp.{k}"] for k in ("up.weight", "down.weight", "s_u", "s_v"))
        orig = [up[:H], up[n:n + H], down[:, :H], su[:H], sv[:H]]
        extra = [up[H:n], up[n + H:], down[:, H:], su[H:], sv[H:]]
        return orig, extra

    orig, extra = parts(grads(task, labelled=True))
    assert all((t == 0).all() for t in orig)
    assert all(t.abs().sum() > 0 for t in extra)
    g = grads(task, labelled=False)
    orig, extra = parts(g)
    assert all((t == 0).all() for t in extra)
    assert all(t.abs().sum() > 0 for t in orig)
    assert task.model.blocks[0].mlp.route is None  # the mask is only set around the task's forward
    x, _ = batch(task)
    with torch.no_grad():  # routing changes gradients, not values
        plain = task.model(x)
        with routing(task.model, torch.rand(x.shape) < 0.5):
            assert torch.allclose(task.model(x), plain, atol=1e-5)


def _without_extra_units(model: NormalizedTransformer, cfg) -> NormalizedTransformer:
    plain = build_model(cfg, model.embed.num_embeddings)
    state = dict(model.state_dict())
    for i, b in enumerate(model.blocks):
        H, n = b.mlp.hidden, b.mlp.hidden + b.mlp.extra
        p = f"blocks.{i}.mlp."
        state[p + "up.weight"] = torch.cat([state[p + "up.weight"][:H], state[p + "up.weight"][n:n + H]])
        state[p + "down.weight"] = state[p + "down.weight"][:, :H]
        state[p + "s_u"], state[p + "s_v"] = state[p + "s_u"][:H], state[p + "s_v"][:H]
    plain.load_state_dict(state)
    return plain.eval()


def test_ablated_zeroes_exactly_the_forget_entries_or_extra_units(corpus):
    cfg = config(corpus)
    torch.manual_seed(1)
    model = build_model(cfg, 20)
    masks = forget_masks(model, cfg)
    cut = ablated(model, cfg, "sgtm")
    for (name, p), q in zip(model.named_parameters(), cut.parameters()):
        m = masks.get(name, torch.zeros_like(p, dtype=torch.bool))
        assert (q[m] == 0).all() and torch.equal(q[~m], p[~m]), name
        assert (p[m] != 0).any() or not m.any(), name  # the original is untouched
    routed = build_model(cfg, 20, "routing", seed=1)
    cut = ablated(routed, cfg, "routing")
    mlp, mlp_cut = routed.blocks[0].mlp, cut.blocks[0].mlp
    H, n = mlp.hidden, mlp.hidden + mlp.extra
    for name, p in routed.named_parameters():
        q = dict(cut.named_parameters())[name]
        if not name.startswith("blocks.0.mlp."):
            assert torch.equal(p, q), name
    assert torch.equal(mlp_cut.up.weight[:H], mlp.up.weight[:H]) and torch.equal(mlp_cut.up.weight[n:n + H], mlp.up.weight[n:n + H])
    assert torch.equal(mlp_cut.down.weight[:, :H], mlp.down.weight[:, :H]) and torch.equal(mlp_cut.s_u[:H], mlp.s_u[:H])
    assert (mlp_cut.up.weight[H:n] == 0).all() and (mlp_cut.up.weight[n + H:] == 0).all()
    assert (mlp_cut.down.weight[:, H:] == 0).all() and (mlp_cut.s_u[H:] == 0).all() and (mlp_cut.s_v[H:] == 0).all()
    x = torch.randint(0, 20, (2, 12))
    with torch.no_grad():  # ablated = the model with the extra units removed; before ablation they matter
        assert torch.allclose(cut.eval()(x), _without_extra_units(routed, cfg)(x), atol=1e-5)
        assert not torch.allclose(routed.eval()(x), cut(x), atol=1e-3)
    with pytest.raises(AnchoringError, match="no deletion edit"):
        ablated(model, cfg, "control")
    with pytest.raises(AnchoringError, match="no extra MLP units"):
        ablated(model, cfg, "routing")


def test_plain_models_are_unchanged_and_routing_shares_the_control_init(corpus):
    cfg = config(corpus)
    torch.manual_seed(0)
    control = build_model(cfg, 20, "control")
    after_control = torch.rand(3)
    torch.manual_seed(0)
    routed = build_model(cfg, 20, "routing", seed=0)
    assert torch.equal(torch.rand(3), after_control)  # the extra units draw nothing from the global RNG
    W, L, hidden = cfg.lm.width, cfg.lm.layers, cfg.lm.width * cfg.lm.mlp_ratio
    shapes = {n: tuple(p.shape) for n, p in control.named_parameters()}
    for arm in (None, "anchored", "sgtm", "weak-filtered"):
        assert {n: tuple(p.shape) for n, p in build_model(cfg, 20, arm).named_parameters()} == shapes
    assert len(shapes) == 3 + 11 * L
    for i in range(L):
        assert shapes[f"blocks.{i}.mlp.up.weight"] == (2 * hidden, W) and shapes[f"blocks.{i}.mlp.down.weight"] == (W, hidden)
        assert shapes[f"blocks.{i}.mlp.s_u"] == (hidden,) and shapes[f"blocks.{i}.attn.q.weight"] == (W, W)
    assert not any(isinstance(m, MLP) and m.extra for m in control.modules())
    state = control.state_dict()
    for k, v in routed.state_dict().items():  # every weight but the extra units equals the control's
        if k.startswith("blocks.0.mlp."):
            H, n = hidden, hidden + 8
            v = torch.cat([v[:H], v[n:n + H]]) if k.endswith("up.weight") else v[:, :H] if k.endswith("down.weight") else v[:H]
        assert torch.equal(v, state[k]), k
    assert list(routed.state_dict()) == list(state)


@pytest.mark.parametrize("override, message", [
    ("sgtm.heads=3", "sgtm.heads = 3 exceeds the model's 2 heads"),
    ("sgtm.layers=[5]", "sgtm.layers: no block 5"),
    ("routing.layers=[2]", "routing.layers: no block 2"),
])
def test_bad_baseline_config_is_one_line(corpus, tmp_path, override, message):
    args = [a for o in tiny(corpus, 'lm.arms=["control","sgtm","routing"]', override) for a in ("--set", o)]
    r = CliRunner().invoke(app, ["run", "lm-anchor-passages", *args, "--out", str(tmp_path / "run"), "-q"])
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    cfg = experiments.load("lm-anchor-passages", tiny(corpus, 'lm.arms=["control"]', override))  # unused arm: not checked
    assert cfg.lm.arms == ["control"]


def test_control_sgtm_routing_train_write_and_reopen(corpus, tmp_path):
    cfg = config(corpus)
    out = lifecycle.run(cfg, tmp_path / "run")
    assert [r["arm"] for r in out.summary["models"]] == ["control", "sgtm", "routing"]
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    lab = {a: metrics[metrics.arm == a]["labelled_passages"].to_numpy() for a in ("control", "sgtm", "routing")}
    assert (lab["control"] == lab["sgtm"]).all() and (lab["control"] == lab["routing"]).all() and lab["control"].sum() > 0
    run = lifecycle.load_run(tmp_path / "run")
    assert set(run.arms) == {"control", "sgtm", "routing"}
    routed, control, sgtm = run.model("routing"), run.model("control"), run.model("sgtm")
    assert routed.blocks[0].mlp.extra == 8 and control.blocks[0].mlp.extra == 0
    assert not torch.equal(sgtm.blocks[0].attn.q.weight, control.blocks[0].attn.q.weight)  # labels changed training
    text = "He drew his sword and stabbed him."
    for arm in ("control", "sgtm", "routing"):
        assert 0 < run.loss_per_token(text, arm=arm)[0]["nats_per_char"] < 10
    for arm in ("sgtm", "routing"):
        cut = ablated(run.model(arm), run.config, arm)
        assert not torch.equal(cut(run.tokenize(text)[None]), run.model(arm)(run.tokenize(text)[None]))
        assert run.generate("The ", model=cut, n=5).startswith("The ")
    # the unlearning table scores these rows after the ablation, not the trained arms as they are
    from anchoring.kinds.lm import unlearning as ul

    models = {(arm, 0): run.model(arm) for arm in run.arms}
    rows = {m.name: m for m in ul.methods(run.config, run.data, models, 0)}
    for arm, name in (("sgtm", "SGTM"), ("routing", "gradient routing")):
        m = rows[name]
        assert m.before is models[arm, 0] and m.weights_edited
        want = ablated(models[arm, 0], run.config, arm).state_dict()
        assert all(torch.equal(v, want[k]) for k, v in m.after.state_dict().items()), name
        assert any(not torch.equal(v, m.before.state_dict()[k]) for k, v in m.after.state_dict().items()), name


def test_sgtm_and_routing_data_parallel_equal_one_process(corpus, tmp_path):
    from safetensors.torch import load_file

    base = tiny(corpus, "train.steps=4", 'lm.arms=["sgtm","routing"]', "evaluate.shade_passages=0", *ROUTE)
    lifecycle.run(experiments.load("lm-anchor-passages", base), tmp_path / "one")
    lifecycle.run(experiments.load("lm-anchor-passages", [*base, "lm.nproc=2"]), tmp_path / "two")
    a, b = (load_file(str(tmp_path / d / "checkpoint.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys() and a["routing.0.blocks.0.mlp.s_u"].shape == (cfg_hidden(corpus) + 8,)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), (k, float((a[k] - b[k]).abs().max()))


def cfg_hidden(corpus) -> int:
    cfg = config(corpus)
    return cfg.lm.width * cfg.lm.mlp_ratio


def test_sgtm_and_routing_steer_the_losses_of_labelled_target_tokens(corpus, monkeypatch):
    """The loss at position t predicts token t+1, so a loss-side method must mark the positions
    whose *target* is labelled: with span labels, the first letter of a labelled word is predicted
    at the position before the word, which the input labels leave unmarked."""
    cfg = config(corpus, 'text.weak_labels="spans"', 'terms.0.positions="all"', 'terms.1.positions="all"',
                 'terms.0.select="labelled"', 'terms.1.select="labelled"')
    data = load_data(cfg.text)
    task = LMTask(cfg, data, 0, "sgtm")
    b = task.stream.batch(0, cfg.lm.batch_size, task.labels)
    assert torch.equal(b.target_labels[:, :-1], b.labels[:, 1:])
    assert torch.equal(b.target_labels[:-1, -1], b.labels[1:, 0])  # a window's last target opens the next window
    after = task.stream.batch(1, cfg.lm.batch_size, task.labels)
    assert b.target_labels[-1, -1] == after.labels[0, 0]
    starts = (b.target_labels[:, :-1] == 1) & (b.labels[:, :-1] == 0)  # positions just before a labelled run
    assert starts.any()
    for r, t in starts.nonzero().tolist()[:20]:
        assert data.tokenizer.decode([int(b.targets[r, t])]).isalpha()  # the run starts at a word's first letter
    seen = []
    for arm in ("sgtm", "routing"):
        task = LMTask(cfg, data, 0, arm)
        monkeypatch.setattr(task, "_baseline_backward", lambda x, y, labelled: seen.append(labelled.clone()) or
                            torch.tensor(1.0, requires_grad=True).sum())
        task.step(0)
    assert all(torch.equal(s, b.target_labels.bool()) for s in seen) and len(seen) == 2


def test_a_small_positive_forget_fraction_still_gets_one_unit():
    assert forget_units(64, 0.001) == 1 and forget_units(64, 0.0) == 0 and forget_units(64, 1 / 16) == 4


def test_sgtm_forget_entries_of_every_attention_matrix_belong_to_the_same_heads(corpus):
    """With 2 heads and 1 forget head the query rows' start, (heads − 1)·d, equals 1·d, so the tests
    could not tell the last head from the second; with 4 heads a slip would mask head 1's queries,
    keys and values but head 3's output columns and scales, and SGTM would train and cut neither."""
    cfg = config(corpus, "lm.heads=4", "sgtm.heads=1")
    model = build_model(cfg, 20)
    masks = forget_masks(model, cfg)
    for i, block in enumerate(model.blocks):
        H, p = block.attn.heads, f"blocks.{i}.attn."
        assert H == 4
        by_head = {"q": masks[p + "q.weight"], "k": masks[p + "k.weight"], "v": masks[p + "v.weight"],
                   "o": masks[p + "o.weight"].T, "s_qk": masks[p + "s_qk"]}  # rows of d per head (o: its input columns)
        touched = {name: set(torch.nonzero(m.reshape(H, -1).any(-1)).flatten().tolist()) for name, m in by_head.items()}
        assert all(heads == {3} for heads in touched.values()), touched
        assert all(masks[p + n].view(H, -1)[3].all() for n in ("q.weight", "k.weight", "v.weight", "s_qk"))
