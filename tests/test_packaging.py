"""The wheel works on its own: shipped adapters are package data, the base install is lean, the metadata is right."""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from segmote_core.shipped import shipped_adapter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the files git would ship: setuptools writes build/ and *.egg-info beside the sources it
    # builds, and the checkout stays as the developer left it.
    source = tmp_path_factory.mktemp("source") / "segmote"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                ".pytest_cache", ".hypothesis", "segmote-demo",
                                                                "runs", ".whl", ".gl"))
    # No build isolation: the project's own build requirement (setuptools >= 77) is in the test environment.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, text=True)
    [built] = out.glob("segmote-*.whl")
    return built


def test_wheel_carries_the_shipped_adapter_bit_for_bit(wheel):
    with zipfile.ZipFile(wheel) as archive:
        packed = archive.read("segmote_core/data/adapters/chest_ct_lungs.safetensors")
    assert packed == shipped_adapter("chest_ct_lungs").read_bytes()


def test_wheel_metadata_licence_and_lean_base_install(wheel):
    with zipfile.ZipFile(wheel) as archive:
        [metadata_name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode())
    assert metadata["License-Expression"] == "Apache-2.0"
    requires = metadata.get_all("Requires-Dist")
    base = [r for r in requires if "extra ==" not in r]
    assert not any(r.startswith(("monai", "matplotlib", "onnx", "openvino", "pytest")) for r in base), base
    assert any(r.startswith("monai") and 'extra == "eval"' in r for r in requires)
    assert any(r.startswith("matplotlib") and 'extra == "demo"' in r for r in requires)


def test_installed_wheel_finds_its_adapter_by_name_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    code = ("import segmote_core.shipped as s, segmote_core.adapters as a; "
            "print(s.shipped_adapter('chest_ct_lungs')); print(a.read_adapter_header('chest_ct_lungs')['classes'])")
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            check=True)
    path, classes = result.stdout.splitlines()
    assert Path(path).is_relative_to(target), path  # the installed copy, not the checkout
    assert "right lung" in classes and "left lung" in classes
