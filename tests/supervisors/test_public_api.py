"""The shape of the public API (supervisors/__init__.py)."""

from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path

import supervisors

PACKAGE = Path(supervisors.__file__).resolve().parent
PRIVATE_MODULES = sorted(p.stem for p in PACKAGE.glob("_*.py") if p.stem != "__init__")


def test_all_lists_exactly_the_public_names_sorted() -> None:
    public = sorted(
        name for name in vars(supervisors) if not name.startswith("_") and name != "annotations"
    )
    assert supervisors.__all__ == sorted(supervisors.__all__)
    assert supervisors.__all__ == public


def test_every_private_module_declares_all_and_each_name_exists() -> None:
    for stem in PRIVATE_MODULES:
        module = importlib.import_module(f"supervisors.{stem}")
        assert hasattr(module, "__all__"), stem
        for name in module.__all__:
            assert hasattr(module, name), f"{stem}.{name}"


def test_every_export_comes_from_exactly_one_private_module() -> None:
    for name in supervisors.__all__:
        homes = [
            stem
            for stem in PRIVATE_MODULES
            if name in importlib.import_module(f"supervisors.{stem}").__all__
        ]
        assert len(homes) == 1, (name, homes)


def test_exported_classes_and_functions_say_they_come_from_supervisors() -> None:
    for name in supervisors.__all__:
        obj = getattr(supervisors, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == "supervisors", name


def test_every_export_is_documented() -> None:
    for name in supervisors.__all__:
        assert inspect.getdoc(getattr(supervisors, name)), name


def test_public_methods_of_the_supervisor_are_documented() -> None:
    for name in (
        "start",
        "start_child",
        "terminate_child",
        "restart_child",
        "delete_child",
        "which_children",
        "count_children",
        "tree",
    ):
        assert inspect.getdoc(getattr(supervisors.Supervisor, name)), name


def test_modules_stay_small() -> None:
    for path in PACKAGE.glob("*.py"):
        assert len(path.read_text().splitlines()) < 500, path.name


def test_package_ships_py_typed() -> None:
    assert (PACKAGE / "py.typed").is_file()


def test_library_logger_has_a_null_handler() -> None:
    handlers = logging.getLogger("supervisors").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)


def test_errors_form_one_family() -> None:
    for name in (
        "SupervisorConfigError",
        "ChildNotFoundError",
        "ChildStateError",
        "AlreadyRegisteredError",
        "NoProcError",
    ):
        assert issubclass(getattr(supervisors, name), supervisors.SupervisorError)
    assert issubclass(supervisors.SupervisorConfigError, ValueError)
    assert issubclass(supervisors.NoProcError, LookupError)
    # Control flow injected into actors must not be a BaseException: Pykka would stop
    # every actor in the process.
    assert issubclass(supervisors.ActorKilledError, Exception)
    assert issubclass(supervisors.ActorExit, Exception)
