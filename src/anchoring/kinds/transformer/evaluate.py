"""Measuring the colour transformer: exact match, alignment with the anchor, probes, edits.

Everything is computed from fixed evaluation lines (independent of the training seed), so
an anchored model and its control are scored on the same equations.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anchoring.anchor import Capture
from anchoring.anchor.sequence import SequenceSite
from anchoring.control import intervene, suppress
from anchoring.control.erasure import mean_difference as mean_difference_of
from anchoring.domains.colour import hsv_similarity
from anchoring.domains.colour.labels import redness
from anchoring.domains.colour_language import ROLE, ColourLanguage

SETS = ("seen", "held-out", "complement", "lighten", "red answers")
MAP_SLOTS = ("a", "+", "b", "=", "answer", ";", "= → x")  # columns of the alignment map
EVAL_SEED = 9001


@dataclass
class Lines:
    op: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor


def both_orders(pairs: torch.Tensor) -> torch.Tensor:
    """Every unordered pair as its ordered lines: x + y and y + x, and x + x once (listing it twice
    gave the trivial lines twice their share of a set)."""
    return torch.cat([pairs, pairs[pairs[:, 0] != pairs[:, 1]].flip(-1)])


def eval_lines(lang: ColourLanguage, n: int, k: int = 10) -> dict[str, Lines]:
    """Seen and held-out mixes (both orders), every complement, every lighten, and every *seen* line
    whose answer is among the k reddest colours (so the red group is not a handful of lines)."""
    g = torch.Generator().manual_seed(EVAL_SEED)
    out = {}
    for split in ("seen", "held-out"):
        both = both_orders(lang.mix_pairs(split))
        pick = both[torch.randperm(len(both), generator=g)[:n]]
        out[split] = Lines(torch.zeros(len(pick), dtype=torch.long), pick[:, 0], pick[:, 1])
    colours = torch.arange(lang.n_colours)
    none = torch.full_like(colours, -1)
    out["complement"] = Lines(torch.ones_like(colours), colours, none)
    out["lighten"] = Lines(torch.full_like(colours, 2), colours, none)
    red = reddest(lang, k)  # ties at the k-th place: torch.topk's pick (fixed for a lattice), see `reddest`
    seen = both_orders(lang.mix_pairs("seen"))
    mix = seen[torch.isin(lang.lattice.mix(seen[:, 0], seen[:, 1]), red)]
    unary = [(op, colours[torch.isin(lang.answer(torch.full_like(colours, op), colours, none), red)]) for op in (1, 2)]
    out["red answers"] = Lines(torch.cat([torch.zeros(len(mix), dtype=torch.long), *[torch.full_like(c, op) for op, c in unary]]),
                               torch.cat([mix[:, 0], *[c for _, c in unary]]),
                               torch.cat([mix[:, 1], *[torch.full_like(c, -1) for _, c in unary]]))
    return out


@torch.no_grad()
def line_correct(model: nn.Module, lang: ColourLanguage, lines: Lines, context: int, chunk: int = 128) -> torch.Tensor:
    """`(N,)` bool: the model's top prediction after each line's '=' is the answer."""
    batch, where = lang.pack_whole(lines.op, lines.a, lines.b, context)
    preds = torch.cat([model(batch.inputs[i:i + chunk]).argmax(-1) for i in range(0, len(batch.inputs), chunk)])
    right = torch.zeros(batch.colours.shape[:2], dtype=torch.bool)
    rows, pos = batch.answer_query.nonzero(as_tuple=True)
    right[rows, batch.line[rows, pos]] = preds[rows, pos] == batch.targets[rows, pos]
    return right[where[:, 0], where[:, 1]]


def line_redness(lang: ColourLanguage, lines: Lines) -> torch.Tensor:
    """`(N, 3)` redness of operand a, operand b (0 when absent) and the answer."""
    c = lang.answer(lines.op, lines.a, lines.b)
    cols = torch.stack([lines.a, lines.b, c], -1)
    r = redness(lang.lattice.rgb(cols.clamp_min(0)))
    return torch.where(cols >= 0, r, torch.zeros_like(r))


def reddest(lang: ColourLanguage, k: int) -> torch.Tensor:
    """Token ids of the k reddest colours. Redness ties at the k-th place (on 6 levels, four colours
    share redness 0.7 at ranks 10–13) are broken by `torch.topk`, the same way every time: the red
    group is exactly k colours, and the others tied with the k-th count as not red."""
    return redness(lang.lattice.rgb()).topk(k).indices


def groups(lang: ColourLanguage, lines: Lines, k: int, redish: float) -> dict[str, torch.Tensor]:
    """Masks over lines: answer among the k reddest; any red-ish colour; no red-ish colour at all."""
    c = lang.answer(lines.op, lines.a, lines.b)
    r = line_redness(lang, lines)
    return {"red answer": torch.isin(c, reddest(lang, k)), "red-ish": r.max(-1).values >= redish,
            "no red": r.max(-1).values < redish}


def score(model: nn.Module, lang: ColourLanguage, sets: dict[str, Lines], context: int) -> dict[str, torch.Tensor]:
    """Per set, `(N,)` bool: is each line answered right. The table and the curve below both read this."""
    return {name: line_correct(model, lang, lines, context) for name, lines in sets.items()}


def accuracy_table(lang: ColourLanguage, sets: dict[str, Lines], right: dict[str, torch.Tensor], k: int,
                   redish: float) -> dict[str, float]:
    """Exact match per set, and over all sets by redness group (with each group's count `n …` and
    number right `right …`, so that differences between two tables can be taken exactly)."""
    out: dict[str, float] = {name: float(r.float().mean()) for name, r in right.items()}
    masks = [groups(lang, lines, k, redish) for lines in sets.values()]
    every = torch.cat(list(right.values()))
    for g in ("red answer", "red-ish", "no red"):
        m = torch.cat([ms[g] for ms in masks])
        out[g] = float(every[m].float().mean()) if m.any() else float("nan")
        out[f"n {g}"] = int(m.sum())
        out[f"right {g}"] = int(every[m].sum())
    return out


def accuracy_drop(before: dict[str, float], after: dict[str, float], group: str) -> float:
    """Accuracy lost in a redness group, from the counts: the float32 means differ from the exact
    fractions in the 8th digit, enough to read a drop of exactly 0.05 as 0.05000001 and fail a
    "≤ 0.05" target."""
    n = before[f"n {group}"]
    return (before[f"right {group}"] - after[f"right {group}"]) / n if n else float("nan")


def accuracy_by_redness(lang: ColourLanguage, sets: dict[str, Lines], right: dict[str, torch.Tensor],
                        bins: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01)) -> tuple[np.ndarray, np.ndarray]:
    """Exact match by the reddest colour of a line (binned): a curve that should fall only at the red end."""
    right_t = torch.cat(list(right.values())).float().numpy()
    red_t = torch.cat([line_redness(lang, lines).max(-1).values for lines in sets.values()]).numpy()
    idx = np.digitize(red_t, bins) - 1
    acc = np.array([right_t[idx == i].mean() if (idx == i).any() else np.nan for i in range(len(bins) - 1)])
    centres = 0.5 * (np.array(bins[:-1]) + np.array(bins[1:]))
    return centres, acc


# --- alignment -------------------------------------------------------------------------------------

def probe_lines(lang: ColourLanguage, partners: int = 8) -> tuple[Lines, Lines, torch.Tensor]:
    """Mix lines with each colour x as operand a (`partners` partners each), and complement lines `~ x̄ = x`.

    Returns (mix lines, complement lines, colour of each mix line).
    """
    g = torch.Generator().manual_seed(EVAL_SEED + 1)
    n = lang.n_colours
    pairs = torch.cat([lang.mix_pairs("seen"), lang.mix_pairs("held-out")])
    both = torch.cat([pairs, pairs.flip(-1)])
    x = torch.arange(n).repeat_interleave(partners)
    ys = []
    for colour in range(n):  # partners whose mix with x is part of the language
        cand = both[both[:, 0] == colour, 1]
        ys.append(cand[torch.randint(len(cand), (partners,), generator=g)])
    y = torch.cat(ys)
    mix = Lines(torch.zeros_like(x), x, y)
    colours = torch.arange(n)
    comp = Lines(torch.ones_like(colours), lang.lattice.complement(colours), torch.full_like(colours, -1))
    return mix, comp, x


@torch.no_grad()
def capture_lines(model: nn.Module, lang: ColourLanguage, lines: Lines, context: int,
                  sites: Sequence[SequenceSite]) -> tuple[dict[SequenceSite, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations `(R, T, D)` per site for whole-packed lines, with roles, line ids and line coordinates."""
    batch, where = lang.pack_whole(lines.op, lines.a, lines.b, context)
    with Capture(model, [s.module for s in sites]) as cap:
        model(batch.inputs)
        acts = {s: s.read(cap.acts).clone() for s in sites}
    return acts, batch.roles, batch.line, where


