"""The import rules of DESIGN.md, checked on the source, and the torch-free SDK checked at run time."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WINGS = {
    "core": "core",
    "training": "training",
    "export": "export",
    "server": "server",
    "clients": "client",
    "cli": "cli",
}
# folder -> cotap subpackages it may import
ALLOWED = {
    "core": set(),
    "training": {"core"},
    "export": {"training", "core"},
    "server": {"core", "training"},  # training only inside the torch backend (checked below)
    "clients": {"core"},
    "cli": {"core", "training", "export", "server", "client"},
}
THIRD_PARTY_FORBIDDEN = {
    "core": {"torch", "fastapi", "onnxruntime", "httpx"},
    "clients": {"torch", "fastapi", "onnxruntime", "starlette", "uvicorn"},
}


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append((node.module, node.lineno))
    return names


@pytest.mark.parametrize("folder", sorted(WINGS))
def test_wing_imports_follow_design(folder: str) -> None:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name, line in _imports(path):
            parts = name.split(".")
            if parts[0] == "cotap" and len(parts) > 1:
                target = parts[1]
                own = WINGS[folder]
                if target != own and target not in ALLOWED[folder]:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
                if folder == "server" and target == "training" and "backends" not in path.parts:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports training outside the torch backend")
            elif parts[0] in THIRD_PARTY_FORBIDDEN.get(folder, set()):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "import rules broken:\n" + "\n".join(bad)


def test_every_package_is_listed_in_pyproject() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = cfg["package-dir"]
    listed = set(cfg["packages"])
    found = set()
    for pkg, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([pkg, *rel.parts]))
    assert found == listed, (
        f"pyproject packages differ from the tree: missing {found - listed}, extra {listed - found}"
    )


def test_sdk_and_core_import_without_torch() -> None:
    code = (
        "import sys, cotap.core.bundle, cotap.core.images, cotap.cli.main\n"
        "import importlib.util\n"
        "if importlib.util.find_spec('cotap.client.client'): import cotap.client\n"
        "heavy = [m for m in ('torch', 'fastapi', 'onnxruntime') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"torch-free modules pulled in: {out}"
