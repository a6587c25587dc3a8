"""One house for every kind: the same lifecycle, `load_run`, `show`, `intervene` and `delete` on
colour and transformer runs; a key of another kind is an error naming the key and the kind;
the method's packages import no concrete model or domain."""

import ast
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import anchoring
from anchoring import load_run
from anchoring.cli import app

runner = CliRunner()
TINY_TRANSFORMER = ["--set", "transformer.width=32", "--set", "transformer.layers=2", "--set", "transformer.heads=4",
                    "--set", "language.context=32", "--set", "transformer.eval_lines=128", "--set", "concepts.0.label_scale=1.0",
                    "--set", "terms.0.site=\"blocks.0\"", "--set", "terms.2.site=\"blocks.0\"",
                    "--set", "terms.1.site=\"blocks.1\"", "--set", "terms.3.site=\"blocks.1\"",
                    "--set", "transformer.workers=1"]


@pytest.fixture(scope="module")
def two_kinds(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    colour, transformer = root / "colour", root / "transformer"
    r = runner.invoke(app, ["run", "anchored", "--seeds", "2", "--steps", "60", "--out", str(colour), "-q"])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["run", "transformer-anchor-residual", "--seeds", "1", "--steps", "60", "--out", str(transformer),
                            "-q", *TINY_TRANSFORMER])
    assert r.exit_code == 0, r.stderr
    return colour, transformer


def test_load_run_opens_every_kind_with_its_helpers(two_kinds):
    summary = json.loads((two_kinds[0] / "summary.json").read_text())
    assert summary["anchored_seeds"] == sum(bool(r["anchored"]) for r in summary["seeds"])
    colour, transformer = (load_run(p) for p in two_kinds)
    assert colour.kind == "colour" and transformer.kind == "transformer"
    z = colour.encode(torch.tensor([[1.0, 0.0, 0.0]]))
    assert z.shape == (2, 1, 4) and torch.allclose(z.norm(dim=-1), torch.ones(2, 1))
    assert colour.decode(z).shape == (2, 1, 3)
    line = "500 + 005 = 303 ;"
    tokens = transformer.tokenize(line)
    assert transformer.language.words(tokens) == line.split()
    assert set(transformer.arms) == {"anchored", "control"}
    logits = transformer.logits(line, arm="control")
    assert logits.shape == (len(tokens), transformer.language.vocab_size)
    nats = transformer.loss_per_token(line, arm="anchored", seed=0)
    assert nats.shape == (len(tokens) - 1,) and (nats >= 0).all()
    own = transformer.logits(line, arm="anchored", seed=0)  # token t + 1 scored by the logits at t
    assert torch.allclose(nats, torch.nn.functional.cross_entropy(own[:-1], tokens[1:], reduction="none"))
    assert not torch.equal(transformer.logits(line, arm="anchored"), logits)  # two different models
    for run, ids in ((colour, ["step", "seed"]), (transformer, ["step", "seed", "arm"])):
        m = run.metrics()
        assert isinstance(m, pd.DataFrame) and list(m.columns) == [*ids, "metric", "value"]
        assert m.step.max() == 59 and "loss" in set(m.metric)
    arms = transformer.metrics().groupby("arm").size()  # named as in an LM run's table, each arm's every step
    assert set(arms.index) == {"anchored", "control"} and arms["anchored"] == arms["control"]
    with pytest.raises(anchoring.AnchoringError, match="is not a word of the colour language"):
        transformer.tokenize("500 + purple")


