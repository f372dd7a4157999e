"""The docs the code cites exist: every `docs/<page>.md#<anchor>` in the code, specs and benchmarks names a page of
the site and a heading on it; the README stays one page and shows the report's current main table."""

import re
from pathlib import Path

from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[2]
CITATION = re.compile(r"docs/([a-z0-9-]+\.md)(?:#([a-z0-9-]+))?")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # no headings inside code blocks
    found = {slugify(h.strip(), "-") for h in re.findall(r"^#{1,6} (.+?)(?: \{#[^}]+\})?$", text, flags=re.MULTILINE)}
    return found | set(re.findall(r"\{#([a-z0-9-]+)\}", text))


def test_every_docs_citation_resolves():
    cited = []
    for folder in ("flowopd", "specs", "benchmarks", "stages"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                cited += [(path, page, anchor) for page, anchor in CITATION.findall(path.read_text())]
    assert cited, "no citation found: the pattern is wrong"
    broken = []
    for path, page, anchor in cited:
        target = ROOT / "docs" / page
        if not target.is_file():
            broken.append(f"{path.relative_to(ROOT)}: docs/{page} does not exist")
        elif anchor and anchor not in anchors(target):
            broken.append(f"{path.relative_to(ROOT)}: docs/{page} has no heading #{anchor}")
    assert not broken, "\n".join(broken)


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and "[" in line]


def test_the_readme_is_one_page_and_shows_the_current_main_table():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make repro" in readme and "make test" in readme
    main = table_rows((ROOT / "reports/main_table.md").read_text())
    assert main and all(row in readme for row in main), (
        "README.md's headline table differs from reports/main_table.md: copy the table's rows from it")
