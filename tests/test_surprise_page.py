"""The surprisal page: well formed, self-contained, one sparkline per row, tooltips, before/after, speed."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import pytest
import torch

from anchoring.domains.text.tokenize import BPETokenizer, CharTokenizer
from anchoring.errors import AnchoringError
from anchoring.evaluate.surprise import score_text
from anchoring.models.ngpt import NormalizedTransformer
from anchoring.report import surprise_page as sp

TEXT = ("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
        "And all the clouds that lour'd upon our house\n\nIn the deep bosom of the ocean buried.\n")
VOID = {"meta", "br", "img", "input", "link", "hr", "wbr", "source", "col", "area", "base", "embed", "track", "param"}


class Balance(HTMLParser):
    """Checks that every non-void element is closed in order; collects what the tests look at."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def parse(page: str) -> Balance:
    b = Balance()
    b.feed(page)
    b.close()
    assert not b.errors and not b.stack, (b.errors[:5], b.stack[-5:])
    return b


def tiny(vocab: int, context: int = 32) -> NormalizedTransformer:
    torch.manual_seed(0)
    return NormalizedTransformer(vocab, width=32, layers=1, heads=2, context=context).eval()


@pytest.fixture(scope="module")
def char_page():
    tok = CharTokenizer.train([TEXT])
    model = tiny(tok.vocab_size)
    spans, scores = score_text(model, tok, TEXT, context=32)
    return spans, scores, sp.surprise_page(TEXT, spans, scores, title="a <test> & page")


def test_page_is_well_formed_and_self_contained(char_page):
    page = char_page[2]
    parse(page)
    assert page.lower().startswith("<!doctype html>")
    low = page.lower()
    for bad in ("http://", "https://", "<script", "src=", "@import", "url(", "<link"):
        assert bad not in low, bad
    assert "<title>a &lt;test&gt; &amp; page</title>" in page


def test_every_row_has_a_sparkline_and_rows_follow_lines(char_page):
    tags = parse(char_page[2]).tags
    rows = [a for t, a in tags if t == "div" and "row" in a.get("class", "").split()]
    svgs = [a for t, a in tags if t == "svg" and a.get("class") == "spark"]
    assert len(rows) == len(svgs) == 4  # four text lines; the blank line's newline ends the third
    for a in svgs:
        cols = int(a["viewbox" if "viewbox" in a else "viewBox"].split()[2])
        assert a["style"].startswith(f"width:{cols}ch")


def test_tooltips_carry_the_numbers(char_page):
    spans, scores, page = char_page
    tips = [html.unescape(a["data-tip"]) for t, a in parse(page).tags if t == "span" and "data-tip" in a]
    assert len(tips) == len(spans)  # char tokenizer: one span per token
    assert "no score" in tips[0]
    lv = scores.log_vocab
    for k in (1, 7, len(tips) - 1):
        assert f"s₂       {float(scores.s2[k]):+.3f}" in tips[k]
        assert f"i/log|V| {float(scores.surprisal[k]) / lv:.3f}" in tips[k]
        assert f"h/log|V| {float(scores.entropy[k]) / lv:.3f}" in tips[k]


def test_passage_means_are_shown(char_page):
    spans, scores, page = char_page
    second = TEXT.index("In the deep")
    m = scores.mean(next(k for k, (s, _) in enumerate(spans) if s >= second))
    assert f"s₂ <b>{m['s2']:+.3f}</b>" in page
    assert f"mean i/log|V| <b>{m['surprisal'] / scores.log_vocab:.3f}</b>" in page  # surprisal over log |V|
    assert page.count('class="passage"') == 2


def shown_text(page: str, row_class: str = "row") -> list[str]:
    """Displayed characters of each row (the txt div), tags stripped."""
    out = []
    for m in re.finditer(r'<div class="' + row_class + r'[^"]*">(?:<div class="gut">[^<]*</div>)?<div><div class="txt">(.*?)</div><svg', page, re.S):
        out.append(html.unescape(re.sub(r"<[^>]+>", "", m.group(1))))
    return out


def test_colour_steps_leave_small_values_white_and_clip_at_the_ends():
    from anchoring.report.surprise_page import BIN, STEPS, _cls

    white = f"c{STEPS}"
    assert _cls(0.8 * BIN) == white and _cls(-0.8 * BIN) == white  # |s₂| < one step: untinted
    assert _cls(1.6 * BIN) == f"c{STEPS + 1}" and _cls(-1.6 * BIN) == f"c{STEPS - 1}"
    assert _cls(40.0) == f"c{2 * STEPS} over" and _cls(-40.0) == "c0"


