"""Engine fast paths from issue #6: a given backbone, streaming automatic segmentation, background prefetch,
and adapters whose safetensors header length happens to start with byte 0x80."""

import numpy as np
import pytest
import torch

from segmote_core.adapters import load_adapter, save_adapter
from segmote_core.engine import Engine, largest_component
from segmote_core.errors import InputError
from segmote_core.models.backbones import build_tiny_sam_vit
from segmote_core.models.segmote import SegMoTE
from segmote_core.normalize import rule_for_training
from segmote_core.volume import Volume


def _volume(depth=6, size=48):
    rng = np.random.default_rng(0)
    array = rng.normal(0, 20, (depth, size, size)).astype(np.int16)
    array[:, 12:36, 16:32] += 300
    return Volume(array, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))


def _engine(**kwargs):
    torch.manual_seed(0)
    return Engine(backbone=build_tiny_sam_vit(), device="cpu", **kwargs)


def _adapter(engine, path, padding=0, rule=None):
    torch.manual_seed(0)
    rule = rule or {"kind": "range", "low": -100.0, "high": 400.0}
    return save_adapter(path, SegMoTE(engine.backbone), ["organ"], rule, extra={"pad": " " * padding},
                        backbone_sha256=None)


def test_engine_takes_a_built_backbone():
    engine = _engine()
    assert engine.model_name == "sam_vit_tiny"
    mask = engine.segment(_volume(), box_ijk=[14, 10, 2, 33, 37, 2])
    assert mask.shape == (6, 48, 48) and mask[:2].sum() == 0 and engine.cache.misses == 1


def test_auto_embeds_each_slice_once_even_when_the_cache_is_too_small(tmp_path):
    engine = _engine(batch_size=2, cache_bytes=1)  # the cache keeps one entry: nothing survives a batch
    engine.load_adapter(_adapter(engine, tmp_path / "a.safetensors"))
    seen = []
    volume = _volume()
    segments = engine.auto(volume, progress=lambda done, total: seen.append((done, total)))
    assert len(segments) == 1 and segments[0].mask.shape == (6, 48, 48)
    assert engine.cache.misses == 6  # before: 12 (everything embedded, evicted, embedded again)
    assert seen[0] == (0, 6) and seen[-1] == (6, 6)
    # A volume that does not fit is not cached (nothing useful was evicted for it): even the slice embedded last,
    # which a one-entry cache would have kept, is embedded again when asked for.
    engine.embeddings(engine.prepare(volume), [5])
    assert engine.cache.misses == 7


def test_auto_caches_a_volume_that_fits_so_prompts_afterwards_need_no_encoder(tmp_path):
    """With the rule `segmote train` stores by default (the backbone's own), a box alone after the automatic run
    finds its embeddings; an adapter with a window of its own makes a box alone embed its slices once more, since
    the frozen decoder answering it gets the backbone's input."""
    engine = _engine(batch_size=2)
    engine.load_adapter(_adapter(engine, tmp_path / "a.safetensors", rule=rule_for_training(backbone="sam_vit_tiny")))
    volume = _volume()
    assert 6 * engine.embedding_bytes() <= engine.cache.max_bytes
    engine.auto(volume)
    assert engine.cache.misses == 6
    engine.embeddings(engine.prepare(volume), range(6))  # all six kept
    assert engine.cache.misses == 6
    engine.segment(volume, box_ijk=[14, 10, 1, 33, 37, 4])
    assert engine.cache.misses == 6


def test_only_slices_not_seen_before_are_embedded_whatever_volume_holds_them(tmp_path):
    """The cache is keyed by each slice's voxels: every other slice of a scan, a slab of it, or a copy with one
    slice edited embeds only what it does not share; an adapter loaded and unloaded keeps what was embedded."""
    engine = _engine()
    scan = _volume()
    window = (150, 600)  # the same normalisation for every volume below (an automatic one reads all voxels)
    engine.embeddings(engine.prepare(scan, window=window), range(6))
    assert engine.cache.misses == 6
    every_other = Volume(scan.array[::2].copy(), (1.0, 1.0, 4.0), scan.origin, scan.direction)
    slab = Volume(scan.array[2:5].copy(), scan.spacing, (0.0, 0.0, 4.0), scan.direction)
    for part in (every_other, slab):
        engine.embeddings(engine.prepare(part, window=window), range(part.array.shape[0]))
    assert engine.cache.misses == 6
    edited = scan.array.copy()
    edited[3, 20, 20] += 100
    engine.embeddings(engine.prepare(Volume(edited, scan.spacing, scan.origin, scan.direction), window=window),
                      range(6))
    assert engine.cache.misses == 7  # the edited slice alone: a changed slice never reuses a stale embedding
    engine.load_adapter(_adapter(engine, tmp_path / "a.safetensors"))
    engine.embeddings(engine.prepare(scan, window=window), range(6))
    assert engine.cache.misses == 13  # an adapter also needs the early features
    engine.unload_adapter()
    engine.embeddings(engine.prepare(scan, window=window), range(6))
    engine.load_adapter(tmp_path / "a.safetensors")
    engine.embeddings(engine.prepare(scan, window=window), range(6))
    assert engine.cache.misses == 13


