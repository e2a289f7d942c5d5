"""Adapter checkpoints: round trip, header, atomic write, and every refusal (one line each)."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from segmote_core.adapters import (
    AdapterClass,
    class_indices,
    load_adapter,
    load_segmote,
    read_adapter_header,
    save_adapter,
)
from segmote_core.errors import CheckpointError, InputError
from segmote_core.models.backbones import build_tiny_sam_vit
from segmote_core.models.segmote import SegMoTE, SegMoTEConfig

SHA = "ab" * 32
NORMALIZATION = {"mode": "ct_window", "level": 40.0, "width": 400.0}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def trained_tiny_model(seed: int = 0) -> SegMoTE:
    """A tiny model whose adapter tensors are all random (as if trained), so a load that skipped any would show."""
    torch.manual_seed(seed)
    model = SegMoTE(build_tiny_sam_vit(), SegMoTEConfig(num_classes=2, expert_rank=8))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith("backbone."):
                parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


@pytest.fixture()
def saved(tmp_path):
    model = trained_tiny_model()
    path = save_adapter(tmp_path / "organs.safetensors", model, ["liver", ("kidney", (0.1, 0.2, 0.9))],
                        NORMALIZATION, {"epochs": 3}, backbone_sha256=SHA)
    return model, path


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


# ---- round trip ----------------------------------------------------------------------------------------------
def test_round_trip_gives_identical_outputs_in_a_fresh_model(saved):
    model, path = saved
    fresh_backbone = build_tiny_sam_vit()
    fresh_backbone.load_state_dict(model.backbone.state_dict())  # same backbone weights, new adapters
    loaded, header = load_segmote(path, fresh_backbone, backbone_sha256=SHA)
    model.eval()
    generator = torch.Generator().manual_seed(1)
    embedding, early = torch.randn(1, 256, 16, 16, generator=generator), torch.randn(1, 48, 16, 16,
                                                                                        generator=generator)
    box = torch.tensor([[10.0, 20.0, 200.0, 150.0]])
    with torch.no_grad():
        expected, actual = model.decode(embedding, early, boxes=box), loaded.decode(embedding, early, boxes=box)
        assert torch.equal(expected.logits, actual.logits) and torch.equal(expected.iou, actual.iou)
        expected, actual = model.auto_decode(embedding, early, 1), loaded.auto_decode(embedding, early, 1)
        assert torch.equal(expected.logits, actual.logits)
        assert torch.equal(expected.objectness, actual.objectness)
    assert loaded.config == model.config
    assert header["classes"][1] == {"name": "kidney", "color": [0.1, 0.2, 0.9]}


def test_file_holds_only_adapter_tensors_and_a_complete_header(saved):
    model, path = saved
    config, header, state_dict = load_adapter(path, "sam_vit_tiny")
    assert set(state_dict) == set(model.adapter_state_dict())
    assert not any(key.startswith("backbone.") for key in state_dict)
    assert config == model.config
    assert header["format"] == "segmote-adapter" and header["format_version"] == 1
    assert header["backbone"] == "sam_vit_tiny" and header["backbone_sha256"] == SHA
    assert header["input_size"] == 256 and header["early_channels"] == 48
    assert header["normalization"] == NORMALIZATION and header["extra"] == {"epochs": 3}
    assert header["config"] == model.config.to_dict()
    assert [c["name"] for c in header["classes"]] == ["liver", "kidney"]
    assert all(len(c["color"]) == 3 and all(0 <= v <= 1 for v in c["color"]) for c in header["classes"])
    assert read_adapter_header(path) == header


def test_write_is_atomic_and_leaves_no_temporary_files(saved, tmp_path):
    model, path = saved
    before = path.read_bytes()
    with pytest.raises(InputError):  # a bad request fails before anything is written
        save_adapter(path, model, ["a", "b"], {"bad": object()}, backbone_sha256=SHA)
    assert path.read_bytes() == before
    save_adapter(path, model, ["a", "b"], NORMALIZATION, backbone_sha256=None)  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["organs.safetensors"]
    assert read_adapter_header(path)["backbone_sha256"] is None


# ---- refusals -------------------------------------------------------------------------------------------------
def test_adapter_for_another_backbone_is_refused(saved):
    _, path = saved
    with pytest.raises(CheckpointError) as error:
        load_adapter(path, "lite_medsam")
    assert one_line(error) == ("adapter organs.safetensors was trained for sam_vit_tiny, "
                               "but the loaded backbone is lite_medsam")


def test_adapter_for_other_backbone_weights_is_refused(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match="weights") as error:
        load_adapter(path, "sam_vit_tiny", backbone_sha256="cd" * 32)
    one_line(error)
    load_adapter(path, "sam_vit_tiny", backbone_sha256=SHA.upper())  # same hash, other case: fine


@pytest.mark.parametrize("keep", [0.5, 0.999, 12, 3, 0])
def test_truncated_file_is_refused(saved, keep):
    _, path = saved
    data = path.read_bytes()
    size = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:size])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as error:
        load_adapter(path, "sam_vit_tiny")
    one_line(error)


def test_corrupt_header_and_foreign_safetensors_are_refused(tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a SegMoTE adapter") as error:
        read_adapter_header(foreign)
    one_line(error)

    future = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(2)}, str(future),
              metadata={"segmote_adapter": json.dumps({"format": "segmote-adapter", "format_version": 99})})
    with pytest.raises(CheckpointError, match="format version 99") as error:
        read_adapter_header(future)
    one_line(error)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 20) + b"not json at all!!!!!" + b"\0" * 16)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_adapter_header(garbage)

    with pytest.raises(CheckpointError, match="does not exist"):
        read_adapter_header(tmp_path / "missing.safetensors")


class _CreatesMarker:
    """Unpickling this object would create a marker file: proof that pickled code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name, writer", [
    ("evil.pt", "torch"),                # torch.save zip, honest extension
    ("evil.safetensors", "torch"),       # torch.save zip dressed as safetensors
    ("evil.safetensors", "pickle"),      # raw pickle dressed as safetensors
])
def test_pickled_code_is_refused_not_run(tmp_path, name, writer):
    marker = tmp_path / "marker-created-by-unpickling"
    path = tmp_path / name
    payload = {"mote.expert_tokens.weight": _CreatesMarker(str(marker))}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    assert not marker.exists()
    for load in (lambda: load_adapter(path, "sam_vit_tiny"), lambda: read_adapter_header(path)):
        with pytest.raises(CheckpointError, match="pickled code") as error:
            load()
        assert one_line(error).startswith(f"refusing {name}")
    assert not marker.exists()


