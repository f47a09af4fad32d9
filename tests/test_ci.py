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


def test_the_wheel_ships_its_type_hints_and_the_default_model(tmp_path: Path) -> None:
    """PEP 561: without `py.typed` in each subpackage of the `cotap` namespace, a user's mypy or IDE
    sees every `cotap.client` name as `Any` (the repo's own mypy goes through typings/ instead)."""
    import shutil
    import subprocess
    import sys
    import tomllib
    import zipfile

    # A copy of the sources: setuptools would reuse files left in the checkout's build/ folder.
    skip = shutil.ignore_patterns(".*", "build", "runs", "dist", "*.egg-info", "__pycache__", "typings")
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=skip)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", str(source), "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("cotap-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package in packages:
        assert f"{package.replace('.', '/')}/py.typed" in names, package
    assert "cotap/server/default_model/config.json" in names
    assert "cotap/server/default_model/onnx/model-fp32.onnx" in names
