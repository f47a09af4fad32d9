"""requirements.lock covers the CI environment and CI audits it with pip-audit."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.utils import canonicalize_name

from tests.reliability.lockfile import closure

ROOT = Path(__file__).resolve().parents[2]


def _locked() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([0-9][A-Za-z0-9.!+_-]*)", line)
        assert match, f"not a pinned requirement: {line!r}"
        out[canonicalize_name(match.group(1))] = match.group(2)
    return out


def test_lock_covers_the_ci_environment() -> None:
    locked = _locked()
    needed = closure()
    absent = sorted(set(needed) - set(locked))
    assert not absent, (
        f"requirements.lock lacks {absent}: python -m tests.reliability.lockfile > requirements.lock"
    )
    assert {"fastapi", "uvicorn", "pillow", "numpy", "safetensors", "torch"} <= set(locked)
    assert "+" not in locked["torch"]  # a public release the vulnerability databases know
    readme = (ROOT / "README.md").read_text()
    assert f"torch=={locked['torch']}" in readme  # the torch the README's test command installs


def test_ci_runs_pip_audit_on_the_lock() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip-audit -r requirements.lock" in ci and "--strict" in ci
    assert "--vulnerability-service osv" in ci and "--vulnerability-service pypi" in ci
    assert "SKIPPED" in ci  # says so when no database can be reached, never silently
