"""The README is tested: its Python block runs, every relative link of the README and of docs/*.md points to a
file that exists (and an ``#anchor`` to a heading of that file), every docs page is linked from the README, and
``.ci/run`` runs exactly the README's test command."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
CI = ROOT / ".ci" / "run"

TEST_COMMAND = 'python -m pip install -e ".[dev]" && python -m pytest -q'
MAIN_COMMAND = 'python -m pip install -e ".[digits]" && relu2dlgn run'
# Links that leave the repository: only these, checked where the workspace around the clone has them.
OUTSIDE = {"../shared/DUALITY.md"}

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(CODE_SPAN.sub("", line))
    return out


def fenced_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}[ \t]*\n(.*?)^```", text, re.M | re.S)


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text, lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)      # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)                              # inline HTML tags
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)                             # \w keeps letters, digits, _ (Unicode too)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[str]:
    return [m.group(1) for line in prose_lines(path.read_text(encoding="utf-8")) for m in LINK.finditer(line)]


def test_slug_rules():
    assert github_slug("The main command: `relu2dlgn run`") == "the-main-command-relu2dlgn-run"
    assert github_slug("Set-up (two commands)") == "set-up-two-commands"
    assert github_slug("The papers' experiments") == "the-papers-experiments"
    assert github_slug("Files, resume, failures") == "files-resume-failures"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(page: Path):
    problems = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):             # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        inside = dest == ROOT or ROOT in dest.parents
        if not inside:
            if file_part not in OUTSIDE or page != README:
                problems.append(f"{target}: leaves the repository")
            elif dest.parent.is_dir() and not dest.exists():
                problems.append(f"{target}: no such file")
            continue
        if not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            problems.append(f"{target}: no heading with anchor #{anchor} in {os.path.relpath(dest, ROOT)}")
    assert not problems, f"{os.path.relpath(page, ROOT)}: " + "; ".join(problems)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README) if t.partition("#")[0]}
    assert DOCS and not [p.name for p in DOCS if p.resolve() not in linked]


def test_link_checker_catches_broken_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [bad](#nope) [gone](missing.md) `[code](missing.md)`\n"
                    "```\n[fenced](missing.md)\n```\n")
    assert links(page) == ["#title", "#nope", "missing.md"]
    assert anchors(page) == {"title"}


def test_readme_commands_and_ci_agree():
    bash = "\n".join(fenced_blocks(README.read_text(encoding="utf-8"), "bash"))
    commands = [line.strip() for line in bash.splitlines() if line.strip() and not line.startswith("#")]
    assert MAIN_COMMAND in commands and TEST_COMMAND in commands
    readme_test = [c for c in commands if "pytest" in c]
    assert readme_test == [TEST_COMMAND]
    ci = [line.strip() for line in CI.read_text(encoding="utf-8").splitlines()
          if "pytest" in line and not line.lstrip().startswith("#")]
    assert ci == readme_test, f".ci/run runs {ci}, the README says {readme_test}"


def test_readme_benchmark_table_is_replaceable():
    text = README.read_text(encoding="utf-8")
    assert "\n## Benchmarks\n" in text
    section = text.split("\n## Benchmarks\n", 1)[1].split("\n## ", 1)[0]
    assert section.count("<!-- benchmarks:begin -->") == 1 and section.count("<!-- benchmarks:end -->") == 1
    table = section.split("<!-- benchmarks:begin -->")[1].split("<!-- benchmarks:end -->")[0]
    rows = [line for line in table.strip().splitlines() if line.startswith("|")]
    assert len(rows) >= 3 and rows[1].startswith("|---")     # header, rule, at least one row


def test_figure_script_draws(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_figure", ROOT / "docs" / "make_figure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(str(tmp_path / "dlgn.png"))
    assert Path(out).stat().st_size > 10_000
    assert (ROOT / "docs" / "images" / "dlgn.png").exists()


def test_readme_python_block_runs(tmp_path, monkeypatch):
    """Every ```python block of the README, in order, in one namespace, in a scratch directory."""
    blocks = fenced_blocks(README.read_text(encoding="utf-8"), "python")
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert written, "the README's Python block wrote nothing"
