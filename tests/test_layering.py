"""Dependencies point one way (docs/architecture.md): read every module's imports with ``ast`` and check the layers.

- models know no files and no GUI: no volume, segmentation_io, files, CLI, SimpleITK or slicerio;
- nothing in segmote_core imports the Slicer module or Slicer's GUI toolkits (SegMoTESlicer, slicer, qt, ctk, vtk);
- the Slicer library (SegMoTESlicer/SegMoTESlicerLib) imports no qt or ctk and opens no slicer.util dialog: the
  module's widget asks the user, the library raises errors;
- library modules do not import the CLI (segmote_core.cli*); a module's ``main()``, its ``python -m`` entry point,
  may hand its arguments to it;
- segmote_core never imports the benchmarks.

Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "segmote_core"
SLICER_LIB = ROOT / "SegMoTESlicer" / "SegMoTESlicerLib"

# slicer.util functions that open a dialog (or a pop-up) and wait for the user.
SLICER_DIALOGS = {"confirmOkCancelDisplay", "confirmYesNoDisplay", "confirmRetryCloseDisplay", "errorDisplay",
                  "warningDisplay", "infoDisplay", "messageBox", "delayDisplay"}

# Known violations, each named with the reason it is still there. The test fails when one is fixed, so that the
# allowance goes with it.
ALLOWED: dict[str, tuple[str, str]] = {}  # none left: name -> (file, the dialog call it makes)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, int, str | None]]:
    """(imported module, line, enclosing top-level function or None) for every import in the file, relative ones
    resolved; ``from package import name`` also yields ``package.name`` (it may be a submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and function is None:
                inner = child.name
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                found.append((base, child.lineno, function))
                found.extend((f"{base}.{alias.name}", child.lineno, function) for alias in child.names)
            visit(child, inner)

    visit(tree, None)
    return found


def attribute_chains(path: Path) -> list[tuple[str, int]]:
    """Dotted names used in the file (``slicer.util.confirmOkCancelDisplay``), with their lines."""
    chains = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Attribute):
            parts, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                parts.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name):
                chains.append((".".join([value.id, *reversed(parts)]), node.lineno))
    return chains


def is_under(module: str, roots: set[str]) -> bool:
    return any(module == root or module.startswith(root + ".") for root in roots)


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_the_checker_resolves_relative_imports():
    """The rules below are only as good as the import reader: check it on the forms the project uses."""
    found = {(name, function) for name, _, function in imports(CORE / "training" / "loop.py")}
    assert ("segmote_core.training.objective", None) in found  # from .objective import ...
    assert ("segmote_core.checkpoints", "build_backbone") in found  # a lazy `from ..checkpoints import ...`
    assert ("segmote_core.errors.TrainingError", None) in found
    assert any(n.startswith("segmote_core.cli") and f == "main" for n, _, f in imports(CORE / "train.py"))


def test_models_know_no_files_and_no_gui():
    banned = {"segmote_core.volume", "segmote_core.segmentation_io", "segmote_core.files", "segmote_core.cli",
              "SimpleITK", "slicerio", "slicer", "qt", "vtk", "ctk"}
    bad = [f"{where(path, line)} imports {name}" for path in python_files(CORE / "models")
           for name, line, _ in imports(path) if is_under(name, banned)]
    assert bad == []


def test_segmote_core_never_imports_the_slicer_module_or_a_gui_toolkit():
    banned = {"SegMoTESlicer", "SegMoTESlicerLib", "slicer", "qt", "vtk", "ctk"}
    bad = [f"{where(path, line)} imports {name}" for path in python_files(CORE)
           for name, line, _ in imports(path) if is_under(name, banned)]
    assert bad == []


def test_the_slicer_library_imports_no_gui_toolkit_and_opens_no_dialog():
    allowed = set(ALLOWED.values())
    bad, used = [], set()
    for path in python_files(SLICER_LIB):
        relative = str(path.relative_to(ROOT))
        bad += [f"{where(path, line)} imports {name}" for name, line, _ in imports(path)
                if is_under(name, {"qt", "ctk"}) or name in {f"slicer.util.{d}" for d in SLICER_DIALOGS}]
        for chain, line in attribute_chains(path):
            if chain.startswith("slicer.util.") and chain.rpartition(".")[2] in SLICER_DIALOGS:
                if (relative, chain) in allowed:
                    used.add((relative, chain))
                else:
                    bad.append(f"{where(path, line)} opens a dialog: {chain}")
    assert bad == []
    fixed = [name for name, allowance in ALLOWED.items() if allowance not in used]
    assert fixed == [], f"fixed, remove the allowance: {fixed}"


def test_library_modules_do_not_import_the_cli():
    cli = {"segmote_core.cli"}
    is_cli = lambda path: module_name(path) == "segmote_core.cli" or module_name(path).startswith("segmote_core.cli.")  # noqa: E731
    bad = []
    for path in python_files(CORE) + python_files(SLICER_LIB):
        if is_cli(path) or path.name == "__main__.py":  # `python -m segmote_core` is the command line itself
            continue
        bad += [f"{where(path, line)} imports {name}" for name, line, function in imports(path)
                if is_under(name, cli) and function != "main"]  # main(): the module's `python -m` entry point
    assert bad == []


@pytest.mark.parametrize("folder", [CORE, SLICER_LIB], ids=["segmote_core", "SegMoTESlicerLib"])
def test_nothing_installed_imports_the_benchmarks(folder):
    bad = [f"{where(path, line)} imports {name}" for path in python_files(folder)
           for name, line, _ in imports(path) if is_under(name, {"benchmarks", "bench"})]
    assert bad == []
