"""Every console script's --help reads as plain, complete sentences with an example: no reST markup,
no sentence cut mid-way, parentheses closed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SCRIPTS = re.findall(r'"([\w-]+) = [\w.]+:\w+"', (ROOT / "setup.py").read_text())


def test_every_console_script_is_checked():
    assert len(SCRIPTS) >= 12 and "internvl-doctor" in SCRIPTS and "internvl_node" in SCRIPTS


def paragraphs(text: str) -> list[str]:
    """The prose of a help text: its paragraphs, without the usage, option and example blocks."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        first = block.strip().splitlines()[0] if block.strip() else ""
        if (
            not first
            or first.startswith(("usage:", "options:", "positional arguments:", "Example"))
            or block.startswith("  ")
        ):
            continue
        out.append(" ".join(line.strip() for line in block.strip().splitlines()))
    return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_plain_complete_sentences_with_an_example(script):
    run = subprocess.run([str(BIN / script), "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    # no reStructuredText
    assert "``" not in text and ":func:" not in text and ":class:" not in text, text
    assert "Example" in text, text
    prose = paragraphs(text)
    assert prose, text
    for paragraph in prose:
        assert paragraph.endswith((".", ":")), f"cut mid-way? {paragraph!r}"
    assert text.count("(") == text.count(")"), text
