"""Every relative link in README.md and docs/*.md points to a file that exists and, when it
names a heading (`page.md#anchor`), to a heading of that page (GitHub's anchor rules)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"`[^`]*`")
_EXTERNAL = ("http://", "https://", "mailto:")


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) for every line outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: markup and punctuation dropped, lower case,
    spaces to hyphens (underscores and hyphens kept)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of `page`, repeated headings numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(page.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if match is None:
            continue
        anchor = github_anchor(match.group(1))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def relative_links(page: Path) -> Iterator[tuple[int, str]]:
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        for target in _LINK.findall(_INLINE_CODE.sub("", line)):
            if not target.startswith(_EXTERNAL):
                yield number, target


def broken_link(page: Path, target: str) -> str | None:
    """Why `target` (as written in `page`) does not resolve, or None when it does."""
    path_part, _, anchor = target.partition("#")
    linked = (page.parent / path_part).resolve() if path_part else page
    if not linked.exists():
        return f"{target} names {linked}, which does not exist"
    if anchor and linked.suffix == ".md" and anchor not in anchors(linked):
        return f"{linked.name} has no heading with anchor #{anchor}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    problems = [
        f"{page.relative_to(ROOT)}:{number}: ({target}) {why}"
        for number, target in relative_links(page)
        if (why := broken_link(page, target)) is not None
    ]
    assert not problems, "\n".join(problems)


def test_readme_links_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    unlinked = [p.name for p in PAGES[1:] if f"(docs/{p.name}" not in readme]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_anchor_rules_match_github() -> None:
    assert github_anchor("What each role learns (privacy table)") == (
        "what-each-role-learns-privacy-table"
    )
    assert github_anchor("Key-holder group (`simulations/bench_threshold.py`)") == (
        "key-holder-group-simulationsbench_thresholdpy"
    )
    assert github_anchor("result.json") == "resultjson"
    assert github_anchor("Scoring new records: fedhe predict") == (
        "scoring-new-records-fedhe-predict"
    )


def test_a_broken_link_and_a_missing_anchor_are_found(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A section\n", encoding="utf-8")
    assert broken_link(page, "#a-section") is None
    assert "no heading" in (broken_link(page, "#another") or "")
    assert "does not exist" in (broken_link(page, "missing.md") or "")
