"""Models: backbones (frozen SAM-family networks) and the SegMoTE additions. No files, no GUI."""

from .backbones import BACKBONES, Backbone, build_sam_vit, build_tiny_sam_vit

__all__ = ["BACKBONES", "Backbone", "build_sam_vit", "build_tiny_sam_vit"]