def test_rows_show_the_whole_text_and_wrap_long_lines():
    text = ("word " * 90).strip() + "\nshort line\n" + "x" * 250
    tok = CharTokenizer.train([text])
    spans, scores = score_text(tiny(tok.vocab_size, 64), tok, text, context=64)
    page = sp.surprise_page(text, spans, scores, title="wrap")
    parse(page)
    rows = shown_text(page)
    assert "".join(rows) == text.replace("\n", "↵")
    assert max(len(r) for r in rows) <= sp.WRAP
    assert rows[0].endswith(" ")  # a long line of words wraps after a space


def test_bpe_spans_that_share_a_character_render_once():
    corpus = ["plain words and more plain words " * 20]
    tok = BPETokenizer.train(corpus, vocab_size=270)
    text = "plain 😀 words\n\tand é\n"
    spans, scores = score_text(tiny(tok.vocab_size), tok, text, context=32)
    assert len(set(spans)) < len(spans)  # the emoji is cut into byte tokens sharing one span
    page = sp.surprise_page(text, spans, scores, title="bpe")
    parse(page)
    assert "".join(shown_text(page)) == text.replace("\n", "↵").replace("\t", "→")
    summed = [t for _, t in tips_of(page) if "sums over its" in t]  # the emoji's ratios are sums that may pass 1
    assert len(summed) >= 1 and all(t.startswith("'😀'") or t.startswith("'é'") for t in summed), summed


def test_before_and_after_rows_are_aligned():
    tok = CharTokenizer.train([TEXT])
    model, edited = tiny(tok.vocab_size), tiny(tok.vocab_size)
    with torch.no_grad():
        edited.unembed.weight[tok.encode("e")[0]] *= -1
    page = sp.render_surprise(model, tok, TEXT, edited_model=edited, title="edit", context=32)
    parse(page)
    before, after = shown_text(page, "row before"), shown_text(page, "row after")
    assert before == after and len(before) == 4
    assert page.count('class="gut">before<') == page.count('class="gut">after<') == 4
    assert "Δs₂ vs before" in page and "s₂ before" in page
    # the numbers, from the two models' own scores: a sign or an order swapped read as the edit's opposite
    _, sb = score_text(model, tok, TEXT, context=32)
    _, sa = score_text(edited, tok, TEXT, context=32)
    mb, ma = float(sb.s2[1:].mean()), float(sa.s2[1:].mean())
    assert mb != ma and f"s₂ before <b>{mb:+.3f}</b> → after <b>{ma:+.3f}</b>" in page
    k = next(k for k in range(1, len(sa)) if abs(float(sa.s2[k] - sb.s2[k])) > 0.01)
    assert html.escape(f"Δs₂ vs before {float(sa.s2[k] - sb.s2[k]):+.3f}") in page
    table = page[page.index("per-passage means"):]
    rows = [re.findall(r"<td[^>]*>([^<]*)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", table)]
    rows = [r for r in rows if len(r) == 10]  # ¶, its beginning, tokens, i/h/s₂ before and after, Δs₂
    assert len(rows) == 2, rows
    for r in rows:  # the Δ column is after − before, as its neighbours print them
        before_s2, after_s2, delta = (float(v.replace("−", "-")) for v in r[-3:])
        assert abs(delta - (after_s2 - before_s2)) <= 0.0015, r
    assert any(float(r[-1].replace("−", "-")) != 0 for r in rows)


def test_bad_input_is_one_line_error(tmp_path):
    tok = CharTokenizer.train([TEXT])
    spans, scores = score_text(tiny(tok.vocab_size), tok, TEXT, context=32)
    with pytest.raises(AnchoringError):
        sp.surprise_page(TEXT, spans[:-1], scores, title="x")
    with pytest.raises(AnchoringError):
        sp.render_surprise(tiny(tok.vocab_size), tok, "", title="x")
    with pytest.raises(AnchoringError, match="context"):
        sp.render_surprise(lambda ids: torch.zeros(*ids.shape, 5), tok, "abc", title="x")


