"""The unlearning table, from the rows `unlearning.evaluate` scored: every method a row per seed and its
median, the targets as medians over seeds, and the notes that say why a cell is undefined. Presentation
only: nothing here runs a model, so a finished run's table can be read back from its summary alone."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from anchoring.evaluate.stats import median
from anchoring.kinds.lm.unlearning import (
    CONTROL_ROWS,
    COST_FLOOR,
    DISTIL_ONLY,
    DISTILLED,
    DIVERGED,
    MATCHED_COST,
    ND,
    distillation_broke,
    ratio,
    selectivity,
)


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


UNEDITED = "kept vs unedited"  # the column of `kept_unedited` (`unlearning.attack_unedited`)


def shares(unedited: bool) -> tuple[tuple[str, str], ...]:
    """(column name, record key) of each attack's figures, with `kept_unedited` when it was measured."""
    return (("relearned", "relearned"), ("kept", "kept"), *([(UNEDITED, "kept_unedited")] if unedited else []))


def has_unedited(unlearning: dict[str, Any]) -> bool:
    """Whether the table's attacks were also run on the unedited models (summaries before that option say nothing)."""
    return bool(unlearning.get("attack_unedited"))


def columns(ks: list[int], unedited: bool = False) -> list[str]:
    return ["method", "seed", "forget before", "forget after", "concept before", "concept after", "retain before",
            "retain after", "Δforget", "Δforget (concept)", "retain cost", "selectivity", "R", "direction left",
            *[f"{name} K={k}" for k in ks for name, _ in shares(unedited)], "steps to recover"]


