"""The GPU paths of issue #6, on a real GPU: the CUDA engine agrees with the CPU one on the shipped chest CT, bf16
agrees with fp32 (automatic: Dice >= 0.99), the shipped adapter's automatic segmentation is the same on both devices, and SAM
ViT attention through SDPA equals segment-anything's own while holding no N x N matrix.

Skipped where CUDA is absent; `pytest -m cuda` (or benchmarks/gpu_check.sh) runs them on a machine with an NVIDIA
GPU. The CT is read with pynrrd, the reader slicerio itself uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CHEST_CT, CHEST_SEG, LUNG_WINDOW, bounding_box_ijk
from segmote_core.metrics import dice
from segmote_core.shipped import shipped_adapter

pytestmark = [pytest.mark.cuda, pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ADAPTER = shipped_adapter("chest_ct_lungs")


def read_nrrd_volume(path):
    import nrrd

    from segmote_core.toolbox import ras_lps
    from segmote_core.volume import Volume

    data, header = nrrd.read(str(path))  # (I, J, K)
    ijk_to_space = np.eye(4)
    ijk_to_space[:3, :3] = np.asarray(header["space directions"], float).T  # columns: the i, j, k steps
    ijk_to_space[:3, 3] = header["space origin"]
    ijk_to_ras = ras_lps(ijk_to_space) if header["space"].startswith("left-posterior") else ijk_to_space
    return Volume.from_ijk_to_ras(np.transpose(data, (2, 1, 0)), ijk_to_ras)


@pytest.fixture(scope="module")
def chest():
    from segmote_core.segmentation_io import read_segments

    _, segments = read_segments(CHEST_SEG)
    return read_nrrd_volume(CHEST_CT), {s.name: s.mask for s in segments}


@pytest.fixture(scope="module")
def engines():
    from segmote_core.engine import Engine

    return {"cpu": Engine("lite_medsam", device="cpu"), "cuda": Engine("lite_medsam", device="cuda"),
            "bf16": Engine("lite_medsam", device="cuda", precision="bf16")}


def test_cuda_and_bf16_agree_with_the_cpu_on_a_3d_box(chest, engines):
    volume, truth = chest
    for lung in ("right lung", "left lung"):
        box = bounding_box_ijk(truth[lung])
        masks = {name: engine.segment(volume, box_ijk=box, window=LUNG_WINDOW) for name, engine in engines.items()}
        scores = {name: dice(mask, masks["cpu"]) for name, mask in masks.items()}
        print(f"\n{lung}: Dice against the CPU fp32 mask {scores}; against the truth "
              f"{ {name: round(dice(mask, truth[lung]), 3) for name, mask in masks.items()} }")
        assert scores["cuda"] >= 0.999
        # bf16 embeddings differ from fp32 by up to ~8 % (TinyViT); following a 3-D box slice by slice amplifies that
        # where the object ends (H100, 2026-11-26: right lung 0.967, and 0.930 against the truth vs fp32's 0.911).
        # Automatic segmentation, slice by slice without following, agrees to 0.998 (next test).
        assert dice(masks["bf16"], masks["cuda"]) >= 0.95
        assert dice(masks["cuda"], truth[lung]) >= 0.9 and dice(masks["bf16"], truth[lung]) >= 0.9


def test_shipped_adapter_automatic_segmentation_is_the_same_on_the_gpu(chest, engines):
    volume, truth = chest
    found = {}
    for name in ("cpu", "cuda", "bf16"):
        engines[name].load_adapter(ADAPTER)
        try:
            found[name] = {s.name: s.mask for s in engines[name].auto(volume)}
        finally:
            engines[name].unload_adapter()
    for lung in ("right lung", "left lung"):
        print(f"\n{lung}: cuda vs cpu {dice(found['cuda'][lung], found['cpu'][lung]):.4f}, bf16 vs fp32 "
              f"{dice(found['bf16'][lung], found['cuda'][lung]):.4f}, cuda vs truth "
              f"{dice(found['cuda'][lung], truth[lung]):.3f}")
        assert dice(found["cuda"][lung], found["cpu"][lung]) >= 0.999
        assert dice(found["bf16"][lung], found["cuda"][lung]) >= 0.99


def test_sdpa_vit_b_attention_equals_segment_anythings_and_needs_less_memory():
    from segmote_core.models.backbones import BACKBONES, use_sdpa

    torch.manual_seed(0)
    vit = BACKBONES["sam_vit_b"].build().eval().cuda()
    with torch.no_grad():
        for name, param in vit.named_parameters():
            if "rel_pos" in name:  # zero at init; random so that the folded terms matter
                param.normal_(0, 0.02)
    x = torch.randn(2, 3, 1024, 1024, device="cuda")
    outputs, peaks = {}, {}
    for label, enabled in (("original", False), ("sdpa", True)):
        use_sdpa(vit.image_encoder, enabled)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            outputs[label] = vit.encode(x)[0].float()
        peaks[label] = torch.cuda.max_memory_allocated() / 2**20
    error = float((outputs["sdpa"] - outputs["original"]).abs().max() / outputs["original"].abs().max())
    print(f"\nViT-B, 2 slices: max relative difference {error:.2e}; peak memory {peaks}")
    assert error <= 1e-3  # TF32 may differ between the two kernels' matrix products
    assert peaks["sdpa"] < peaks["original"]


def test_pinned_copies_and_batching_give_the_same_embeddings_as_one_at_a_time(chest, engines):
    volume, _ = chest
    engine = engines["cuda"]
    prepared = engine.prepare(volume, window=LUNG_WINDOW)
    engine.cache.clear()
    batched = {i: embedding.clone() for i, (embedding, _) in engine.embeddings(prepared, range(8)).items()}
    engine.cache.clear()
    engine.batch_size, before = 1, engine.batch_size
    try:
        single = {i: engine.embeddings(prepared, [i])[i][0] for i in range(8)}
    finally:
        engine.batch_size = before
    assert sorted(batched) == sorted(single) == list(range(8))
    for i, b in single.items():
        a = batched[i]
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-3
