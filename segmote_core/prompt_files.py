"""Prompts read from files: 3D Slicer markups (.mrk.json) and a CSV table (README.md, "Prompt files").

Each file yields named objects; each object (a box and/or points) becomes one segment of that name. Markups apply
to every case of a run; CSV rows name their case.

- Slicer markups JSON: an ROI markup is a box (its bounding box, if rotated), named by its control point's label;
  a Fiducial (point list) markup gives points, each named by its label with Slicer's automatic counter removed
  ("liver-2" -> "liver"); a point whose description is "negative" (or "-") is a negative point, any other a
  positive one. ``coordinateSystem`` "LPS" (what Slicer 5 writes) or "RAS" (older files; also the default when
  the key is absent) - LPS is converted to RAS.
- CSV: header ``case,name,kind,x,y,z`` and optionally ``space``; kind ``box`` (two rows: opposite corners),
  ``positive`` or ``negative`` (points); space ``RAS`` (default), ``LPS`` or ``IJK`` (voxel indices); an empty
  case applies the row to every case.
"""

from __future__ import annotations

import csv
import json
import os
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .toolbox import one_line, ras_lps

SPACES = ("RAS", "LPS", "IJK")
NEGATIVE_DESCRIPTIONS = ("negative", "-")
_COUNTER = re.compile(r"-\d+$")


@dataclass
class PromptObject:
    """One object to segment: box corners and points, each coordinate as (space, xyz) with space RAS or IJK."""

    name: str
    corners: list[tuple[str, tuple[float, float, float]]] = field(default_factory=list)
    points: list[tuple[str, tuple[float, float, float]]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def in_voxels(self, volume) -> tuple[np.ndarray | None, np.ndarray | None, list[int] | None]:
        """(box_ijk (6,) or None, points_ijk (N, 3) or None, point labels or None) on `volume`'s grid."""
        box = None
        if self.corners:
            box = np.concatenate([_to_ijk(volume, space, xyz) for space, xyz in self.corners])
        points = np.stack([_to_ijk(volume, space, xyz) for space, xyz in self.points]) if self.points else None
        return box, points, (list(self.labels) if self.points else None)


def _to_ijk(volume, space: str, xyz) -> np.ndarray:
    if space == "IJK":
        return np.asarray(xyz, float)
    return volume.ras_to_ijk(np.asarray([xyz], float))[0]


def _ras(space: str, xyz) -> tuple[str, tuple[float, float, float]]:
    """LPS -> RAS (x and y change sign); RAS and IJK as they are."""
    xyz = tuple(float(v) for v in xyz)
    return ("RAS", tuple(ras_lps(xyz).tolist())) if space == "LPS" else (space, xyz)


class PromptTable:
    """Objects per case name; objects under the case None apply to every case."""

    def __init__(self, source: str):
        self.source = source
        self.objects: dict[str | None, dict[str, PromptObject]] = {}

    def object(self, case: str | None, name: str) -> PromptObject:
        return self.objects.setdefault(case, {}).setdefault(name, PromptObject(name))

    def check_cases(self, cases) -> None:
        """Every case the table names is one of `cases` (a row for a case that is not there is a typo or the
        wrong folder, never silently ignored)."""
        unknown = sorted(str(case) for case in self.objects if case is not None and case not in set(cases))
        if unknown:
            raise InputError(f"{self.source} names case(s) {', '.join(map(repr, unknown[:5]))} that the input does "
                             f"not hold; its cases: {', '.join(sorted(cases)[:5])}{' ...' if len(cases) > 5 else ''}")

    def for_case(self, case: str) -> list[PromptObject]:
        merged = {**self.objects.get(None, {}), **self.objects.get(case, {})}
        if not merged:
            raise InputError(f"{self.source} has no prompts for case {case!r}")
        return list(merged.values())

    def check(self) -> "PromptTable":
        for case, objects in self.objects.items():
            for obj in objects.values():
                if obj.corners and len(obj.corners) != 2:
                    where = f" of case {case!r}" if case else ""
                    raise InputError(f"{self.source}: object {obj.name!r}{where} has {len(obj.corners)} box corners; "
                                     "a box needs 2")
                if not obj.corners and not any(label == 1 for label in obj.labels):
                    where = f" of case {case!r}" if case else ""
                    raise InputError(f"{self.source}: object {obj.name!r}{where} has only negative points; give a "
                                     "box or a positive point (negative points only say what to leave out)")
        if not self.objects:
            raise InputError(f"{self.source} holds no prompts")
        return self


MAX_PROMPT_FILE_BYTES = 8 << 20  # a prompt file holds boxes and points: far less than this


def read_prompts(path: str | Path) -> PromptTable:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompts file not found: {path}")
    if not os.access(path, os.R_OK):
        raise InputError(f"prompts file {path} cannot be read (permission denied)")
    size = path.stat().st_size
    if size > MAX_PROMPT_FILE_BYTES:
        raise InputError(f"prompts file {path.name} holds {size / 2**20:.0f} MiB; a prompt file of boxes and points "
                         f"is at most {MAX_PROMPT_FILE_BYTES >> 20} MiB")
    if path.name.lower().endswith(".json"):
        return read_markups(path)
    if path.suffix.lower() == ".csv":
        return read_csv(path)
    raise InputError(f"prompts file {path.name} must be a Slicer markups file (.mrk.json) or a .csv table")


# ---- Slicer markups ---------------------------------------------------------------------------------------------
def read_markups(path: Path) -> PromptTable:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # ValueError: bad JSON, a number of 5000 digits
        raise InputError(f"cannot read {path.name}: not valid JSON ({one_line(error, 160)})") from None
    markups = document.get("markups") if isinstance(document, dict) else None
    if not isinstance(markups, list):
        raise InputError(f"{path.name} is not a Slicer markups file (no 'markups' list)")
    table = PromptTable(path.name)
    for number, markup in enumerate(markups, start=1):
        kind = markup.get("type") if isinstance(markup, dict) else None
        where = f"{path.name} markup {number} ({kind})"
        try:
            if kind == "ROI":
                _read_roi(table, markup)
            elif kind == "Fiducial":
                _read_fiducials(table, markup, where)
            else:
                raise InputError(f"type {kind!r} is not a prompt; use ROI (box) or Fiducial (points) markups")
        except InputError as error:
            raise InputError(f"{where}: {error}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError) as error:
            raise InputError(f"{where}: malformed entry ({one_line(error, 150, named=True)})") from None
    return table.check()


def _space(markup: dict) -> str:
    system = markup.get("coordinateSystem", "RAS")
    if system not in ("RAS", "LPS"):
        raise InputError(f"unknown coordinate system {system!r} (RAS or LPS)")
    return system


def _vector(values, count: int, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).reshape(-1)
    if array.size != count or not np.all(np.isfinite(array)):
        raise InputError(f"{what} must be {count} finite numbers, got {values!r}")
    return array


def _read_roi(table: PromptTable, markup: dict) -> None:
    space = _space(markup)
    center = _vector(markup["center"], 3, "center")
    size = _vector(markup["size"], 3, "size")
    if np.any(size < 0):  # a zero size along one axis is a 2-D box on one slice
        raise InputError(f"size must not be negative, got {markup['size']!r}")
    axes = _vector(markup.get("orientation", np.eye(3).reshape(-1)), 9, "orientation").reshape(3, 3)
    signs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], float)
    corners = center + (signs * size / 2) @ axes.T  # the ROI's axes are the columns of its orientation
    points = markup.get("controlPoints") or []
    name = (points[0].get("label") if points else None) or markup.get("name") or "segment"
    obj = table.object(None, _COUNTER.sub("", name) or name)
    if space == "LPS":
        corners = ras_lps(corners)
    obj.corners.extend([("RAS", tuple(corners.min(axis=0))), ("RAS", tuple(corners.max(axis=0)))])


