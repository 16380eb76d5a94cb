"""The docs describe the software: the README stays a short door, no page speaks about how the
work was done, every `docs/<page>.md §N` citation names a section that exists, and every
repository path a page names in backticks exists."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CODE = [p for folder in ("dmpo_jax", "launch", "benchmarks", "configs", "tests")
        for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".sh", ".md")]
PROCESS_WORDS = re.compile(
    r"\bissue \d+|\b(?:this|that|the|previous|next) session\b|\bwas (not )?lent\b|\bround \d\b|the issue's|\bTODO\b|"
    r"\bhelper agents?\b|no GPU was|\.\./shared|jax_patterns\.md", re.IGNORECASE)
CITATION = re.compile(r"(?:docs/)?([a-z_]+\.md) §(\d+(?:\.\d+)*)")
PATH = re.compile(r"`((?:dmpo_jax|launch|benchmarks|configs|tests)/[\w/.-]+\.(?:py|sh|md))`")


def _sections(page: pathlib.Path) -> set[str]:
  return {m.group(1) for m in re.finditer(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", page.read_text(),
                                          re.MULTILINE)}


def test_readme_is_a_short_door():
  lines = (REPO / "README.md").read_text().splitlines()
  assert len(lines) <= 250, f"README.md has {len(lines)} lines (at most 250)"


def test_no_page_speaks_about_how_the_work_was_done():
  hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}"
          for p in PAGES + CODE for i, line in enumerate(p.read_text().splitlines(), 1)
          if PROCESS_WORDS.search(line) and p.name != "test_docs.py"]
  assert not hits, "\n".join(hits)


def test_every_section_citation_exists():
  sections = {p.name: _sections(p) for p in PAGES if p.parent.name == "docs"}
  missing = []
  for p in PAGES + CODE:
    for i, line in enumerate(p.read_text().splitlines(), 1):
      for page, section in CITATION.findall(line):
        if page in sections and section not in sections[page]:
          missing.append(f"{p.relative_to(REPO)}:{i}: {page} §{section}")
        elif page not in sections and page != "README.md":
          missing.append(f"{p.relative_to(REPO)}:{i}: no page docs/{page}")
  assert not missing, "\n".join(missing)


def test_every_path_a_page_names_exists():
  missing = [f"{p.relative_to(REPO)}: {path}" for p in PAGES
             for path in PATH.findall(p.read_text()) if not (REPO / path).exists()]
  assert not missing, "\n".join(missing)
