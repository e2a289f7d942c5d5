"""The Slicer module's files, checked without Slicer: .ui names, CMake lists, GUI-free logic, extension metadata.

SegMoTESlicer.py itself cannot be imported here (it needs Slicer's Qt application), so it is read as an AST; its
self-test body is executed headlessly against slicer-core's MRML with Qt-free stand-ins.
"""

from __future__ import annotations

import ast
import io
import json
import re
import struct
import subprocess
import sys
import threading
import types
import unittest
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "SegMoTESlicer"
SCRIPT = MODULE / "SegMoTESlicer.py"
UI_FILE = MODULE / "Resources" / "UI" / "SegMoTESlicer.ui"
LIB = MODULE / "SegMoTESlicerLib"
GUI_FREE = ["logic.py", "planning.py", "edits.py", "compute.py", "catalogue.py", "prompts.py", "segments.py",
            "worker.py", "dependencies.py", "__init__.py"]


def module_tree() -> ast.Module:
    return ast.parse(SCRIPT.read_text(encoding="utf-8"), filename=str(SCRIPT))


def cmake_list(text: str, variable: str, substitutions: dict[str, str]) -> list[str]:
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set"
    items = [line.split("#")[0].strip() for line in match.group(1).splitlines()]
    out = []
    for item in filter(None, items):
        for name, value in substitutions.items():
            item = item.replace("${" + name + "}", value)
        out.append(item)
    return out


def cmake_value(text: str, variable: str) -> str:
    match = re.search(rf'set\(\s*{variable}\s+"([^"]*)"\s*\)', text)
    assert match, f"{variable} not set"
    return match.group(1)


# ---- the panel ----------------------------------------------------------------------------------------------------
def test_ui_file_parses_and_has_every_widget_the_code_uses():
    root = ElementTree.parse(UI_FILE).getroot()
    names = {w.get("name") for w in root.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", SCRIPT.read_text(encoding="utf-8")))
    assert used, "the widget code looks up no .ui widgets"
    assert not used - names, f"missing in the .ui file: {sorted(used - names)}"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    classes = {w.get("class") for w in root.iter("widget")}
    qt_classes = {c for c in classes if c.startswith("Q")}
    assert not classes - qt_classes - declared, f"custom widgets not declared: {classes - qt_classes - declared}"


def test_ui_parameter_names_are_parameter_node_fields():
    root = ElementTree.parse(UI_FILE).getroot()
    bound = {p.findtext("string") for w in root.iter("widget") for p in w.findall("property")
             if p.get("name") == "SlicerParameterName"}
    wrapper = next(node for node in module_tree().body
                   if isinstance(node, ast.ClassDef) and node.name == "SegMoTESlicerParameterNode")
    assert any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in wrapper.decorator_list)
    fields = {item.target.id for item in wrapper.body if isinstance(item, ast.AnnAssign)}
    assert bound and bound <= fields, f"unknown parameter names in the .ui: {bound - fields}"