def test_write_is_atomic_and_complete(tmp_path, char_page):
    out = sp.write_surprise_page(tmp_path / "deep" / "page.html", char_page[2])
    assert out.read_text(encoding="utf-8") == char_page[2]
    assert [p.name for p in out.parent.iterdir()] == ["page.html"]
    assert sp.write_surprise_page(out, char_page[2] + " ") == out  # a page written here is replaced
    out.write_text(char_page[2].replace(f"<meta name='generator' content='{sp.GENERATOR}'>", ""))
    assert sp.write_surprise_page(out, char_page[2]) == out  # so is one written before pages carried the mark
    other = tmp_path / "notes.html"
    other.write_text("<html>mine</html>")
    with pytest.raises(AnchoringError, match="not a surprisal page"):
        sp.write_surprise_page(other, char_page[2])
    assert other.read_text() == "<html>mine</html>"


def test_single_character_text_renders():
    tok = CharTokenizer.train(["a"])
    page = sp.render_surprise(tiny(tok.vocab_size), tok, "a", title="one", context=8)
    parse(page)
    assert "no score" in page


def test_a_ten_thousand_character_page_has_every_line_scored():
    """The default LM size (width 128, 4 layers, 4 heads, context 256) over 10,000 characters: more
    than one context window, every line with its sparkline. How fast it is lives in `anchoring bench`."""
    base = TEXT * 3 + "What's in a name? That which we call a rose\nBy any other word would smell as sweet.\n\n"
    text = (base * (10_000 // len(base) + 1))[:10_000]
    tok = CharTokenizer("".join(chr(c) for c in range(32, 127)) + "\n")  # ~ the Shakespeare char vocabulary size
    torch.manual_seed(0)
    model = NormalizedTransformer(tok.vocab_size, width=128, layers=4, heads=4, context=256).eval()
    page = sp.render_surprise(model, tok, text, title="ten thousand")
    assert page.count('class="spark"') >= sum(1 for line in text.split("\n") if line)
    assert "http://" not in page and "https://" not in page


def test_indentation_starts_its_own_row():
    """Only a blank line's newline joins the row above; spaces that indent verse stay at the start of their line."""
    text = "He drew his sword,\n    and the birds sang.\n" + "a\n" + " " * 120 + "b"
    tok = CharTokenizer.train([text])
    spans, scores = score_text(tiny(tok.vocab_size, 256), tok, text, context=256)
    rows = shown_text(sp.surprise_page(text, spans, scores, title="indent"))
    assert rows[0] == "He drew his sword,↵" and rows[1].startswith("    and")
    assert max(len(r) for r in rows) <= sp.WRAP


def test_a_character_cut_into_byte_tokens_keeps_the_scores_of_its_later_bytes():
    """A first character of several byte tokens: nothing predicts its first byte, but the model does
    predict the others, so its display unit is scored by them, and only scored tokens are counted."""
    tok = BPETokenizer.train(["plain words " * 40], vocab_size=270)
    text = "🎉 hi"
    spans, scores = score_text(tiny(tok.vocab_size), tok, text, context=32)
    assert len(spans) > len(text) and torch.isnan(scores.surprisal[0]) and not torch.isnan(scores.surprisal[1:]).any()
    page = sp.surprise_page(text, spans, scores, title="emoji")
    tips = [html.unescape(a["data-tip"]) for t, a in parse(page).tags if t == "span" and "data-tip" in a]
    lv = scores.log_vocab
    first = [k for k, s in enumerate(spans) if s == spans[0]]
    assert f"i/log|V| {float(scores.surprisal[first[1:]].sum()) / lv:.3f}" in tips[0] and "no score" not in tips[0]
    assert f"mean over {len(spans) - 1} tokens" in page


def tips_of(page: str) -> list[tuple[str, str]]:
    """(class, tooltip) of every scored token, in page order."""
    return [(a["class"], html.unescape(a["data-tip"])) for t, a in parse(page).tags if t == "span" and "data-tip" in a]


class _MaskUnknown(torch.nn.Module):
    """A model that never predicts the unknown id (as `generate` masks it): that token's surprisal is +inf."""

    def __init__(self, inner: NormalizedTransformer):
        super().__init__()
        self.inner, self.context = inner, inner.context

    def forward(self, ids):
        logits = self.inner(ids).clone()
        logits[..., 0] = -float("inf")
        return logits


def test_an_infinite_surprisal_is_drawn_at_the_end_of_the_scale_and_printed_as_infinity():
    tok = CharTokenizer.train(["abc def\n"])
    page = sp.render_surprise(_MaskUnknown(tiny(tok.vocab_size, 16)), tok, "abc é def", title="masked")
    tips = tips_of(page)
    cls, tip = tips[4]  # é
    assert tip.startswith("'é'") and "i/log|V| ∞   i ∞ nats" in tip and "s₂       +∞" in tip
    assert cls.split()[:3] == ["t", f"c{2 * sp.STEPS}", "over"]
    assert "inf" not in " ".join(t for _, t in tips)
    assert "i/log|V| <b>∞</b>" in page  # the mean over a text with an infinite surprisal
    for d in re.findall(r'<path class="[^"]*" d="([^"]*)"', page):
        assert "inf" not in d and "nan" not in d, d


def _sections(page: str) -> list[tuple[int, str, list[str]]]:
    """Per passage section: the token count in its header, its displayed text, the tooltips of its scored tokens."""
    out = []
    for sec in re.findall(r'<section class="passage">(.*?)</section>', page, re.S):
        n = int(re.search(r"</b> · (\d+) tokens", sec).group(1))
        out.append((n, "".join(shown_text(sec)), [t for _, t in tips_of(sec) if "no score" not in t]))
    return out


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_an_indented_passage_keeps_its_first_line(kind):
    """A passage is cut after the blank lines, before the next passage's indentation: each section
    shows its own passage and its header counts the tokens it shows."""
    text = "First passage here.\n\n    Second passage, indented.\nSecond line.\n\n    Third one.\n"
    if kind == "char":
        tok = CharTokenizer.train([text])
    else:
        tok = BPETokenizer.train(["plain words and more plain words\n\n    indented words\n" * 20], vocab_size=300)
    spans, scores = score_text(tiny(tok.vocab_size, 128), tok, text, context=128)
    if kind == "bpe":
        assert any(text[a:b] == "\n\n   " for a, b in spans)  # a token that straddles the cut
    sections = _sections(sp.surprise_page(text, spans, scores, title="passages"))
    words = [p.split() for p in ("First passage here.", "Second passage, indented.\nSecond line.", "Third one.")]
    assert [shown.replace("↵", " ").split() for _, shown, _ in sections] == words
    for n, _, scored in sections:
        assert n == len(scored)
    if kind == "char":
        assert [shown for _, shown, _ in sections] == ["First passage here.↵↵", "    Second passage, indented.↵Second line.↵↵",
                                                       "    Third one.↵"]


def test_characters_the_tokenizer_does_not_know_are_marked():
    tok = CharTokenizer.train(["abc def\n"])
    page = sp.render_surprise(tiny(tok.vocab_size, 16), tok, "é abc 😀", title="unknown")
    tips = tips_of(page)
    marked = [t.split("\n")[0] for c, t in tips if sp.UNKNOWN_NOTE in t]
    assert marked == ["'é'", "'😀'"]  # the first token too, though nothing scores it
    assert all("unk" in c.split() for c, t in tips if sp.UNKNOWN_NOTE in t)
    assert sp.unknown_characters(tok, "é abc 😀é") == "é😀" and sp.unknown_characters(tok, "abc") == ""
    assert sp.unknown_characters(tok, "😀 ~é") == "😀~é"  # as they come: the warning lists "the first 10"
    bpe = BPETokenizer.train(["plain words " * 40], vocab_size=270)
    assert sp.unknown_tokens(bpe, "é") is None and sp.unknown_characters(bpe, "é😀") == ""
    with pytest.raises(AnchoringError, match="unknown"):
        sp.surprise_page("ab", [(0, 1), (1, 2)], score_text(tiny(tok.vocab_size), tok, "ab", context=8)[1], title="x",
                         unknown=[False])


def test_surprisal_command_warns_about_unknown_characters_and_names_the_seed(tmp_path, monkeypatch):
    """`_lm_models` is replaced by a stand-in run, so the command runs without training a model."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    import anchoring.cli as cli

    tok = CharTokenizer.train(["abc def\n"])
    model = tiny(tok.vocab_size, 16)
    run = SimpleNamespace(config=SimpleNamespace(name="tiny-lm"), arms={"control": None}, seeds=[3, 4],
                          data=SimpleNamespace(tokenizer=tok), path=tmp_path / "myrun")
    monkeypatch.setattr(cli.text, "_lm_models", lambda *a: (run, model, None))
    page = tmp_path / "p.html"
    r = CliRunner().invoke(cli.app, ["surprisal", str(tmp_path), "abc é déf ü", "--out", str(page)])
    assert r.exit_code == 0, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("warning:") and "'éü'" in r.stderr
    assert "<title>myrun (tiny-lm): control arm, seed 3</title>" in page.read_text()
    r = CliRunner().invoke(cli.app, ["surprisal", str(tmp_path), "abc", "--seed", "4", "--out", str(page)])  # over the first page
    assert r.exit_code == 0 and r.stderr == "", r.stderr + r.stdout
    assert "<title>myrun (tiny-lm): control arm, seed 4</title>" in page.read_text()
    r = CliRunner().invoke(cli.app, ["surprisal", str(tmp_path), "abc", "--out", str(tmp_path)])  # a folder
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "is a directory" in r.stderr, r.stderr


def test_s2_above_one_is_ticked_like_the_surprisal():
    text = "abcd"
    nan = float("nan")
    scores = sp.TokenScores(torch.tensor([nan, 0.9, 1.6, 0.2]), torch.tensor([nan, 0.4, 0.1, 0.5]),
                            torch.tensor([nan, 0.5, 1.5, -0.3]), 1.0)
    page = sp.surprise_page(text, [(k, k + 1) for k in range(4)], scores, title="clip")
    classes = [c.split() for c, _ in tips_of(page)]
    assert "over" in classes[2] and not any("over" in c for k, c in enumerate(classes) if k != 2)
    (ticks,) = re.findall(r'<path class="clip s2" d="([^"]*)"', page)
    assert re.fullmatch(r"M2 [\d.]+H3", ticks)
    assert "s₂ −1" in page and "≥ +1</span>" in page


def test_carriage_returns_are_shown_and_a_lone_one_ends_the_line():
    text = "line one\rline two\r\nthree\r\n\r\nfour\r\rfive"
    tok = CharTokenizer.train([text])
    spans, scores = score_text(tiny(tok.vocab_size, 64), tok, text, context=64)
    page = sp.surprise_page(text, spans, scores, title="cr")
    assert shown_text(page) == ["line one␍", "line two␍↵", "three␍↵␍↵", "four␍␍", "five"]
    assert len(tips_of(page)) == len(spans)  # every \r is a token on the page
    assert [text[a:b] for a, b in sp._passages(text)] == ["line one\rline two\r\nthree\r\n\r\n", "four\r\r", "five"]
    assert sp._passages("a\r\nb") == [(0, 4)]  # one CRLF is a line break, not a blank line


def test_columns_count_wide_characters_twice_and_combining_marks_not_at_all():
    from anchoring.report.surprise_page import _boxed, _columns

    assert [_columns(s) for s in ("a", "日", "日本", "e\u0301", "\u0301", "\u00ad", "★")] == [1, 2, 4, 1, 1, 1, 1]
    # emoji and Hangul sequences are drawn as one glyph of two columns
    assert [_columns(s) for s in ("❤\ufe0f", "👨\u200d👩\u200d👧", "👍🏽", "\u1112\u1161\u11ab", "\U00020000")] == [2, 2, 2, 2, 2]
    assert _boxed("plain é text") == "" and _boxed("ǂ") != "" and _boxed("日") == ' style="width:2ch"' and _boxed("↵") == ' style="width:1ch"'
    text = "日本語 ab\n"
    tok = CharTokenizer.train([text])
    torch.manual_seed(0)
    model = NormalizedTransformer(tok.vocab_size, width=16, layers=1, heads=2, context=32).eval()
    page = sp.render_surprise(model, tok, text)
    assert 'style="width:10ch' in page  # the sparkline spans 3×2 + 1 + 2 + ↵ = 10 columns, not 7


def test_a_byte_that_is_not_utf8_in_the_text_is_shown_as_a_replacement_and_the_page_writes(tmp_path):
    """`anchoring surprisal RUN "$(printf 'ab\\xffcd')"` passes a lone surrogate; it was scored and put
    into the page raw, and writing the page failed with a UnicodeEncodeError traceback."""
    tok = CharTokenizer.train(["abcd"])
    text = "ab" + "\udcff" + "cd"
    page = sp.render_surprise(tiny(tok.vocab_size), tok, text, title="bytes", context=8)
    assert "\udcff" not in page and "\ufffd" in page
    out = sp.write_surprise_page(tmp_path / "p.html", page)
    assert "\ufffd" in out.read_text(encoding="utf-8")
