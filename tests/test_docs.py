"""The docs' own navigation: a long page's contents list names every section, and links between the
repository's files point at files that exist."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every ## and ### heading outside fenced code (a `# comment` in a shell block is not one)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#{2,3}) (.+)$", line)):
            out.append((len(m.group(1)), m.group(2)))
    return out


def anchor(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, code marks and punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower().replace("`", "")).replace(" ", "-")


@pytest.mark.parametrize("page", [p for p in DOCS if "\n## Contents\n" in p.read_text()], ids=lambda p: p.name)
def test_the_contents_list_names_every_section_in_order(page):
    text = page.read_text()
    listed = re.findall(r"^( *)- \[(.+)\]\(#([^)]+)\)$", text.split("\n## Contents\n")[1].split("\n## ")[0], re.M)
    sections = [(level, title) for level, title in headings(text) if title != "Contents"]
    assert [(2 + len(indent) // 2, title) for indent, title, _ in listed] == sections
    assert [a for _, _, a in listed] == [anchor(t) for _, t in sections]


def test_the_anchor_rule_matches_githubs_on_the_awkward_cases():
    assert anchor("`train.compile`") == "traincompile"
    assert anchor("Labels (`cleared · 30%`, 3 seeds)") == "labels-cleared--30-3-seeds"
    assert anchor("Blinding (`anchoring delete --method blind`)") == "blinding-anchoring-delete---method-blind"


def test_the_repository_paths_the_docs_name_exist():
    """Markdown links between the pages and `docs/…`, `examples/…`, `src/…` paths in code marks."""
    named = []
    for page in (ROOT / "README.md", *DOCS):
        text = page.read_text()
        named += [page.parent / t for t in re.findall(r"\]\(((?!https?:|#|mailto:)[^)#\s]+)", text)]
        named += [ROOT / t for t in re.findall(r"`((?:docs|examples|src|tests|\.ci)/[\w./-]+)`", text)]
    assert len(named) > 40  # the patterns still find the paths the pages name
    assert [str(p.relative_to(ROOT)) for p in named if not p.exists()] == []
