"""A picture of a segmentation: axial and coronal slices through its largest cross-sections, masks filled,
optional reference masks (ground truth) as contours. Used by the demo and by `segmote segment|auto --preview`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .colors import palette_color
from .errors import SegMoTEError
from .files import atomic_write
from .normalize import Normalization, normalize


def save_overlay_png(path: str | Path, volume, predictions: dict[str, np.ndarray], normalization: Normalization,
                     truth: dict[str, np.ndarray] | None = None, title: str = "") -> Path:
    """Axial and coronal views of `volume` (shown through `normalization`) at the slices where the masks are
    largest: predictions filled, masks of `truth` with the same names as contours. Written atomically."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise SegMoTEError("pictures need matplotlib: pip install 'segmote[demo]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .volume import SliceStack

    truth = truth or {}
    image = normalize(volume.array, normalization)
    figure, axes = plt.subplots(1, 2, figsize=(10, 5.2), dpi=110)
    union = np.any(list(predictions.values()), axis=0) if predictions else np.zeros(volume.array.shape, bool)
    for ax, (axis_name, lps_axis) in zip(axes, (("axial", 2), ("coronal", 1))):
        stack = SliceStack(volume, lps_axis)
        index = int(np.argmax(stack.to_stack(union).sum(axis=(1, 2))))
        spacing_rows = volume.spacing[2] if lps_axis == 1 else volume.spacing[1]
        aspect = spacing_rows / volume.spacing[0]
        ax.imshow(stack.to_stack(image)[index], cmap="gray", aspect=aspect)
        for number, (name, mask) in enumerate(predictions.items()):
            color = palette_color(number)
            plane = stack.to_stack(mask)[index]
            overlay = np.zeros(plane.shape + (4,))
            overlay[plane] = (*color, 0.45)
            ax.imshow(overlay, aspect=aspect)
            if name in truth:
                ax.contour(stack.to_stack(truth[name])[index], levels=[0.5], colors=[color], linewidths=1.0)
        ax.set_title(f"{axis_name} slice {index}")
        ax.axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    try:
        return atomic_write(path, lambda temporary: figure.savefig(temporary, format="png"))
    finally:
        plt.close(figure)