def _slot_mean(h: torch.Tensor, roles: torch.Tensor, line: torch.Tensor, where: torch.Tensor, role: int) -> torch.Tensor:
    """`(N, D)` the vector at `role` of each input line (lines in `where` order)."""
    rows, pos = (roles == role).nonzero(as_tuple=True)
    table = torch.zeros(roles.shape[0], int(line.max()) + 1, h.shape[-1])
    table[rows, line[rows, pos]] = h[rows, pos]
    return table[where[:, 0], where[:, 1]]


@dataclass
class Probe:
    """One model's activations on the probe lines at every site, captured once and read by the
    alignment map, the linear probes and the post-hoc direction alike."""

    mix: tuple  # capture_lines(...) of the mix lines
    comp: tuple  # capture_lines(...) of the complement lines
    colours: torch.Tensor  # operand a of each mix line

    def slot(self, site: SequenceSite, role: int) -> torch.Tensor:
        """`(N, D)` unit vectors at `role` of every mix line."""
        acts, roles, line, where = self.mix
        return F.normalize(_slot_mean(acts[site], roles, line, where, role), dim=-1)

    def producing(self, site: SequenceSite) -> torch.Tensor:
        """`(n_colours, D)` unit vectors at the '=' of the complement line whose answer is each colour."""
        acts, roles, line, where = self.comp
        return F.normalize(_slot_mean(acts[site], roles, line, where, ROLE["eq"]), dim=-1)


