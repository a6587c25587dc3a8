"""Out-of-distribution detection with a run's own surprise (the `lm-ood` experiment).

Held-out passages of the run's corpus (its *test* split, never trained on) are the reference; the
comparison sets are another domain (Milton, when the corpus is Shakespeare), the same passages with
their words shuffled within each line, random characters from the training vocabulary, and the same
passages with a random 20–40 character suffix. Every set is scored by passage-mean s₂ and, for
comparison, passage-mean surprisal; AUROC per pair. After `delete`, the held-out concept passages are
a further set: the deleted model should find them stranger than the rest, which are drawn to match the
concept passages' lengths one by one.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from anchoring.errors import AnchoringError
from anchoring.evaluate.ood import auroc, auroc_table, comparison_sets, crop, score_sets, select_passages
from anchoring.evaluate.surprise import passage_mean_scores
from anchoring.kinds.lm.data import LMData
from anchoring.kinds.lm.edits import edited
from anchoring.kinds.lm.model import LMRun


def heldout_indices(data: LMData, corpus_name: str, concept: bool | None = None) -> list[int]:
    """Test-split passages of the corpus (optionally only those with / without the concept), less those
    made of stage directions alone, which hold no speech to find strange (as `lm_ood_sets`). The
    checks before training count these same passages."""
    from anchoring.domains.text.corpus import load_corpus

    idx = data.parts["test"]
    if concept is not None:
        idx = idx[data.reference[idx] == int(concept)]
    corpus = load_corpus(corpus_name)  # the same passages as data.texts, with their stage spans
    return [int(i) for i in idx if not corpus.is_stage_only(int(i))]


def heldout(run: LMRun, concept: bool | None = None) -> list[str]:
    """The texts of `heldout_indices` for a run."""
    return [run.data.texts[i] for i in heldout_indices(run.data, run.config.text.corpus, concept)]


def ood_vocabulary(data: LMData) -> str:
    """The printable characters (and line ends) of the training split: what random text is drawn from,
    and what another domain's passages must be written in to be scored on style rather than on
    unknown characters."""
    chars = {c for i in data.parts["train"] for c in set(data.texts[i])}
    return "".join(sorted(c for c in chars if c.isprintable() or c == "\n"))


def length_matched(pool: list[str], like: list[str], max_chars: int = 600) -> list[str]:
    """For each text of `like` in turn, the unused passage of `pool` (cropped to `max_chars`) closest to
    it in length (ties: the pool's order). Why: a passage mean depends on its length (early tokens of a
    short passage have little context), so concept and retain passages compared by their means must
    have the same lengths."""
    free = [crop(t, max_chars) for t in pool]
    if len(free) < len(like):
        raise AnchoringError(f"only {len(free)} passages to match {len(like)} by length")
    out = []
    for t in like:
        j = min(range(len(free)), key=lambda i: abs(len(free[i]) - len(t)))
        out.append(free.pop(j))
    return out


def ood_sets(run: LMRun, n: int, seed: int, min_chars: int = 200) -> dict[str, list[str]]:
    """The comparison sets for this run; Milton only when the run learned Shakespeare alone."""
    tok = run.data.tokenizer
    vocabulary = ood_vocabulary(run.data)
    milton: list[str] | None = None
    if run.config.text.corpus == "shakespeare":
        from anchoring.domains.text.corpus import load_corpus

        milton = load_corpus("milton").texts
    return comparison_sets(heldout(run), milton, tok, vocabulary, n=n, seed=seed, min_chars=min_chars)


def evaluate_ood(run: LMRun, *, n: int = 200, seed: int = 0, arm: str = "control", min_chars: int = 200) -> dict[str, Any]:
    """AUROC of every comparison set against held-out text, by passage-mean s₂ and surprisal, for
    each seed's `arm`; and, per seed of the anchored arm after `delete`, concept vs retain passages."""
    out: dict[str, Any] = {"arm": arm, "n": n, "auroc": {}, "deleted": []}
    sets = ood_sets(run, n, seed, min_chars)
    for s in run.seeds:
        model = run.model(arm, s)
        scores = score_sets(model, run.data.tokenizer, sets, context=model.context)
        out["auroc"][str(s)] = auroc_table(scores, metrics=("s2", "surprisal"))
        out.setdefault("scores", {})[str(s)] = {k: {m: v[m].tolist() for m in ("s2", "surprisal")} for k, v in scores.items()}
    if "anchored" in run.arms:
        d = run.data
        idx = heldout_indices(d, run.config.text.corpus)  # one read of the corpus for both pools
        pool_c, pool_r = [d.texts[i] for i in idx if d.reference[i]], [d.texts[i] for i in idx if not d.reference[i]]
        concept = select_passages(pool_c, min(n, len(pool_c)), seed, min_chars=1, max_chars=600)
        retain = length_matched(random.Random(f"{seed}:retain").sample(pool_r, len(pool_r)), concept)
        for s in run.seeds:
            row: dict[str, Any] = {"seed": s, "n_concept": len(concept), "n_retain": len(retain)}
            # the same sets before the edit: what the deletion adds, not what the concept text scores anyway
            for when, model in (("before", run.model("anchored", s)), ("after", edited(run.model("anchored", s), run.config, "delete"))):
                c = passage_mean_scores(model, run.data.tokenizer, concept, context=model.context)["s2"].numpy()
                r = passage_mean_scores(model, run.data.tokenizer, retain, context=model.context)["s2"].numpy()
                row.update({f"concept_s2_{when}": float(np.nanmean(c)), f"retain_s2_{when}": float(np.nanmean(r)),
                            f"auroc_s2_{when}": auroc(r, c)})
            row.update(concept_s2=row["concept_s2_after"], retain_s2=row["retain_s2_after"], auroc_s2=row["auroc_s2_after"])
            out["deleted"].append(row)
    return out