def test_missing_classes_are_named(saved):
    _, path = saved
    config, header, _ = load_adapter(path, "sam_vit_tiny", classes=["kidney"])
    assert class_indices(header, ["kidney", "liver"]) == [1, 0]
    with pytest.raises(InputError, match="'spleen', 'aorta'") as error:
        load_adapter(path, "sam_vit_tiny", classes=["liver", "spleen", "aorta"])
    one_line(error)


def test_bad_save_requests_are_input_errors(tmp_path):
    model = trained_tiny_model()
    target = tmp_path / "a.safetensors"
    cases = [
        (tmp_path / "a.pt", ["a", "b"], {}, "end in .safetensors"),
        (target, ["a"], {}, "2 class"),
        (target, ["a", "a"], {}, "unique"),
        (target, ["a", ("b", (1.5, 0.0, 0.0))], {}, "colour"),
        (target, ["a", AdapterClass("b", (0.0, 0.0))], {}, "colour"),
    ]
    for path, classes, normalization, message in cases:
        with pytest.raises(InputError, match=message):
            save_adapter(path, model, classes, normalization, backbone_sha256=None)
    with pytest.raises(InputError, match="backbone_sha256"):
        save_adapter(target, model, ["a", "b"], {}, backbone_sha256="not-a-hash")
    assert not target.exists()


def test_state_dict_that_does_not_fit_is_refused():
    model = trained_tiny_model()
    state_dict = model.adapter_state_dict()
    other = SegMoTE(build_tiny_sam_vit(), SegMoTEConfig(num_classes=3, expert_rank=8))
    with pytest.raises(CheckpointError, match="wrong shape 1 \\(ppt.class_tokens\\)") as error:
        other.load_adapter_state_dict(state_dict)
    one_line(error)
    del state_dict["mote.residual_scale"]
    with pytest.raises(CheckpointError, match="missing 1"):
        model.load_adapter_state_dict(state_dict)


def test_safetensors_header_length_starting_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """About 1 in 256 valid adapters has a header length whose first byte is 0x80, a pickle's first byte."""
    import struct

    from segmote_core.adapters import _refuse_unsafe_or_missing

    path = tmp_path / "a.safetensors"
    header = b"{" + b" " * (0x80 - 2) + b"}"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    assert path.read_bytes()[0] == 0x80
    _refuse_unsafe_or_missing(path)  # no error: the layout is safetensors'
    pickled = tmp_path / "b.safetensors"
    pickled.write_bytes(b"\x80\x04\x95" + bytes(20))
    with pytest.raises(CheckpointError, match="pickle"):
        _refuse_unsafe_or_missing(pickled)


# ---- the shipped adapter: never worse than the base model outside its classes ---------------------------------
@pytest.mark.slow
def test_shipped_lung_adapter_leaves_a_box_on_the_spine_as_good_as_the_base_model(chest_ct, chest_truth,
                                                                                    lite_engine, lung_adapter_engine):
    """The lung adapter once turned a box on the thoracic spine from Dice 0.55 into 0.003; now a box alone with the
    adapter loaded is answered exactly as without it (held-out slices 16 and 22): the frozen decoder, fed the input
    it was trained for rather than the adapter's lung window."""
    from segmote_core.metrics import dice

    tuned = lung_adapter_engine  # the shipped lung adapter loaded
    tuned_prep = tuned.boxes_view(tuned.prepare(chest_ct))
    base_prep = lite_engine.prepare(chest_ct)
    assert tuned_prep.normalization.key() == base_prep.normalization.key()
    assert tuned.prepare(chest_ct).normalization.rule == ("window", -700.0, 600.0)  # clicks: the adapter's rule
    spine = tuned_prep.stack.to_stack(chest_truth["thoracic vertebral column"])
    for index in (16, 22):
        truth = spine[index]
        rows, cols = np.flatnonzero(truth.any(1)), np.flatnonzero(truth.any(0))
        box = np.array([cols[0], rows[0], cols[-1], rows[-1]], float)
        with_adapter = dice(tuned.predict_slice(tuned_prep, index, box=box).mask, truth)
        base = dice(lite_engine.predict_slice(base_prep, index, box=box).mask, truth)
        assert base > 0.3  # the base model does find the vertebra
        assert with_adapter == base, (index, with_adapter, base)