def test_show_intervene_and_delete_on_a_transformer_run(two_kinds, tmp_path):
    _, run_dir = two_kinds
    r = runner.invoke(app, ["show", str(run_dir)])
    assert r.exit_code == 0 and "exact match per model" in r.stdout and "report:" in r.stdout, r.stderr
    r = runner.invoke(app, ["intervene", str(run_dir), "--concept", "red", "--method", "suppress", "--name", "sup"])
    assert r.exit_code == 0, r.stderr
    assert "red answer" in r.stdout and "no red" in r.stdout
    saved = json.loads((run_dir / "interventions" / "sup" / "summary.json").read_text())
    rows = saved["rows"]
    assert {(x["arm"], x["direction"]) for x in rows} == {("anchored", "anchor"), ("control", "difference of means")}
    assert saved["sites"] and saved["spec"]["sites"] == saved["sites"] and "latent" not in saved["sites"]  # where it ran
    assert all(x["sites"] == saved["sites"] for x in rows)
    # the control's edit runs along its own difference of means, recomputed here from the evaluation functions
    from anchoring.anchor.sequence import SequenceSite
    from anchoring.kinds.transformer import evaluate as ev

    run = load_run(run_dir)
    lang, ctx, tc = run.language, run.config.language.context, run.config.transformer
    control = run.model("control")
    sites = [SequenceSite(x) for x in saved["sites"]]
    seen = ev.probe(control, lang, ctx, sites)
    sets = ev.eval_lines(lang, tc.eval_lines, tc.reddest)
    with ev.edited(control, [(x, ev.mean_difference(seen, lang, x, tc.reddest)) for x in sites], "suppress"):
        after = ev.accuracy_table(lang, sets, ev.score(control, lang, sets, ctx), tc.reddest, tc.redish)
    (row,) = [x for x in rows if x["arm"] == "control"]
    assert all(row[f"{g} after"] == after[g] for g in ("red answer", "red-ish", "no red")), (row, after)
    # and the anchored model's along its anchors (an edit that left it alone showed after = before)
    from anchoring.kinds.transformer.training import build_sequence_objective

    anchored = run.model("anchored")
    before = ev.accuracy_table(lang, sets, ev.score(anchored, lang, sets, ctx), tc.reddest, tc.redish)
    with ev.edited(anchored, build_sequence_objective(run.config, anchored).anchors("red"), "suppress"):
        after = ev.accuracy_table(lang, sets, ev.score(anchored, lang, sets, ctx), tc.reddest, tc.redish)
    assert before != after
    (row,) = [x for x in rows if x["arm"] == "anchored"]
    assert all(row[f"{g} before"] == before[g] and row[f"{g} after"] == after[g] for g in ("red answer", "red-ish", "no red"))
    shown = runner.invoke(app, ["show", str(run_dir / "interventions" / "sup")])  # read back: the table intervene printed
    assert shown.exit_code == 0 and "exact match by redness" in shown.stdout and "red answer" in shown.stdout, shown.stderr
    for x in rows:  # in the order its header says: before → after
        for g in ("red answer", "red-ish", "no red"):
            assert f"{x[f'{g} before']:.3f} → {x[f'{g} after']:.3f}" in shown.stdout, (g, shown.stdout)
    r = runner.invoke(app, ["intervene", str(run_dir), "--concept", "red", "--method", "repel"])
    assert r.exit_code == 2 and "'transformer' run supports --method suppress or ablate" in r.stderr
    for args, message in ((["--concept", "blue"], "concept 'blue' is not anchored in this run (anchored: red)"),
                          (["--concept", "red", "--site", "embed"], "site(s) embed not anchored (anchored: ")):
        r = runner.invoke(app, ["intervene", str(run_dir), *args, "--name", "unused"])
        assert r.exit_code == 2 and message in r.stderr, (args, r.stderr)
    for flag, value in (("--falloff", "constant:0"), ("--dims", "0"), ("--k", "3")):  # ignored before, and recorded as applied
        for cmd in ("intervene", "delete") if flag == "--dims" else ("intervene",):  # delete has only --dims of these
            r = runner.invoke(app, [cmd, str(run_dir), "--concept", "red", flag, value,
                                    *(["--out", str(tmp_path / "unused")] if cmd == "delete" else ["--name", "unused"])])
            assert r.exit_code == 2 and f"{flag} does not apply to 'transformer' runs" in r.stderr, (cmd, flag, r.stderr)
    assert not (run_dir / "interventions" / "unused").exists() and not (tmp_path / "unused").exists()
    deleted = tmp_path / "deleted"
    r = runner.invoke(app, ["delete", str(run_dir), "--concept", "red", "--out", str(deleted)])
    assert r.exit_code == 0, r.stderr
    assert "control: copied unedited (no anchor to remove)" in r.stdout  # a reference, not an edit that did nothing
    edit = json.loads((deleted / "edit.json").read_text())
    assert max(edit["max_residual_component"]) < 1e-5  # the anchor axis is gone from every residual state
    d, orig = load_run(deleted), load_run(run_dir)
    for name, p in d.model("anchored").named_parameters():  # only the residual writers and embeddings changed
        changed = not torch.equal(p, dict(orig.model("anchored").named_parameters())[name])
        assert changed == (name == "embed.weight" or name.endswith("attn.o.weight") or name.endswith("mlp.down.weight")), name
    assert all(torch.equal(a, b) for a, b in zip(d.model("control").parameters(), orig.model("control").parameters()))
    edit_rows = {x["arm"]: x for x in json.loads((deleted / "summary.json").read_text())["edit_rows"]}
    before = {x["arm"]: x for x in rows}  # intervene scored the same unedited models on the same lines
    for g in ("red answer", "red-ish", "no red"):
        assert edit_rows["anchored"][f"{g} before"] == before["anchored"][f"{g} before"]
        assert edit_rows["control"][f"{g} before"] == edit_rows["control"][f"{g} after"]
    assert any(edit_rows["anchored"][f"{g} after"] != edit_rows["anchored"][f"{g} before"] for g in ("red answer", "red-ish", "no red"))
    r = runner.invoke(app, ["show", str(deleted)])
    assert r.exit_code == 0 and "deleted red" in r.stdout, r.stderr
    r = runner.invoke(app, ["resume", str(deleted)])
    assert r.exit_code == 2 and "is an edited run" in r.stderr
    r = runner.invoke(app, ["relearn", str(run_dir)])  # the transformer kind has no relearning attack
    assert r.exit_code == 2 and r.stderr.strip() == "error: `relearn` does not apply to 'transformer' runs"


