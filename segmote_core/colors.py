"""The one palette: display colours (RGB in [0, 1]) for segments and adapter classes saved without a colour.

It imports nothing, so every layer (files, adapters, the Slicer library, the demo) takes its colours from here.
"""

PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.90, 0.30, 0.25), (0.25, 0.55, 0.90), (0.30, 0.75, 0.35), (0.95, 0.75, 0.20), (0.65, 0.40, 0.85),
    (0.20, 0.80, 0.80), (0.95, 0.50, 0.70), (0.60, 0.45, 0.25), (0.55, 0.75, 0.20), (0.45, 0.45, 0.95),
)


def palette_color(index: int) -> tuple[float, float, float]:
    """The colour of the index-th segment or class (the palette repeats)."""
    return PALETTE[index % len(PALETTE)]
