"""supervisors/ is a reusable library: it knows nothing of the application built on it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import supervisors

PACKAGE = Path(supervisors.__file__).resolve().parent
ALLOWED_THIRD_PARTY = {"pykka"}


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            modules.add(node.module)
    return modules


def _sources() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def test_no_supervisors_module_imports_erllama_py() -> None:
    for path in _sources():
        offending = {m for m in _imported_modules(path) if m.split(".")[0] == "erllama_py"}
        assert not offending, f"{path.name} imports {offending}"


def test_supervisors_depends_only_on_the_standard_library_and_pykka() -> None:
    for path in _sources():
        for module in _imported_modules(path):
            top = module.split(".")[0]
            assert top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY | {"supervisors"}, (
                f"{path.name} imports {module}"
            )


def test_importing_supervisors_loads_no_erllama_py_module() -> None:
    code = (
        "import sys, supervisors\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] == 'erllama_py']\n"
        "print(loaded)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_private_modules_import_each_other_not_the_package_facade() -> None:
    # The facade imports the private modules; a private module importing `supervisors`
    # itself would create a cycle.
    for path in _sources():
        if path.name != "__init__.py":
            assert "supervisors" not in _imported_modules(path), path.name