def test_commands_that_do_not_apply_say_so_naming_the_kind(tmp_path):
    out = tmp_path / "lobes"
    assert runner.invoke(app, ["run", "intervention-lobes", "--out", str(out), "-q"]).exit_code == 0
    for command in (["intervene", str(out), "--concept", "red"], ["delete", str(out), "--out", str(tmp_path / "d")],
                    ["delete", str(out), "--repair-steps", "2", "--out", str(tmp_path / "d")]):
        r = runner.invoke(app, command)
        assert r.exit_code == 2 and r.stderr.strip() == (f"error: {str(out)!r} is a 'figures' run: it draws figures and "
                                                         f"trains no model to open or edit"), (command, r.stderr)
    assert not (tmp_path / "d").exists()


CROSS = [("anchored", "transformer.width=32", "colour"), ("anchored", "language.context=16", "colour"),
         ("transformer-anchor-residual", "model.latent_dim=5", "transformer"),
         ("transformer-anchor-residual", "train.fast=false", "transformer"),
         ("transformer-anchor-residual", "data.batch_size=8", "transformer"),
         ("intervention-lobes", "train.seeds=2", "figures"), ("colour-spaces", "terms.0.kind=\"anchor\"", "figures")]


@pytest.mark.parametrize("experiment,item,kind", CROSS)
def test_a_key_of_another_kind_is_an_error_naming_key_and_kind(experiment, item, kind, tmp_path):
    key = item.split("=")[0]
    r = runner.invoke(app, ["run", experiment, "--set", item, "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert repr(key) in r.stderr and f"for a {kind!r} experiment" in r.stderr, r.stderr
    # the same key written into a spec file
    spec_path = anchoring.experiments.find(experiment)
    section, _, leaf = key.partition(".")
    head, _, rest = leaf.partition(".")
    text = spec_path.read_text()
    text = text.replace("schedule = \"", f"schedule = \"{spec_path.parent}/") if "schedule = \"" in text else text
    extra = f"\n[{section}]\n{head} = {item.split('=', 1)[1]}\n" if not rest else f"\n[[{section}]]\n{rest} = 1\n"
    bad = tmp_path / "bad.toml"
    bad.write_text(text + extra if f"[{section}]" not in text else text.replace(f"[{section}]", f"[{section}]\n{head} = 1", 1))
    r = runner.invoke(app, ["run", str(bad), "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"for a {kind!r} experiment" in r.stderr and section in r.stderr, r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_readme_latent_dim_example_is_explained():
    r = runner.invoke(app, ["run", "--set", "model.latent_dim=5", "--steps", "2", "--out", "/nonexistent/never"])
    assert r.exit_code == 2 and "anchor has 4 entries but the anchored space has 5 dims" in r.stderr


PACKAGE = Path(anchoring.__file__).parent


@pytest.mark.parametrize("layer", ["anchor", "control", "train"])
def test_the_method_imports_no_concrete_model_or_domain(layer):
    for path in (PACKAGE / layer).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                assert not name.startswith(("anchoring.models", "anchoring.domains", "anchoring.kinds")), (path, name)


def _kind_specific(node: ast.AST, names: set[str]) -> str | None:
    """What makes `node` reach one kind by name: a comparison or `case` with a kind's name
    (`cfg.kind == "lm"`, `kind_of(cfg).name in ("lm", …)`), or an import from a kind's own package."""
    consts: list = []
    if isinstance(node, ast.Compare):
        for n in (node.left, *node.comparators):
            elts = n.elts if isinstance(n, (ast.Tuple, ast.List, ast.Set)) else [n]
            consts += [e.value for e in elts if isinstance(e, ast.Constant)]
    elif isinstance(node, ast.MatchValue) and isinstance(node.value, ast.Constant):
        consts.append(node.value.value)
    if any(isinstance(c, str) and c in names for c in consts):
        return ast.unparse(node)
    modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
        [a.name for a in node.names] if isinstance(node, ast.Import) else []
    return next((f"import {m}" for m in modules if m.startswith("anchoring.kinds.") and m != "anchoring.kinds.base"), None)


def test_the_shared_commands_and_the_lifecycle_ask_a_kind_instead_of_naming_it():
    """`run`, `resume`, the edits, `show`, `sweep`, the lifecycle and the report reach a kind through the
    registry and its capabilities (`nproc_key`, `delete_options`, `concepts`, …), so a new kind needs no
    line in them. `surprisal`/`generate` (cli/text.py) are the language model's own commands and
    `bench` (cli/bench.py) runs each kind's own cases, so those two may name one."""
    from anchoring.kinds import REGISTRY

    names = set(REGISTRY)
    own = {PACKAGE / "cli" / "text.py", PACKAGE / "cli" / "bench.py"}
    shared = [*sorted((PACKAGE / "cli").glob("*.py")), PACKAGE / "lifecycle.py", PACKAGE / "runs.py",
              *sorted((PACKAGE / "sweep").rglob("*.py")), *sorted((PACKAGE / "report").rglob("*.py"))]
    found = [(path.name, node.lineno, why) for path in shared if path not in own
             for node in ast.walk(ast.parse(path.read_text())) if (why := _kind_specific(node, names))]
    assert found == []
    def fires(code: str) -> bool:
        return any(_kind_specific(n, names) for n in ast.walk(ast.parse(code)))

    assert all(map(fires, ['cfg.kind != "lm"', 'kind_of(cfg).name in ("colour", "x")', "from anchoring.kinds.lm import edits",
                           'match cfg.kind:\n    case "lm":\n        pass']))
    assert not fires('t.kind == "anchor"')  # a regularizer term's kind is no experiment kind
    for path in own:  # each exemption is still needed: one that is not would hide a kind named there later
        assert fires(path.read_text()), path


def test_weights_that_do_not_fit_the_config_are_one_line_naming_the_tensor(tmp_path):
    from torch import nn

    from anchoring.errors import AnchoringError
    from anchoring.kinds.arms import load_arms, write_arms

    write_arms(tmp_path, {("control", 0): nn.Linear(3, 4)}, "test-1")
    with pytest.raises(AnchoringError) as e:
        load_arms(tmp_path, {"arms": ["control"], "seeds": [0]}, lambda arm: nn.Linear(3, 2))
    message = str(e.value)
    assert "\n" not in message and "size mismatch for weight" in message and "do not match the config" in message


@pytest.mark.parametrize("experiment", ["colour-transformer", "lm-control"])
def test_a_seed_listed_twice_is_refused_where_models_are_stored_by_seed(tmp_path, experiment):
    """Two jobs trained into one seed's name, and `load_run` gave that model twice."""
    out = tmp_path / "dup"
    r = runner.invoke(app, ["run", experiment, "--set", "train.seed_list=[0,3,0]", "--steps", "2", "-q", "--out", str(out)])
    assert r.exit_code == 2 and "train.seed_list repeats seed 0" in r.stderr and not out.exists(), r.stderr


def test_jobs_trained_one_after_another_add_their_steps_and_a_stop_names_the_run(tmp_path):
    """The transformer and LM kinds train their (arm, seed) jobs through one loop: each job's steps come
    after the jobs before it on the bar, a job another process trained reports nothing here, and a stop
    inside any job names the run's directory (what `anchoring resume` needs)."""
    from anchoring.kinds.arms import train_each
    from anchoring.train.skeleton import TrainingInterrupted

    def train(arm, seed, report):
        for s in range(1, 4):
            if report is not None:
                report(s)
        return f"{arm}{seed}"

    seen: list[tuple[int, int]] = []
    jobs = [("anchored", 0), ("control", 0)]
    got = train_each(jobs, 3, train, lambda done, total: seen.append((done, total)), tmp_path)
    assert got == {("anchored", 0): "anchored0", ("control", 0): "control0"}
    assert seen == [(n, 6) for n in range(1, 7)]
    seen.clear()
    train_each(jobs, 3, train, lambda done, total: seen.append((done, total)), tmp_path, here=False)
    assert seen == []  # the worker processes reported these steps already

    def stopped(arm, seed, report):
        if arm == "control":
            raise TrainingInterrupted(2, None)
        return arm

    with pytest.raises(TrainingInterrupted) as e:
        train_each(jobs, 3, stopped, None, tmp_path)
    assert (e.value.step, e.value.run_dir) == (2, tmp_path)
