"""The documentation: method tables equal the registry's, the README stays short, every relative
link resolves, and no private note leaks into the user docs."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from sharpbench.optim import registry

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
BEGIN, END = "<!-- methods:begin -->", "<!-- methods:end -->"
MAX_README_LINES = 260
FORBIDDEN = ("seed 00", "METHODS.md", "../shared")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def between_markers(path: Path, begin: str = BEGIN, end: str = END) -> str:
    text = path.read_text(encoding="utf-8")
    assert text.count(begin) == 1 and text.count(end) == 1, \
        f"{rel(path)}: expected one {begin} and one {end} line"
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")


@pytest.mark.parametrize("path", [README, DOCS / "methods.md"], ids=rel)
def test_method_table_is_the_registrys(path):
    assert between_markers(path) == registry.method_table(), (
        f"{rel(path)}: the method table differs from the registry's; paste the output of "
        f"`sharpbench methods --markdown` between the {BEGIN} and {END} lines")


@pytest.mark.parametrize("name,page", [("EvalConfig", "outputs.md"), ("AnalyzeConfig", "analysis.md")])
def test_command_key_tables_are_the_typed_configs(name, page):
    """The docs' key tables of eval and analyze are generated from their typed configs."""
    from sharpbench import command_configs
    from sharpbench.typed_config import markdown_table
    marker = name.removesuffix("Config").lower()
    begin, end = f"<!-- {marker}-keys:begin -->", f"<!-- {marker}-keys:end -->"
    assert between_markers(DOCS / page, begin, end) == markdown_table(getattr(command_configs, name)), (
        f"docs/{page}: the key table differs from {name}; paste the output of python -c "
        f"'from sharpbench.command_configs import {name}; from sharpbench.typed_config import "
        f"markdown_table; print(markdown_table({name}))' between the {begin} and {end} lines")


def test_configuration_key_tables_are_the_schemas():
    """docs/configuration.md's key tables are generated from the schema --help prints."""
    from sharpbench.schema import key_reference
    begin, end = "<!-- keys:begin -->", "<!-- keys:end -->"
    assert between_markers(DOCS / "configuration.md", begin, end) == key_reference(), (
        "docs/configuration.md: the key tables differ from the schema; paste the output of "
        "python -c 'from sharpbench.schema import key_reference; print(key_reference())' "
        f"between the {begin} and {end} lines")


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines (at most {MAX_README_LINES}); move details to docs/")


# ------------------------------------------------------------------------------------ links
FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`]*`")


def prose_lines(text: str):
    """Lines outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup removed, lower case, punctuation dropped (letters,
    digits, marks, `_` and `-` kept), spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # links keep their text
    text = text.replace("`", "").replace("*", "").lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path):
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            yield target


def test_slug_follows_github():
    assert slug("Fidelity: the paper's formula by default, the authors' code by a switch") == \
        "fidelity-the-papers-formula-by-default-the-authors-code-by-a-switch"
    assert slug("What A²SAM and X-SAM cost") == "what-a²sam-and-x-sam-cost"
    assert slug("BatchNorm (`optimizer.bn_policy`)") == "batchnorm-optimizerbn_policy"
    assert slug("5. A hand-written float64 reference test") == "5-a-hand-written-float64-reference-test"


@pytest.mark.parametrize("path", PAGES, ids=rel)
def test_relative_links_resolve(path):
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):   # https:, mailto: …
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
            continue
        if anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {rel(dest)}")
    assert not broken, f"{rel(path)}: broken links:\n" + "\n".join(broken)


def test_docs_carry_no_private_notes():
    files = [README, *(p for p in sorted(DOCS.rglob("*")) if p.is_file())]
    hits = []
    for path in files:
        data = path.read_bytes()
        for word in FORBIDDEN:
            if word.encode() in data:
                lines = [i for i, line in enumerate(data.splitlines(), 1) if word.encode() in line]
                hits.append(f"{rel(path)}: {word!r} on line(s) {lines}")
    assert not hits, "notes that do not belong in user docs:\n" + "\n".join(hits)


def test_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(README) if t.startswith("docs/")}
    missing = [rel(p) for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"