def test_engines_sharing_a_cache_use_each_others_slices_but_never_another_encoders(tmp_path):
    """Engines on one backbone and one cache (a base model and its adapter's, a report's two engines): a slice one
    of them embedded serves the other, with the early feature an adapter needs when the cache keeps it; an engine
    on other weights or another runtime shares the budget only."""
    from segmote_core.engine import EmbeddingCache

    base = _engine(embedding_cache=EmbeddingCache(keep_early=True))
    with_adapter = Engine(backbone=base.backbone, device="cpu", embedding_cache=base.cache,
                          adapter=_adapter(base, tmp_path / "a.safetensors"))
    scan, window = _volume(), (150, 600)
    base.embeddings(base.prepare(scan, window=window), range(4))
    assert base.cache.misses == 4
    embedded = with_adapter.embeddings(with_adapter.prepare(scan, window=window), range(6))
    assert base.cache.misses == 6 and all(early is not None for _, early in embedded.values())
    base.embeddings(base.prepare(scan, window=window), range(6))
    assert base.cache.misses == 6
    torch.manual_seed(1)
    others = [Engine(backbone=build_tiny_sam_vit(), device="cpu", embedding_cache=base.cache),  # other weights
              Engine(backbone=base.backbone, device="cpu", embedding_cache=base.cache, precision="bf16")]
    for number, other in enumerate(others, start=1):
        other.embeddings(other.prepare(scan, window=window), range(6))
        assert base.cache.misses == 6 + 6 * number


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


def test_largest_component_keeps_the_biggest_26_connected_piece():
    mask = np.zeros((8, 30, 30), bool)
    mask[1:4, 2:10, 2:10] = True  # 192 voxels
    mask[4, 10, 10] = True  # touches the first block only at a corner: 26-connected to it
    mask[5:7, 20:25, 20:25] = True  # 50 voxels, separate
    kept = largest_component(mask)
    assert kept.sum() == 193 and kept[4, 10, 10] and not kept[5:7, 20:25, 20:25].any()
    assert not largest_component(np.zeros((3, 4, 5), bool)).any()
    single = np.zeros((3, 4, 5), bool)
    single[1, 1:3, 2] = True
    assert np.array_equal(largest_component(single), single)


def test_largest_component_in_place_clears_the_rest_of_the_given_mask_and_counts_any_number_of_pieces():
    mask = np.zeros((4, 20, 20), bool)
    mask[0:2, 0:5, 0:5] = True  # 50 voxels
    mask[3, 15:18, 15:18] = True  # 9 voxels, separate
    original = mask.copy()
    copied = largest_component(mask)
    assert np.array_equal(mask, original) and copied.sum() == 50  # a copy: the caller's mask untouched
    kept = largest_component(mask, in_place=True)
    assert kept is mask and mask.sum() == 50 and not mask[3].any()
    # more pieces than 16-bit labels count (90 000 isolated voxels and one 3-voxel line): still the largest
    many = np.zeros((1, 600, 600), bool)
    many[0, ::2, ::2] = True
    many[0, 1, 0:3] = True
    kept = largest_component(many, in_place=True)
    assert kept.sum() == 7 and kept[0, 1, 0:3].all()  # the line and the four dots touching it


def test_compiled_encoder_pads_to_two_static_shapes_and_matches_eager(monkeypatch, tmp_path):
    monkeypatch.setenv("SEGMOTE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SEGMOTE_COMPILE_BACKEND", "aot_eager")  # Dynamo capture without C++ codegen (CPU CI)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    import torch._dynamo

    torch._dynamo.reset()
    eager, compiled = _engine(batch_size=4), _engine(batch_size=4, compile=True)
    assert compiled.compiled and not eager.compiled
    volume = _volume(depth=6)  # batches of 4 and 2 (padded to 4), then single slices
    ours, reference = compiled.prepare(volume), eager.prepare(volume)
    found, expected = compiled.embeddings(ours, range(6)), eager.embeddings(reference, range(6))
    single = compiled.embeddings(ours, [5])  # cached
    compiled.cache.clear()
    alone = compiled.embeddings(ours, [5])
    for index in range(6):
        assert found[index][0].shape == expected[index][0].shape == (1, 256, 16, 16)  # tiny ViT: 256 px input
        assert torch.allclose(found[index][0], expected[index][0], atol=1e-5)
    assert torch.allclose(alone[5][0], expected[5][0], atol=1e-5) and single[5][0] is found[5][0]
    assert (tmp_path / "inductor").is_dir()


def test_embeddings_computed_elsewhere_are_used_as_they_are(tmp_path):
    """add_embeddings (how a training run hands its embedding store to the held-out report): the engine answers
    from them without running its encoder, and the answer is the one its own embeddings give."""
    volume = _volume()
    own = _engine(runtime="torch")
    own.load_adapter(_adapter(own, tmp_path / "a.safetensors"))
    prepared = own.prepare(volume)
    computed = {index: (embedding[0].numpy(), early[0].numpy())
                for index, (embedding, early) in own.embeddings(prepared, range(6)).items()}
    expected = own.predict_slice(prepared, 3, box=np.array([16.0, 12.0, 31.0, 35.0])).mask
    given = _engine(runtime="torch")
    given.load_adapter(tmp_path / "a.safetensors")
    given_prepared = given.prepare(volume)
    given.add_embeddings(given_prepared, computed)
    mask = given.predict_slice(given_prepared, 3, box=np.array([16.0, 12.0, 31.0, 35.0])).mask
    assert given.cache.misses == 0 and np.array_equal(mask, expected) and mask.any()
    with pytest.raises(InputError, match="early feature"):
        given.add_embeddings(given_prepared, {0: (computed[0][0], None)})
