"""README.md and docs/*.md name only files that exist: a module moved or renamed is renamed in the
text too.

Two kinds of citation are checked. A repository path: one of the repository's top folders
(``app/``, ``actors/``, ``tests/`` …) at the start of a word, then folders and a file name, as in
``app/worker/flow.py``; ``myapp/handlers.py`` and a URL's ``…/docs/…`` are not at the start of a
word, so they are not taken for one. And a link to a local file, ``[text](relay.md#settings)``,
resolved from the page's own folder; links with a scheme (``https:``) and anchors of the page
itself (``#states``) are left alone.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOP_FOLDERS = ("app", "actors", "migrations", "tests", "benchmarks", "examples", "docs")
PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(TOP_FOLDERS)})/[\w./-]*)")
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def pages(repo: Path) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def missing_citations(repo: Path, page: Path) -> list[str]:
    """``page:line: target`` for each path or local link in ``page`` that names nothing."""
    found: list[str] = []
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        cited = [(repo, path.rstrip(".")) for path in PATH.findall(line)]
        cited += [
            (page.parent, target) for target in LINK.findall(line) if not SCHEME.match(target)
        ]
        for base, target in dict.fromkeys(cited):  # once each, in order
            if not (base / target).exists():
                found.append(f"{page.relative_to(repo)}:{number}: {target}")
    return found


def test_every_cited_path_exists() -> None:
    checked = pages(REPO)
    assert [page.name for page in checked[:2]] == ["README.md", "architecture.md"]
    missing = [line for page in checked for line in missing_citations(REPO, page)]
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)


def test_what_counts_as_a_citation(tmp_path: Path) -> None:
    (tmp_path / "app" / "worker").mkdir(parents=True)
    (tmp_path / "app" / "worker" / "flow.py").touch()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "relay.md").touch()
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "The stop is in `app/worker/flow.py`, the start in app/worker/flow.py.\n"
        "Folders: app/worker/, docs/. Links: [relay](relay.md#settings), [up](#states).\n"
        "Not ours: myapp/handlers.py, https://example.com/app/gone.py, [x](https://a.b/c.md).\n"
        "Gone: `app/worker/wiring.py`, (see tests/test_gone.py).\n"
        "A dead link: [old](docs/relay.md), and [another](gone.md#top).\n",
        encoding="utf-8",
    )
    assert missing_citations(tmp_path, page) == [
        "docs/page.md:4: app/worker/wiring.py",
        "docs/page.md:4: tests/test_gone.py",
        "docs/page.md:5: docs/relay.md",  # resolved from docs/: docs/docs/relay.md
        "docs/page.md:5: gone.md",
    ]