def _read_fiducials(table: PromptTable, markup: dict, where: str) -> None:
    space = _space(markup)
    for index, point in enumerate(markup.get("controlPoints") or [], start=1):
        if point.get("positionStatus", "defined") != "defined":
            continue  # a placeholder the user never placed
        label = str(point.get("label") or "segment")
        name = _COUNTER.sub("", label) or label
        try:
            position = _vector(point["position"], 3, "position")
        except (InputError, KeyError) as error:
            raise InputError(f"control point {index} ({label}): {error}") from None
        obj = table.object(None, name)
        obj.points.append(_ras(space, position))
        negative = str(point.get("description", "")).strip().lower() in NEGATIVE_DESCRIPTIONS
        obj.labels.append(0 if negative else 1)


# ---- CSV ------------------------------------------------------------------------------------------------------
def read_csv(path: Path) -> PromptTable:
    table = PromptTable(path.name)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: a byte-order mark is not a column
            reader = csv.DictReader(handle)
            missing = [c for c in ("case", "name", "kind", "x", "y", "z") if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path.name} lacks the column(s) {', '.join(missing)}; the header must be "
                                 "case,name,kind,x,y,z[,space]")
            for row in reader:
                _read_row(table, row, f"{path.name} line {reader.line_num}")
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot read {path.name}: {' '.join(str(error).split())}") from None
    return table.check()


def _read_row(table: PromptTable, row: dict, where: str) -> None:
    kind = (row.get("kind") or "").strip().lower()
    space = (row.get("space") or "RAS").strip().upper()
    name = (row.get("name") or "").strip()
    if not name:
        raise InputError(f"{where}: empty name")
    if space not in SPACES:
        raise InputError(f"{where}: unknown coordinate system {row.get('space')!r} (RAS, LPS or IJK)")
    try:
        xyz = [float(row[c]) for c in ("x", "y", "z")]
    except (TypeError, ValueError):
        raise InputError(f"{where}: x, y, z must be numbers, got {row.get('x')!r}, {row.get('y')!r}, "
                         f"{row.get('z')!r}") from None
    if not all(math.isfinite(v) for v in xyz):
        raise InputError(f"{where}: x, y, z must be finite")
    obj = table.object((row.get("case") or "").strip() or None, name)
    if kind == "box":
        obj.corners.append(_ras(space, xyz))
    elif kind in ("positive", "negative"):
        obj.points.append(_ras(space, xyz))
        obj.labels.append(1 if kind == "positive" else 0)
    else:
        raise InputError(f"{where}: kind {row.get('kind')!r} is not box, positive or negative")
