"""Links between the pages: every relative markdown link of the README, docs/, scripts/ and studies/ points at a
file or folder of the repository, and a link to a section of a page (``page.md#section``, ``#section``)
at a heading of that page, by GitHub's anchor rule (no broken link after sections move)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "scripts").glob("**/*.md")),
            *sorted((REPO / "studies").glob("**/*.md"))]


def _prose(text: str) -> str:
    return re.sub(r"(?ms)^```.*?^```", "", text)  # code blocks hold no links and no headings


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation but ``-`` and ``_`` dropped,
    spaces to ``-``, a repeated anchor numbered ``-1``, ``-2``, ..."""
    seen: dict[str, int] = {}
    out = set()
    for title in re.findall(r"(?m)^#{1,6} +(.+?) *$", _prose(page.read_text())):
        base = re.sub(r"[^\w\- ]", "", title.replace("`", "").lower()).replace(" ", "-")
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z]+:", target):
            continue  # a web or mail address
        path, _, anchor = target.partition("#")
        dest = page if not path else page.parent / path
        if not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(target)
    return bad


def test_every_relative_link_resolves():
    pages = _pages()
    assert len(pages) > 10
    broken = {str(p.relative_to(REPO)): b for p in pages if (b := broken_links(p))}
    assert not broken, broken


def test_the_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A title, `code` (2026)\n## Twice\n## Twice\n")
    page.write_text("# Here\n[ok](there.md#a-title-code-2026) [web](https://x.org) [self](#here) [2nd](there.md#twice-1)\n"
                    "[gone](nowhere.md#b) [no such section](there.md#nope) [nor here](#there)\n```\n[code](x.md)\n```\n")
    assert broken_links(page) == ["nowhere.md#b", "there.md#nope", "#there"]


#: the pages a user follows: each ``minivln ...`` command of their bash blocks must parse
TASK_PAGES = ("install.md", "data.md", "train.md", "distil.md", "evaluate.md", "deploy.md", "guide-gpu.md")


def commands(page: Path) -> list[str]:
    """The ``minivln ...`` commands of a page's bash blocks (continuation lines joined, comments and
    ``&&`` chains split, ``torchrun ... -m minivln.cli`` taken as ``minivln``)."""
    out = []
    for block in re.findall(r"(?ms)^```bash\n(.*?)^```", page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = re.sub(r"\s+#.*$", "", part).strip()
                part = re.sub(r"^torchrun .*?-m minivln\.cli ", "minivln ", part)
                if part.startswith("minivln ") and "..." not in part:
                    out.append(part)
    return out


def test_the_task_pages_commands_parse():
    """Every command of the task pages, the GPU guide and the README names a command and options the CLI
    has (placeholders like FEATS.hdf5 stand for files; nothing runs)."""
    import shlex

    from minivln.cli import build_parser

    checked = 0
    for page in [REPO / "README.md", *(REPO / "docs" / p for p in TASK_PAGES)]:
        for cmd in commands(page):
            # optional parts' brackets and alternatives' bars dropped; shell variables as a number (they stand
            # for paths and counts)
            cmd = re.sub(r"\$\{?[A-Za-z_]+\}?", "1", cmd.replace("[", "").replace("]", "").replace("|", " "))
            argv = shlex.split(cmd)[1:]
            parser = build_parser(argv)
            try:
                args, extra = parser.parse_known_args(argv)
            except SystemExit as exc:  # --help (0), or argparse's error: an unknown command or option value
                if exc.code == 0:
                    continue
                raise AssertionError(f"{page.name}: {cmd}") from exc
            assert args.command, (page.name, cmd)
            options = [a for a in extra if a.startswith("-")]
            assert not options, (page.name, cmd, options)
            checked += 1
    assert checked >= 20


#: pages that are records or plans themselves, and may carry dated figures
RECORD_PAGES = {"results.md", "demo.md", "guide-gpu.md"}
DATED = re.compile(r"commit [0-9a-f]{7}\b|older figures?:|re-run at|load average (about )?\d|when written")


def test_the_task_and_reference_pages_leave_dated_measurements_to_the_record():
    """A measurement that came from a run (its commit, machine load, 'older figure', 're-run at') lives in
    docs/results.md; the other pages link to it (issue 23, item 5)."""
    found = {}
    for page in sorted((REPO / "docs").glob("*.md")):
        if page.name in RECORD_PAGES or page.name.startswith("preregistration"):
            continue
        hits = [line.strip()[:100] for line in _prose(page.read_text()).splitlines()
                if DATED.search(line) and "results.md#" not in line]
        if hits:
            found[page.name] = hits
    assert not found, found
    assert DATED.search("(older figure: commit 0494b45, AMD EPYC)")
