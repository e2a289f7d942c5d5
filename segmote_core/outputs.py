"""Where a segmentation goes: the output format (chosen or implied by the --out suffix), checked before any model
runs, and the one call that writes it.

Formats: ``seg.nrrd`` (3D Slicer segmentation: named, coloured segments with standard terminology; added to an
existing file), ``nifti`` and the other label maps (.nii.gz, .nii, .nrrd, .mha...: one value per segment), and
``dicom-seg`` (DICOM Segmentation referencing the input DICOM series; written whole). Without --output-format the
suffix decides as before, and ``.dcm`` means dicom-seg.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .volume import LABELMAP_SUFFIXES, check_output_path, check_writable_output, is_segmentation_path

OUTPUT_FORMATS = ("seg.nrrd", "nifti", "dicom-seg")
DICOM_SEG_SUFFIX = ".dcm"
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class OutputTarget:
    path: Path
    format: str  # "seg.nrrd", "labelmap" (NIfTI or another label-map format) or "dicom-seg"
    image: Path  # the input, which a DICOM SEG references
    series: str | None = None
    notices: list[str] = field(default_factory=list)  # for the caller to show as warnings after saving


def output_suffix(output_format: str | None) -> str:
    """The file suffix a folder run gives each case's output in this format (None: the default, seg.nrrd)."""
    return {"nifti": ".nii.gz", "dicom-seg": DICOM_SEG_SUFFIX}.get(output_format or "seg.nrrd", ".seg.nrrd")


def plan_output(out: str | Path, output_format: str | None, image: str | Path, series: str | None = None,
                overwrite: bool = False, names: tuple[str, ...] = ()) -> OutputTarget:
    """Check the output before any model runs: its format, its suffix, its folder; for DICOM SEG also the input (a
    DICOM series folder), highdicom, the segment `names` already known, and that no file would be replaced without
    `overwrite`."""
    path, name = Path(out), str(out).lower()
    if output_format is not None and output_format not in OUTPUT_FORMATS:
        raise InputError(f"unknown output format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    if output_format is None:
        output_format = "dicom-seg" if name.endswith(DICOM_SEG_SUFFIX) else None
    if output_format == "dicom-seg":
        if is_segmentation_path(path) or name.endswith(LABELMAP_SUFFIXES):
            raise InputError(f"output {path.name} has the suffix of another format; a DICOM SEG ends in .dcm")
        from .dicom_seg import check_available, check_label, check_source

        check_source(image)
        if Path(image).resolve() in path.resolve().parents:
            raise InputError(f"output {path.name} lies inside the input DICOM folder {Path(image).name}, where it "
                             "would be read as a second series of that folder; choose an --out outside it")
        check_available()
        for name in names:
            check_label(name)
        check_writable_output(path)
        if path.exists() and not overwrite:
            raise InputError(f"output {path.name} exists; a DICOM SEG is written whole, not added to: choose another "
                             "--out, or pass --overwrite to replace the file")
        return OutputTarget(path, "dicom-seg", Path(image), series)
    if output_format == "seg.nrrd" and not is_segmentation_path(path):
        raise InputError(f"--output-format seg.nrrd needs an output ending in .seg.nrrd, got {path.name}")
    if output_format == "nifti" and not name.endswith(NIFTI_SUFFIXES):
        raise InputError(f"--output-format nifti needs an output ending in .nii.gz or .nii, got {path.name}")
    if output_format is None and not (is_segmentation_path(path) or name.endswith(LABELMAP_SUFFIXES)):
        raise InputError(f"output {path.name} must end in .seg.nrrd or a label-map format "
                         f"({', '.join(LABELMAP_SUFFIXES)}), or .dcm for DICOM SEG")
    path = check_output_path(path)
    if names and not overwrite:
        from .segmentation_io import existing_segment_names

        taken = sorted(set(names) & (existing_segment_names(path) or set()))
        if taken:
            raise InputError(f"{path.name} already has a segment named '{taken[0]}'; give another --name or pass "
                             "--overwrite to replace it")
    return OutputTarget(path, "seg.nrrd" if is_segmentation_path(path) else "labelmap", Path(image), series)


def save_output(target: OutputTarget, volume, segments: list, replace_same_name: bool = False,
                automatic: bool = False) -> list[int]:
    """Write `segments` to the target (see save_segments and write_dicom_seg); returns the voxels stored per segment.
    Names without a standard terminology entry leave a notice in target.notices (formats that store terminology)."""
    from .terminology import resolve

    if target.format == "dicom-seg":
        from .dicom_seg import write_dicom_seg

        stored = write_dicom_seg(target.path, volume, segments, target.image, target.series, automatic=automatic)
    else:
        from .segmentation_io import save_segments

        stored = save_segments(target.path, volume, segments, replace_same_name=replace_same_name,
                               notices=target.notices)
    if target.format != "labelmap":
        target.notices += [notice for notice in (resolve(s.name).notice for s in segments) if notice]
    return stored