def targets(unlearning: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The unlearning targets, medians over seeds (where the rows they need exist)."""
    rows = unlearning["rows"]

    def med(method: str, get) -> float:
        return ranked_median([_num(get(r)) for r in rows if r["method"] == method])

    def times(mine: str, other: str) -> dict[str, Any]:
        """Median over seeds of `mine`'s Δforget (concept) over `other`'s, and how many seeds had none: a
        seed with a `mine` row but no `other` row (no cost-matched row where the anchored deletion cost
        nothing) counts as undefined rather than leaving the median to the other seeds unsaid."""
        ratios, broken = [], 0
        for a in (r for r in rows if r["method"] == mine):
            b = next((r for r in rows if r["method"] == other and r["seed"] == a["seed"]), None)
            ratios.append(float("nan") if b is None else ratio(_num(a["d_forget_concept"]), _num(b["d_forget_concept"])))
            broken += bool(a.get("repair_diverged") or (b or {}).get("repair_diverged"))  # counted by `unrepaired`
        m = ranked_median(ratios)
        return {"median": m, "met": m >= 3.0, "undefined_seeds": sum(math.isnan(v) for v in ratios) - broken}

    def unrepaired(line: dict[str, Any], *methods: str) -> dict[str, Any]:
        """A target line of `methods` with the seeds where a repair of any of them diverged: their values
        are undefined and left out, so the line is not met on them (a median over the seeds that
        survived says nothing of the ones that did not)."""
        broken = [r for r in rows if r["method"] in methods and r.get("repair_diverged")]
        counts = {key: len({r["seed"] for r in broken if distillation_broke(r) == distilled})
                  for key, distilled in (("repair_diverged_seeds", False), ("distil_diverged_seeds", True))}
        return {**line, "met": False, **{k: n for k, n in counts.items() if n}} if broken else line

    out: dict[str, dict[str, Any]] = {}
    # the writers' deletion first (the edit the targets name), then the readers' blinding, each against
    # the same edit along the post-hoc mean-difference direction, then the deletion distilled (when scored)
    for edit in ("delete", "blind", DISTILLED.removeprefix("anchoring · ")):
        mine, md = f"anchoring · {edit}", f"mean-difference · {edit}"
        if not any(r["method"] == mine for r in rows):
            continue
        d = med(mine, lambda r: r["d_forget_concept"])
        cost = med(mine, lambda r: r["retain_cost"])
        out[f"{mine}: Δforget at concept positions ≥ 0.5 nats/char"] = unrepaired({"median": d, "met": d >= 0.5}, mine)
        out[f"{mine}: retain cost ≤ 0.02 nats/char"] = unrepaired({"median": cost, "met": cost <= 0.02}, mine)
        if any(r["method"] == md for r in rows):
            out[f"Δforget (concept) of {mine} ≥ 3 × {md}"] = unrepaired({
                **times(mine, md), "retain_costs": [cost, med(md, lambda r: r["retain_cost"])]}, mine, md)
        if edit == "delete" and any(r["method"] == MATCHED_COST for r in rows):  # the target as stated: at the same retain cost
            out[f"Δforget (concept) of {mine} ≥ 3 × {md} at the same retain cost"] = {
                **times(mine, MATCHED_COST), "strengths": [r["strength"] for r in rows if r["method"] == MATCHED_COST]}
        ks = unlearning.get("relearn_k") or []
        if ks:
            k = max(ks)
            attacked = [r for r in rows if r["method"] == mine and str(k) in (r.get("relearn") or {})]
            kept = ranked_median([kept_for_median(r, k) for r in attacked])
            broke = sum(bool(r["relearn"][str(k)].get("diverged")) for r in attacked)
            out[f"{mine} keeps ≥ 50% of Δforget after relearning on K = {k}"] = unrepaired({
                "median": kept, "met": kept >= 0.5 and not broke,  # an attack that broke proves nothing kept
                "undefined_seeds": sum(math.isnan(_num(r["relearn"][str(k)].get("kept"))) and not r["relearn"][str(k)].get("diverged")
                                       for r in attacked),
                "undefined_counted_as": 0.0,  # see kept_for_median
                **({"diverged_seeds": broke} if broke else {})}, mine)
        if not any(r["method"] == "oracle filter" for r in rows):  # R is relative to it: no arm, no target
            continue
        r_ = med(mine, lambda r: r["R"])
        out[f"R ({mine} vs oracle filter) ≥ 0.5"] = unrepaired({
            "median": r_, "met": r_ >= 0.5, "undefined_seeds": sum(math.isnan(_num(r["R"])) and not r.get("repair_diverged")
                                                                   for r in rows if r["method"] == mine)}, mine)
    return out


def kept_for_median(row: dict[str, Any], k: int, key: str = "kept") -> float:
    """A row's share kept at K = k (`key`: "kept", or "kept_unedited") as medians count it: NaN when the
    row was not attacked at k, and 0 when it was but its edit raised the forget loss too little for a
    share ("kept" undefined): it had nothing to keep, and leaving it out would let the seeds where the
    edit worked decide alone. A `kept_unedited` undefined for another reason (the unedited model's
    attack broke) stays NaN."""
    got = (row.get("relearn") or {}).get(str(k))
    if got is None or got.get("diverged"):  # not attacked, or the attack broke: no share either way
        return float("nan")
    v = _num(got.get(key))
    return 0.0 if math.isnan(v) and math.isnan(_num(got.get("kept"))) else v


def ranked_median(values: list[float]) -> float:
    """Median over seeds that ranks ±inf as the extremes they are (a seed that never recovered, an
    edit with no retain cost) instead of dropping them; NaN (undefined) values are left out."""
    return median(values, rank_infinite=True)


def table(unlearning: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Every method a row per seed plus its median over seeds; every metric a column. `recover`
    beyond the cap shows as "> N"; rows that were not fine-tuned show "hook" there (hooks, unless they were attacked), or "control"
    (the matched controls)."""
    median = ranked_median

    ks = unlearning["relearn_k"]
    cap = unlearning.get("recover_cap")
    figures = shares(has_unedited(unlearning))

    def values(r: dict[str, Any]) -> list[float]:
        rel = r.get("relearn") or {}
        return [_num(r["before"]["forget"]), _num(r["after"]["forget"]), _num(r["before"]["concept"]),
                _num(r["after"]["concept"]), _num(r["before"]["retain"]), _num(r["after"]["retain"]),
                _num(r["d_forget"]), _num(r["d_forget_concept"]), _num(r["retain_cost"]),
                selectivity(_num(r["d_forget_concept"]), _num(r["retain_cost"])),
                _num(r["R"]), _num(r.get("leftover")), *[_num(rel.get(str(k), {}).get(key)) for k in ks for _, key in figures]]

    def recover(r: dict[str, Any]) -> Any:
        if r["method"] in CONTROL_ROWS:  # never fine-tuned
            return "control"
        if r["method"] == MATCHED_COST:  # a dialled-down copy of a row that is attacked in full
            return "–"
        if not r.get("fine_tuned", r["weights_edited"]):  # summaries written before hooks could be attacked
            return "hook"
        if _nothing_to_recover(r):
            return ND
        if r.get("recover_diverged"):
            return DIVERGED
        return r["recover_steps"] if r["recover_steps"] is not None else f"> {cap}"

    head = columns(ks, has_unedited(unlearning))
    rows: list[list[Any]] = []
    for m in dict.fromkeys(r["method"] for r in unlearning["rows"]):
        mine = [r for r in unlearning["rows"] if r["method"] == m]
        vals = np.array([values(r) for r in mine], dtype=float)
        steps = [r["recover_steps"] for r in mine if not _nothing_to_recover(r) and not r.get("recover_diverged")]  # out of
        # the median: nd seeds, and seeds whose recovery fine-tune broke
        med_rec: Any = recover(mine[0]) if not mine[0].get("fine_tuned", mine[0]["weights_edited"]) else (
            median([float(s) if s is not None else float("inf") for s in steps]) if steps
            else DIVERGED if any(r.get("recover_diverged") for r in mine) else ND)
        if isinstance(med_rec, float) and not math.isfinite(med_rec):
            med_rec = f"> {cap}"
        med = [median(list(col)) for col in vals.T]
        for k in ks:  # as the target line: an attacked seed whose edit had nothing to keep kept 0, not "unknown"
            for name, key in figures[1:]:
                med[head.index(f"{name} K={k}") - 2] = median([kept_for_median(r, k, key) for r in mine])
        rows.append([m, "median", *med, med_rec])
        rows += [[m, r["seed"], *values(r), recover(r)] for r in mine]
    return head, rows


def matched_note(unlearning: dict[str, Any]) -> str:
    """What the cost-matched row is, with its strength per seed ("" when the table has none)."""
    got = [r for r in unlearning["rows"] if r["method"] == MATCHED_COST]
    if not got:
        return ""
    betas = ", ".join(f"{r['strength']:.3f} (seed {r['seed']})" for r in got)
    return (f"{MATCHED_COST}: the same deletion with only a share β of each direction's component removed, β chosen "
            f"per seed so that its retain cost equals that of anchoring · delete (β = {betas}); not fine-tuned")


def lines(unlearning: dict[str, Any]) -> list[Any]:
    """The CLI's unlearning table: medians over seeds."""
    from rich.table import Table

    header, rows = table(unlearning)
    ks = unlearning["relearn_k"]
    keep = ["method", "Δforget", "Δforget (concept)", "retain cost", "selectivity", "R",
            *[f"relearned K={max(ks)}" for _ in ks[:1]], *[h for h in header if h.startswith("kept")], "steps to recover"]
    idx = [header.index(h) for h in keep]
    steps = header.index("steps to recover")

    def cell(v: Any, i: int) -> str:
        if not isinstance(v, float):
            return str(v)
        if math.isnan(v):  # undefined, as the report's tables print it
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        return f"{v:g}" if i == steps else f"{v:.3f}"

    title = "unlearning: median over seeds (nats/char on held-out text)"
    medians = [[cell(r[i], i) for i in idx] for r in rows if r[1] == "median"]
    longest = max((len(c[0]) for c in medians), default=0)
    t = Table(title=title)
    t.add_column("method", justify="right", min_width=min(NAME_WIDTH, longest))  # longer names wrap onto lines of their own
    for h in keep[1:]:
        t.add_column(h, justify="right", no_wrap=True)
    for cells in medians:
        t.add_row(*cells)
    listed = [title + ":", *[f"{c[0]}: " + ", ".join(f"{h} {v}" for h, v in zip(keep[1:], c[1:])) for c in medians]]
    t_or_list = TableOrList(t, listed, max(0, longest - NAME_WIDTH))
    return [t_or_list, f"{unlearning['note']}; relearning fine-tunes {unlearning['relearn_steps']} steps; "
                       f"relearned = lowest concept loss reached − the control's; medians leave out undefined (–) seeds "
                       f"(kept counts one as 0) and rank ±∞ as extremes", *notes(unlearning)]


def notes(unlearning: dict[str, Any]) -> list[str]:
    """What the table's cells cannot say (broken fine-tunes, undefined shares, failed attacks, R's
    denominator, the matched and repaired rows), under the CLI's table and the report's alike."""
    said = [diverged_note(unlearning), nothing_kept_note(unlearning), never_lower_note(unlearning),
            nothing_to_recover_note(unlearning), r_note(unlearning), matched_note(unlearning), repair_note(unlearning),
            distil_note(unlearning), unedited_note(unlearning)]
    return [n for n in said if n]


def unedited_note(unlearning: dict[str, Any]) -> str:
    """What the "kept vs unedited" columns count, with how far the attack took each unedited model ("" without them)."""
    if not has_unedited(unlearning):
        return ""
    drops: dict[tuple[str, int], dict[str, float]] = {}
    for r in unlearning["rows"]:
        for k, got in (r.get("relearn") or {}).items():
            if "unedited_drop" in got:
                drops.setdefault((str(got.get("unedited")), r["seed"]), {})[k] = _num(got["unedited_drop"])
    told = "; ".join(f"{arm}, seed {seed}: " + ", ".join(f"K={k} {'–' if math.isnan(v) else f'{v:.3f}'}" for k, v in d.items())
                     for (arm, seed), d in sorted(drops.items()))
    return ("kept vs unedited = (lowest − before + drop) / (after − before): the share kept counted from where the same "
            "attack takes the unedited model, drop below its own concept loss (so headroom the attack finds without any "
            "edit does not count against the edit); drops: " + (told or "none measured")
            + ("; –: the attack on the unedited model diverged, and kept vs unedited is undefined there" if "–" in told else ""))


NAME_WIDTH = 20  # the CLI table's method column: longer names wrap


class TableOrList:
    """`table` where the terminal is wide enough for it, else the same cells one row per line: rich
    cuts a table wider than the terminal (80 columns, or output piped) to "anch…" in every name."""

    def __init__(self, table: Any, lines: list[str], give: int = 0) -> None:
        self.table, self.lines, self.give = table, lines, give  # give: columns the wrapped first column can give up

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.measure import Measurement
        from rich.text import Text

        natural = Measurement.get(console, options.update(max_width=10**6), self.table).maximum  # unclamped
        if natural - self.give <= options.max_width:
            yield self.table
        else:
            yield from (Text(line) for line in self.lines)


def diverged_note(unlearning: dict[str, Any]) -> str:
    """The fine-tunes that broke (a loss or weights no longer finite): an attack's or recovery's curve
    stops there, its "kept" and recovery undefined and out of the medians; a repair's leaves the whole
    row after the edit undefined ("" when none)."""
    out = [f"{r['method']} seed {r['seed']} K = {k}" for r in unlearning["rows"]
           for k, got in (r.get("relearn") or {}).items() if got.get("diverged")]
    out += [f"{r['method']} seed {r['seed']} recovery" for r in unlearning["rows"]
            if r.get("recover_diverged") and not r.get("repair_diverged")]
    broken = [r for r in unlearning["rows"] if r.get("repair_diverged")]  # a repair's, or a distillation's
    said = []
    if out:
        said.append(f"{len(out)} fine-tune(s) diverged at unlearning.relearn_lr {unlearning.get('relearn_lr', '?')} and stop "
                    f"at their last finite point, their relearned, kept and recovery undefined (a smaller rate: `anchoring "
                    f"relearn RUN --lr`): " + "; ".join(out))
    for noun, key, after, distilled in (("repair", "repair", "the edit", False), ("distillation", "distil", "it", True)):
        names = [f"{r['method']} seed {r['seed']}" for r in broken if distillation_broke(r) == distilled]
        if names:
            said.append(f"{len(names)} {noun}(s) diverged at unlearning.{key}_lr {unlearning.get(f'{key}_lr', '?')}, so "
                        f"everything after {after} is undefined there and the method's targets are not met (a smaller rate: "
                        f"`anchoring relearn RUN --{key}-lr`): " + "; ".join(names))
    return ". ".join(said)


def nothing_kept_note(unlearning: dict[str, Any]) -> str:
    """Which attacked seeds had no Δforget to keep, and so count as keeping 0 in the medians above
    ("" when none)."""
    out = []
    for m in dict.fromkeys(r["method"] for r in unlearning["rows"]):
        seeds = sorted({r["seed"] for r in unlearning["rows"] if r["method"] == m
                        for k in unlearning["relearn_k"] if (r.get("relearn") or {}).get(str(k)) is not None
                        and math.isnan(_num(r["relearn"][str(k)].get("kept"))) and not r["relearn"][str(k)].get("diverged")})
        if seeds:
            out.append(f"{m} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})")
    if not out:
        return ""
    return ("kept counts 0 where an edit raised the forget loss too little to have a share to keep: " + "; ".join(out))


def never_lower_note(unlearning: dict[str, Any]) -> str:
    """Which attacks never brought the concept loss below the edited model's own ("" when none). Their
    kept is 1 by the definition (the lowest point is the start), and a reader would take that for an
    edit that held; what it shows is a fine-tune that only raised the loss (often one on a few passages
    at the attack's rate), which says nothing about how the edit would fare against a gentler one."""
    at: dict[str, dict[int, list[int]]] = {}  # method → K → seeds, methods in the table's order
    for r in unlearning["rows"]:
        for k, got in (r.get("relearn") or {}).items():
            if not got.get("diverged") and not math.isnan(_num(got.get("kept"))) and _num(got.get("lowest")) >= _num(got.get("after_edit")):
                at.setdefault(r["method"], {}).setdefault(int(k), []).append(r["seed"])
    if not at:
        return ""
    out = [f"{m} (" + "; ".join(f"K = {k}: seed{'s' if len(ss) > 1 else ''} {', '.join(map(str, sorted(ss)))}"
                                for k, ss in sorted(ks.items())) + ")" for m, ks in at.items()]
    return ("kept is 1 where no step of the attack brought the concept loss below the edited model's (the fine-tune "
            "only raised it): a failed attack, not evidence that the edit held; see unlearning_curves.csv: " + "; ".join(out))


def _nothing_to_recover(row: dict[str, Any]) -> bool:
    """Whether the recovery fine-tune began at or below the control's concept loss (0 steps): shown as
    nd, not as "recovered in 0 steps". Rows that were not fine-tuned have no steps at all."""
    return row.get("recover_steps") == 0


def nothing_to_recover_note(unlearning: dict[str, Any]) -> str:
    """Which seeds show "nd" under steps to recover ("" when none)."""
    out = []
    for m in dict.fromkeys(r["method"] for r in unlearning["rows"]):
        seeds = [str(r["seed"]) for r in unlearning["rows"] if r["method"] == m and _nothing_to_recover(r)]
        if seeds:
            out.append(f"{m} (seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)})")
    if not out:
        return ""
    return (f"steps to recover is {ND} (nothing to recover) where the edited model's concept loss on the recovery's "
            "evaluation text was already at or below the control's before the first step; those seeds are left out of "
            "the median: " + "; ".join(out))


def r_note(unlearning: dict[str, Any]) -> str:
    """Why R is undefined on some or every seed ("" when it is defined everywhere it can be)."""
    rows = unlearning["rows"]
    oracle = {r["seed"]: r["d_forget_concept"] for r in rows if r["method"] == "oracle filter"}
    if not oracle:
        return "R is undefined (–) throughout: the run has no oracle-filter arm to divide by"
    bad = {s: _num(d) for s, d in oracle.items() if not _num(d) >= COST_FLOOR}  # read back from JSON, NaN is None
    if not bad:
        return ""
    every = " throughout" if len(bad) == len(oracle) else f" on seed{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}"
    if all(d < 0 for d in bad.values()):
        why = "negative: without the concept's passages the filter predicts them better, so there is no removal to divide by"
    elif all(d >= 0 for d in bad.values()):
        why = "too small to divide by"
    elif all(math.isnan(d) for d in bad.values()):
        why = "itself undefined"
    else:
        why = "too small to divide by, negative or undefined"
    return (f"R is undefined (–){every}: the oracle filter's Δforget (concept) there is under {COST_FLOOR:g} ("
            + ", ".join("–" if math.isnan(d) else f"{d:+.4f}".replace("-", "−") for d in bad.values())
            + f"), {why}")


def repair_note(unlearning: dict[str, Any]) -> str:
    """What "after" means when the edits were repaired ("" when they were not)."""
    n = unlearning.get("repair_steps") or 0
    if not n:
        return ""
    distilled = [r for r in unlearning["rows"] if r["method"] in (DISTILLED, DISTIL_ONLY)]
    repaired = any("edit_only" in r for r in distilled)  # a summary older than their repair has none
    students = (" (the distilled rows after their distillation, with no edit to re-apply: a student's axes are its own)"
                if repaired else "")
    spared = "the filters and the distilled rows" if distilled and not repaired else "the filters"
    return (f"every edit (not {spared}) was repaired before scoring: {n} fine-tuning steps on retain passages with the "
            f"edit re-applied after each step{students}; the mean-difference deletion at anchoring's retain cost is not "
            "computed then")


def distil_note(unlearning: dict[str, Any]) -> str:
    """What the distilled rows are ("" when the run scored none)."""
    n = unlearning.get("distil_steps") or 0
    if not n:
        return ""
    alpha = unlearning["distil_noise"]
    start = "a fresh model" if alpha == 1 else f"a copy of its teacher moved {alpha:g} of the way to a fresh model"
    return (f"{DISTILLED}: the deleted anchored model distilled into {start} for {n} steps on all training text (peak rate "
            f"{unlearning['distil_lr']:g}), the student free to write along any direction; {DISTIL_ONLY}: the anchored model "
            "distilled the same way with no edit, not attacked")
