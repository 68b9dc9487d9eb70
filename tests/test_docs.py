"""The README and docs/ point only at things that exist.

Docs rot silently: a renamed config, a moved sbatch script or a re-titled section leaves a link that
a user follows to nothing. Every relative link (and its ``#anchor``, with GitHub's heading slugs),
every repository path a page names (``configs/...``, ``slurm/...``, ``benchmarks/...``,
``img_lightning/...``, ``preprocessing/...``, ``tests/...``, brace lists and globs expanded) and
every test file it cites must exist; every page is on the map; the quick start keeps its two
commands and ``.ci/run`` runs exactly the test one.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DEMO_COMMAND = 'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/img-demo'
TEST_COMMAND = 'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/python -m pytest -q'
README_MAX_LINES = 250

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w./${-])((?:configs|slurm|benchmarks|img_lightning|preprocessing|tests)/"
                  r"[\w./{},*+-]*[\w}*/])")
TEST_FILE = re.compile(r"(?<![\w/])(test_\w+\.py)\b")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def slugs(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, ``-N`` on repeats."""
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        m = None if in_code else HEADING.match(line)
        if not m:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(2))  # a link in a heading keeps its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [e for alt in m.group(1).split(",")
            for e in expand_braces(pattern[:m.start()] + alt + pattern[m.end():])]


def named_paths(text: str) -> list[str]:
    return [m.group(1).rstrip(".") for m in PATH.finditer(text)]


def path_exists(name: str) -> bool:
    return all(glob.glob(str(ROOT / variant)) for variant in expand_braces(name))


def links(text: str) -> list[str]:
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    problems = []
    for target in links(page.read_text(encoding="utf-8")):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in slugs(dest):
            problems.append(f"{target}: no heading with anchor #{anchor} in {_rel(dest)}")
    assert not problems, f"{_rel(page)}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_repository_paths_exist(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    missing = sorted({p for p in named_paths(text) if not path_exists(p)})
    missing += sorted({t for t in TEST_FILE.findall(text) if not (ROOT / "tests" / t).is_file()})
    assert not missing, f"{_rel(page)} names paths that do not exist: {missing}"


def test_every_docs_page_is_on_both_maps() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    doc_map = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    pages = [p.name for p in PAGES[1:] if p.name != "README.md"]
    assert [p for p in pages if f"(docs/{p})" not in readme] == []
    assert [p for p in pages if f"({p})" not in doc_map] == []


def test_readme_is_a_front_door_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert DEMO_COMMAND in readme and TEST_COMMAND in readme
    assert len(readme.splitlines()) <= README_MAX_LINES, (
        f"README.md has {len(readme.splitlines())} lines: move reference material to a docs/ page")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert TEST_COMMAND in ci, ".ci/run must run exactly the README's test command"


# The checkers themselves: each must catch what it exists to catch.

def test_slugs_follow_github() -> None:
    page = ROOT / "docs" / "README.md"
    assert "img-lightning-documentation" in slugs(page)


def test_slugs_of_punctuated_and_repeated_headings(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("# 2. Preprocess: Pick-a-Pic → cache (`img-preprocess`)\n## Notes\n## Notes\n"
                    "```\n# not a heading\n```\n", encoding="utf-8")
    assert slugs(page) == {"2-preprocess-pick-a-pic--cache-img-preprocess", "notes", "notes-1"}


def test_path_checker_expands_braces_and_globs_and_catches_a_missing_one() -> None:
    text = ("run `configs/eval/benchmarks/t2i_compbench_{color,shape}.yaml`, `slurm/*.sbatch` and "
            "`configs/eval/benchmarks/nope.yaml`; not /data/configs/x.yaml")
    names = named_paths(text)
    assert names == ["configs/eval/benchmarks/t2i_compbench_{color,shape}.yaml", "slurm/*.sbatch",
                     "configs/eval/benchmarks/nope.yaml"]
    assert [path_exists(n) for n in names] == [True, True, False]
    assert path_exists("configs/eval/benchmarks/t2i_compbench_{color,nope}.yaml") is False


def test_link_checker_skips_urls_only() -> None:
    assert links("[a](https://x.org/y) [b](docs/x.md#z) [c](#here) [d](mailto:a@b)") == ["docs/x.md#z", "#here"]
