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


def test_mypy_follows_the_cotap_imports() -> None:
    """The sources live in folders that setuptools maps to `cotap.*`; mypy cannot follow the
    editable install's import hook, so typings/cotap/ links each folder under its import name.
    Without it every `from cotap...` import is `Any` and mypy checks nothing across modules."""
    import tomllib

    mypy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert mypy["mypy_path"] == "typings"
    assert set(mypy["packages"]) == set(setuptools["package-dir"])
    for name, folder in setuptools["package-dir"].items():
        link = ROOT / "typings" / Path(*name.split("."))
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), name
    assert "\nmypy  #" in (ROOT / ".ci" / "run").read_text()  # no file arguments: the config's packages
