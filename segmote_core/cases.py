"""Finding the cases of a run: one image file, a DICOM series folder, or a folder of image files.

A folder of images may be an nnU-Net raw ``imagesTs/`` folder: ``CASE_0000.nii.gz`` is channel 0 of case ``CASE``;
only channel 0 is read (other channels ``_0001``... of a case with a ``_0000`` are skipped, also when other images
sit beside them). A DICOM series in the same folder as images is one more case, named after the folder. Each case
gets a name (the file name without its
image suffix and channel suffix) from which its output file is named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .volume import IMAGE_SUFFIXES, LABELMAP_SUFFIXES, is_segmentation_path, strip_image_suffix
CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class InputCase:
    name: str
    path: Path



def _holds_dicom(folder: Path) -> bool:
    import SimpleITK as sitk

    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def find_input_cases(path: str | Path) -> list[InputCase]:
    """The cases of `path`: a file is one case; a folder holding image files is one case per image (nnU-Net
    channel suffixes understood); a folder holding only a DICOM series is one case. Sorted by name."""
    path = Path(path)
    if not path.is_dir():  # a file, or nothing: reading it says what is wrong
        stem = strip_image_suffix(path.name) or path.stem
        return [InputCase(stem, path)]
    name_of_folder = path.resolve().name or "dicom"  # `-i .` names the folder, never an empty (hidden) file name
    entries = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    files = sorted(p for p in entries if not is_segmentation_path(p) and strip_image_suffix(p.name) is not None)
    others = [p for p in entries if p not in files and not is_segmentation_path(p)]
    if not files:
        if _holds_dicom(path):
            return [InputCase(name_of_folder, path)]
        raise InputError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no DICOM series")
    stems = {p: strip_image_suffix(p.name) for p in files}
    channels = {p: CHANNEL.match(stem) for p, stem in stems.items()}
    # nnU-Net: CASE_0000 is channel 0 of CASE, and CASE_0001... are its other channels, whatever else the folder
    # holds (a stray image beside them is a case of its own, never a reason to read channels as cases).
    nnunet_cases = {match["case"] for match in channels.values() if match is not None and match["channel"] == "0000"}
    cases: dict[str, Path] = {}
    if others and _holds_dicom(path):  # a DICOM series beside the images is a case too
        cases[name_of_folder] = path
    for image in files:
        name, match = stems[image], channels[image]
        if match is not None and match["case"] in nnunet_cases:
            if match["channel"] != "0000":
                continue
            name = match["case"]
        if name in cases:
            raise InputError(f"cases {cases[name].name} and {image.name} have the same name {name!r}; "
                             "their outputs would overwrite each other")
        cases[name] = image
    return [InputCase(name, cases[name]) for name in sorted(cases)]


def output_for(case: InputCase, output: Path, folder_output: bool, suffix: str = ".seg.nrrd") -> Path:
    """Where a case's result goes: `output` itself, or `output`/CASE.seg.nrrd when writing into a folder."""
    return output / f"{case.name}{suffix}" if folder_output else output


def is_folder_output(output: str | Path, collection: bool) -> bool:
    """A folder of cases writes into a folder; one case writes into `output` when it is an existing folder or a
    name without a suffix (`results`, `results/`), else to the file `output`."""
    return collection or Path(output).is_dir() or str(output).endswith(("/", "\\")) or not Path(output).suffix


def record_path(output: Path) -> Path:
    """OUT.json beside OUT.seg.nrrd (or beside a label map OUT.nii.gz, ...)."""
    name = output.name
    lower = name.lower()
    for suffix in (".seg.nrrd", *LABELMAP_SUFFIXES, ".dcm"):
        if lower.endswith(suffix):
            return output.with_name(name[: -len(suffix)] + ".json")
    return output.with_name(name + ".json")
