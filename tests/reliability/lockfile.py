"""`requirements.lock`: the exact versions of everything the CI environment installs (cotap with the
extras of the README's test command, and all their dependencies, as installed here), which `.ci/run`
audits with pip-audit.

    python -m tests.reliability.lockfile > requirements.lock     # refresh, in the CI venv

Unlike `pip freeze`, this follows the dependency metadata from cotap's extras, so tools installed
by hand into the same venv (playwright for the browser test, ...) stay out. Local version labels
are dropped (`torch==2.13.0+cpu` -> `torch==2.13.0`): the vulnerability databases know releases.
"""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
CI_EXTRAS = ("train", "serve", "export", "plot", "dev")  # the README's `pip install -e '.[...]'`


def project_requirements(extras: tuple[str, ...] = CI_EXTRAS) -> list[Requirement]:
    """cotap's dependencies plus those of `extras`, read from pyproject.toml (not from the installed
    metadata, which is as old as the last `pip install -e .`)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"])
    for extra in extras:
        texts += project["optional-dependencies"][extra]
    return [Requirement(t) for t in texts]


def closure(extras: tuple[str, ...] = CI_EXTRAS, missing: set[str] | None = None) -> dict[str, str]:
    """{canonical name: installed version} of cotap[extras]'s dependencies, followed recursively;
    requirements that apply here but are not installed are added to `missing`."""
    versions: dict[str, str] = {}
    done: set[tuple[str, str]] = set()  # (name, extra or "")
    todo = [(r.name, e) for r in project_requirements(extras) for e in ("", *r.extras)]
    while todo:
        name, extra = todo.pop()
        key = canonicalize_name(name)
        if (key, extra) in done:
            continue
        done.add((key, extra))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            if missing is not None:
                missing.add(key)
            continue
        versions[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            if req.marker is None and extra:
                continue  # unconditional requirements are followed once, with extra ""
            todo += [(req.name, e) for e in ("", *req.extras)]
    return versions


def lock_lines(versions: dict[str, str]) -> list[str]:
    return [f"{name}=={Version(v).public}" for name, v in sorted(versions.items())]


HEADER = """\
# The CI environment's exact dependency versions: cotap[{extras}] and everything they pull in.
# Audited by .ci/run (pip-audit). Refresh in the CI venv:
#   python -m tests.reliability.lockfile > requirements.lock
"""


if __name__ == "__main__":
    absent: set[str] = set()
    lines = lock_lines(closure(missing=absent))
    note = f"# Required but not installed where this was made (so not locked): {', '.join(sorted(absent))}\n"
    print(HEADER.format(extras=",".join(CI_EXTRAS)) + (note if absent else "") + "\n".join(lines))