def test_module_script_parses_and_has_module_widget_logic_and_a_live_test():
    tree = module_tree()
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    bases = {name: {ast.unparse(b) for b in node.bases} for name, node in classes.items()}
    assert "ScriptedLoadableModule" in bases["SegMoTESlicer"]
    assert "ScriptedLoadableModuleWidget" in bases["SegMoTESlicerWidget"]
    assert "ScriptedLoadableModuleTest" in bases["SegMoTESlicerTest"]
    test = classes["SegMoTESlicerTest"]
    methods = {f.name: f for f in test.body if isinstance(f, ast.FunctionDef)}
    run = ast.unparse(methods["runTest"])
    tests = [name for name in methods if name.startswith("test_")]
    assert tests and all(f"self.{name}()" in run for name in tests), "runTest must run every test method"
    source = SCRIPT.read_text(encoding="utf-8")
    assert "testLogic = False" not in source and "skipTest" not in source
    # The panel never installs packages at import or in a constructor.
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef) and function.name in ("__init__", "setup"):
            assert "ensureDependencies" not in ast.unparse(function), function.name
    top_level = [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any("torch" in line or "segmote_core.engine" in line for line in top_level)


def test_shortcuts_shadow_no_slice_view_key_and_prompt_events_are_handled_gui_free():
    tree = module_tree()
    shortcuts = next(node for node in tree.body if isinstance(node, ast.Assign)
                     and any(isinstance(t, ast.Name) and t.id == "SHORTCUTS" for t in node.targets))
    keys = {pair.elts[0].value for pair in shortcuts.value.elts}
    assert {"P", "N", "Shift+B", "Esc", "Ctrl+Z"} <= keys
    # Keys Slicer's slice views use (vtkMRMLSliceIntersectionWidget); tests/test_slicer_panel.py checks each key is
    # bound once (the embedded Segment Editor's own keys are not installed).
    slice_view_keys = {"B", "F", "V", "R", "G", "T", "[", "]", "{", "}", "Left", "Right", "Up", "Down"}
    assert not keys & slice_view_keys, keys & slice_view_keys
    prompts = (LIB / "prompts.py").read_text(encoding="utf-8")
    for event in ("PointPositionDefinedEvent", "PointStartInteractionEvent", "PointEndInteractionEvent"):
        assert event in prompts
    source = SCRIPT.read_text(encoding="utf-8")
    assert "PointModifiedEvent" not in source  # the panel forwards to the PromptController
    assert "POLL_WAIT_S" in source  # the timer waits on jobs (releases the GIL), see test_slicer_worker_gil.py
    assert "GetWindow" not in source  # window/level is read by the Logic, from the display node


def test_supported_slicer_versions_are_stated_everywhere():
    dependencies = load_dependencies()
    minimum = dependencies.MINIMUM_SLICER
    for path in (ROOT / "README.md", ROOT / "docs" / "slicer.md"):
        assert f"Slicer {minimum}" in path.read_text(encoding="utf-8"), path.name
    assert f"Slicer {minimum}" in cmake_value((ROOT / "CMakeLists.txt").read_text(encoding="utf-8"),
                                              "EXTENSION_DESCRIPTION")


# ---- CMake ---------------------------------------------------------------------------------------------------------
def test_every_module_file_is_listed_in_cmake_and_every_listed_file_exists():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    name = re.search(r"set\(\s*MODULE_NAME\s+(\w+)\s*\)", text).group(1)
    assert name == "SegMoTESlicer"
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS", {"MODULE_NAME": name})
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES", {"MODULE_NAME": name})
    listed = set(scripts) | set(resources)
    on_disk = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.name != "CMakeLists.txt"
               and not p.name.endswith((".pyc", ".orig", ".rej", "~"))}
    assert listed == on_disk, f"not listed: {sorted(on_disk - listed)}; listed but missing: {sorted(listed - on_disk)}"
    assert all(s.endswith(".py") for s in scripts) and not any(r.endswith(".py") for r in resources)
    assert "WITH_GENERIC_TESTS" in text and "slicerMacroBuildScriptedModule" in text


def cmake_glob(pattern: str, recursive: bool) -> list[str]:
    """What CMake's file(GLOB[_RECURSE] ... RELATIVE <source dir>) gives for a pattern below the checkout."""
    folder, _, name = pattern.rpartition("/")
    found = (ROOT / folder).rglob(name) if recursive else (ROOT / folder).glob(name)
    return sorted(p.relative_to(ROOT).as_posix() for p in found if p.is_file())


