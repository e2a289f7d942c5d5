"""Engine fast paths from issue #6: a given backbone, streaming automatic segmentation, background prefetch,
and adapters whose safetensors header length happens to start with byte 0x80."""

import numpy as np
import pytest
import torch

from segmote_core.adapters import load_adapter, save_adapter
from segmote_core.engine import Engine
from segmote_core.models.backbones import build_tiny_sam_vit
from segmote_core.models.segmote import SegMoTE
from segmote_core.volume import Volume


def _volume(depth=6, size=48):
    rng = np.random.default_rng(0)
    array = rng.normal(0, 20, (depth, size, size)).astype(np.int16)
    array[:, 12:36, 16:32] += 300
    return Volume(array, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))


def _engine(**kwargs):
    torch.manual_seed(0)
    return Engine(backbone=build_tiny_sam_vit(), device="cpu", **kwargs)


def _adapter(engine, path, padding=0):
    torch.manual_seed(0)
    return save_adapter(path, SegMoTE(engine.backbone), ["organ"], {"kind": "range", "low": -100.0, "high": 400.0},
                        extra={"pad": " " * padding}, backbone_sha256=None)


def test_engine_takes_a_built_backbone():
    engine = _engine()
    assert engine.model_name == "sam_vit_tiny"
    mask = engine.segment(_volume(), box_ijk=[14, 10, 2, 33, 37, 2])
    assert mask.shape == (6, 48, 48) and mask[:2].sum() == 0 and engine.cache.misses == 1


def test_auto_embeds_each_slice_once_even_when_the_cache_is_too_small(tmp_path):
    engine = _engine(batch_size=2, cache_bytes=1)  # the cache keeps one entry: nothing survives a batch
    engine.load_adapter(_adapter(engine, tmp_path / "a.safetensors"))
    seen = []
    segments = engine.auto(_volume(), progress=lambda done, total: seen.append((done, total)))
    assert len(segments) == 1 and segments[0].mask.shape == (6, 48, 48)
    assert engine.cache.misses == 6  # before: 12 (everything embedded, evicted, embedded again)
    assert seen[0] == (0, 6) and seen[-1] == (6, 6)


def test_prefetch_embeds_the_neighbours_nearest_first_and_can_be_superseded():
    engine = _engine()
    prepared = engine.prepare(_volume())
    engine.prefetch(prepared, centre=3, radius=1)
    engine.stop_prefetch(wait=False)  # a newer request supersedes the old one ...
    engine.prefetch(prepared, centre=3, radius=2)
    engine.wait_prefetch()
    assert engine.cache.misses >= 5
    before = engine.cache.misses
    engine.predict_slice(prepared, 4, box=np.array([16, 12, 31, 35]))  # ... and prompts find their embedding
    assert engine.cache.misses == before


def test_adapter_with_a_header_length_starting_with_0x80_loads(tmp_path):
    engine = _engine()
    path = tmp_path / "a.safetensors"
    for padding in range(300):
        _adapter(engine, path, padding)
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length starting with 0x80")
    config, header, state = load_adapter(path, "sam_vit_tiny")
    assert header["classes"][0]["name"] == "organ" and state
