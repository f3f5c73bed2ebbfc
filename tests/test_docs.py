"""The README and docs/ as a reader meets them: every relative link leads somewhere (a file that
exists, a heading that is there, by GitHub's anchor rules), the README stays a first ten minutes
(at most 200 lines, the run and test commands first, as CI runs them), every docs page is linked
from the README, and the README's layout names every module of the package."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RUN_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
    "accelerate launch --config_file launch_configs/auto.yaml -m trainer --epochs 10"
)
TEST_COMMAND = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && pytest'

FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
ATX = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = ("http://", "https://", "mailto:")


def markdown_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (code inside them is not Markdown)."""
    lines, fence = [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            lines.append(line)
    return lines


def code_blocks(text: str) -> list[str]:
    """The contents of the fenced code blocks, in order."""
    blocks, fence, current = [], None, []
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence, current = match.group(1)[0] * len(match.group(1)), []
        elif fence is not None and line.strip().startswith(fence):
            blocks.append("\n".join(current))
            fence = None
        elif fence is not None:
            current.append(line)
    return blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: inline markup dropped, lowercase, punctuation removed, each
    space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives the headings of a Markdown file (a repeated one gets -1, -2...)."""
    seen: dict[str, int] = {}
    found = set()
    lines = prose_lines(path.read_text(encoding="utf-8"))
    for i, line in enumerate(lines):
        match = ATX.match(line)
        if match:
            heading = match.group(2)
        elif i and lines[i - 1].strip() and re.fullmatch(r"\s{0,3}(=+|-+)\s*", line) and "|" not in lines[i - 1]:
            heading = lines[i - 1].strip()  # a setext heading: text underlined with === or ---
        else:
            continue
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    """The targets of the file's links and images, inline and reference definitions, code left out."""
    targets = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        definition = DEFINITION.match(line)
        if definition:
            targets.append(definition.group(1))
        targets += LINK.findall(INLINE_CODE.sub("", line))
    return targets


def broken_links(files: list[Path], root: Path) -> list[str]:
    """'file: target (why)' for each relative link that leads nowhere."""
    broken = []
    for path in files:
        for target in links(path):
            if target.startswith(EXTERNAL):
                continue
            where, _, anchor = unquote(target).partition("#")
            dest = (path.parent / where).resolve() if where else path
            name = f"{path.relative_to(root)}: {target}"
            if not dest.is_relative_to(root.resolve()):
                broken.append(f"{name} (outside the repository)")
            elif not dest.exists():
                broken.append(f"{name} (no such file)")
            elif anchor:
                page = dest / "README.md" if dest.is_dir() else dest
                if page.suffix != ".md" or not page.exists():
                    broken.append(f"{name} (an anchor into a file that is not Markdown)")
                elif anchor not in anchors(page):
                    broken.append(f"{name} (no heading with that anchor in {page.name})")
    return broken


def test_every_relative_link_resolves():
    files = markdown_files(REPO)
    assert len(files) >= 6 and sum(len(links(f)) for f in files) >= 30  # the parse finds the links
    assert broken_links(files, REPO) == []


def test_a_broken_link_is_found(tmp_path):
    """Negative control: a missing file, a missing heading and a link out of the tree are reported;
    good links, links in code and external links are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Exit codes: `128 + N`\n\n## Notes\n\n## Notes\n")
    (tmp_path / "README.md").write_text(
        "# Top\n\n"
        "[ok](docs/page.md) [ok](docs/page.md#a-page) [ok](docs/page.md#exit-codes-128--n) "
        "[ok](docs/page.md#notes-1) [ok](#top) [ok](https://example.com/x.md) `[code](nowhere.md)`\n\n"
        "```\n[in a block](nowhere.md)\n```\n\n"
        "[gone](docs/missing.md) [bad anchor](docs/page.md#no-such-heading) [out](../elsewhere.md)\n"
    )
    broken = broken_links(markdown_files(tmp_path), tmp_path)
    assert broken == [
        "README.md: docs/missing.md (no such file)",
        "README.md: docs/page.md#no-such-heading (no heading with that anchor in page.md)",
        "README.md: ../elsewhere.md (outside the repository)",
    ]


def test_anchors_follow_githubs_rules():
    assert slug("Checkpoints and resuming") == "checkpoints-and-resuming"
    assert slug("Evaluate, predict, plot") == "evaluate-predict-plot"
    assert slug("A traceback from `accelerate launch` after `trainer: error: ...`") == (
        "a-traceback-from-accelerate-launch-after-trainer-error-"
    )
    assert slug("The run_log of [a link](x.md)") == "the-run_log-of-a-link"


def test_the_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    blocks = code_blocks(text)
    assert blocks[:2] == [RUN_COMMAND, TEST_COMMAND]


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / unquote(t).partition("#")[0]).resolve() for t in links(README)}
    pages = sorted((REPO / "docs").rglob("*.md"))
    assert pages and [p.name for p in pages if p.resolve() not in linked] == []


def test_the_readme_layout_names_every_module():
    layout = next(b for b in code_blocks(README.read_text(encoding="utf-8")) if b.startswith("trainer/"))
    named = set(re.findall(r"\b(\w+\.py)\b", layout))
    modules = {p.name for p in (REPO / "trainer").glob("*.py")} - {"__init__.py", "__main__.py"}
    assert sorted(modules - named) == [], "modules the README's layout does not name"
    assert sorted(named - modules) == [], "the README's layout names modules that do not exist"
