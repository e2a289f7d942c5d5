"""Conventions every `segmote` command follows: --version, -v/-q, help on every option, a clean stderr."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CHEST_CT, chest_ct_slab
from segmote_core import __version__, cli

ROOT = Path(__file__).resolve().parents[1]


def segmote_process(*args: str, cwd, users_runtime: bool = False) -> subprocess.CompletedProcess:
    """`python -m segmote_core ARGS` in a fresh interpreter; users_runtime: without the tests' SEGMOTE_RUNTIME, on
    the runtime users get."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if users_runtime:
        env.pop("SEGMOTE_RUNTIME", None)
    # The CLI writes UTF-8 ("≈", "→"); read it as such whatever locale this process was left in (a test run in
    # another order had switched the test process to the C locale, and decoding the child's output failed).
    return subprocess.run([sys.executable, "-m", "segmote_core", *args], cwd=cwd, env=env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300)


def all_parsers(parser: argparse.ArgumentParser, path=("segmote",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, (*path, name))


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"segmote {__version__}"


def test_every_option_of_every_command_has_help():
    parser = cli.build_parser(None)
    missing = []
    for path, sub in all_parsers(parser):
        if path[1:2] and path[1] in cli.LAZY_COMMANDS:
            continue  # their parsers live in their own modules for now
        for action in sub._actions:
            if action.option_strings and not action.help:
                missing.append(f"{' '.join(path)} {action.option_strings[0]}")
            if not action.option_strings and not isinstance(action, argparse._SubParsersAction) and not action.help:
                missing.append(f"{' '.join(path)} {action.dest}")
    assert missing == []


@pytest.mark.parametrize("argv", [["-q", "weights", "list"], ["weights", "list", "-q"], ["--quiet", "eval", "--pred",
                                                                                           "a", "--gt", "b"]])
def test_quiet_is_taken_before_or_after_the_command(argv):
    command = next(word for word in argv if not word.startswith("-"))  # as main() finds it
    args = cli.build_parser(command).parse_args(argv)
    assert args.quiet is True and args.verbose is False


def test_verbose_and_quiet_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["weights", "list", "-v", "-q"])
    assert done.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_usage_and_user_errors_have_their_own_exit_codes(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["segment", "--no-such-option"])
    assert done.value.code == 2
    for missing_or_twice in ([], ["image.nrrd", "-i", "image.nrrd"]):
        with pytest.raises(SystemExit) as done:
            cli.main(["segment", *missing_or_twice, "-o", str(tmp_path / "o.seg.nrrd"), "--box-ijk", *"123456"])
        assert done.value.code == 2
        assert "IMAGE or -i/--input" in capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(["eval", "--pred", str(tmp_path / "none.seg.nrrd"), "--gt", str(tmp_path / "none.seg.nrrd")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_segment_writes_no_dependency_warnings(tmp_path, chest_ct, exported_graphs):
    """A real run in a fresh interpreter on what users get (the LiteMedSAM import path, the default runtime, its
    graphs already exported as after a first run), on three slices of the chest CT: nothing on stderr but what the
    tool itself has to say. (That -q then prints nothing at all: tests/test_offline.py, in its fresh process.)"""
    import SimpleITK as sitk

    scan = tmp_path / "slab.nrrd"
    sitk.WriteImage(chest_ct_slab(chest_ct, 16, 19).to_sitk(), str(scan))
    out = tmp_path / "out.seg.nrrd"
    done = segmote_process("segment", str(scan), "--out", str(out), "--box-ijk", "20", "30", "1", "60", "90", "1",
                           "--device", "cpu", cwd=tmp_path, users_runtime=True)
    assert done.returncode == 0, done.stderr
    assert out.is_file()
    noisy = [line for line in done.stderr.splitlines() if "Warning" in line or line.startswith("warning")]
    assert noisy == []
    assert "segment:" in done.stdout and "ml" in done.stdout


def test_python_dash_m_segmote_core_is_the_cli(tmp_path):
    done = segmote_process("--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"segmote {__version__}"


def test_verbose_shows_what_each_case_runs_on(tmp_path, capsys, cli_engine):
    prompt = ["--box-ijk", "20", "30", "17", "60", "90", "17", "--device", "cpu"]
    assert cli.main(["-v", "segment", str(CHEST_CT), "--out", str(tmp_path / "v.seg.nrrd"), *prompt]) == 0
    verbose = capsys.readouterr().err
    assert "CTChest4: " in verbose and "128x128x34 voxels" in verbose and "lite_medsam on cpu" in verbose
    assert cli.main(["segment", str(CHEST_CT), "--out", str(tmp_path / "n.seg.nrrd"), *prompt]) == 0
    assert "128x128x34 voxels" not in capsys.readouterr().err
