"""Every ```python block in README.md and docs/*.md runs (so the examples stay true)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def examples():
    for page in PAGES:
        for i, code in enumerate(BLOCK.findall(page.read_text(encoding="utf-8"))):
            yield pytest.param(code, id=f"{page.relative_to(ROOT)}#{i}")


@pytest.mark.parametrize("code", list(examples()))
def test_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<example>", "exec"), {"__name__": "__example__"})


def test_every_mechanism_has_a_page_and_a_picture():
    import efficient_transformers as et
    for name in et.list_attention():
        assert (ROOT / "docs" / f"{name}.md").is_file(), name
        assert (ROOT / "docs" / "patterns" / f"{name}.png").is_file(), name


def test_mechanism_pages_are_those_the_code_writes(tmp_path):
    """docs/NAME.md as `efficient-transformers docs` writes it from the docstrings, options and
    the committed bench results: a docstring changed without regenerating the pages fails here."""
    from efficient_transformers.cli import main

    bench = ",".join(str(ROOT / "docs" / "bench" / f) for f in ("cpu.json", "cuda.json"))
    assert main(["docs", "--out", str(tmp_path), "--bench", bench, "--no-pictures"]) == 0
    written = sorted(tmp_path.glob("*.md"))
    assert written
    stale = [p.name for p in written
             if p.read_text(encoding="utf-8") != (ROOT / "docs" / p.name).read_text(encoding="utf-8")]
    assert not stale, (f"{stale} stale; regenerate: efficient-transformers docs "
                       f"--bench docs/bench/cpu.json,docs/bench/cuda.json --no-pictures")
