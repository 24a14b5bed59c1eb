"""The paper builds from the files a micro reproduction generates (skipped where TeX is missing)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from studies.pipeline import reproduce

PAPER = Path(__file__).resolve().parents[1] / "paper" / "main.tex"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("latexmk") is None, reason="latexmk/TeX Live not installed (see README: make paper)")
def test_paper_builds_from_micro_outputs(micro_ctx, tmp_path):
    reproduce("micro", out=micro_ctx.out, paper=micro_ctx.paper, progress=False)
    build = tmp_path / "paper"
    shutil.copytree(micro_ctx.paper, build)
    shutil.copy(PAPER, build / "main.tex")
    run = subprocess.run(["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", "main.tex"], cwd=build,
                         capture_output=True, text=True, timeout=300)
    log = (build / "main.log").read_text(errors="replace") if (build / "main.log").exists() else run.stdout
    assert run.returncode == 0, log[-3000:]
    assert (build / "main.pdf").stat().st_size > 10_000
    wanted = re.findall(r"\\gen\{([a-z_]+)\}", PAPER.read_text())
    assert len(wanted) >= 19 and all((build / "tables" / f"{name}.tex").is_file() for name in wanted), \
        [name for name in wanted if not (build / "tables" / f"{name}.tex").is_file()]
    assert "Output written on main.pdf" in log


def test_numbers_are_written_without_exponents_where_they_fit():
    """fmt (every number in the generated paper): significant digits, separators, and never "1e+02" for 100."""
    from studies.common import fmt

    assert fmt(100.0, 2) == "100" and fmt(99.7, 2) == "100" and fmt(0.123456) == "0.123" and fmt(12345.6) == "12,346"
    assert fmt(2.5e-7) == "2.5e-07" and fmt(1234) == "1,234" and fmt(float("nan")) == "--" and fmt(4.07, 3) == "4.07"


STRAY_PERCENT = re.compile(r"(?<!\\)%\s*\S")


def _stray_percents(tables: Path) -> list[str]:
    """Lines of generated .tex with an unescaped % followed by text (it would comment out the rest of a caption or
    a row and break the build); comment lines and a % that ends a line (TeX's line-end idiom) are fine."""
    return [f"{path.name}: {line[:80]}" for path in sorted(tables.glob("*.tex"))
            for line in path.read_text().splitlines()
            if not line.lstrip().startswith("%") and STRAY_PERCENT.search(line)]


def test_committed_tables_have_no_stray_percent(tmp_path):
    (tmp_path / "t.tex").write_text("% comment\n\\resizebox{x}{!}{%\n\\caption{95 % intervals}\nok 95\\% here\n")
    assert _stray_percents(tmp_path) == ["t.tex: \\caption{95 % intervals}"]  # the check catches what broke the build
    assert _stray_percents(PAPER.parent / "tables") == []


@pytest.mark.slow
def test_generated_tables_have_no_stray_percent(micro_ctx):
    """Every table, caption and answer a micro reproduction writes (no TeX needed to check this)."""
    reproduce("micro", out=micro_ctx.out, paper=micro_ctx.paper, progress=False)
    assert _stray_percents(micro_ctx.paper / "tables") == []
