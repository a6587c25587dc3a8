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

from anchoring.evaluate.ood import auroc, auroc_table, comparison_sets, score_sets, select_passages
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
        pool_c, pool_r = heldout(run, True), [t for t in heldout(run, False) if len(t.strip()) >= min_chars]
        concept = select_passages(pool_c, min(n, len(pool_c)), seed, min_chars=1, max_chars=600)
        retain = select_passages(pool_r, min(n, len(pool_r)), seed, min_chars=min_chars, max_chars=600)
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
