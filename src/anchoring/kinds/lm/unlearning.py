"""The unlearning evaluation of an LM run: forget and retain loss before and after each method, and
how much of the forgetting survives a relearning fine-tune (see docs/method.md, "Unlearning").

Methods, per seed (each with the model it starts from, "before", and the one it ends with, "after"):

- `anchoring · delete|blind|suppress`: the anchored arm, edited along its own anchor (every dim of a
  subspace): the writers' deletion, the readers' blinding after the anchored site, the hook;
- `anchoring · matched random move`: the anchored arm, every state the suppress hook edits turned by the
  same angle towards a random direction instead (`control.matched_random`): the suppress row's control;
- `anchoring · matched random deletion`: the anchored arm with as many other directions deleted, the
  same way (`edits.matched_directions`): the delete row's control;
- `anchoring · matched random blinding`: likewise, the readers blinded to those other directions: the
  blind row's control;
- `mean-difference · …`, `LEACE · …`: the control arm, edited along post-hoc directions (`posthoc`);
- `weak filter`, `oracle filter`: before = the control arm, after = the filtered arm;
- `SGTM`, `gradient routing`: the arm as trained, and `baselines.ablated` of it (only when those arms exist);
- `repair alone (control)`: with a repair (below), the control arm repaired without any edit;
- `anchoring · delete → distil`: with `unlearning.distil_steps` > 0, the deleted anchored model distilled
  into a fresh (or partly noised) model on all training text (`distil`), and `distil alone (control)`,
  the anchored model distilled the same way with no edit.

With `unlearning.repair_steps` > 0 every edit's "after" model is first *repaired*: fine-tuned on
retain passages only, with the edit put back after every step (`repair`), before it is scored
and attacked. The filters are trained arms, not edits, and are not repaired. The distilled rows are
repaired after their distillation, with nothing to put back (a distillation that diverges is recorded
as a repair that diverged is).

Losses are nats per character on held-out text (`evaluate.eval_set`): *forget* = every token of a
reference-positive passage, *concept* = its concept positions, *retain* = every token of a
reference-negative passage. Fine-tunes score a smaller fixed subset (`unlearning.eval_chars`).

The table, the targets and their notes are read from these rows by `unlearning_table`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from anchoring import runs
from anchoring.control.relearn import finetune as shared_finetune
from anchoring.control.surgery import residual_component
from anchoring.errors import AnchoringError
from anchoring.kinds.lm import distil
from anchoring.kinds.lm import evaluate as ev
from anchoring.kinds.lm.config import LMExperiment, UnlearningConfig
from anchoring.kinds.lm.data import LMData
from anchoring.train.skeleton import Diverged

CURVES = "unlearning_curves.csv"
PARTIAL = "unlearning-partial"  # a run's finished methods while its evaluation is unfinished (one JSON file per seed)
SCORING = 3  # part of every saved seed's key: raise it whenever a change alters what a row or curve holds, so an
# evaluation resumed after an upgrade never reads rows the older code scored (2: ratio floors, relative β tolerance;
# 3: the distilled rows repaired with the other edits)
PICK_SALT, BATCH_SALT, MIX_SALT, REPAIR_SALT, MIX_RETAIN_SALT = 0x4E1, 0x4E2, 0x4E3, 0x4E4, 0x4E5
DISTIL_SALT = 0x309  # the distillation's windows: the salt of its first measurements (docs/lm.md), kept so they reproduce
TINY = 1e-6  # nats/char: a difference this small is no difference
COST_FLOOR = 1e-3  # nats/char: a change under this prints as 0.000 or 0.001, and a ratio over it says more about rounding than
# about the edit (Δforget 0.005 over a cost of 0.0002 read as 25): a ratio with such a denominator is ∞ or undefined
KEPT_FLOOR = 0.01  # nats/char: an edit must raise the curve's forget loss this much for "kept" to be a share
POSTHOC_NAMES = {"mean-difference": "mean-difference", "leace": "LEACE"}
BASELINES = {"sgtm": "SGTM", "routing": "gradient routing"}
DIVERGED = "diverged"  # steps to recover of a recovery fine-tune whose loss stopped being finite before it recovered
ND = "nd"  # steps to recover of an edited model already at or below the control's concept loss: nothing to recover
MATCHED_RANDOM = "anchoring · matched random move"
MATCHED_DELETE = "anchoring · matched random deletion"
MATCHED_BLIND = "anchoring · matched random blinding"
MATCHED_COST = "mean-difference · delete at anchoring's retain cost"  # the deletion target's comparison, not attacked
REPAIR_ONLY = "repair alone (control)"  # a model repaired without any edit (the table: the control arm; `delete`: the anchored arm)
DISTILLED = "anchoring · delete → distil"  # the deletion distilled into a fresh or noised model (`distil`)
DISTIL_ONLY = "distil alone (control)"  # the anchored model distilled the same way with no edit
DISTIL_BROKE = "the distillation's"  # how a row's `repair_diverged` starts when its distillation, not its repair, broke
# a method's control, not a method: figures draw it apart, never attacked
CONTROL_ROWS = (MATCHED_RANDOM, MATCHED_DELETE, MATCHED_BLIND, REPAIR_ONLY, DISTIL_ONLY)
Progress = Callable[[int, int], None]


@torch.no_grad()
def losses(model: nn.Module, es: ev.EvalSet, batch: int = 16) -> dict[str, float]:
    """Nats per character: `forget` (reference-positive passages, whole), `concept` (their concept
    positions) and `retain` (reference-negative passages). Loss only: no captures, no probes."""
    model.eval()
    nats = dict.fromkeys(("forget", "concept", "retain"), 0.0)
    chars = dict.fromkeys(nats, 0.0)
    for b0 in range(0, len(es.tokens), batch):
        x = es.tokens[b0:b0 + batch]
        ell = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(x.shape[0], -1)
        tc, ch = es.cls[b0:b0 + batch, 1:], es.chars[b0:b0 + batch, 1:]
        for name, mask in (("forget", (tc == ev.CONCEPT) | (tc == ev.OTHER)), ("concept", tc == ev.CONCEPT),
                           ("retain", tc == ev.RETAIN)):
            nats[name] += float(ell[mask].sum())
            chars[name] += float(ch[mask].sum())
    return {k: nats[k] / chars[k] if chars[k] else float("nan") for k in nats}


def ratio(num: float, den: float, floor: float = COST_FLOOR) -> float:
    """num/den of two changes, honest at the edges: a denominator under `floor` (no change one can
    read, or one of the other sign) gives inf when the numerator is at least `floor`, else NaN.
    Why: dividing by 0.0006 turned a mean-difference deletion that removed nothing visible into a
    precise-looking "53 ×"."""
    if not (math.isfinite(num) and math.isfinite(den)):
        return float("nan")
    if den < floor:
        return float("inf") if num >= floor else float("nan")
    return num / den


def selectivity(d_forget_concept: float, retain_cost: float) -> float:
    """Δforget (concept) / retain cost. A cost under COST_FLOOR counts as none: then ∞ when Δforget
    (concept) is at least KEPT_FLOOR (a real removal at no measurable cost), else undefined, since
    0.0012 over a cost of 0.0003 would read as the best possible edit."""
    if not (math.isfinite(d_forget_concept) and math.isfinite(retain_cost)):
        return float("nan")
    if retain_cost < COST_FLOOR:
        return float("inf") if d_forget_concept >= KEPT_FLOOR else float("nan")
    return d_forget_concept / retain_cost


@dataclass
class Method:
    name: str
    arm: str
    before: nn.Module
    after: nn.Module
    weights_edited: bool  # False: a hook (fine-tuned with the hook in place when `unlearning.attack_hooks`)
    removed: list[torch.Tensor] | None = None  # a deletion's directions: its row reports how much of them is left
    redo: Callable[[nn.Module], nn.Module] | None = None  # the weight edit as a copying map, applied again after each repair step
    repairable: bool = True  # False for the filters: a trained arm, not an edit of `before`
    student: nn.Module | None = None  # with one, `after` is the teacher, and the student distilled from it is scored


def methods(cfg: LMExperiment, data: LMData, models: dict[tuple[str, int], nn.Module], seed: int) -> list[Method]:
    """Every method that applies to this run's arms, for `seed` (see the module docstring)."""
    from anchoring.kinds.lm import posthoc
    from anchoring.kinds.lm.direction import anchored_sites
    from anchoring.kinds.lm.edits import concept_directions, edited, matched_directions

    arms = cfg.lm.arms
    control = models["control", seed]
    out: list[Method] = []
    if "anchored" in arms:
        a, concept = models["anchored", seed], concept_directions(cfg)
        others = matched_directions(concept, torch.Generator().manual_seed(seed))

        def weight_edit(name: str, redo: Callable[[nn.Module], nn.Module], removed: list[torch.Tensor] | None = None) -> Method:
            return Method(name, "anchored", a, redo(a), True, removed, redo)

        out += [weight_edit("anchoring · delete", lambda m: edited(m, cfg, "delete"), concept),
                Method("anchoring · suppress", "anchored", a, edited(a, cfg, "suppress"), False),
                Method(MATCHED_RANDOM, "anchored", a, edited(a, cfg, "suppress", random_control=seed), False),
                weight_edit(MATCHED_DELETE, lambda m: edited(m, cfg, "delete", directions=others), others)]
        if anchored_sites(cfg):  # blinding reads after the anchored site
            out += [weight_edit("anchoring · blind", lambda m: edited(m, cfg, "blind")),
                    weight_edit(MATCHED_BLIND, lambda m: edited(m, cfg, "blind", directions=others))]
    if cfg.unlearning.posthoc:
        sites = anchored_sites(cfg) or [f"blocks.{cfg.lm.layers - 1}"]
        for key, f in posthoc.fit(control, cfg, data, seed, sites).items():
            name = POSTHOC_NAMES[key]
            out += [Method(f"{name} · delete", "control", control, f.delete(control, cfg), True, list(f.directions.values()),
                           lambda m, f=f: f.delete(m, cfg)),
                    Method(f"{name} · blind", "control", control, f.blind(control, cfg), True, redo=lambda m, f=f: f.blind(m, cfg)),
                    Method(f"{name} · suppress", "control", control, f.suppress(control, cfg), False)]
    for arm, name in (("weak-filtered", "weak filter"), ("oracle-filtered", "oracle filter")):
        if arm in arms:
            out.append(Method(name, arm, control, models[arm, seed], True, repairable=False))
    if cfg.unlearning.repair_steps:  # retain-only training shifts a model away from the forget text by itself
        out.append(Method(REPAIR_ONLY, "control", control, control, True))
    if cfg.unlearning.distil_steps and "anchored" in arms:
        out += distil_methods(cfg, models["anchored", seed], seed)
    extra = [a for a in BASELINES if a in arms]
    if extra:
        from anchoring.kinds.lm.baselines import ablated  # only present where those arms are

        for arm in extra:
            m = models[arm, seed]
            out.append(Method(BASELINES[arm], arm, m, ablated(m, cfg, arm), True, redo=lambda x, arm=arm: ablated(x, cfg, arm)))
    return out


