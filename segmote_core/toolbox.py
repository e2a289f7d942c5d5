"""Small rules that many layers share, each written once: an error as one line, the box around a mask and the
mask inside a box, the RAS <-> LPS flip, and the hash of an array's contents.

Only numpy and the standard library: the CLI, the engine, the volume layer and the Slicer library all import it.
(Dice is ``segmote_core.metrics.dice``.)
"""

from __future__ import annotations

import hashlib

import numpy as np


# ---- messages ----------------------------------------------------------------------------------------------
def one_line(message: object, limit: int = 300, named: bool = False) -> str:
    """A message (an exception, a tool's output) as one line: its lines joined, runs of white space as one space,
    cut at `limit` characters. named: an exception's type goes first ("ValueError: ..."), for errors the user did
    not cause, where the type is the first clue."""
    text = " ".join(str(message).split())
    if named and isinstance(message, BaseException):
        text = f"{type(message).__name__}: {text}" if text else type(message).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- masks and boxes ---------------------------------------------------------------------------------------
def mask_extent(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of a bool mask of any dimension, as one slice per axis (stop exclusive); None if empty."""
    bounds = []
    for axis in range(mask.ndim):
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if occupied.size == 0:
            return None
        bounds.append(slice(int(occupied[0]), int(occupied[-1]) + 1))
    return tuple(bounds)


def mask_box(mask: np.ndarray, margin: float = 0.0) -> np.ndarray | None:
    """The box (x0, y0, x1, y1) of a 2-D (rows, cols) mask, corners on its outermost pixels, grown by `margin`
    pixels and kept on the image; None if the mask is empty."""
    extent = mask_extent(mask)
    if extent is None:
        return None
    rows, cols = extent
    height, width = mask.shape
    return np.array([max(cols.start - margin, 0), max(rows.start - margin, 0),
                     min(cols.stop - 1 + margin, width - 1), min(rows.stop - 1 + margin, height - 1)], dtype=float)


def box_mask(box_xy, shape: tuple[int, int]) -> np.ndarray:
    """The bool (rows, cols) mask of the pixels inside a box (x0, y0, x1, y1), corners rounded and included."""
    x0, y0, x1, y1 = np.round(np.asarray(box_xy, dtype=float)).astype(int)
    inside = np.zeros(shape, dtype=bool)
    inside[max(y0, 0):max(y1 + 1, 0), max(x0, 0):max(x1 + 1, 0)] = True
    return inside


# ---- patient frames ----------------------------------------------------------------------------------------
_RAS_LPS_POINT = np.array([-1.0, -1.0, 1.0])


def ras_lps(values) -> np.ndarray:
    """RAS <-> LPS (the flip is its own inverse: x and y change sign). values: points (..., 3), or a 4x4 matrix
    that maps into one frame (ijk -> LPS), which becomes the matrix that maps into the other (ijk -> RAS)."""
    array = np.asarray(values, dtype=float)
    if array.shape == (4, 4):
        return array * np.array([[-1.0], [-1.0], [1.0], [1.0]])
    if array.shape[-1:] != (3,):
        raise ValueError(f"RAS <-> LPS takes (..., 3) points or a 4x4 matrix, not an array of shape {array.shape}")
    return array * _RAS_LPS_POINT


# ---- contents ----------------------------------------------------------------------------------------------
def content_hash(array: np.ndarray) -> str:
    """A hash of an array's shape, type and values: equal arrays, equal hashes (a cache key, a checksum on disk)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str((array.shape, array.dtype.str)).encode())
    digest.update(np.ascontiguousarray(array).view(np.uint8).reshape(-1))
    return digest.hexdigest()
