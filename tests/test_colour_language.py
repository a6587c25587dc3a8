"""The colour language: lattice arithmetic, splits, packing and line labels."""

import pytest
import torch

from anchoring.anchor.sequence import position_labels
from anchoring.domains.colour import get_labeller
from anchoring.domains.colour_language import (
    ROLE,
    ColourLanguage,
    Lattice,
    draw_line_labels,
)
from anchoring.errors import AnchoringError


def tok(lat: Lattice, r: int, g: int, b: int) -> torch.Tensor:
    return lat.token(torch.tensor([r, g, b]))


def test_mix_is_the_channel_mean_rounded_half_up():
    lat = Lattice(6)
    assert lat.mix(tok(lat, 5, 0, 0), tok(lat, 1, 0, 2)) == tok(lat, 3, 0, 1)
    assert lat.mix(tok(lat, 5, 0, 0), tok(lat, 0, 0, 0)) == tok(lat, 3, 0, 0)  # 2.5 rounds up
    assert lat.mix(tok(lat, 0, 1, 4), tok(lat, 0, 2, 5)) == tok(lat, 0, 2, 5)  # 1.5 → 2, 4.5 → 5
    a, b = torch.randint(216, (500,)), torch.randint(216, (500,))
    assert torch.equal(lat.mix(a, b), lat.mix(b, a))


def test_complement_mirrors_each_channel_and_lighten_saturates():
    lat = Lattice(6)
    assert lat.complement(tok(lat, 5, 0, 0)) == tok(lat, 0, 5, 5)  # red ↔ cyan
    assert lat.complement(tok(lat, 0, 0, 0)) == tok(lat, 5, 5, 5)
    every = torch.arange(216)
    assert torch.equal(lat.complement(lat.complement(every)), every)
    assert lat.lighten(tok(lat, 4, 5, 0)) == tok(lat, 5, 5, 1)
    assert torch.allclose(lat.rgb(tok(lat, 5, 0, 0)), torch.tensor([1.0, 0.0, 0.0]))


def test_held_out_pairs_are_disjoint_from_seen_and_exact_rule_needs_no_rounding():
    lang = ColourLanguage(Lattice(6), "exact", 0.2)
    seen, held = lang.mix_pairs("seen"), lang.mix_pairs("held-out")
    as_set = lambda p: {tuple(x) for x in p.tolist()}  # noqa: E731
    assert not as_set(seen) & as_set(held)
    assert abs(len(held) / (len(seen) + len(held)) - 0.2) < 0.01
    both = torch.cat([seen, held])
    assert bool(lang.lattice.mix_is_exact(both[:, 0], both[:, 1]).all())
    # every line a training batch draws uses a seen pair, in either order
    g = torch.Generator().manual_seed(0)
    op, a, b = lang.sample_lines(4000, g)
    mixes = {tuple(sorted(p)) for p in torch.stack([a, b], -1)[op == 0].tolist()}
    assert mixes <= as_set(seen)
    rounded = ColourLanguage(Lattice(6), "half-up", 0.2)
    assert len(rounded.mix_pairs("seen")) + len(rounded.mix_pairs("held-out")) == 216 * 217 // 2


def test_packed_targets_after_each_equals_sign_are_the_answers():
    lang = ColourLanguage()
    batch = lang.batch(8, 64, torch.Generator().manual_seed(3))
    assert batch.inputs.shape == batch.targets.shape == batch.roles.shape == (8, 64)
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    rows, pos = batch.answer_query.nonzero(as_tuple=True)
    line = batch.line[rows, pos]
    expected = batch.colours[rows, line, 2]
    assert torch.equal(batch.targets[rows, pos], expected)
    assert bool((batch.inputs[batch.roles == ROLE["a"]] < lang.n_colours).all())


def test_pack_whole_keeps_every_line_and_maps_it_back():
    lang = ColourLanguage()
    op = torch.tensor([0, 1, 2, 0, 1])
    a = torch.tensor([0, 5, 7, 215, 100])
    b = torch.tensor([2, -1, -1, 213, -1])
    batch, where = lang.pack_whole(op, a, b, 16)
    assert batch.inputs.shape[1] == 16 and len(where) == 5
    for i in range(5):
        r, k = where[i]
        assert int(batch.colours[r, k, 0]) == int(a[i])


def test_line_labels_follow_redness_and_spread_to_positions():
    lang = ColourLanguage()
    lat = lang.lattice
    always = get_labeller("red").__class__("red", get_labeller("red").score, scale=1.0, power=1.0)
    red, cyan = int(tok(lat, 5, 0, 0)), int(tok(lat, 0, 5, 5))
    colours = torch.tensor([[[red, -1, cyan], [cyan, red, red], [cyan, -1, red], [cyan, cyan, cyan]]])
    labels = draw_line_labels(lat, always, colours, torch.Generator().manual_seed(0))
    assert labels.tolist() == [[1.0, 1.0, 0.0, 0.0]]  # operands draw; a red answer alone does not
    line = torch.tensor([[0, 0, 1, 2, 2, 3]])
    assert position_labels(labels, line).tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]


def test_bad_language_settings_are_errors():
    with pytest.raises(AnchoringError, match="levels"):
        Lattice(1)
    with pytest.raises(AnchoringError, match="mix_rule"):
        ColourLanguage(mix_rule="floor")
    with pytest.raises(AnchoringError, match="split"):
        ColourLanguage().mix_pairs("test")


def test_exact_mixes_need_every_channel_sum_even_and_there_are_3024_pairs():
    lat = Lattice(6)
    assert not bool(lat.mix_is_exact(tok(lat, 0, 0, 0), tok(lat, 1, 0, 0)))  # one odd channel is enough to round
    assert bool(lat.mix_is_exact(tok(lat, 0, 2, 4), tok(lat, 2, 0, 4)))
    lang = ColourLanguage(lat, "exact", 0.2)
    # per channel, 18 of the 36 ordered level pairs have an even sum: 18³ ordered pairs, 216 of them x + x
    assert len(lang.mix_pairs("seen")) + len(lang.mix_pairs("held-out")) == (18**3 - 216) // 2 + 216


def test_sampled_mix_lines_come_in_both_orders():
    op, a, b = ColourLanguage().sample_lines(400, torch.Generator().manual_seed(0))
    mix = op == 0
    assert bool((a[mix] > b[mix]).any()) and bool((a[mix] < b[mix]).any())  # the stored pairs all have a ≤ b


def test_padding_in_a_whole_packed_batch_belongs_to_no_line():
    lang = ColourLanguage()
    op, a, b = torch.tensor([0, 1]), torch.tensor([0, 5]), torch.tensor([2, -1])
    batch, _ = lang.pack_whole(op, a, b, 64)  # 10 lines fit: 2 real, 8 filler, then ';' padding
    per = 64 // 6
    assert int(batch.line[0, -1]) == per and int(batch.line.max()) == per
    n = int((batch.line[0] < per).sum())  # the lines' own tokens (5 or 6 each), then padding
    assert n < 64 and bool((batch.inputs[0, n:] == lang.op_token(";")).all())


def test_a_colour_word_needs_levels_inside_the_lattice():
    lang = ColourLanguage(Lattice(6))
    assert lang.words(lang.tokenize("500 + 005")) == ["500", "+", "005"]
    with pytest.raises(AnchoringError, match="not a word"):
        lang.tokenize("600")
