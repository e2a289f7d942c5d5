"""SegMoTE core: engine, models, volume layer, training and CLI.

Layering (arrows point one way): cli / Slicer module -> engine -> models + volume layer;
train -> models + volume layer. Nothing here imports the Slicer module or any GUI toolkit.
"""

__version__ = "0.1.0"
