"""Shared fixtures: the real chest CT that slicerio ships, its ground truth, and one LiteMedSAM engine.

The engine is session-scoped so that slice embeddings (≈1.3 s each on 2 cores) are computed once per test run.

Two tiers. `make test-fast` runs the tests not marked ``slow``: pure logic, files the tests write, tiny random
models. `make test` runs every test. A test that loads LiteMedSAM or reads a real scan (the chest CT and its
ground truth, the MNI152 and pydicom CT cases) is ``slow``: asking for one of REAL_FIXTURES marks it so, any other
way needs @pytest.mark.slow, and a test that loads the real weights without the mark fails and says so.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import slicerio

DATA = Path(os.path.dirname(slicerio.__file__)) / "data"
CHEST_CT = DATA / "CTChest4.nrrd"
CHEST_SEG = DATA / "Segmentation.seg.nrrd"
LUNG_WINDOW = (-700.0, 600.0)  # level, width: lung parenchyma against everything brighter
# Engines built in tests run PyTorch unless they ask for another runtime: an ONNX export per randomly initialised
# test model would cost seconds each. The session's LiteMedSAM engines (below) ask for what users get by default.
os.environ.setdefault("SEGMOTE_RUNTIME", "torch")
USERS_RUNTIME = "auto"  # an engine's runtime when neither the user nor SEGMOTE_RUNTIME names one
# Exported graphs (and anything else SegMoTE caches) go to a temporary folder, not the user's cache.
_CACHE = tempfile.TemporaryDirectory(prefix="segmote-tests-cache-")
os.environ.setdefault("SEGMOTE_CACHE_DIR", _CACHE.name)

# Property-based tests draw the same examples on every run, so a result (red or green) reproduces on any machine;
# HYPOTHESIS_PROFILE=explore draws new ones each run, to look for more failing cases.
from hypothesis import settings  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

# Hypothesis keeps its files (examples, constants) in a temporary folder, not in the checkout's .hypothesis/.
_HYPOTHESIS_HOME = tempfile.TemporaryDirectory(prefix="segmote-tests-hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME.name)

settings.register_profile("reproducible", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))


REAL_FIXTURES = {"lite_engine", "lung_adapter_engine", "torch_engine", "cli_engine", "cli_lung_engine", "chest_ct",
                 "chest_truth"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if REAL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _real_weights_only_in_slow_tests(request, monkeypatch):
    """A test not marked slow that loads a backbone's real weights fails, naming the mark it lacks (so that
    `make test-fast` stays fast as tests are added)."""
    if request.node.get_closest_marker("slow") is None:
        from segmote_core import checkpoints

        found_weights = checkpoints.default_checkpoint

        def refuse(name):
            if found_weights(name) is not None:
                pytest.fail(f"{request.node.nodeid} loads the real {name} weights: mark it @pytest.mark.slow",
                            pytrace=False)
            return None

        monkeypatch.setattr(checkpoints, "default_checkpoint", refuse)
    yield


_torch_threads_at_start: list[int] = []  # torch's thread count before a test module lowered it


@pytest.fixture(scope="module")
def single_torch_thread():
    """For modules of tiny-model tests: on a 2-core machine two busy-waiting torch threads run small ops far
    slower than one."""
    import torch

    threads = torch.get_num_threads()
    if not _torch_threads_at_start:
        _torch_threads_at_start.append(threads)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def all_torch_threads():
    """Torch's own thread count inside, even in a single-thread module: for a session's engine (its exported
    runtimes take the count in force when it is built, and one first asked for in such a module would run on one
    core for the rest of the run) and for LiteMedSAM work inside such a module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(_torch_threads_at_start[0] if _torch_threads_at_start else threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def chest_ct():
    from segmote_core.volume import read_volume

    return read_volume(CHEST_CT)


@pytest.fixture(scope="session")
def chest_truth():
    """{segment name: bool (K, J, I) mask} of the shipped ground truth."""
    from segmote_core.segmentation_io import read_segments

    _, segments = read_segments(CHEST_SEG)
    return {s.name: s.mask for s in segments}


# The session engines' shared embedding cache: room for the chest CT under every normalisation the tests ask for
# (each embedded once), with the early features the adapter's engine needs.
SESSION_CACHE_BYTES = 3 << 30


@pytest.fixture(scope="session")
def lite_engine():
    """LiteMedSAM on the runtime users get by default (the fastest installed CPU runtime; tests/test_runtime.py
    checks its masks against PyTorch's)."""
    from segmote_core.engine import EmbeddingCache, Engine

    with all_torch_threads():
        return Engine("lite_medsam", device="cpu", runtime=USERS_RUNTIME,
                      embedding_cache=EmbeddingCache(SESSION_CACHE_BYTES, keep_early=True))


@pytest.fixture(scope="session")
def lung_adapter_engine(lite_engine):
    """LiteMedSAM with the shipped lung adapter loaded (an engine of its own: an adapter changes how prompts are
    answered, and the tests of the base model must not see it), on `lite_engine`'s backbone and embedding cache:
    a slice either engine embedded with the adapter's window (the lung_parenchyma preset's) serves both."""
    from segmote_core.engine import Engine
    from segmote_core.shipped import shipped_adapter

    with all_torch_threads():
        return Engine(backbone=lite_engine.backbone, device="cpu", adapter=shipped_adapter("chest_ct_lungs"),
                      runtime=USERS_RUNTIME, embedding_cache=lite_engine.cache)


@pytest.fixture(scope="session")
def torch_engine(lite_engine):
    """LiteMedSAM in PyTorch fp32, the reference the exported runtimes are checked against (same weights)."""
    from segmote_core.engine import Engine

    return Engine(backbone=lite_engine.backbone, device="cpu", runtime="torch")


def _shared_with_cli(engine, adapter):
    """Register `engine` as the CLI's in-process engine for LiteMedSAM on the CPU with `adapter` (as the command line
    names it), under the CLI's own key (``engine_key``), for no --runtime (what users get) and --runtime auto: a
    command then embeds nothing the session's engine has already embedded."""
    from segmote_core.cli import common

    keys = [common.engine_key("lite_medsam", None, "cpu", adapter, runtime=runtime) for runtime in (None, USERS_RUNTIME)]
    for key in keys:
        common._engines[key] = engine
    # Left registered after the test: the engine lives for the whole run anyway, and a later command that forgot
    # to ask for it finds it rather than loading the model again.
    yield engine


@pytest.fixture
def cli_engine(lite_engine):
    """`segmote ... --device cpu` in this process runs on the session's `lite_engine`."""
    yield from _shared_with_cli(lite_engine, None)


@pytest.fixture
def cli_lung_engine(lung_adapter_engine):
    """`segmote ... --adapter chest_ct_lungs --device cpu` in this process runs on `lung_adapter_engine`."""
    yield from _shared_with_cli(lung_adapter_engine, "chest_ct_lungs")


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `segmote ARGS` run in this process."""
    from segmote_core import cli

    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def bounding_box_ijk(mask: np.ndarray) -> list[int]:
    """(i0, j0, k0, i1, j1, k1) of a (K, J, I) mask: the box a user would drag around the object."""
    from segmote_core.toolbox import mask_extent

    k, j, i = mask_extent(mask)
    return [i.start, j.start, k.start, i.stop - 1, j.stop - 1, k.stop - 1]


def chest_ct_slab(chest_ct, k0: int, k1: int):
    """Axial slices k0 .. k1 - 1 of the chest CT as a volume of their own, where they lie in the whole scan: a
    real scan at a fraction of the cost, for tests of what surrounds the model (files, commands, processes)."""
    from segmote_core.volume import Volume

    origin = (chest_ct.ijk_to_lps @ [0, 0, k0, 1])[:3]
    return Volume(np.ascontiguousarray(chest_ct.array[k0:k1]), chest_ct.spacing, origin, chest_ct.direction)


@pytest.fixture(scope="session")
def exported_graphs(lite_engine, lung_adapter_engine) -> Path:
    """The tests' cache folder of exported graphs, holding what a fresh process on the default runtime exports
    first (LiteMedSAM's encoder and decoders, the shipped lung adapter's decoder); empty where no CPU runtime
    is installed."""
    folder = Path(os.environ["SEGMOTE_CACHE_DIR"]) / "exported"
    folder.mkdir(exist_ok=True)
    return folder
