"""Out-of-distribution detection with a run's own surprise (the `lm-ood` experiment).

Held-out passages of the run's corpus (its *test* split, never trained on) are the reference; the
comparison sets are another domain (Milton, when the corpus is Shakespeare), the same passages with
their words shuffled within each line, random characters from the training vocabulary, and the same
passages with a random 20–40 character suffix. Every set is scored by passage-mean s₂ and, for
comparison, passage-mean surprisal; AUROC per pair. After `delete`, the held-out concept passages are
a further set: the deleted model should find them stranger than the rest.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from anchoring.evaluate.ood import auroc, auroc_table, comparison_sets, score_sets
from anchoring.evaluate.surprise import passage_mean_scores
from anchoring.kinds.lm.edits import edited
from anchoring.kinds.lm.model import LMRun


def heldout(run: LMRun, concept: bool | None = None) -> list[str]:
    """Test-split passages of the run's corpus (optionally only those with / without the concept)."""
    d = run.data
    idx = d.parts["test"]
    if concept is not None:
        idx = idx[d.reference[idx] == int(concept)]
    return [d.texts[i] for i in idx]


def ood_sets(run: LMRun, n: int, seed: int, min_chars: int = 200) -> dict[str, list[str]]:
    """The comparison sets for this run; Milton only when the run learned Shakespeare alone."""
    tok = run.data.tokenizer
    vocabulary = "".join(sorted({c for t in heldout(run) for c in t if c.isprintable() or c == "\n"}))
    milton: list[str] = []
    if run.config.text.corpus == "shakespeare":
        from anchoring.domains.text.corpus import load_corpus

        milton = load_corpus("milton").texts
    sets = comparison_sets(heldout(run), milton or heldout(run), tok, vocabulary, n=n, seed=seed, min_chars=min_chars)
    if not milton:
        sets.pop("milton")
    return sets


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
        concept, retain = heldout(run, True)[:n], heldout(run, False)[:n]
        for s in run.seeds:
            model = edited(run.model("anchored", s), run.config, "delete")
            c = passage_mean_scores(model, run.data.tokenizer, concept, context=model.context)["s2"].numpy()
            r = passage_mean_scores(model, run.data.tokenizer, retain, context=model.context)["s2"].numpy()
            out["deleted"].append({"seed": s, "concept_s2": float(np.nanmean(c)), "retain_s2": float(np.nanmean(r)),
                                   "auroc_s2": auroc(r, c), "n_concept": len(c), "n_retain": len(r)})
    return out
