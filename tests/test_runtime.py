"""CPU runtimes (ONNX Runtime, OpenVINO): masks agree with PyTorch fp32 on the real chest CT, the export cache is
keyed, checked and written atomically, and every failure falls back to PyTorch with one notice.

One export of LiteMedSAM's encoder and decoders serves the whole session (a temporary cache folder): both runtimes
read the same ONNX files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import bounding_box_ijk
from segmote_core import runtime as runtimes
from segmote_core.engine import Engine
from segmote_core.files import sha256_file
from segmote_core.runtime import relative_distance
from segmote_core.volume import Volume
from segmote_core.shipped import shipped_adapter

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = shipped_adapter("chest_ct_lungs")
AGREEMENT = 0.995
FAST = [name for name in ("onnx", "openvino") if runtimes.installed(name)]
pytestmark = [pytest.mark.slow,  # LiteMedSAM on every runtime: `make test` only (tests/conftest.py)
              pytest.mark.skipif(not FAST, reason="neither onnxruntime nor openvino is installed (segmote[cpu])")]


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks; two empty masks agree fully."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


@pytest.fixture(scope="session")
def export_cache():
    """The tests' temporary SegMoTE cache (tests/conftest.py), where the session's engines exported their graphs."""
    return Path(os.environ["SEGMOTE_CACHE_DIR"])


@pytest.fixture(scope="session")
def fast_engines(lite_engine):
    """One engine per installed runtime; the session's engine is the one users get by default."""
    return {name: lite_engine if lite_engine.runtime == name else
            Engine(backbone=lite_engine.backbone, device="cpu", runtime=name) for name in FAST}


@pytest.fixture(scope="session")
def adapter_engines(lung_adapter_engine):
    engines = {"torch": Engine(backbone=lung_adapter_engine.backbone, device="cpu", adapter=ADAPTER, runtime="torch")}
    engines.update({name: lung_adapter_engine if lung_adapter_engine.runtime == name else
                    Engine(backbone=lung_adapter_engine.backbone, device="cpu", adapter=ADAPTER, runtime=name)
                    for name in FAST})
    return engines


def slice_box(mask: np.ndarray, near: int = 20) -> list[int]:
    """A 2-D box around the structure on its slice (k) nearest to `near` where it shows at least 30 % of its largest
    cross-section (not a sliver at its end): what a user drags on the slice they look at. Structures share slices
    this way (the seven need three embeddings per runtime)."""
    area = mask.sum(axis=(1, 2))
    present = np.flatnonzero(area >= 0.3 * area.max())
    k = int(present[np.argmin(np.abs(present - near))])
    box = bounding_box_ijk(mask[k:k + 1])
    box[2] = box[5] = k
    return box


def test_engines_use_the_runtime_asked_for(fast_engines):
    for name, engine in fast_engines.items():
        assert engine.runtime == name and set(engine.runtime_models) == {"encoder", "decoder"} and engine.notices == []
        assert engine.runtime_description.endswith("encoder f32")
    assert runtimes.choose("auto", torch.device("cpu")) == FAST[-1]  # OpenVINO first when installed
    assert runtimes.choose("auto", torch.device("cuda")) == "torch"


def test_box_prompts_on_all_seven_structures_agree_with_pytorch(fast_engines, torch_engine, chest_ct, chest_truth):
    assert len(chest_truth) == 7
    for name, truth in chest_truth.items():
        box = slice_box(truth)
        reference = torch_engine.segment(chest_ct, box_ijk=box)
        assert reference.any(), name
        for runtime, engine in fast_engines.items():
            mask = engine.segment(chest_ct, box_ijk=box)
            assert agreement(mask, reference) >= AGREEMENT, (runtime, name, agreement(mask, reference))