def probe(model: nn.Module, lang: ColourLanguage, context: int, sites: Sequence[SequenceSite]) -> Probe:
    mix, comp, xs = probe_lines(lang)
    return Probe(capture_lines(model, lang, mix, context, sites), capture_lines(model, lang, comp, context, sites), xs)


def alignment_map(p: Probe, sites: Sequence[SequenceSite], direction: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """`(len(sites), len(MAP_SLOTS), n_colours)` mean cos(h, anchor) with colour x in each slot.

    Slots a…; are positions of mix lines `x + y = z ;` (averaged over partners y); '= → x' is the
    '=' of the complement line whose answer is x (where the model must produce x).
    """
    dirs = list(direction) if isinstance(direction, (list, tuple)) else [direction] * len(sites)
    xs = p.colours
    n = int(xs.max()) + 1
    out = torch.zeros(len(sites), len(MAP_SLOTS), n)
    mix_roles = [ROLE["a"], ROLE["op"], ROLE["b"], ROLE["eq"], ROLE["answer"], ROLE["end"]]
    for i, s in enumerate(sites):
        v = F.normalize(dirs[i], dim=-1)
        for j, role in enumerate(mix_roles):
            cos = p.slot(s, role) @ v
            out[i, j] = torch.zeros(n).index_add_(0, xs, cos) / torch.bincount(xs, minlength=n).clamp_min(1)
        out[i, -1] = p.producing(s) @ v
    return out


def concept_scores(lang: ColourLanguage) -> tuple[torch.Tensor, torch.Tensor]:
    """Per colour: concept weight (redness⁸, the labeller's shape) and HSV similarity to pure red."""
    rgb = lang.lattice.rgb()
    return redness(rgb).pow(8), hsv_similarity(rgb, torch.tensor([1.0, 0.0, 0.0]))


def alignment_stats(align: torch.Tensor, weight: torch.Tensor, similarity: torch.Tensor) -> dict[str, float]:
    """margin, containment (mean cos over colours), mean |cos|, grading R² vs similarity, for `(n_colours,)` cosines."""
    a = align.double()
    w = weight.double()
    margin = float((a * w).sum() / w.sum() - a.mean())
    sim = similarity.double()
    r = torch.corrcoef(torch.stack([a, sim]))[0, 1]
    return {"margin": margin, "containment": float(a.mean()), "mean_abs": float(a.abs().mean()),
            "grading_r2": float(r * r) if torch.isfinite(r) else 0.0, "red_cos": float(a[weight.argmax()])}


# --- probes ------------------------------------------------------------------------------------

def probe_concept(p: Probe, lang: ColourLanguage, sites: Sequence[SequenceSite], direction: torch.Tensor | None,
                  k: int, folds: int = 5) -> list[dict[str, float]]:
    """Per site: cross-validated (by colour) linear probe for 'among the k reddest' at the operand's own position.

    With the anchor direction projected out too: a probe that still works means the concept
    also lives outside the anchor.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    xs = p.colours
    y = torch.isin(xs, reddest(lang, k)).numpy()
    out = []
    for s in sites:
        X = p.slot(s, ROLE["a"])
        row = {"site": str(s)}
        variants = {"auc": X}
        if direction is not None and direction.shape[-1] == X.shape[-1]:
            v = F.normalize(direction, dim=-1)
            variants["auc_without_anchor"] = X - (X @ v)[:, None] * v
        for name, feats in variants.items():
            scores = np.zeros(len(y))
            for tr, te in GroupKFold(folds).split(feats.numpy(), y, groups=xs.numpy()):
                clf = LogisticRegression(max_iter=2000, class_weight="balanced").fit(feats[tr].numpy(), y[tr])
                scores[te] = clf.decision_function(feats[te].numpy())
            row[name] = float(roc_auc_score(y, scores))
        out.append(row)
    return out


# --- interventions -----------------------------------------------------------------------------

def edit_for(method: str, direction: torch.Tensor, head: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation edit: suppress (remove the positive part along v) or ablate (remove it whole)."""
    v = F.normalize(direction, dim=-1)

    def apply(z: torch.Tensor) -> torch.Tensor:
        if method == "suppress":
            return suppress(z, v)
        return z - (z @ v).unsqueeze(-1) * v

    if head is None:
        return apply

    def per_head(z: torch.Tensor) -> torch.Tensor:  # (B, H, T, d): edit one head only
        z = z.clone()
        z[:, head] = apply(z[:, head])
        return z

    return per_head


@contextmanager
def edited(model: nn.Module, targets: Sequence[tuple[SequenceSite, torch.Tensor]], method: str) -> Iterator[nn.Module]:
    """`with edited(model, [(site, direction), …], method):` every listed site edited at once."""
    with ExitStack() as stack:
        for site, v in targets:
            stack.enter_context(intervene(model, site.module, edit_for(method, v, site.head)))
        yield model


def mean_difference(p: Probe, lang: ColourLanguage, site: SequenceSite, k: int) -> torch.Tensor:
    """A post-hoc concept direction for a model trained without anchors: mean(reddest k) − mean(rest)."""
    return mean_difference_of(p.slot(site, ROLE["a"]), torch.isin(p.colours, reddest(lang, k)))
