"""Standard terminology for segment names: the one resolver from a name ("left lung", "Liver", "kidney_right") to
SNOMED CT codes (category, type, laterality modifier) and a recommended display colour.

The table is ``segmote_core/data/terminology.csv``. Matching ignores case, spaces, underscores and hyphens and knows
synonyms; for a paired structure, "left"/"right"/"both"/"bilateral" anywhere in the name add the laterality
modifier. A name the table does not know gets the generic code Tissue (SCT 85756007) and a notice the caller shows
(``warning: ...``), so that a file never carries a made-up code and the user learns which name to use instead.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

SCHEME = "SCT"  # SNOMED CT, the coding scheme of every code in the table
SLICER_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
SLICER_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
LATERALITY = {  # CID 244 (Laterality)
    "left": ("7771000", "Left"),
    "right": ("24028007", "Right"),
    "both": ("51440002", "Right and left"),
    "bilateral": ("51440002", "Right and left"),
}


@dataclass(frozen=True)
class Code:
    value: str
    meaning: str
    scheme: str = SCHEME

    def slicer(self) -> list[str]:
        return [self.scheme, self.value, self.meaning]


@dataclass(frozen=True)
class TerminologyEntry:
    category: Code
    type: Code
    modifier: Code | None = None
    color: tuple[float, float, float] | None = None  # 0-1 RGB; None: the caller picks one

    def slicer_terminology(self) -> dict:
        """The entry as slicerio writes it into a .seg.nrrd (3D Slicer's TerminologyEntry tag)."""
        entry = {"contextName": SLICER_CONTEXT, "category": self.category.slicer(), "type": self.type.slicer(),
                 "anatomicContextName": SLICER_ANATOMIC_CONTEXT}
        if self.modifier is not None:
            entry["typeModifier"] = self.modifier.slicer()
        return entry

    def describe(self) -> str:
        text = f"{self.type.scheme} {self.type.value} {self.type.meaning}"
        return text + (f" ({self.modifier.meaning})" if self.modifier else "")


GENERIC = TerminologyEntry(Code("85756007", "Tissue"), Code("85756007", "Tissue"))


@dataclass(frozen=True)
class Resolution:
    entry: TerminologyEntry
    notice: str | None  # set when the name was not recognised and the generic entry stands in


@dataclass(frozen=True)
class _Row:
    entry: TerminologyEntry
    paired: bool


def normalize_name(name: str) -> str:
    """Lower case, with underscores, hyphens and runs of spaces made single spaces."""
    return " ".join(re.sub(r"[_\-]+", " ", name).lower().split())


@lru_cache(maxsize=1)
def _table() -> dict[str, _Row]:
    text = resources.files("segmote_core").joinpath("data/terminology.csv").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    table = {}
    for row in csv.DictReader(lines):
        modifier = Code(row["modifier_code"], row["modifier_meaning"]) if row["modifier_code"] else None
        color = tuple(int(c) / 255 for c in row["color"].split()) if row["color"] else None
        entry = TerminologyEntry(Code(row["category_code"], row["category_meaning"]),
                                 Code(row["type_code"], row["type_meaning"]), modifier, color)
        for name in row["names"].split("|"):
            key = normalize_name(name)
            if key in table:
                raise ValueError(f"terminology.csv lists {key!r} twice")
            table[key] = _Row(entry, row["paired"] == "yes")
    return table


def known_names() -> list[str]:
    return sorted(_table())


def resolve(name: str) -> Resolution:
    """The terminology entry for a segment name (see the module docstring); never raises for an unknown name."""
    table, key = _table(), normalize_name(name)
    if key in table:
        return Resolution(table[key].entry, None)
    words = key.split()
    sides = [word for word in words if word in LATERALITY]
    base = " ".join(word for word in words if word not in LATERALITY)
    row = table.get(base)
    if row is not None and len(set(LATERALITY[side] for side in sides)) == 1 and row.paired:
        value, meaning = LATERALITY[sides[0]]
        entry = row.entry
        return Resolution(TerminologyEntry(entry.category, entry.type, Code(value, meaning), entry.color), None)
    return Resolution(GENERIC, f"segment '{name}' has no standard terminology entry; it is stored with the generic "
                               f"code {GENERIC.describe()} (known names: segmote_core/data/terminology.csv, e.g. "
                               "'left lung', 'liver', 'tumour')")
