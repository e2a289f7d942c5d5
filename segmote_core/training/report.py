"""What ships: the held-out report (slice split) through the Engine, and the exported adapter."""

from __future__ import annotations

import time
from pathlib import Path

from ..metrics import pooled_dice
from ..toolbox import mask_box
from .config import TrainConfig
from .data import TrainData
from .prompts import centre_point


def export(chosen: Path, target: Path, backbone, report: dict | None, seconds: float) -> None:
    """Copy the chosen adapter to ``target``; the held-out report goes into its header's ``extra``."""
    from ..adapters import load_segmote, save_adapter

    model, header = load_segmote(chosen, backbone, getattr(backbone, "weights_sha256", None))
    extra = dict(header.get("extra", {}))
    if report is not None:
        extra["heldout_report"] = report
    extra["run_seconds"] = round(seconds, 1)
    classes = [(c["name"], tuple(c["color"])) for c in header["classes"]]
    save_adapter(target, model, classes, header["normalization"], extra,
                 backbone_sha256=header.get("backbone_sha256"))


def heldout_report(config: TrainConfig, data: TrainData, adapter: Path, device, log=print) -> dict:
    """Dice on the held-out slices of the single training volume.

    automatic: ``Engine(adapter=...).auto(volume)`` (whole volume, largest 3-D component kept), scored on the
    held-out slices only. single click: one positive click at the centre (farthest from the border) of each class on
    each held-out slice where it is present, answered as the engine answers clicks (segmote_core/boxes.py); box: the
    tight box. Base backbone vs adapter, each with the input a user gets (the base model its own default, the
    adapter its rule for clicks and the frozen decoder's input for a box alone); Dice over those slices. The
    adapter's caches are seeded from the training store (same encoder, normalisation and slices); the held-out
    slices are embedded once more with the backbone's own input, which both engines share (one backbone, one
    embedding cache).
    """
    import torch

    from ..devices import default_cache_bytes
    from ..engine import EmbeddingCache, Engine

    case = data.split["case"]
    volume, labels = data.volumes[case]
    held = list(data.split["val"])
    cache = EmbeddingCache(default_cache_bytes(torch.device(device)), keep_early=True)  # base's slices serve both
    tuned = Engine(config.backbone, config.checkpoint, str(device), adapter=adapter, embedding_cache=cache)
    base = Engine(backbone=tuned.backbone, device=str(device), embedding_cache=tuned.cache)
    tuned_prep = tuned.prepare(volume)  # clicks and automatic segmentation: the adapter's rule
    tuned_boxes = tuned.boxes_view(tuned_prep)  # a box alone, as a session answers it
    base_prep = base.prepare(volume)  # the base model as a user gets it
    computed = {item.index: (item.embedding, item.early) for item in data.train + data.val if item.case == case}
    tuned.add_embeddings(tuned_prep, computed)
    if base_prep.normalization.key() == tuned_prep.normalization.key():
        base.add_embeddings(base_prep, computed)
    stack = tuned_prep.stack
    tick = time.time()
    automatic = {s.name: stack.to_stack(s.mask) for s in tuned.auto(volume, data.classes, keep_largest=True,
                                                                   refine_passes=config.refine_passes)}
    auto_seconds = time.time() - tick

    def prompted(name: str) -> dict:
        """Single-click and tight-box Dice, base vs adapter, over the held-out slices where ``name`` is present."""
        truth = stack.to_stack(labels[name])
        present = [i for i in held if truth[i].any()]
        scores = {key: [] for key in ("click_base", "click_tuned", "box_base", "box_tuned")}
        for i in present:
            x, y = centre_point(truth[i])
            point_ijk = stack.stack_to_ijk([i, y, x])[0].tolist()
            box = mask_box(truth[i])
            for label, engine, for_boxes in (("base", base, base_prep), ("tuned", tuned, tuned_boxes)):
                mask = stack.to_stack(engine.segment(volume, points_ijk=[point_ijk], point_labels=[1]))
                scores[f"click_{label}"].append((mask[i], truth[i]))
                scores[f"box_{label}"].append((engine.predict_slice(for_boxes, i, box=box).mask, truth[i]))
        return {"single_click_dice_base": pooled_dice(scores["click_base"]),
                "single_click_dice_tuned": pooled_dice(scores["click_tuned"]),
                "box_dice_base": pooled_dice(scores["box_base"]), "box_dice_tuned": pooled_dice(scores["box_tuned"]),
                "slices_with_class": len(present)}

    report = {"case": case, "heldout_slices": held, "classes": {}, "other_structures": {},
              "auto_seconds": round(auto_seconds, 1)}
    for name in data.classes:
        truth = stack.to_stack(labels[name])
        report["classes"][name] = r = {"automatic_dice": pooled_dice([(automatic[name][i], truth[i]) for i in held]),
                                       **prompted(name)}
        log(f"held-out {name}: automatic Dice {r['automatic_dice']:.4f}; single click {r['single_click_dice_base']:.4f}"
            f" (base) -> {r['single_click_dice_tuned']:.4f} (adapter); box {r['box_dice_base']:.4f} (base) -> "
            f"{r['box_dice_tuned']:.4f} (adapter)")
    # The labelled structures the adapter was not trained for: it must not make them worse (docs/training.md).
    for name in (n for n in labels if n not in data.classes):
        report["other_structures"][name] = r = prompted(name)
        log(f"held-out {name} (not trained): single click {r['single_click_dice_base']:.4f} (base) -> "
            f"{r['single_click_dice_tuned']:.4f} (adapter); box {r['box_dice_base']:.4f} (base) -> "
            f"{r['box_dice_tuned']:.4f} (adapter)")
    return report