def distil_methods(cfg: LMExperiment, anchored: nn.Module, seed: int) -> list[Method]:
    """The distilled deletion and its control: the anchored model deleted, or left as it is, each the
    teacher of a student that starts `unlearning.distil_noise` of the way from it to a fresh model
    (the same fresh model for both, per seed). With `unlearning.repair_steps`, both students are then
    repaired like every edit, with no edit to re-apply: a student's axes are its own, so retain-only
    steps are all the repair can be."""
    from anchoring.kinds.lm.edits import edited
    from anchoring.kinds.lm.training import build_model

    u = cfg.unlearning
    fresh = distil.fresh_model(lambda: build_model(cfg, anchored.embed.weight.shape[0], "anchored", seed), seed)
    deleted = edited(anchored, cfg, "delete")
    return [Method(DISTILLED, "anchored", anchored, deleted, True,  # no leftover: the student's axes are its own
                   student=distil.noised(deleted, fresh, u.distil_noise)),
            Method(DISTIL_ONLY, "anchored", anchored, anchored, True, student=distil.noised(anchored, fresh, u.distil_noise))]


def repair(model: nn.Module, redo: Callable[[nn.Module], nn.Module] | None, batches: Callable[[int], torch.Tensor],
           steps: int, lr: float, tick: Callable[[], None] | None = None) -> nn.Module:
    """A copy of the edited `model` fine-tuned for `steps` Adam steps on retain windows, with the edit
    re-applied in place after every step (`redo`, a copying map; None for a hook, which is part of the
    model, or for no edit). Why: an edit is often judged after a short repair on data it should spare,
    since that undoes damage that is not about the concept. The edit must survive the repair, or the
    repair would just be relearning: a deletion's directions stay out of the writers, ablated units
    stay at zero."""
    keep = None if redo is None else (lambda m: m.load_state_dict(redo(m).state_dict()))
    out: list[nn.Module] = []
    finetune(model, batches, steps, lr, lambda m: out.append(m) or {}, tick=tick, keep=keep)
    return out[-1].eval()


