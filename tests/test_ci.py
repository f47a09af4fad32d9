"""The README's test command is what CI runs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    readme = ROOT / "README.md"
    lines = readme.read_text().splitlines()
    i = lines.index("<!-- test-command -->")
    assert lines[i + 1].startswith("```")
    command = lines[i + 2]
    assert "pip install -q torch==2.13.0" in command
    assert command.index("torch==2.13.0") < command.index("pip install -q -e")
    assert "python -m pytest" in command
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci and 'bash -c "set -euo pipefail; $test_command"' in ci
