"""What an LM run shows: its HTML report and the lines `anchoring run` and `show` print, both read from
`summary.json` alone (a finished run's report can be redrawn without its models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anchoring import runs
from anchoring.evaluate.stats import target_median, target_text
from anchoring.kinds.lm.config import WEAK_LABEL_ARMS, LMExperiment
from anchoring.kinds.lm.direction import measured_direction
from anchoring.report import html


def text_line(cfg: LMExperiment) -> str:
    """What this run read and labelled, from its resolved config: the experiment's description names
    its defaults, which `--set text.…` may have changed."""
    t = cfg.text
    fp = f", false positives {t.false_positives:g}" if t.false_positives else ""
    return (f"This run: corpus {t.corpus}, concept {t.concept}, {t.tokenizer} tokens, weak labels on {t.weak_labels} "
            f"at coverage {t.coverage:g}{fp}.")


def better(s2: float, surprisal: float) -> str:
    """Which passage mean separates the set better; equal to the printed three decimals is a tie."""
    if round(s2, 3) == round(surprisal, 3):
        return "tie"
    return "s₂" if s2 > surprisal else "surprisal"


def write_report(cfg: LMExperiment, path: Path, summary: dict[str, Any], metric_names: list[str]) -> None:
    figs = path / "figures"
    loss_rows = [[r["arm"], r["seed"], *[r["loss"][k] for k in ("all", "concept", "retain")],
                  *[r["bits"][k] for k in ("all", "concept", "retain")]] for r in summary["models"]]
    sites = list(summary["models"][0]["alignment"])
    al_rows = [[r["arm"], r["seed"], s, *[r["alignment"][s][k] for k in ("concept", "retain", "margin", "containment")]]
               for r in summary["models"] for s in sites]
    pr_rows = [[r["arm"], r["seed"], p["site"], p["auc"], p["auc_without_anchor"]] for r in summary["models"] for p in r["probes"]]
    ev_ = summary["eval"]
    sections = [
        ("Overview", f"<p>{html.html.escape(cfg.description)}</p><p>{html.html.escape(text_line(cfg))}</p>"
                     f"<p>Concept positions: {html.html.escape(ev_['concept_positions'])} "
                     f"({ev_['positions']['concept']} positions); retain: {html.html.escape(ev_['retain_positions'])} "
                     f"({ev_['positions']['retain']}); {ev_['passages']} validation passages, {ev_['positions']['all']} "
                     f"positions in all.</p>"),
        ("Validation loss (nats/char, then bits/char)",
         html.table_html(["arm", "seed", "all", "concept", "retain", "all (bits)", "concept (bits)", "retain (bits)"], loss_rows)),
    ]
    timing = summary.get("timing") or {}
    seconds = [[r["arm"], r["seed"], timing.get(f"{r['arm']}-seed{r['seed']}_s")] for r in summary["models"]]
    notes = "".join(f"<p>{html.html.escape(n)}.</p>" for n in run_notes(summary))
    if notes or any(t is not None for *_, t in seconds):
        sections.append(("Training run", notes + html.table_html(["arm", "seed", "training seconds"],
                                                                 [[a, s_, "–" if t is None else float(t)] for a, s_, t in seconds])))
    if summary["targets"]:
        shown = [[k, target_text(target_median(v)) + left_out_note(v), v["met"]] for k, v in summary["targets"].items()]
        note = budget_note(summary)
        sections.append(("Targets", (f"<p>{note}.</p>" if note else "") + html.table_html(["target", "median", "met"], shown)))
    sections += [
        ("Alignment cos(h, anchor) per layer", html.table_html(["arm", "seed", "site", "concept", "retain", "margin",
                                                                "containment"], al_rows)),
        ("Alignment per layer (figure)", html.image_html(figs / "alignment.png", "alignment")),
        ("Linear probes (AUC, concept vs retain positions; fitted on one half of the passages, scored on the other)",
         html.table_html(["arm", "seed", "site", "AUC", "AUC without anchor direction"], pr_rows)),
        ("Training", html.image_html(figs / "training_curves.png", "training curves")),
    ]
    if "ood" in summary:
        o = summary["ood"]
        def f3(x: float | None, spec: str = ".3f") -> str:  # as the command line prints them; undefined: –
            return "–" if x is None or x != x else format(x, spec)

        def s3(x: float | None) -> str:
            return f3(x, "+.3f")

        rows = [[seed, name, f3(t["s2"]), f3(t["surprisal"]), better(t["s2"], t["surprisal"])]
                for seed, table in o["auroc"].items() for name, t in table.items()]
        body = (f"<p>{o['n']} passages per set, scored by the {o['arm']} arm; AUROC of each set against held-out text.</p>"
                + html.table_html(["seed", "set", "AUROC s₂", "AUROC surprisal", "better"], rows)
                + html.image_html(figs / "ood_roc.png", "ROC curves"))
        if o["deleted"]:
            body += ("<p>The anchored arm before and after deleting its direction: mean s₂ of held-out concept "
                     "passages vs the rest, and the AUROC separating them.</p>"
                     + html.table_html(["seed", "concept s₂ before", "retain s₂ before", "AUROC before",
                                        "concept s₂ after", "retain s₂ after", "AUROC after"],
                                       [[d["seed"], s3(d["concept_s2_before"]), s3(d["retain_s2_before"]),
                                         f3(d["auroc_s2_before"]), s3(d["concept_s2"]), s3(d["retain_s2"]),
                                         f3(d["auroc_s2"])] for d in o["deleted"]]))
        sections.append(("Out-of-distribution detection", body))
    if "unlearning" in summary:
        from anchoring.kinds.lm import unlearning_table as ut

        u = summary["unlearning"]
        header, rows = ut.table(u)
        matched = ". ".join(ut.notes(u))
        body = (f"<p>Nats/char on held-out text. Forget: reference-positive passages (whole, and at concept positions); "
                f"retain: reference-negative passages. Δ = after − before; selectivity = Δforget (concept) / retain cost; "
                f"R = Δforget (concept) / that of the oracle filter against the control. Relearning: "
                f"{u['relearn_steps']} fine-tuning steps on K forget passages, scored on {u['eval_positions']['curves']} "
                f"positions; relearned = lowest concept loss − the control's, kept = share of Δforget that survives. "
                f"{html.html.escape(u['note'])}. {html.html.escape(matched)}{'. ' if matched else ''}"
                f"Curves: {html.html.escape(u['curves'])}.</p>"
                # method and seed in one cell: the first column stays in view when the wide table scrolls
                + html.table_html(["method, seed", *header[2:]],
                                  [[f"{r[0]}, {r[1] if r[1] == 'median' else f'seed {r[1]}'}", *r[2:]] for r in rows])
                + html.image_html(figs / "unlearning_tradeoff.png", "Δforget (concept) against retain cost"))
        if (figs / "relearning_curves.png").is_file():
            body += html.image_html(figs / "relearning_curves.png", "relearning curves")
        sections.append(("Unlearning", body))
    if (figs / "shaded_passages.png").is_file():
        shading = ("red: a larger share of the state in the concept's subspace" if measured_direction(cfg)[1]
                   else "red: towards the anchor, blue: away")
        sections.append((f"Held-out passages shaded by alignment ({shading})",
                         html.image_html(figs / "shaded_passages.png", "shaded passages")))
    sections.append(("Resolved config", f"<pre>{html.html.escape(cfg.to_toml())}</pre>"))
    runs.write_atomic(path / runs.REPORT, html.page(f"anchoring: {cfg.name}", sections))


def left_out_note(t: dict[str, Any]) -> str:
    """What a target line adds when some seeds had no value for it (their median leaves them out)."""
    n = t.get("undefined_seeds") or 0
    treated = "left out" if t.get("undefined_counted_as") is None else f"counted as {t['undefined_counted_as']:g}"
    said = f" ({n} seed{'s' * (n != 1)} undefined, {treated})" if n else ""
    broke = t.get("diverged_seeds") or 0
    unrepaired = t.get("repair_diverged_seeds") or 0
    undistilled = t.get("distil_diverged_seeds") or 0

    def whose(n: int) -> str:
        return f"{n} seed's" if n == 1 else f"{n} seeds'"

    return (said + (f" ({whose(broke)} attack diverged, left out: not met)" if broke else "")
            + (f" ({whose(unrepaired)} repair diverged, left out: not met)" if unrepaired else "")
            + (f" ({whose(undistilled)} distillation diverged, left out: not met)" if undistilled else ""))


TARGET_STEPS = 1000  # the budget the LM targets are stated for: every built-in LM schedule's length


def budget_note(summary: dict[str, Any]) -> str | None:
    """A run shortened with --steps is judged against targets meant for the full budget; say so next to
    the MISS lines, so that a first look at 300 steps is not read as the method failing."""
    steps = summary.get("steps")
    if not summary.get("targets") or steps is None or steps >= TARGET_STEPS:
        return None
    return f"the targets are stated for the default budget of {TARGET_STEPS} steps; this run trained {steps}"


def _cell(x: float | None) -> str:
    """A table cell of three decimals; "–" for a value that is undefined (NaN in the run, null once
    summary.json is read back: a class with no positions, a probe with one class)."""
    return "–" if x is None or x != x else f"{x:.3f}"


def run_notes(summary: dict[str, Any]) -> list[str]:
    """Where the run trained and the weak labels it really had: under `anchoring show`'s table and in the report."""
    notes = []
    timing = summary.get("timing") or {}
    if "device" in timing:  # runs written before it was recorded do not say
        notes.append(f"trained on {timing['device']}, torch {timing['torch']}, {timing['processes']} {timing['parallel']} "
                     "(the session that finished the training)")
    labels = summary.get("labels")  # runs written before it was recorded do not say
    trained = summary.get("arms") or [m.get("arm") for m in summary.get("models") or [] if isinstance(m, dict)]
    if labels and set(trained) & WEAK_LABEL_ARMS:  # the control and oracle filter train on none
        per = labels["per_seed"].values()
        line = f"weak labels: coverage {labels['asked']:g} asked, " + ", ".join(f"{c['coverage']:.3f}" for c in per)
        if labels["kind"] == "spans":
            line += " realised; with a word to mark (what span labels train): " + ", ".join(f"{c['with_a_span']:.3f}" for c in per)
        notes.append(line + " (per seed)")
    return notes


