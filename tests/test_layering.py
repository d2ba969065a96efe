"""Packages depend downwards only: htp_cli -> flows -> pipelines -> indexes, htp_embed.

Checked on the source (every import statement, including ones inside functions), so a cycle
cannot creep back in through a lazy import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["htp_embed", "indexes", "pipelines", "flows", "htp_cli"]
MAY_IMPORT = {
    "htp_embed": set(),
    "indexes": set(),
    "pipelines": {"htp_embed", "indexes"},
    "flows": {"htp_embed", "indexes", "pipelines"},
    "htp_cli": {"htp_embed", "indexes", "pipelines", "flows"},
}


def first_party_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_the_layers_below_it(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported - MAY_IMPORT[package] - {package})
        for path in files
        if (imported := first_party_imports(path)) - MAY_IMPORT[package] - {package}
    }
    assert wrong == {}, f"imports against the layering: {wrong}"


def test_every_package_says_what_it_is_for():
    for package in PACKAGES:
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "placeholder" not in doc.lower() and len(doc) > 60, package