def extension_install_list() -> set[str]:
    """Every file the built extension installs, read from the CMake rules (paths relative to the checkout)."""
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    variables = {}
    for kind, variable, pattern in re.findall(
            r"file\((GLOB_RECURSE|GLOB)\s+(\w+)\s+RELATIVE\s+\$\{CMAKE_CURRENT_SOURCE_DIR\}\s+CONFIGURE_DEPENDS\s+"
            r"\$\{CMAKE_CURRENT_SOURCE_DIR\}/(\S+)\)", top):
        variables[variable] = cmake_glob(pattern, kind == "GLOB_RECURSE")
    call = re.search(r"ctkMacroCompilePythonScript\((.*?)\n  \)", top, re.S).group(1)
    scripts = re.search(r'SCRIPTS\s+"\$\{(\w+)\}"', call).group(1)
    resources = re.search(r'RESOURCES\s+"\$\{(\w+)\}"', call).group(1)
    listed = set(variables[scripts])
    for item in cmake_list(top, resources, {}):
        listed |= set(variables[item[2:-1]]) if item.startswith("${") else {item}
    module = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    for variable in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        listed |= {f"SegMoTESlicer/{item}" for item in cmake_list(module, variable, {"MODULE_NAME": "SegMoTESlicer"})}
    return listed


def test_the_built_extension_carries_every_module_file_the_engine_and_the_shipped_adapters():
    installed = extension_install_list()
    assert all((ROOT / path).is_file() for path in installed), sorted(p for p in installed if not (ROOT / p).is_file())
    module_files = {p.relative_to(ROOT).as_posix() for p in MODULE.rglob("*") if p.is_file()
                    and "__pycache__" not in p.parts and p.name != "CMakeLists.txt"}
    engine_files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "segmote_core").rglob("*") if p.is_file()
                    and "__pycache__" not in p.parts and not p.name.endswith(".pyc")}
    assert not module_files - installed, sorted(module_files - installed)
    assert not engine_files - installed, sorted(engine_files - installed)
    adapters = {p for p in installed if p.startswith("segmote_core/data/adapters/")}
    assert "segmote_core/data/adapters/chest_ct_lungs.safetensors" in adapters


def test_extension_urls_name_one_repository_and_no_placeholder():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    entry = json.loads((ROOT / "resources" / "SegMoTE.json").read_text(encoding="utf-8"))
    repository = entry["scm_url"].removesuffix(".git").removeprefix("https://github.com/")
    assert "placeholder" not in text.lower()
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in cmake_value(text, variable).split():
            assert f"/{repository}/" in url, (variable, url)
    name = repository.split("/")[1]
    guide = (ROOT / "docs" / "slicer.md").read_text(encoding="utf-8")
    assert name.startswith("Slicer") or "does not start with \"Slicer\"" in guide  # the stated exception
    assert "3d-slicer-extension" in guide


def test_extension_cmake_metadata_and_engine_packaging():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL"):
        assert cmake_value(text, variable), variable
    assert cmake_value(text, "EXTENSION_CATEGORY") == "Segmentation"
    assert cmake_value(text, "EXTENSION_DEPENDS") == "PyTorch"
    icon = cmake_value(text, "EXTENSION_ICONURL").split("/main/", 1)[1]
    assert (ROOT / icon).is_file(), icon
    assert "add_subdirectory(SegMoTESlicer)" in text
    assert re.search(r"GLOB_RECURSE\s+SEGMOTE_CORE_SCRIPTS.*segmote_core/\*\.py", text, re.S)
    assert "Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR" in text
    assert "Slicer_EXTENSION_GENERATE_CONFIG" in text and "Slicer_EXTENSION_CPACK" in text


def test_extensions_index_entry_matches_the_cmake_metadata():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    project = re.search(r"^project\((\w+)\)", text, re.M).group(1)
    entries = sorted(p.name for p in (ROOT / "resources").glob("*.json"))
    assert entries == [f"{project}.json"], "the index entry's file name must be the CMake project name"
    entry = json.loads((ROOT / "resources" / f"{project}.json").read_text(encoding="utf-8"))
    screenshots = cmake_value(text, "EXTENSION_SCREENSHOTURLS").split()
    assert screenshots and all((ROOT / url.split("/main/", 1)[1]).is_file() for url in screenshots)
    description = cmake_value(text, "EXTENSION_DESCRIPTION")
    assert 10 <= len(description.split()) and not description.lower().startswith("this extension")
    assert "slicer-extension-catalog-entry-schema" in entry["$schema"]
    assert entry["category"] == cmake_value(text, "EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == cmake_value(text, "EXTENSION_DEPENDS").split()
    assert entry["scm_url"].startswith("https://") and entry["build_subdirectory"] == "."
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision", "scm_type",
               "scm_url", "tier"}
    assert set(entry) <= allowed  # the schema has additionalProperties: false