def summary_lines(summary: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    if "edit" in summary:  # a run written by `anchoring delete`
        from anchoring.kinds.lm.control import _table

        e = summary["edit"]
        what = "readers blinded to" if e.get("method") == "blind-readers" else "deleted"
        fixed = f", repaired for {e['repair_steps']} steps on retain text" if e.get("repair_steps") else ""
        return [_table(f"{summary['experiment']}: {what} {e['concept']}{fixed}", summary["edit_rows"]),
                f"largest |h·v| left in the residual stream: {e['max_residual_component']:.2e}"]

    sites = summary.get("anchored_sites") or []
    table = Table(title=f"{summary['experiment']}: validation nats/char" + (" and alignment" if sites else ""))
    timing = summary.get("timing", {})
    cols = ["arm", "seed", "all", "concept", "retain", *[f"{s}\nmargin" for s in sites], *[f"{s}\ncontainment" for s in sites],
            "train\ns"]
    longest = max((len(str(r["arm"])) for r in summary["models"]), default=3)
    for c in cols:  # arm names and header words stay whole at 80 columns, rather than "weak-fil…"
        table.add_column(c, justify="right", min_width=longest if c == "arm" else max(map(len, c.split("\n"))))
    listed = [table.title + " (one line per model: the terminal is too narrow for the table):"]
    for r in summary["models"]:
        seconds = timing.get(f"{r['arm']}-seed{r['seed']}_s")
        cells = [r["arm"], str(r["seed"]), *[_cell(r["loss"][k]) for k in ("all", "concept", "retain")],
                 *[_cell(r["alignment"][s]["margin"]) for s in sites],
                 *[_cell(r["alignment"][s]["containment"]) for s in sites],
                 "–" if seconds is None else f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"]
        table.add_row(*cells)
        listed.append(f"{cells[0]}, seed {cells[1]}: " + ", ".join(f"{c.replace(chr(10), ' ')} {v}" for c, v in zip(cols[2:], cells[2:])))
    from anchoring.kinds.lm.unlearning_table import TableOrList

    lines: list[Any] = [TableOrList(table, listed), *run_notes(summary)]
    if note := budget_note(summary):
        lines.append(note)
    for name, t in summary.get("targets", {}).items():
        lines.append(f"{'met ' if t['met'] else 'MISS'}  {name}: {target_text(target_median(t))}{left_out_note(t)}")  # None: NaN read back from JSON
    if summary.get("unlearning"):
        from anchoring.kinds.lm import unlearning_table as ut

        lines += ut.lines(summary["unlearning"])
    o = summary.get("ood")
    if o:
        for seed, table in o["auroc"].items():
            shown = ", ".join(f"{k} {t['s2']:.3f} / {t['surprisal']:.3f}" for k, t in table.items())
            lines.append(f"OOD AUROC ({o['arm']}, seed {seed}), s₂ / surprisal: {shown}")
        for d in o["deleted"]:
            lines.append(f"after delete (seed {d['seed']}): concept passages s₂ {d['concept_s2']:+.3f} "
                         f"(before {d['concept_s2_before']:+.3f}), retain {d['retain_s2']:+.3f} "
                         f"(before {d['retain_s2_before']:+.3f}), AUROC {d['auroc_s2']:.3f} (before {d['auroc_s2_before']:.3f})")
    return lines
