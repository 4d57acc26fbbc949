"""Links between the pages: every relative markdown link of the README, docs/ and studies/ points at a
file or folder of the repository (no broken link after pages move)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "studies").glob("**/*.md"))]


def broken_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    bad = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a web address, a mail address, an anchor of the page itself
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            bad.append(target)
    return bad


def test_every_relative_link_resolves():
    pages = _pages()
    assert len(pages) > 10
    broken = {str(p.relative_to(REPO)): b for p in pages if (b := broken_links(p))}
    assert not broken, broken


def test_the_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("")
    page.write_text("[ok](there.md) [web](https://x.org) [anchor](#a) [gone](nowhere.md#b)\n```\n[code](x.md)\n```\n")
    assert broken_links(page) == ["nowhere.md#b"]