def test_icon_is_a_128_pixel_png():
    data = (MODULE / "Resources" / "Icons" / "SegMoTESlicer.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


# ---- the Logic stays GUI-free ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GUI_FREE)
def test_lib_modules_import_no_gui(name):
    tree = ast.parse((LIB / name).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            modules = []
        for module in modules:
            top = module.split(".")[0]
            assert top not in ("qt", "ctk", "PythonQt", "PyQt5", "PySide2", "PySide6"), f"{name} imports {module}"
            assert "ScriptedLoadableModule" not in module, f"{name} imports {module}"
        if isinstance(node, ast.Attribute) and node.attr in ("app", "mrmlScene", "modules"):
            assert ast.unparse(node.value) != "slicer", f"{name} uses slicer.{node.attr}"


def test_importing_the_logic_loads_no_torch():
    code = ("import sys; sys.path.insert(0, %r); import SegMoTESlicerLib.logic, SegMoTESlicerLib.dependencies, "
            "SegMoTESlicerLib.catalogue, SegMoTESlicerLib.planning, SegMoTESlicerLib.edits, SegMoTESlicerLib.compute; "
            "bad = [m for m in ('torch', 'segmote_core.engine', 'qt', 'ctk') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)" % str(MODULE))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the catalogue the panel reads ------------------------------------------------------------------------------
def test_the_catalogue_reads_segmote_cores_tables(monkeypatch):
    sys.path.insert(0, str(MODULE))
    from SegMoTESlicerLib import catalogue
    from segmote_core import weights
    from segmote_core.colors import PALETTE

    assert list(catalogue.MODELS)[0] == catalogue.SHIPPED_MODEL and set(catalogue.MODELS) == set(weights.KNOWN_WEIGHTS)
    assert catalogue.MODELS["sam_vit_b"] == "SAM ViT-B (375 MB download)"
    assert catalogue.MODELS["sam_vit_h"] == "SAM ViT-H (2.6 GB download)"
    assert catalogue.MODELS["lite_medsam"] == "LiteMedSAM (fast, works offline)"
    assert catalogue.weightsAvailable("lite_medsam") and not catalogue.needsDownload("lite_medsam")
    bigger = weights.WeightsInfo("sam_vit_b", "https://example.org/b.pth", "b.pth", "0" * 64, 2_000_000_000)
    monkeypatch.setitem(weights.KNOWN_WEIGHTS, "sam_vit_b", bigger)
    assert catalogue.modelLabel("sam_vit_b") == "SAM ViT-B (2.0 GB download)"  # the size segmote_core pins
    assert [catalogue.segmentColor(i) for i in range(len(PALETTE) + 1)] == [*PALETTE, PALETTE[0]]


# ---- first-use dependencies ----------------------------------------------------------------------------------
def load_dependencies():
    sys.path.insert(0, str(MODULE))
    from SegMoTESlicerLib import dependencies

    return dependencies


def test_dependencies_are_complete_here_and_skip_what_slicer_bundles():
    dependencies = load_dependencies()
    assert dependencies.missingPackages() == [] and not dependencies.torchMissing()
    for bundled in ("SimpleITK", "numpy", "requests", "torch"):
        assert bundled in dependencies.BUNDLED
    assert not any(req.split(">")[0].split("=")[0].lower() in {b.lower() for b in dependencies.BUNDLED}
                   for _, req in dependencies.REQUIREMENTS)


def test_install_asks_once_then_uses_pytorch_utils_and_pip(monkeypatch):
    dependencies = load_dependencies()
    asked, torch_calls, installed = [], [], []
    monkeypatch.setattr(dependencies, "torchMissing", lambda: not torch_calls)
    monkeypatch.setattr(dependencies, "missingPackages", lambda: [] if installed else ["segment-anything>=1.0"])
    fake_utils = types.ModuleType("PyTorchUtils")

    class FakeTorchLogic:
        def installTorch(self, **kwargs):
            torch_calls.append(kwargs)
            return object()

    fake_utils.PyTorchUtilsLogic = FakeTorchLogic
    monkeypatch.setitem(sys.modules, "PyTorchUtils", fake_utils)
    monkeypatch.setattr(dependencies, "_installPackages",
                        lambda requirements, progress=None, cancelled=None, idle=None: installed.append(requirements))

    assert dependencies.ensureDependencies(confirm=lambda packages: asked.append(packages) or True) is True
    assert len(asked) == 1 and "PyTorch" in asked[0][0] and asked[0][1:] == ["segment-anything>=1.0"]
    assert torch_calls and torch_calls[0]["askConfirmation"] is False
    assert installed == [["segment-anything>=1.0"]]


def test_install_declined_installs_nothing_and_worker_threads_are_refused(monkeypatch):
    dependencies = load_dependencies()
    monkeypatch.setattr(dependencies, "torchMissing", lambda: True)
    monkeypatch.setattr(dependencies, "_installTorch", lambda: pytest.fail("installed after a No"))
    assert dependencies.ensureDependencies(confirm=lambda packages: False) is False
    errors = []
    thread = threading.Thread(target=lambda: errors.append(_raises(dependencies.ensureDependencies)))
    thread.start()
    thread.join()
    assert errors == ["dependencies can only be installed from the main thread"]


def _raises(function):
    try:
        function()
    except Exception as error:  # noqa: BLE001
        return str(error)
    return None


# ---- the module's own Slicer self-test, run headless ------------------------------------------------------------
def test_module_self_test_body_passes_on_headless_mrml(lite_engine, monkeypatch):
    """SegMoTESlicerTest.test_PromptsOnASyntheticVolume, executed on slicer-core's MRML (no app, no installs).

    slicer.mrmlScene is a fresh scene, ensureDependencies a no-op (everything is installed here) and the Logic
    reuses the session's engine; the test's own code runs unchanged."""
    slicer = pytest.importorskip("slicer")
    sys.path.insert(0, str(MODULE))
    from SegMoTESlicerLib import dependencies, logic as logic_module
    from segmote_core.errors import SegMoTEError

    scene = slicer.vtkMRMLScene()
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(dependencies, "ensureDependencies", lambda *a, **k: pytest.fail("the self-test installed"))

    class SharedEngineLogic(logic_module.SegMoTESlicerLogic):
        def __init__(self):
            super().__init__(engine=lite_engine)

        def setDevice(self, device):  # keep the shared CPU engine
            pass

    test_class = next(n for n in module_tree().body if isinstance(n, ast.ClassDef) and n.name == "SegMoTESlicerTest")
    method = next(f for f in test_class.body if isinstance(f, ast.FunctionDef)
                  and f.name == "test_PromptsOnASyntheticVolume")
    namespace = {"slicer": slicer, "dependencies": dependencies, "SegMoTESlicerLogic": SharedEngineLogic,
                 "SegMoTEError": SegMoTEError, "modelTestsRunnable": lambda: True}
    exec(compile(ast.Module(body=[method], type_ignores=[]), str(SCRIPT), "exec"), namespace)

    class Headless(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    Headless.test_PromptsOnASyntheticVolume = namespace["test_PromptsOnASyntheticVolume"]
    result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(
        Headless("test_PromptsOnASyntheticVolume"))
    segmentations_logic.SetMRMLScene(None)
    assert result.wasSuccessful(), (result.failures + result.errors)[0][1]
