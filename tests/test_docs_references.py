"""Every reference to the docs resolves (docs/architecture.md#architecture).

Comments and docstrings cite the rules they keep with one form of reference,
``docs/<file>.md#<heading-anchor>``, where the anchor is the heading as GitHub links it. These
tests find every such reference in ``src/``, ``tests/``, ``bench/``, ``docs/`` and the README and
check that the file and the heading exist; that links between the docs resolve; that the source
files the architecture page names exist; and that nothing cites a document a reader of this
repository does not have (the notes the code was first written from).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCANNED = [ROOT / "src", ROOT / "tests", ROOT / "bench", DOCS, ROOT / "README.md"]
SUFFIXES = {".py", ".md", ".toml", ".txt", ".sh", ".cfg", ".ini"}

REFERENCE = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]*)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
# What the comments cited before the docs existed: documents outside the repository.
OUTSIDE = re.compile(
    r"spec §|DESIGN principle|principle \d+ of the design|design notes|DESIGN\.md"
    r"|performance notes|spec[ /`]+security\.md|shared/spec/"
)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (``-`` and ``_``
    kept), each space a hyphen. Inline code and emphasis marks are punctuation too."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading anchor of a Markdown page, repeated headings numbered as GitHub does
    (``name``, ``name-1``, ``name-2``); headings inside code blocks do not count."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match is None:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def scanned_files() -> Iterator[Path]:
    for place in SCANNED:
        if place.is_file():
            yield place
            continue
        for path in sorted(place.rglob("*")):
            skipped = "__pycache__" in path.parts or ".build" in path.parts  # not ours
            if path.is_file() and path.suffix in SUFFIXES and not skipped:
                yield path


def where(path: Path, text: str, index: int) -> str:
    return f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, index) + 1}"


def resolve(page: str, anchor: str | None) -> str | None:
    """Why ``docs/<page>#<anchor>`` does not resolve, or None when it does."""
    target = DOCS / page
    if not target.is_file():
        return f"docs/{page} does not exist"
    if anchor is not None and anchor not in anchors(target.read_text(encoding="utf-8")):
        return f"docs/{page} has no heading with the anchor #{anchor}"
    return None


def test_github_slugs() -> None:
    assert github_slug("Keep-alive") == "keep-alive"
    assert github_slug("Typed errors, mapped once") == "typed-errors-mapped-once"
    assert github_slug("One chat request, from the route to llama_decode") == (
        "one-chat-request-from-the-route-to-llama_decode"
    )
    assert github_slug("`pollama run`") == "pollama-run"
    assert anchors("# A\n## B\n```\n# not a heading\n```\n## B\n") == {"a", "b", "b-1"}


def test_the_docs_exist() -> None:
    for page in ("architecture.md", "ollama-behaviour.md", "security.md"):
        assert (DOCS / page).is_file(), page


def test_every_docs_reference_names_a_heading_that_exists() -> None:
    problems: list[str] = []
    count = 0
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in REFERENCE.finditer(text):
            count += 1
            problem = resolve(match.group(1), match.group(2))
            if problem is not None:
                problems.append(f"{where(path, text, match.start())}: {problem}")
    assert count > 30  # the code cites the docs; finding none means the pattern broke
    assert not problems, "\n".join(problems)


def test_links_between_the_docs_resolve() -> None:
    problems: list[str] = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        for match in MARKDOWN_LINK.finditer(text):
            target = match.group(1)
            if "://" in target or target.startswith("mailto:"):
                continue
            name, _, anchor = target.partition("#")
            if name and not name.endswith(".md"):
                problem = None if (page.parent / name).exists() else f"{name} does not exist"
            else:
                problem = resolve(name or page.name, anchor or None)
            if problem is not None:
                problems.append(f"{where(page, text, match.start())}: {problem}")
    assert not problems, "\n".join(problems)


def test_nothing_cites_a_document_outside_the_repository() -> None:
    problems: list[str] = []
    for path in scanned_files():
        if path == Path(__file__).resolve():
            continue  # this file names the patterns
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in OUTSIDE.finditer(text):
            problems.append(f"{where(path, text, match.start())}: {match.group(0)!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", ["architecture.md", "security.md"])
def test_source_files_named_in_the_docs_exist(page: str) -> None:
    """A path in backticks (``server/routes_inference.py``, ``tests/inprocess.py``) names a
    file under ``src/pollama/`` or the repository root, so a walk through the code cannot
    silently go stale when a module moves."""
    text = (DOCS / page).read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:[\w-]+/)*[\w-]+\.py)`", text))
    missing = [
        name
        for name in sorted(named)
        if not (ROOT / "src" / "pollama" / name).is_file() and not (ROOT / name).is_file()
    ]
    assert len(named) > 5 if page == "architecture.md" else named
    assert not missing, f"docs/{page} names files that do not exist: {missing}"
