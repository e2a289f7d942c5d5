"""Adapter headers and tensors checked against the schema; checkpoints that would exhaust memory refused
(docs/reliability.md, "Adapters and checkpoints")."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from segmote_core.adapters import HEADER_KEY, MAX_CLASSES, load_segmote, read_adapter_header, save_adapter
from segmote_core.checkpoints import safe_torch_load
from segmote_core.errors import CheckpointError, InputError
from segmote_core.models.backbones import build_tiny_sam_vit
from segmote_core.models.segmote import SegMoTE, SegMoTEConfig

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def backbone():
    return build_tiny_sam_vit()


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory, backbone):
    torch.manual_seed(0)
    model = SegMoTE(backbone, SegMoTEConfig(num_classes=2, expert_rank=8))
    path = tmp_path_factory.mktemp("adapter") / "good.safetensors"
    save_adapter(path, model, ["liver", "spleen"], {"mode": "ct_window", "level": 40.0, "width": 400.0},
                 backbone_sha256=None)
    return path


def rewrite(source, target, header_edit=None, tensor_edit=None):
    """A copy of an adapter with its header and/or tensors changed as a hostile or broken tool might."""
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as file:
        header = json.loads(file.metadata()[HEADER_KEY])
    tensors = load_file(str(source))
    if header_edit:
        header_edit(header)
    if tensor_edit:
        tensor_edit(tensors)
    save_file(tensors, str(target), metadata={HEADER_KEY: json.dumps(header)})
    return target


def set_key(key, value):
    return lambda header: header.__setitem__(key, value)


WRONG_HEADERS = {
    "duplicate class names": (lambda h: h["classes"][1].__setitem__("name", "liver"), "repeated: liver"),
    "class name with a newline": (lambda h: h["classes"][0].__setitem__("name", "liver\nSegment0_Name:=x"),
                                  "printable ASCII"),
    "class name not a string": (lambda h: h["classes"][0].__setitem__("name", 7), "non-empty string"),
    "colour out of range": (lambda h: h["classes"][0].__setitem__("color", [2, 0, 0]), "colour"),
    "classes not a list": (set_key("classes", "liver"), "list of"),
    "input_size a string": (set_key("input_size", "256"), "input_size must be a positive integer"),
    "input_size a bool": (set_key("input_size", True), "input_size must be a positive integer"),
    "early_channels negative": (set_key("early_channels", -1), "early_channels"),
    "backbone a number": (set_key("backbone", 3), "backbone must be a name"),
    "config a list": (set_key("config", [1]), "config must be an object"),
    "normalization a string": (set_key("normalization", "ct"), "normalization has the wrong type"),
    "huge class count": (lambda h: h["config"].__setitem__("num_classes", 10_000), f"at most {MAX_CLASSES}"),
}


@pytest.mark.parametrize("case", WRONG_HEADERS)
def test_an_adapter_header_of_the_wrong_shape_is_refused(good_adapter, tmp_path, backbone, case):
    edit, message = WRONG_HEADERS[case]
    path = rewrite(good_adapter, tmp_path / "bad.safetensors", header_edit=edit)
    with pytest.raises(CheckpointError, match=message) as error:
        load_segmote(path, backbone)
    assert "\n" not in str(error.value)


def _first_key(tensors):
    return sorted(tensors)[0]


WRONG_TENSORS = {
    "all NaN": (lambda t: t.__setitem__(_first_key(t), torch.full_like(t[_first_key(t)], float("nan"))), "NaN"),
    "one inf": (lambda t: t[_first_key(t)].view(-1).__setitem__(0, float("inf")), "infinite"),
    "int32 weights": (lambda t: t.__setitem__(_first_key(t), t[_first_key(t)].to(torch.int32)), "torch.int32"),
}


@pytest.mark.parametrize("case", WRONG_TENSORS)
def test_adapter_tensors_that_are_not_finite_floats_are_refused(good_adapter, tmp_path, backbone, case):
    edit, message = WRONG_TENSORS[case]
    path = rewrite(good_adapter, tmp_path / "bad.safetensors", tensor_edit=edit)
    with pytest.raises(CheckpointError, match=message):
        load_segmote(path, backbone)


def test_saving_an_adapter_with_a_class_name_a_header_cannot_hold_is_refused(tmp_path, backbone):
    model = SegMoTE(backbone, SegMoTEConfig(num_classes=1, expert_rank=8))
    with pytest.raises(InputError, match="printable ASCII"):
        save_adapter(tmp_path / "a.safetensors", model, ["liver\n"], {}, backbone_sha256=None)
    assert list(tmp_path.iterdir()) == []


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=8),
                           lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                                             children, max_size=3),
                           max_leaves=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["backbone", "input_size", "early_channels", "config", "classes", "normalization",
                            "extra", "backbone_sha256", "format_version"]), value=JSON_VALUES)
def test_fuzzed_adapter_headers_load_or_fail_with_one_line(good_adapter, tmp_path, backbone, key, value):
    path = rewrite(good_adapter, tmp_path / "fuzz.safetensors", header_edit=set_key(key, value))
    try:
        load_segmote(path, backbone)
    except (CheckpointError, InputError) as error:
        assert "\n" not in str(error) and str(error)


# ---- checkpoints that would exhaust memory ------------------------------------------------------------------
def test_a_zip_bomb_checkpoint_is_refused_before_torch_load(tmp_path, monkeypatch):
    path = tmp_path / "bomb.pth"
    torch.save({"w": torch.zeros(4)}, path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("bomb/data/9", "w", force_zip64=True) as member:
            block = bytes(1 << 20)
            for _ in range(200):  # 200 MB of zeros, ~200 KB compressed
                member.write(block)
    assert path.stat().st_size < 1 << 20

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load must not be reached")

    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(CheckpointError, match="declares .* bytes of content"):
        safe_torch_load(path)


def test_an_ordinary_checkpoint_still_loads(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.arange(5.0)}, path)
    assert torch.equal(safe_torch_load(path)["w"], torch.arange(5.0))


def test_read_adapter_header_alone_applies_the_schema(good_adapter, tmp_path):
    path = rewrite(good_adapter, tmp_path / "bad.safetensors", header_edit=set_key("input_size", "x"))
    with pytest.raises(CheckpointError, match="input_size"):
        read_adapter_header(path)