def repair_windows(data: LMData, window: int, seed: int) -> "Windows":
    """The repair's windows for `seed`: retain passages (no reference label) only, the same for every
    method of a seed and for `anchoring delete --repair-steps`."""
    ref = data.reference[data.parts["train"]]
    if not (ref == 0).any():
        raise AnchoringError("a repair trains on retain passages, and this run's training split has none")
    return Windows(data, np.flatnonzero(ref == 0), window, seed, REPAIR_SALT)


def distil_windows(data: LMData, window: int, seed: int) -> "Windows":
    """The distillation's windows for `seed`: every training passage, the concept's too (the teacher's
    outputs there are what the student should learn), the same for the deletion and its control."""
    return Windows(data, np.arange(len(data.train_tokens)), window, seed, DISTIL_SALT)


def recovery_windows(data: LMData, forget: np.ndarray, window: int, seed: int) -> tuple["Windows", "Windows"]:
    """The recovery run's forget and retain windows. Each has a salt of its own, so that a repaired
    model does not meet its repair's retain windows again while it recovers."""
    ref = data.reference[data.parts["train"]]
    return (Windows(data, forget, window, seed, MIX_SALT),
            Windows(data, np.flatnonzero(ref == 0), window, seed, MIX_RETAIN_SALT))


class Windows:
    """Fine-tuning windows cut from a set of training passages: their tokens joined in a fixed order
    (repeated when shorter than a window), and per step `n` windows at offsets drawn from
    `default_rng([seed, step, salt])`: the same windows for every method of a seed."""

    def __init__(self, data: LMData, passages: np.ndarray, window: int, seed: int, salt: int) -> None:
        toks = np.concatenate([data.train_tokens[i] for i in passages]).astype(np.int64)
        self.length = len(toks)
        self.tokens = np.tile(toks, -(-(self.length + window + 1) // self.length) + 1)
        self.window, self.seed, self.salt = window, seed, salt

    def batch(self, step: int, n: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step, self.salt])
        starts = rng.integers(0, self.length, n)
        return torch.from_numpy(np.stack([self.tokens[s:s + self.window + 1] for s in starts]))


def forget_passages(data: LMData, seed: int) -> np.ndarray:
    """Reference-positive training passages (indices into the training list) in a seeded order: the
    attacker's first K, the same for every method of a seed and nested across K."""
    ref = data.reference[data.parts["train"]]
    pos = np.flatnonzero(ref == 1)
    return pos[np.random.default_rng([seed, PICK_SALT]).permutation(len(pos))]


def finetune(model: nn.Module, batches: Callable[[int], torch.Tensor], steps: int, lr: float,
             score: Callable[[nn.Module], dict[str, float]], stop: Callable[[dict[str, float]], bool] | None = None,
             tick: Callable[[], None] | None = None, keep: Callable[[nn.Module], Any] | None = None) -> list[dict[str, float]]:
    """`control.relearn.finetune` on next-token loss over the windows `batches(step)` gives."""
    def loss(m: nn.Module, step: int) -> torch.Tensor:
        x = batches(step)
        return F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())

    return shared_finetune(model, loss, score, steps, lr, stop=stop, keep=keep, tick=tick)