def test_clicks_on_the_lungs_agree_with_pytorch(fast_engines, torch_engine, chest_ct, chest_truth):
    for name in ("right lung", "left lung"):
        truth = chest_truth[name]
        k = 20
        inside = np.argwhere(truth[k])
        j, i = inside[len(inside) // 2]
        j2, i2 = inside[len(inside) // 4]
        points = [[i, j, k], [i2, j2, k]]
        reference = torch_engine.segment(chest_ct, points_ijk=points)
        assert reference.any()
        for runtime, engine in fast_engines.items():
            mask = engine.segment(chest_ct, points_ijk=points)
            assert agreement(mask, reference) >= AGREEMENT, (runtime, name)


def test_adapter_prompts_and_automatic_segmentation_agree_with_pytorch(adapter_engines, chest_ct, chest_truth):
    """The shipped lung adapter: its MoTE prompt decoder and automatic segmentation (both exported) on two slices
    through the lungs."""
    crop = Volume(chest_ct.array[19:21].copy(), chest_ct.spacing, chest_ct.origin, chest_ct.direction)
    reference = adapter_engines["torch"]
    expected = {s.name: s.mask for s in reference.auto(crop)}
    assert any(mask.any() for mask in expected.values())
    box = slice_box(chest_truth["right lung"][19:21], near=1)
    expected_box = reference.segment(crop, box_ijk=box)
    for runtime in FAST:
        engine = adapter_engines[runtime]
        assert engine.runtime == runtime and "decoder" in engine.runtime_models, engine.notices
        for segment in engine.auto(crop):
            assert agreement(segment.mask, expected[segment.name]) >= AGREEMENT, (runtime, segment.name)
        assert agreement(engine.segment(crop, box_ijk=box), expected_box) >= AGREEMENT, runtime


def test_automatic_segmentation_runs_the_exported_decoder_and_agrees_with_pytorch(adapter_engines, chest_ct,
                                                                                    monkeypatch):
    """The shipped lung adapter's automatic segmentation on six slices from the top of the chest CT to its base,
    two lung-free ones included: both lungs of a slice in one call of the exported first pass, refinement only
    where a lung is found (never in PyTorch), and the masks PyTorch fp32 gives (Dice >= 0.99 per lung). Two of
    the slices are the test above's, whose embeddings the engines keep."""
    crop = Volume(chest_ct.array[[1, 4, 13, 19, 20, 28]].copy(), chest_ct.spacing, chest_ct.origin, chest_ct.direction)
    expected = {s.name: s.mask for s in adapter_engines["torch"].auto(crop)}
    assert set(expected) == {"right lung", "left lung"}
    assert all(mask.any() for mask in expected.values()) and not any(mask[:2].any() for mask in expected.values())

    def pytorch_decoder(*args, **kwargs):
        raise AssertionError("the automatic decoder ran in PyTorch")

    for runtime in FAST:
        engine = adapter_engines[runtime]
        assert {"auto decoder", "auto refinement"} <= set(engine.runtime_models), engine.notices
        monkeypatch.setattr(engine.segmote, "auto_coarse", pytorch_decoder)
        monkeypatch.setattr(engine.segmote, "auto_refine", pytorch_decoder)
        coarse_rows, refined_slices = [], []  # classes per first-pass call (one slice each on a CPU); refined calls
        first_pass, refine = engine._fast.auto_coarse, engine._fast.auto_refine
        monkeypatch.setattr(engine._fast, "auto_coarse", lambda *a: coarse_rows.append(len(a[2])) or first_pass(*a))
        monkeypatch.setattr(engine._fast, "auto_refine",
                            lambda *a: refined_slices.append(len(coarse_rows) - 1) or refine(*a))
        segments = engine.auto(crop)
        for segment in segments:
            dice = agreement(segment.mask, expected[segment.name])
            assert dice >= 0.99, (runtime, segment.name, dice)
        assert coarse_rows == [2] * crop.array.shape[0]  # both classes of each slice in one call
        assert refined_slices and not {0, 1} & set(refined_slices)  # the lung-free slices are never refined
        # a run gives the graphs' buffers back before its 3-D labelling: the next run allocates them again, same masks
        again = {segment.name: segment.mask for segment in engine.auto(crop)}
        assert all(np.array_equal(again[segment.name], segment.mask) for segment in segments)
        monkeypatch.undo()


def test_a_clicks_box_search_runs_in_one_exported_call_with_or_without_an_adapter(fast_engines, adapter_engines,
                                                                                   torch_engine, chest_ct, chest_truth,
                                                                                   monkeypatch):
    """A click's candidate boxes go to the exported frozen decoder in one call, also with the lung adapter loaded
    (a click on the spine, off its classes): never to PyTorch, and each mask as PyTorch's for the box alone."""
    from segmote_core.boxes import candidate_boxes
    from segmote_core.evalset import innermost_point

    k = 19
    reference_view = torch_engine.prepare(chest_ct)
    row, col = innermost_point(reference_view.stack.to_stack(chest_truth["thoracic vertebral column"])[k])
    click = np.array([[col, row]], float)
    candidates = candidate_boxes(click, reference_view.slice_shape)
    expected = [torch_engine._decode_slice(reference_view, k, box=box).mask for box in candidates]
    expected_click = torch_engine.predict_slice(reference_view, k, points=click, point_labels=np.array([1])).mask

    def pytorch_decoder(*args, **kwargs):
        raise AssertionError("the frozen decoder ran in PyTorch")

    for engine in [*fast_engines.values(), *(adapter_engines[name] for name in FAST)]:
        monkeypatch.setattr(engine.backbone, "decode", pytorch_decoder)
        prepared = engine.prepare(chest_ct)
        batched = engine.decode_boxes(engine.boxes_view(prepared), k, candidates)
        for got, want in zip(batched, expected, strict=True):
            assert agreement(got.mask, want) >= 0.99, (engine.runtime, engine.segmote is not None)
        answer = engine.predict_slice(prepared, k, points=click, point_labels=np.array([1]))
        assert agreement(answer.mask, expected_click) >= 0.99, (engine.runtime, engine.segmote is not None)
        if engine.segmote is not None:
            assert engine._fast.models["frozen decoder"]["file"] != engine._fast.models["decoder"]["file"]
        monkeypatch.undo()


@pytest.mark.skipif("openvino" not in FAST or not runtimes.native_bf16(),
                    reason="OpenVINO runs bf16 natively only on CPUs with AVX-512 BF16 or AMX")
def test_bf16_runs_only_when_asked_from_the_checked_export_and_stays_near_fp32(fast_engines, lite_engine, chest_ct,
                                                                             chest_truth):
    """fp32 is every runtime's default; precision="bf16" runs OpenVINO's encoder at bf16 from the same export, judged
    at f32 first. Its masks come close to fp32's but not to Dice 0.99 on every structure (docs/benchmarks.md),
    which is why bf16 is never chosen by default."""
    assert all(engine.runtime_models["encoder"]["precision"] == "f32" for engine in fast_engines.values())
    engine = Engine(backbone=lite_engine.backbone, device="cpu", runtime="openvino", precision="bf16")
    assert engine.runtime == "openvino" and engine.notices == [] and engine.runtime_description.endswith("bf16")
    record, checked = engine.runtime_models["encoder"], fast_engines["openvino"].runtime_models["encoder"]
    assert record["precision"] == "bf16" and record["sha256"] == checked["sha256"]
    scores = {}
    for name, truth in chest_truth.items():
        box = slice_box(truth)
        scores[name] = agreement(engine.segment(chest_ct, box_ijk=box), lite_engine.segment(chest_ct, box_ijk=box))
    assert min(scores.values()) >= 0.9, scores  # measured 0.93-1.00


@pytest.mark.skipif("openvino" not in FAST, reason="OpenVINO is not installed")
def test_an_openvino_graph_gives_back_its_buffers_and_answers_alike_afterwards(fast_engines, export_cache):
    """OpenVINO keeps buffers per infer request and in each compiled graph, sized for the largest shapes it ran (a
    decoder's eight candidate boxes: ~0.2-0.3 GB), so the engine makes requests when a graph is first called and
    gives both back after the load probe; a fixed-shape variant is compiled when a call first has its shapes. After
    release() the graph answers exactly as before, on the dynamic graph and on a fixed-shape variant."""
    record = fast_engines["openvino"].runtime_models["decoder"]
    session = runtimes.Session("openvino", export_cache / "exported" / record["file"],
                               static=[{"points": (1, 2, 2), "labels": (1, 2)}])
    generator = torch.Generator().manual_seed(3)
    feeds = {"embedding": torch.randn(1, 256, 64, 64, generator=generator).numpy(),
             "early": torch.randn(1, 160, 64, 64, generator=generator).numpy(),
             "mask_input": np.zeros((1, 1, 256, 256), np.float32), "has_mask": np.zeros(1, np.float32)}
    one_box = dict(feeds, points=np.array([[[30.0, 40.0], [150.0, 170.0]]], np.float32),
                   labels=np.array([[2.0, 3.0]], np.float32))  # the fixed shape
    two_boxes = dict(feeds, points=np.array([[[30.0, 40.0], [150.0, 170.0]], [[60.0, 70.0], [110.0, 120.0]]],
                                            np.float32), labels=np.array([[2.0, 3.0]] * 2, np.float32))
    before = [session(one_box), session(two_boxes)]
    session.release()
    after = [session(one_box), session(two_boxes)]
    for got, expected in zip(after, before):
        assert all(np.array_equal(g, e) for g, e in zip(got, expected))
    assert relative_distance(before[0][0], before[1][0][:1]) < 1e-4  # the variant computes what the graph does


# ---- the export cache -----------------------------------------------------------------------------------
def test_damaged_export_is_detected_rebuilt_and_never_loaded(fast_engines, export_cache):
    encoder = next((export_cache / "exported").glob("encoder-*.onnx"))
    good = encoder.read_bytes()
    encoder.write_bytes(good[: len(good) // 2])  # cut short, as by a crash or a full disk
    loaded = []
    original = runtimes.Session.__init__

    def record(self, runtime, path, threads=None):
        loaded.append(sha256_file(Path(path)))
        original(self, runtime, path, threads)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtimes.Session, "__init__", record)
        engine = Engine("lite_medsam", device="cpu", runtime=FAST[0])
    assert engine.runtime == FAST[0]
    assert encoder.read_bytes() != good[: len(good) // 2]
    assert encoder.with_suffix(".sha256").read_text() == sha256_file(encoder)
    assert sha256_file(encoder) in loaded


def test_changed_weights_or_adapter_get_their_own_export(tmp_path, single_torch_thread):
    from segmote_core.models import build_tiny_sam_vit
    from segmote_core.models.segmote import SegMoTE

    torch.manual_seed(0)
    backbone = build_tiny_sam_vit().eval()
    first = runtimes.FastPaths(FAST[0], backbone, folder=tmp_path)
    first.use_decoder()
    with torch.no_grad():
        backbone.mask_decoder.iou_token.weight.add_(1.0)
    second = runtimes.FastPaths(FAST[0], backbone, folder=tmp_path)
    second.use_decoder()
    segmote = SegMoTE(backbone).eval()
    second.use_decoder(segmote)
    files = sorted(p.name.split("-")[0] for p in tmp_path.glob("*.onnx"))
    assert files == ["decoder"] * 3 + ["encoder"] * 2
    # the exported MoTE decoder computes what PyTorch computes
    embedding, early = backbone.encode(torch.rand(1, 3, 256, 256))
    box = torch.tensor([[30.0, 40.0, 150.0, 170.0]])
    with torch.inference_mode():
        expected = segmote.decode(embedding, early, boxes=box)
    logits, iou = second.decode(embedding, early, None, None, box, None)
    assert torch.allclose(logits, expected.logits, atol=1e-3) and torch.allclose(iou, expected.iou, atol=1e-4)


def test_two_processes_exporting_at_once_leave_a_valid_cache(tmp_path):
    script = (
        "import sys, torch; torch.set_num_threads(1); torch.manual_seed(0)\n"
        "from segmote_core.models import build_tiny_sam_vit\n"
        "from segmote_core.runtime import FastPaths\n"
        f"FastPaths({FAST[0]!r}, build_tiny_sam_vit().eval(), folder=sys.argv[1]).use_decoder()\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    workers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.stderr.read()
    exported = sorted(tmp_path.glob("*.onnx"))
    assert [p.name.split("-")[0] for p in exported] == ["decoder", "encoder"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left over
    for path in exported:
        assert path.with_suffix(".sha256").read_text() == sha256_file(path)


# ---- falling back to PyTorch ----------------------------------------------------------------------------
def test_missing_runtime_package_falls_back_to_pytorch_with_one_notice(monkeypatch, lite_engine):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnxruntime", "openvino") else real(name, *a))
    engine = Engine(backbone=lite_engine.backbone, device="cpu", runtime="openvino")
    assert engine.runtime == "torch" and engine.encode == engine.backbone.encode
    assert len(engine.notices) == 1 and "openvino is not installed" in engine.notices[0]
    automatic = Engine(backbone=lite_engine.backbone, device="cpu", runtime="auto")
    assert automatic.runtime == "torch" and automatic.runtime_description == "PyTorch fp32 on cpu"
    assert len(automatic.notices) == 1 and "pip install 'segmote[cpu]'" in automatic.notices[0]  # how to get one


def test_failing_adapter_export_keeps_the_fast_encoder_and_prompts_run_pytorch(monkeypatch, tmp_path, fast_engines,
                                                                                chest_ct, chest_truth):
    engine = Engine(backbone=fast_engines[FAST[0]].backbone, device="cpu", runtime=FAST[0])
    assert "decoder" in engine.runtime_models
    monkeypatch.setattr(runtimes, "exported_dir", lambda: tmp_path)  # nothing cached for the adapter

    def fail(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::something' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", fail)
    engine.load_adapter(ADAPTER)
    assert engine.runtime == FAST[0] and set(engine.runtime_models) == {"encoder"}  # the record names no decoder graph
    assert len(engine.notices) == 1 and engine.notices[0].startswith("could not export the prompt decoder")
    assert "\n" not in engine.notices[0]
    box = slice_box(chest_truth["left lung"])
    assert engine.segment(chest_ct, box_ijk=box).any()  # PyTorch's MoTE decoder answered


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_a_tampered_export_with_a_rewritten_checksum_is_never_used(tmp_path, single_torch_thread, caplog, part):
    """Whoever changes a cached export can rewrite its .sha256 too: the graph is judged against the weights it
    claims to come from (a probe through both), and exported again when they disagree."""
    import onnx
    from onnx import numpy_helper

    from segmote_core.models import build_tiny_sam_vit

    torch.manual_seed(0)
    backbone = build_tiny_sam_vit().eval()
    first = runtimes.FastPaths(FAST[0], backbone, folder=tmp_path)
    first.use_decoder()
    assert first.models[part]["checked"] == "exported now"
    path = tmp_path / first.models[part]["file"]
    model = onnx.load(str(path))
    weight = max((t for t in model.graph.initializer if "MatMul" in t.name),  # a transformer weight
                 key=lambda t: numpy_helper.to_array(t).size)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))  # a weight scaled
    onnx.save(model, str(path))
    tampered = sha256_file(path)
    path.with_suffix(".sha256").write_text(tampered)  # ... and its checksum rewritten to match
    runtimes._PROBED.clear()  # a new process

    second = runtimes.FastPaths(FAST[0], backbone, folder=tmp_path)
    second.use_decoder()
    assert second.models[part]["checked"] == "exported now"
    assert second.models[part]["sha256"] == sha256_file(path) != tampered
    assert any("does not compute what its weights compute" in r.getMessage() for r in caplog.records)
    # what runs now is what PyTorch computes
    image = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        embedding, early = backbone.encode(image)
        expected, _ = backbone.decode(embedding, boxes=torch.tensor([[30.0, 40.0, 150.0, 170.0]]))
    got_embedding, _ = second.encode(image)
    assert runtimes.relative_distance(got_embedding, embedding) < runtimes.PROBE_TOLERANCE
    logits, _ = second.decode(embedding, early, None, None, torch.tensor([[30.0, 40.0, 150.0, 170.0]]), None)
    assert runtimes.relative_distance(logits, expected) < runtimes.PROBE_TOLERANCE
    # an untouched cache is reused, not exported again
    runtimes._PROBED.clear()
    third = runtimes.FastPaths(FAST[0], backbone, folder=tmp_path)
    third.use_decoder()
    assert third.models[part]["checked"] == "cached; agrees with PyTorch on the probe"


@pytest.mark.skipif("openvino" not in FAST, reason="OpenVINO is not installed")
def test_a_damaged_compiled_blob_is_caught_dropped_and_compiled_again(tmp_path, single_torch_thread, caplog):
    """OpenVINO keeps what it compiled beside the exports for the next start. A blob damaged on disk (its weights
    changed) loads without complaint and computes something else: the probe catches it, and the blobs are dropped,
    so that the graph is compiled again instead of the same damaged blob being loaded again."""
    from segmote_core.models import build_tiny_sam_vit

    torch.manual_seed(0)
    backbone = build_tiny_sam_vit().eval()
    first = runtimes.FastPaths("openvino", backbone, folder=tmp_path)
    blobs = sorted(runtimes.compiled_cache(tmp_path / first.models["encoder"]["file"]).glob("*.blob"))
    assert blobs
    for blob in blobs:
        data = np.fromfile(blob, np.uint8)
        data[len(data) // 2:len(data) // 2 + 4096] = 0  # weights, in OpenVINO's layout
        data.tofile(blob)
    runtimes._PROBED.clear()  # a new process

    second = runtimes.FastPaths("openvino", backbone, folder=tmp_path)
    assert any("does not compute what its weights compute" in r.getMessage() for r in caplog.records)
    image = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        embedding, _ = backbone.encode(image)
    got, _ = second.encode(image)
    assert runtimes.relative_distance(got, embedding) < runtimes.PROBE_TOLERANCE
