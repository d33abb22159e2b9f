"""The README and the docs pages link to each other: every relative link names a file that exists and every
`#anchor` a heading of that page (as GitHub renders headings into anchors), and the README stays a page that fits
a few screens, with the depth in docs/."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    out, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6} (.*)", line)
        if m:
            text = re.sub(r"[`*]", "", m.group(1)).strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # code blocks hold no links
    return [a or b for a, b in LINK.findall(text)]


def broken(page: Path) -> list[str]:
    out = []
    for target in links(page):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            out.append(f"{page.relative_to(REPO)}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            out.append(f"{page.relative_to(REPO)}: {target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    return out


def test_every_link_and_anchor_resolves():
    problems = [line for page in PAGES for line in broken(page)]
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme():
    readme = {(REPO / t.partition("#")[0]).resolve() for t in links(REPO / "README.md")}
    orphans = [p.relative_to(REPO) for p in PAGES[1:] if p.resolve() not in readme]
    assert not orphans, f"docs pages the README does not link: {orphans}"


def test_the_readme_fits_a_few_screens():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 260, f"README.md has {lines} lines; move the depth into a docs/ page"


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "p.md"
    (tmp_path / "q.md").write_text("# Real heading\n")
    page.write_text("[a](q.md#real-heading) [b](q.md#gone) [c](missing.md) `[d](x.md)`\n```\n[e](y.md)\n```\n")
    assert [t for t in links(page)] == ["q.md#real-heading", "q.md#gone", "missing.md", "x.md"]
    assert anchors(tmp_path / "q.md") == {"real-heading"}
