"""Post-hoc directions on a control model (`kinds/lm/posthoc.py`): fitted on the labels the anchored
arm of the same seed trained with, and pointing from the unlabelled states towards the labelled."""

from __future__ import annotations

import torch

from anchoring import experiments
from anchoring.kinds.lm.data import Stream, load_data
from anchoring.kinds.lm.posthoc import fit, fit_activations
from anchoring.kinds.lm.training import build_model
from test_lm_kind import tiny_spans, write_corpus


def test_the_fit_reads_the_seeds_own_labels_and_the_direction_points_to_the_labelled(tmp_path):
    corpus = write_corpus(tmp_path / "texts", files=2, paragraphs=60)
    cfg = experiments.load("lm-unlearning", tiny_spans(corpus, "text.coverage=0.5"))
    data = load_data(cfg.text)
    torch.manual_seed(0)
    model = build_model(cfg, data.vocab_size)
    B, T = cfg.lm.batch_size, cfg.lm.tokens
    n = 6 * B * T  # six batches read whole: the fit's labels are theirs, in order

    def labels(seed: int, weak_seed: int) -> torch.Tensor:
        stream = Stream(data.train_tokens, data.keep("control", seed), seed, T, data.span_masks())
        return torch.cat([stream.batch(step, B, data.weak(weak_seed)).labels.flatten() for step in range(6)])

    for seed in (0, 1):
        acts, y = fit_activations(model, cfg, data, seed, ["blocks.1"], n)
        assert torch.equal(y, labels(seed, seed)), seed
        assert 0 < y.sum() < len(y)
        assert not torch.equal(y, labels(seed, seed + 1))  # another seed's weak labels mark other positions
    v = fit(model, cfg, data, 1, ["blocks.1"])["mean-difference"].directions["blocks.1"]
    proj = acts["blocks.1"] @ v
    assert proj[y.bool()].mean() > proj[~y.bool()].mean()


def test_each_post_hoc_suppression_edits_its_site_with_its_own_eraser(tmp_path):
    """Mean-difference suppression caps h·v at the midpoint of the two classes, LEACE applies its
    fitted eraser. Without them `suppress` fell back to the anchored arm's threshold at 0 along
    the direction, and no test noticed (one table number moved by 1e-8 by chance)."""
    from anchoring.kinds.lm.edits import edited

    corpus = write_corpus(tmp_path / "texts", files=2, paragraphs=60)
    cfg = experiments.load("lm-unlearning", tiny_spans(corpus, "text.coverage=0.5"))
    data = load_data(cfg.text)
    torch.manual_seed(0)
    model = build_model(cfg, data.vocab_size).eval()
    fits = fit(model, cfg, data, 0, ["blocks.1"])
    acts, y = fit_activations(model, cfg, data, 0, ["blocks.1"], cfg.unlearning.fit_positions)  # what `fit` read
    h, v = acts["blocks.1"], fits["mean-difference"].directions["blocks.1"]
    c = 0.5 * (float((h @ v)[y.bool()].mean()) + float((h @ v)[~y.bool()].mean()))
    capped = fits["mean-difference"].erasers["blocks.1"](h)
    assert abs(c) > 1e-3 and float((capped @ v).max()) <= c + 1e-4 and float((h @ v).max()) > c
    below = (h @ v) < c
    assert torch.equal(capped[below], h[below])  # states short of the midpoint are left alone
    x = torch.tensor(data.train_tokens[0][:32])[None]
    for method, f in fits.items():
        assert set(f.erasers) == {"blocks.1"}, method

        def by_hand(_m, _i, out, erase=f.erasers["blocks.1"]):
            return erase(out)

        handle = model.blocks[1].register_forward_hook(by_hand)
        try:
            with torch.no_grad():
                want = model(x)
        finally:
            handle.remove()
        with torch.no_grad():
            got = f.suppress(model, cfg)(x)
            fallback = edited(model, cfg, "suppress", directions={"blocks.1": [f.directions["blocks.1"]]}, sites=["blocks.1"])(x)
        torch.testing.assert_close(got, want)
        assert not torch.allclose(fallback, want, atol=1e-4), method  # the check above could fail