@contextmanager
def _bar(total: int, progress: Progress | None) -> Iterator[Callable[[], None]]:
    """A tick per fine-tuning step, to `progress(done, total)` (the caller's bar; none under -q)."""
    done = [0]

    def tick(n: int = 1) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    yield tick
    if progress is not None and done[0] < total:  # a seed resumed from a save made before methods filled their steps
        progress(total, total)


def seed_key(cfg: LMExperiment, models: dict[tuple[str, int], nn.Module], seed: int) -> str:
    """What one seed's rows and curves rest on: the whole config and every weight of that seed's arms.
    A saved seed is reused only under an equal key, so an interrupted evaluation resumes to the numbers
    an unbroken one gives, and other options (`anchoring relearn --steps`), retrained arms or rows
    scored by an older version of this module (`SCORING`) are never read back."""
    # an option left off is left out, so that evaluations saved before it existed are still read back
    off = None if cfg.unlearning.attack_unedited else {"unlearning": {"attack_unedited"}}
    h = hashlib.sha256(f"scoring {SCORING}\0".encode() + cfg.model_dump_json(exclude=off).encode())
    for (arm, s), model in sorted(models.items(), key=lambda kv: kv[0]):
        if s != seed:
            continue
        h.update(arm.encode() + b"\0")
        for name, t in model.state_dict().items():
            h.update(name.encode() + b"\0" + t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _saved_seed(partial: Path, seed: int, key: str) -> dict[str, Any] | None:
    """What an interrupted evaluation of the same config and weights saved of `seed` (every method when
    `complete`, else the first ones in order), or None (nothing saved, unreadable, or another key)."""
    try:
        saved = json.loads((partial / f"seed{seed}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(saved, dict) and saved.get("key") == key):
        return None
    whole = isinstance(saved.get("rows"), list) and isinstance(saved.get("curves"), list) and isinstance(saved.get("done"), int)
    return saved if whole and all(isinstance(r, dict) and "method" in r for r in saved["rows"]) else None


def method_ticks(m: Method, u: UnlearningConfig) -> int:
    """The fine-tuning steps one method is given: its distillation, repair, attacks and recovery (a
    recovery may stop early, and a fine-tune that diverges stops there)."""
    attacks = len(u.relearn_k) * u.relearn_steps + u.recover_steps if attacked(m, u.attack_hooks) else 0
    return attacks + (u.repair_steps if m.repairable else 0) + (u.distil_steps if m.student is not None else 0)


def _planned_ticks(ms: list[Method], u: UnlearningConfig) -> int:
    """The fine-tuning steps one seed's methods are given, with the attacks on their unedited models."""
    return sum(method_ticks(m, u) for m in ms) + unedited_ticks(ms, u)


def unedited_models(ms: list[Method], u: UnlearningConfig) -> list[nn.Module]:
    """The distinct unedited models (`before`) of the methods the attack runs on, in order of first use:
    the anchored arm for anchoring's rows, the control for the post-hoc directions and the filters, the
    SGTM and routing arms as trained for their ablations."""
    out: dict[int, nn.Module] = {}
    for m in ms:
        if attacked(m, u.attack_hooks):
            out.setdefault(id(m.before), m.before)
    return list(out.values())


def unedited_ticks(ms: list[Method], u: UnlearningConfig) -> int:
    """The steps of the attacks on the unedited models (`unlearning.attack_unedited`)."""
    return len(unedited_models(ms, u)) * len(u.relearn_k) * u.relearn_steps if u.attack_unedited else 0


def kept_unedited(record: dict[str, Any], drop: float) -> float:
    """The share of an edit's rise in concept loss that survives the attack, counted from where the same
    attack takes the unedited model (`drop` below its own loss) rather than from the unedited loss itself:
    (lowest − before + drop) / (after − before). Why: a fine-tune that finds headroom in the unedited
    model would take that drop off `kept` for every edit of it, though no edit caused it. Undefined
    where `kept` is (`relearn_record` decides that: a rise under KEPT_FLOOR, a broken attack) and where
    the unedited model's attack broke."""
    if math.isnan(record["kept"]) or not math.isfinite(drop):
        return float("nan")
    return ratio(record["lowest"] - record["before_edit"] + drop, record["after_edit"] - record["before_edit"])


def attack_unedited(ms: list[Method], rows: list[dict[str, Any]], at: SeedSetting, u: UnlearningConfig,
                    tick: Callable[[int], None], names: dict[int, str]) -> None:
    """Every attack of one seed run again on each unedited model, from the same windows; each attacked row's
    records gain `unedited` (the arm of its unedited model: `names` by `id`, else the method's arm),
    `unedited_drop` (how far the attack took that model below its own concept loss; NaN when that attack
    diverged) and `kept_unedited`. `rows` are the rows of `ms`, in order."""
    if [r["method"] for r in rows] != [m.name for m in ms]:
        raise AnchoringError("internal: the rows to annotate are not those of the seed's methods")
    score = lambda model: losses(model, at.small, at.bs)  # noqa: E731
    drops: dict[tuple[int, str], float] = {}
    for model in unedited_models(ms, u):
        for k, w in at.attack.items():
            spent = [0]

            def counted() -> None:
                spent[0] += 1
                tick(1)

            curve, broke = cut_at_divergence(lambda w=w, model=model: finetune(
                model, lambda step: w.batch(step, u.relearn_batch), u.relearn_steps, u.relearn_lr, score, tick=counted))
            if u.relearn_steps > spent[0]:
                tick(u.relearn_steps - spent[0])
            start = curve[0]["concept"]
            drops[id(model), str(k)] = float("nan") if broke else start - min(c["concept"] for c in curve)
    for m, row in zip(ms, rows):
        for k, record in (row.get("relearn") or {}).items():
            drop = drops.get((id(m.before), k), float("nan"))
            record.update(unedited=names.get(id(m.before), m.arm), unedited_drop=drop, kept_unedited=kept_unedited(record, drop))


@dataclass
class SeedSetting:
    """What every method of one seed is scored against: the evaluation texts, the control's concept loss,
    and the seed's fine-tuning windows (the same for every method, so their numbers compare)."""
    es: ev.EvalSet
    small: ev.EvalSet
    bs: int
    target: float
    forget: np.ndarray
    attack: dict[int, Windows]
    mix: tuple[Windows, Windows]
    fix: Windows | None
    distil: Callable[[int], torch.Tensor] | None = None  # the distillation's batch of each step


def score_method(m: Method, seed: int, at: SeedSetting, u: UnlearningConfig, probe: torch.Tensor, residual: list[str],
                 tick: Callable[[int], None]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One method's table row and fine-tuning curve points (`_score_method`), after which the progress
    has moved by exactly the method's planned steps (`method_ticks`): a recovery that stopped once the
    concept came back, or a fine-tune that diverged, leaves steps unused, and the bar would otherwise
    lag behind until the last method and then jump, its time left wrong all the while."""
    spent = [0]

    def counted(n: int = 1) -> None:
        spent[0] += n
        tick(n)

    out = _score_method(m, seed, at, u, probe, residual, counted)
    unused = method_ticks(m, u) - spent[0]
    if unused > 0:
        tick(unused)
    return out


def _score_method(m: Method, seed: int, at: SeedSetting, u: UnlearningConfig, probe: torch.Tensor, residual: list[str],
                  tick: Callable[[], None]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One method's table row and fine-tuning curve points: its distillation or repair (when asked), its
    losses before and after, the deletion's leftover, the relearning attacks and the recovery."""
    es, small, bs, target = at.es, at.small, at.bs, at.target
    curves: list[dict[str, Any]] = []
    edit_only = None
    if m.student is not None:
        try:
            m.after = distil.distilled(m.after, m.student, at.distil, u.distil_steps, u.distil_lr, tick)
        except Diverged as e:  # recorded as a broken repair is: the run's other methods and seeds still count
            return broken_repair_row(m, seed, losses(m.before, es, bs), None, u, f"{DISTIL_BROKE} {e}"), curves
    if at.fix is not None and m.repairable:
        edit_only = losses(m.after, es, bs)
        fix = at.fix
        try:
            m.after = repair(m.after, m.redo, lambda step: fix.batch(step, u.relearn_batch), u.repair_steps, u.repair_lr, tick)
        except Diverged as e:  # recorded like a broken attack: the run's other methods and seeds still count
            return broken_repair_row(m, seed, losses(m.before, es, bs), edit_only, u, f"the repair's {e}"), curves
    row = _row(m.name, seed, m.arm, m.weights_edited, losses(m.before, es, bs), losses(m.after, es, bs),
               attacked(m, u.attack_hooks))
    if edit_only is not None:  # the edit alone (a distilled row: the unrepaired student), before its repair
        row["edit_only"] = edit_only
        row["repair_steps"] = u.repair_steps
    if m.removed:  # exact (0) for a basis axis; a slanted direction leaks back through the per-dim step α
        with torch.no_grad():
            row["leftover"] = max(residual_component(m.after, v, probe, residual) for v in m.removed)
    if not row["fine_tuned"]:
        return row, curves
    sb = losses(m.before, small, bs)["concept"]
    score = lambda model: losses(model, small, bs)  # noqa: E731

    def points(curve: list[dict[str, float]], fine_tune: str, k: int) -> list[dict[str, Any]]:
        return [{"seed": seed, "method": m.name, "fine_tune": fine_tune, "k": k, "step": i, "forget_concept": c["concept"],
                 "forget": c["forget"], "retain": c["retain"], "control_concept": target} for i, c in enumerate(curve)]

    for k, w in at.attack.items():
        curve, broke = cut_at_divergence(lambda w=w: finetune(m.after, lambda step: w.batch(step, u.relearn_batch),
                                                               u.relearn_steps, u.relearn_lr, score, tick=tick))
        row["relearn"][str(k)] = relearn_record(curve, sb, target, int(min(k, len(at.forget))))
        if broke:  # what a cut curve reached says nothing of what the attack would have: undefined, not low
            row["relearn"][str(k)].update(diverged=broke, kept=float("nan"), relearned=float("nan"))
        curves += points(curve, f"relearn K={k}", k)
    mix_f, mix_r = at.mix
    half = max(1, u.relearn_batch // 2)
    rec, broke = cut_at_divergence(lambda: finetune(m.after, lambda step: torch.cat([mix_f.batch(step, half),
                                                                                     mix_r.batch(step, half)]),
                                                    u.recover_steps, u.relearn_lr, score,
                                                    stop=lambda c: c["concept"] <= target, tick=tick))
    hit = [i for i, c in enumerate(rec) if c["concept"] <= target]
    row["recover_steps"] = hit[0] if hit else None  # 0: nothing to recover (shown nd)
    if broke and not hit:
        row["recover_diverged"] = broke
    curves += points(rec, "recover", 0)
    return row, curves


def distillation_broke(row: dict[str, Any]) -> bool:
    """Whether a row's broken fine-tune (`repair_diverged`) was its distillation rather than its repair: a
    distilled row is repaired too, so the method's name cannot tell them apart."""
    return str(row.get("repair_diverged") or "").startswith(DISTIL_BROKE)


def broken_repair_row(m: Method, seed: int, before: dict[str, float], edit_only: dict[str, float] | None,
                      u: UnlearningConfig, message: str) -> dict[str, Any]:
    """The row of a method whose repair or distillation diverged (a rate too high for the model; `edit_only`:
    the model the repair started from, None when the distillation broke first): its losses after, its differences,
    relearning and recovery are undefined, not those of broken weights, and `repair_diverged` says why.
    Failing instead would lose a run that trained for hours, and the targets this row would count
    towards are reported as not met."""
    row = _row(m.name, seed, m.arm, m.weights_edited, before, dict.fromkeys(before, float("nan")), attacked(m, u.attack_hooks))
    row["repair_diverged"] = message
    if edit_only is not None:
        row.update(edit_only=edit_only, repair_steps=u.repair_steps)
    if row["fine_tuned"]:  # it would have been attacked and recovered: neither ran
        row["recover_diverged"] = message
    return row


def cut_at_divergence(fine_tune: Callable[[], list[dict[str, float]]]) -> tuple[list[dict[str, float]], str | None]:
    """A fine-tune's curve, and None; or, when it diverged (a relearning rate too high for the edited
    model), the curve up to its last finite point and the message. The row records that the attack
    broke and leaves its "kept" and recovery undefined rather than failing a run that trained for
    hours: its other methods and seeds are as good as ever."""
    try:
        return fine_tune(), None
    except Diverged as e:
        if not getattr(e, "curve", None):  # not `finetune`'s own: nothing to keep
            raise
        return e.curve, str(e)


def _save_seed(partial: Path, seed: int, key: str, done: int, rows: list[dict[str, Any]],
               curves: list[dict[str, Any]], complete: bool) -> None:
    """`seed<s>.json`, atomically: the seed's rows and curves so far, and its fine-tuning steps so far
    (`done`, for the progress bar). NaN and ±inf are kept as such, so rows read back equal the computed ones."""
    runs.write_atomic(partial / f"seed{seed}.json", json.dumps(
        {"key": key, "done": done, "complete": complete, "rows": rows, "curves": curves},
        default=lambda o: o.item()))


def evaluate(cfg: LMExperiment, data: LMData, models: dict[tuple[str, int], nn.Module], path: Path | None = None,
             progress: Progress | None = None, partial: Path | None = None) -> dict[str, Any]:
    """Rows per (method, seed) and the fine-tuning curves (also written to `path/unlearning_curves.csv`).
    With `partial`, every finished method is saved there (`seed<s>.json`), and what an interrupted
    evaluation of the same config and weights saved is read back instead of computed again (`seed_key`):
    a full evaluation takes minutes per method, and an interrupt should cost at most the method it
    stopped in."""
    u = cfg.unlearning
    seeds = sorted({s for _a, s in models})
    window = cfg.lm.tokens
    es = ev.eval_set(data, window, cfg.evaluate.eval_chars, cfg.evaluate.after, order=cfg.evaluate.order)
    small = ev.eval_set(data, window, u.eval_chars, cfg.evaluate.after, order=cfg.evaluate.order)
    bs = cfg.evaluate.batch_size
    keys = {s: seed_key(cfg, models, s) for s in seeds} if partial is not None else {}  # nothing to save or reuse without
    saved = {s: x for s, key in keys.items() if (x := _saved_seed(partial, s, key)) is not None}
    complete = {s for s, x in saved.items() if x.get("complete", False)}
    by_seed = {s: methods(cfg, data, models, s) for s in seeds if s not in complete}
    for s in list(saved):  # a seed saved part-way: its first methods, in the order this evaluation computes them
        names = [r["method"] for r in saved[s]["rows"]]
        if s not in complete and names != [m.name for m in by_seed[s][:len(names)]]:
            del saved[s]
    planned = {s: saved[s]["done"] if s in complete else _planned_ticks(by_seed[s], u) for s in seeds}
    probe, residual = es.tokens[:bs, :-1], ["embed", *[f"blocks.{i}" for i in range(cfg.lm.layers)]]
    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    with _bar(sum(planned.values()), progress) as tick:
        for seed in seeds:
            if seed in complete:
                rows += saved[seed]["rows"]
                curves += saved[seed]["curves"]
                tick(planned[seed])
                continue
            seed_rows = list(saved[seed]["rows"]) if seed in saved else []
            seed_curves = list(saved[seed]["curves"]) if seed in saved else []
            done = saved[seed]["done"] if seed in saved else 0
            tick(done)
            counted = [done]

            def ticked(n: int = 1) -> None:
                counted[0] += n
                tick(n)

            control = models["control", seed]
            forget = forget_passages(data, seed)
            at = SeedSetting(es, small, bs, losses(control, small, bs)["concept"], forget,
                             {k: Windows(data, forget[:k], window, seed, (BATCH_SALT << 20) + k) for k in u.relearn_k},  # never a MIX_SALT
                             recovery_windows(data, forget, window, seed),
                             repair_windows(data, window, seed) if u.repair_steps else None,
                             functools.partial(distil_windows(data, window, seed).batch, n=cfg.lm.batch_size) if u.distil_steps else None)
            for m in by_seed[seed][len(seed_rows):]:
                row, points = score_method(m, seed, at, u, probe, residual, ticked)
                seed_rows.append(row)
                seed_curves += points
                if partial is not None:
                    _save_seed(partial, seed, keys[seed], counted[0], seed_rows, seed_curves, False)
            if u.attack_unedited:  # after every method, so a resumed seed annotates its saved rows too
                attack_unedited(by_seed[seed], seed_rows, at, u, ticked,
                                {id(model): arm for (arm, s), model in models.items() if s == seed})
            matched = None if u.repair_steps else cost_matched_row(seed_rows, by_seed[seed], es, bs)
            if matched is not None:
                seed_rows.append(matched)
            set_r(seed_rows)
            rows += seed_rows
            curves += seed_curves
            if partial is not None:
                _save_seed(partial, seed, keys[seed], counted[0], seed_rows, seed_curves, True)
    if path is not None:
        runs.write_atomic(path / CURVES, pd.DataFrame(curves).to_csv(index=False, float_format="%.8g"))
    return {"rows": rows, "curves": CURVES, "curve_points": curves, "relearn_k": list(u.relearn_k),
            "relearn_steps": u.relearn_steps, "relearn_lr": u.relearn_lr, "recover_cap": u.recover_steps, "repair_steps": u.repair_steps,
            "repair_lr": u.repair_lr, **({"attack_unedited": True} if u.attack_unedited else {}),
            **({"distil_steps": u.distil_steps, "distil_noise": u.distil_noise, "distil_lr": u.distil_lr} if u.distil_steps else {}),
            "eval_positions": {"table": int((es.cls[:, 1:] != ev.PAD).sum()), "curves": int((small.cls[:, 1:] != ev.PAD).sum())},
            "note": ("suppress rows are hooks, not weight edits: they are fine-tuned with the hook kept in place; the matched "
                     "controls (random move, random deletion, random blinding) are not fine-tuned" if u.attack_hooks else
                     "suppress rows and the matched random move are hooks, not weight edits: they are not fine-tuned "
                     "(no relearn or recover numbers), nor are the matched random deletion and blinding")}


def relearn_record(curve: list[dict[str, float]], before_edit: float, control: float, passages: int) -> dict[str, Any]:
    """One attack's numbers from its curve of concept losses (the edited model first): the lowest loss the
    attack reached, how far that is above the control's (`relearned`), and the share of the edit's Δforget
    it left (`kept`, from the unedited model's own loss; undefined for an edit that removed under KEPT_FLOOR).
    The lowest point, not the last: an attack that overshoots and climbs back still reached it."""
    lowest = min(c["concept"] for c in curve)
    start = curve[0]["concept"]
    return {"passages": passages, "relearned": lowest - control,
            "kept": ratio(lowest - before_edit, start - before_edit) if start - before_edit >= KEPT_FLOOR else float("nan"),
            "lowest": lowest, "before_edit": before_edit, "after_edit": start}


def _row(method: str, seed: int, arm: str, weights_edited: bool, before: dict[str, float], after: dict[str, float],
         fine_tuned: bool) -> dict[str, Any]:
    """A table row's losses and differences (relearning and recovery filled in by the caller)."""
    row: dict[str, Any] = {
        "method": method, "seed": seed, "arm": arm, "weights_edited": weights_edited, "before": before, "after": after,
        "d_forget": after["forget"] - before["forget"], "d_forget_concept": after["concept"] - before["concept"],
        "retain_cost": after["retain"] - before["retain"], "relearn": {}, "recover_steps": None, "fine_tuned": fine_tuned}
    row["selectivity"] = selectivity(row["d_forget_concept"], row["retain_cost"])
    return row


def cost_matched(model: nn.Module, directions: list[torch.Tensor], cost: float, retain_before: float, es: ev.EvalSet,
                 bs: int, iters: int = 14, tol: float = 1e-4, rel_tol: float = 0.02,
                 full: dict[str, float] | None = None) -> tuple[float, dict[str, float]]:
    """The strength β in [0, 1] at which deleting `directions` from `model` (`edits.delete(…, β)`) costs
    retain text `cost` nats/char on `es`, and the losses there. Why: a deletion that costs retain text more
    also removes more, so comparing two deletions is only fair at one cost; the dearer one is dialled
    down to the cheaper one's. Bisection, since retain cost grows with β (0 at β = 0), until the cost is
    within `tol` or `rel_tol` × `cost`, whichever is tighter (an absolute 1e-4 alone missed a cost of 5e-5
    by half again); a full deletion that costs no more than `cost` is returned as it is (β = 1). Of the
    strengths tried, the one whose cost is nearest `cost` is kept. `full`: the full deletion's losses on
    `es`, when the caller has them."""
    from anchoring.kinds.lm.edits import delete

    def at(beta: float) -> dict[str, float]:
        return losses(delete(model, directions, beta), es, bs)

    full = at(1.0) if full is None else full
    if full["retain"] - retain_before <= cost:
        return 1.0, full
    lo, hi = 0.0, 1.0
    tol = min(tol, rel_tol * abs(cost))
    best = (abs(full["retain"] - retain_before - cost), 1.0, full)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        got = at(mid)
        c = got["retain"] - retain_before
        best = min(best, (abs(c - cost), mid, got), key=lambda t: t[0])
        if abs(c - cost) <= tol:
            break
        lo, hi = (lo, mid) if c > cost else (mid, hi)
    return best[1], best[2]


def cost_matched_row(seed_rows: list[dict[str, Any]], ms: list[Method], es: ev.EvalSet, bs: int) -> dict[str, Any] | None:
    """`mean-difference · delete` dialled to the retain cost of `anchoring · delete` (`cost_matched`), as a
    row with its strength; None when either row is missing or the anchored deletion cost retain text
    nothing (only β = 0, no edit, would match it)."""
    a = next((r for r in seed_rows if r["method"] == "anchoring · delete"), None)
    md = next((m for m in ms if m.name == "mean-difference · delete"), None)
    if a is None or md is None or not a["retain_cost"] > TINY:
        return None
    whole = next(r for r in seed_rows if r["method"] == md.name)  # its full deletion is scored already
    strength, after = cost_matched(md.before, md.removed or [], a["retain_cost"], whole["before"]["retain"], es, bs,
                                   full=whole["after"])
    row = _row(MATCHED_COST, a["seed"], md.arm, True, whole["before"], after, False)
    row["strength"] = strength
    return row


def attacked(m: Method, hooks: bool) -> bool:
    """Whether the relearning attack and the recovery fine-tune run on `m`: every weight edit, and the
    hooks too when `hooks` (fine-tuned with the hook in place: the attacker gets the weights around a
    hook that ships as part of the model, not the hook itself), never a matched control."""
    return m.name not in CONTROL_ROWS and (m.weights_edited or hooks)


def set_r(seed_rows: list[dict[str, Any]]) -> None:
    """R of every row of one seed: its Δforget (concept) over the oracle filter's. NaN without an
    oracle row, or where the oracle removed less than COST_FLOOR: dividing by a negative Δ would turn
    an edit that made the concept easier into a positive R, and dividing by a Δ that prints as 0.000
    would make noise look like a large R."""
    oracle = next((r for r in seed_rows if r["method"] == "oracle filter"), None)
    d = oracle["d_forget_concept"] if oracle else float("nan")
    for r in seed_rows:
        r["R"] = r["d_forget_concept"] / d if d >= COST_FLOOR else float("nan")

